"""mixed_adapters: per-example adapters in one batch, exact against each adapter alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    LoRAParametrization,
    add_lora,
    iter_lora,
    lora_disabled,
    set_active_adapters,
)
from lora_param.routing import mixed_adapters

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _hf_conv1d(nf: int, nx: int) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return transformers.pytorch_utils.Conv1D(nf, nx)


class Zoo(nn.Module):
    """Embedding -> grouped reflect-padded Conv1d -> Conv2d -> HF Conv1D -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2, padding_mode="reflect")
        self.conv2d = nn.Conv2d(2, 4, 3, padding=1)
        self.hf = _hf_conv1d(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (N, L, 8)
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        n, length, _ = h.shape
        img = self.conv2d(h.reshape(n, length, 2, 4).transpose(1, 2))  # (N, 4, L, 4)
        h = h + img.permute(0, 2, 1, 3).reshape(n, length, 16)[..., :8]
        return self.fc(torch.tanh(self.hf(h)))


def _randomize(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_A.copy_(torch.randn(p.lora_A.shape, generator=g) * 0.5)
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.5)


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    model = Zoo()
    add_lora(model, rank=2, adapter="a")
    add_lora(model, ["conv", "hf", "fc"], rank={"fc": 4, "*": 3}, alpha=7, adapter="b")
    add_lora(model, ["emb", "conv2d"], rank=1, use_rslora=True, alpha=3, adapter="c")
    _randomize(model)
    return model


def _ids(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 30, (n, 5), generator=torch.Generator().manual_seed(seed))


NAMES = ["a", "b", "__base__", "c", "b", "a"]


def _alone(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "__base__":
        with lora_disabled(model):
            return model(x)
    set_active_adapters(model, [name])
    return model(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_each_example_equals_its_adapter_alone(grad):
    model = _zoo().eval()
    x = _ids()
    with torch.set_grad_enabled(grad):
        with mixed_adapters(model, NAMES):
            mixed = model(x)
        for i, name in enumerate(NAMES):
            torch.testing.assert_close(mixed[i], _alone(model, x[i : i + 1], name)[0], **TOL)


def test_base_rows_are_bit_exact_and_adapters_change_rows():
    model = _zoo().eval()
    x = _ids()
    with torch.no_grad():
        with mixed_adapters(model, NAMES):
            mixed = model(x)
        with lora_disabled(model):
            base = model(x)
    assert torch.equal(mixed[2], base[2])
    for i in (0, 1, 3):
        assert not torch.allclose(mixed[i], base[i], atol=1e-3)


def test_outside_the_block_the_model_is_unchanged():
    model = _zoo().eval()
    x = _ids()
    with torch.no_grad():
        before = model(x)
        with mixed_adapters(model, NAMES):
            model(x)
        assert torch.equal(model(x), before)
    assert not any("_lora_route" in m.__dict__ for m in model.modules())


def test_stacked_factors_follow_in_place_updates():
    model = _zoo().eval()
    x = _ids()
    with torch.no_grad(), mixed_adapters(model, NAMES):
        first = model(x)
        for path, _, _, p in iter_lora(model):
            if p.adapter == "b" and path == "fc.weight":
                p.lora_B.mul_(2)  # what an optimizer step does: a version bump
        second = model(x)
    assert torch.equal(first[0], second[0])  # adapter a untouched
    assert not torch.allclose(first[1], second[1])
    set_active_adapters(model, ["b"])
    with torch.no_grad():
        torch.testing.assert_close(second[1], model(x[1:2])[0], **TOL)


def test_mixed_batch_trains_each_adapter_on_its_rows():
    model = _zoo().train()
    x = _ids()
    with mixed_adapters(model, NAMES):
        model(x).square().sum().backward()
    mixed = {(path, p.adapter): p.lora_B.grad.clone() for path, _, _, p in iter_lora(model)}
    model.zero_grad()
    set_active_adapters(model, ["a"])
    model(x[[0, 5]]).square().sum().backward()
    for path, _, _, p in iter_lora(model):
        if p.adapter == "a":
            torch.testing.assert_close(mixed[(path, "a")], p.lora_B.grad, **TOL)


def test_repeated_rows_follow_their_example():
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    add_lora(model, rank=2, adapter="a")
    add_lora(model, rank=2, adapter="b")
    _randomize(model)
    x = torch.randn(2, 6)
    expanded = x.repeat_interleave(3, dim=0)  # what beam search does with num_beams=3
    with torch.no_grad():
        with mixed_adapters(model, ["a", "b"]):
            out = model(expanded)
            with pytest.raises(LoRAError, match="not a multiple"):
                model(torch.randn(5, 6))
        for i, name in enumerate(["a", "b"]):
            set_active_adapters(model, [name])
            ref = model(x[i : i + 1])
            torch.testing.assert_close(out[3 * i : 3 * i + 3], ref.expand(3, -1), **TOL)


def _enter(model: nn.Module, names) -> None:
    with mixed_adapters(model, names):
        pass


def test_unknown_names_are_listed_and_nothing_changes():
    model = _zoo()
    with pytest.raises(LoRAError, match=r"'typo'.*\['a', 'c', 'b'\]"):
        _enter(model, ["a", "typo"])
    with pytest.raises(LoRAError, match="one adapter name per example"):
        _enter(model, "a")
    assert not any("_lora_route" in m.__dict__ for m in model.modules())


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_directly_read_tensors_are_refused_by_name_or_left_at_base():
    torch.manual_seed(0)
    model = _Attn()
    add_lora(model, ["attn"], rank=2, adapter="attn_only")
    add_lora(model, ["attn.out_proj"], rank=2, adapter="out")
    add_lora(model, ["fc"], rank=2, adapter="fc_only")
    _randomize(model)
    model.eval()
    with pytest.raises(LoRAError, match=r"attn\.in_proj_weight \('attn_only'\)"):
        _enter(model, ["attn_only", "fc_only"])
    with pytest.raises(LoRAError, match=r"attn\.out_proj\.weight \('out'\)"):
        _enter(model, ["out", "fc_only"])
    # Adapters on MHA that are not in the mix: MHA reads its base weights, exactly.
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        with mixed_adapters(model, ["fc_only", "__base__"]):
            mixed = model(x)
        for i, name in enumerate(["fc_only", "__base__"]):
            torch.testing.assert_close(mixed[i], _alone(model, x[i : i + 1], name)[0], **TOL)


class _Head(nn.Module):
    """Conv features, a LayerNorm, a Linear head: places for copies and DoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(2).mean(-1).repeat(1, 4)  # (n, 16)
        return self.head(torch.tanh(self.body(self.norm(h))))


def _perturb_copies(model: nn.Module, seed: int = 2) -> None:
    from lora_param import iter_copies

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, c in iter_copies(model):
            c.value.add_(torch.randn(c.value.shape, generator=g) * 0.3)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_dora_heads_and_biases_route_per_example(grad):
    """Rows of an adapter with a trained head, trained biases or DoRA equal that adapter alone
    (PEFT routes modules_to_save per example); "__base__" rows are the base model."""
    torch.manual_seed(0)
    model = _Head()
    add_lora(model, ["conv", "body"], rank=2, adapter="plain")
    add_lora(model, ["body"], rank=2, trainable=["head"], adapter="headed")
    add_lora(model, ["conv", "body"], rank=2, bias="all", adapter="biased")
    add_lora(model, ["conv", "body", "head"], rank=2, use_dora=True, adapter="dora")
    _randomize(model)
    _perturb_copies(model)
    x = torch.randn(6, 2, 4, 4)
    names = ["plain", "headed", "__base__", "biased", "dora", "headed"]
    model.eval()
    with torch.set_grad_enabled(grad):
        with mixed_adapters(model, names):
            mixed = model(x)
        if grad:
            mixed.square().sum().backward()
        for i, name in enumerate(names):
            alone = _alone(model, x[i : i + 1], name)
            torch.testing.assert_close(mixed[i], alone[0], **TOL)
    if grad:  # every adapter in the mix got gradients from its rows (heads and biases too)
        from lora_param import adapter_parameters

        for name in set(names) - {"__base__"}:
            assert all(t.grad is not None for t in adapter_parameters(model, name)), name


def test_packed_conv_and_hf_conv1d_route_with_gradients():
    """Mixed batches on packed (quantized) Conv2d and HF Conv1D layers, training."""
    from lora_param import quantize_base

    torch.manual_seed(0)
    model = Zoo()
    quantize_base(model, ["conv2d", "hf", "fc"], method="nf4")
    add_lora(model, rank=2, adapter="a")
    add_lora(model, ["conv2d", "hf"], rank=3, adapter="b")
    _randomize(model)
    x = _ids(4)
    names = ["a", "b", "__base__", "a"]
    with mixed_adapters(model, names):
        mixed = model(x)
    mixed.square().sum().backward()
    with torch.no_grad():
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], _alone(model, x[i : i + 1], name)[0], **TOL)


def test_changing_the_mix_does_not_recompile():
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.testing import CompileCounter

    dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    add_lora(model, rank=2, adapter="a")
    add_lora(model, ["1"], rank=3, adapter="b")
    add_lora(model, ["0", "3"], rank=1, adapter="c")
    _randomize(model)
    model.eval()
    x = _ids(4)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    mixes = [["a", "b", "c", "a"], ["__base__", "c", "c", "b"], ["b"] * 4, ["a", "b", "c", "a"]]
    with torch.no_grad():
        for names in mixes:
            with mixed_adapters(model, names):
                out = compiled(x)
                torch.testing.assert_close(out, model(x), **TOL)
    assert counter.frame_count == 1, counter.frame_count
    dynamo.reset()


def test_beam_search_generation_routes_each_example():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=40, bos_token_id=0,
        eos_token_id=39,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    add_lora(model, ["*.c_attn", "*.c_fc"], rank=2, adapter="a")
    add_lora(model, ["*.c_proj", "transformer.wte"], rank=4, adapter="b")
    _randomize(model)
    prompts = torch.randint(1, 39, (3, 4), generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "__base__"]
    kwargs = {"max_new_tokens": 5, "num_beams": 2, "do_sample": False, "pad_token_id": 39}
    with torch.no_grad():
        with mixed_adapters(model, names):
            mixed = model.generate(prompts, **kwargs)
        alone = [_generate_alone(model, prompts[i : i + 1], n, kwargs) for i, n in enumerate(names)]
    for i, ref in enumerate(alone):
        assert torch.equal(mixed[i], ref[0]), (names[i], mixed[i], ref[0])
    assert len({tuple(r[0].tolist()) for r in alone}) > 1  # the adapters do change the text


def _generate_alone(model, prompt, name, kwargs):
    if name == "__base__":
        with lora_disabled(model):
            return model.generate(prompt, **kwargs)
    set_active_adapters(model, [name])
    return model.generate(prompt, **kwargs)


def test_quantized_base_is_computed_once_by_its_packed_forward():
    from lora_param import quantize_base

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8))
    quantize_base(model, method="int8")
    add_lora(model, rank=2, adapter="a")
    add_lora(model, ["2"], rank=3, adapter="b")
    _randomize(model)
    x = torch.randn(3, 64)
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        with mixed_adapters(model.eval(), names):
            mixed = model(x)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], _alone(model, x[i : i + 1], name)[0], **TOL)
