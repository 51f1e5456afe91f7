"""torch.compile on LoRA models: no graph break from the library, eager-equal outputs, cheap toggles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_param import (
    adapter_parameters,
    add_lora,
    disable_lora,
    enable_lora,
    iter_lora,
    lora_disabled,
    set_active_adapters,
)

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounter  # noqa: E402


def _hf_conv1d():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is an optional test dependency
        return None
    return Conv1D(16, 16)  # (nf, nx): weight stored (in, out)


class Zoo(nn.Module):
    """Every layer kind lora_param adapts: Embedding, Conv1d (plain and grouped), MHA, Linear, HF Conv1D."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=4)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.hf = _hf_conv1d()
        self.fc = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = self.dw(self.conv(h.transpose(1, 2))).transpose(1, 2)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.hf is not None:
            h = torch.tanh(self.hf(h.contiguous()))
        return self.fc(h).mean(1)


ZOO_TARGETS = ["emb", "conv", "dw", "attn", "attn.out_proj", "fc"]


def _zoo(mode: str, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = Zoo()
    targets = ZOO_TARGETS + (["hf"] if model.hf is not None else [])
    add_lora(model, targets, rank=2, mode=mode, dropout=dropout)
    with torch.no_grad():  # a non-zero update, so LoRA on and off differ
        for *_, p in iter_lora(model):
            p.lora_B.normal_(0, 0.5)
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_no_graph_break(mode):
    model = _zoo(mode, dropout=0.1)
    kinds = {p.kind for *_, p in iter_lora(model)}
    assert {"embedding", "conv", "param", "linear"} <= kinds
    for training, grad in [(True, True), (False, True), (False, False)]:
        model.train(training)
        with torch.set_grad_enabled(grad):
            dynamo.reset()
            explained = dynamo.explain(model)(_ids())
        assert explained.graph_break_count == 0, (training, grad, explained.break_reasons)
        assert explained.graph_count == 1


def _on_off_references(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager outputs with LoRA on and off, computed on copies (the compiled model stays untouched)."""
    on_model, off_model = copy.deepcopy(model), copy.deepcopy(model)
    disable_lora(off_model)
    with torch.no_grad():
        return on_model(x), off_model(x)


def test_toggling_recompiles_at_most_once():
    model = _zoo("factored").eval()
    x = _ids()
    on, off = _on_off_references(model, x)
    assert not torch.allclose(on, off)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), on, rtol=1e-6, atol=1e-6)
        assert counter.frame_count == 1
        disable_lora(model)
        torch.testing.assert_close(compiled(x), off, rtol=1e-6, atol=1e-6)
        assert counter.frame_count <= 2  # at most one recompile for the new state
        for _ in range(3):  # flipping back and forth reuses the two compiled graphs
            enable_lora(model)
            torch.testing.assert_close(compiled(x), on, rtol=1e-6, atol=1e-6)
            with lora_disabled(model):
                torch.testing.assert_close(compiled(x), off, rtol=1e-6, atol=1e-6)
        assert counter.frame_count <= 2, counter.frame_count


def test_switching_adapters_in_training_recompiles_at_most_once():
    model = _zoo("factored").train()
    add_lora(model, ["fc", "conv"], rank=2, adapter="other")
    x = _ids()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    for _ in range(3):
        for name in ("default", "other"):
            set_active_adapters(model, [name])
            compiled(x).sum().backward()
    assert counter.frame_count <= 2, counter.frame_count
    assert all(p.grad is not None for p in adapter_parameters(model))


def test_eager_no_grad_calls_in_between_cause_no_recompile():
    model = _zoo("factored").eval()
    x = _ids()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
            model(x)  # eager evaluation of the same model fills the weight cache
            compiled(x)
    assert counter.frame_count == 1, counter.frame_count


def test_switching_adapters_under_compile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    add_lora(model, rank=2, adapter="a")
    add_lora(model, rank=2, adapter="b")
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.normal_()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 8)
    outs = {}
    with torch.no_grad():
        for name in ["a", "b", "a", "b"]:
            set_active_adapters(model, [name])
            outs.setdefault(name, model(x))
            torch.testing.assert_close(compiled(x), outs[name], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs["a"], outs["b"])
    assert counter.frame_count <= 2


def test_compiled_training_matches_eager():
    """The default (inductor) backend: same loss, same adapter gradients, same trained weights."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10))
    eager = add_lora(copy.deepcopy(base), rank=2)
    with torch.no_grad():
        for *_, p in iter_lora(eager):
            p.lora_B.normal_(0, 0.1)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    opt_e = torch.optim.SGD(adapter_parameters(eager), lr=0.1)
    opt_c = torch.optim.SGD(adapter_parameters(compiled_model), lr=0.1)
    for _ in range(3):
        for model, fn, opt in ((eager, eager, opt_e), (compiled_model, compiled, opt_c)):
            opt.zero_grad()
            loss = F.cross_entropy(fn(x), y)
            loss.backward()
            opt.step()
            model._last_loss = loss.detach()
        torch.testing.assert_close(
            compiled_model._last_loss, eager._last_loss, rtol=1e-5, atol=1e-5
        )
    for a, b in zip(adapter_parameters(eager), adapter_parameters(compiled_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, p in compiled_model.named_parameters():
        if "lora_" not in name:
            assert p.grad is None  # the frozen base took no gradient
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
        with lora_disabled(compiled_model):
            torch.testing.assert_close(compiled(x), base(x), rtol=1e-5, atol=1e-5)


def _breaks(model, *args, **kwargs) -> tuple[int, list[str]]:
    dynamo.reset()
    explained = dynamo.explain(model)(*args, **kwargs)
    return explained.graph_break_count, [str(b.reason) for b in explained.break_reasons]


def test_vit_with_lora_compiles_without_graph_breaks():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=48,
        mlp_dim=96,
        num_classes=10,
    )
    add_lora(vit, ["*.self_attention", "*.self_attention.out_proj", "*.mlp.0"], rank=2)
    x = torch.randn(2, 3, 32, 32)
    for training in (True, False):
        vit.train(training)
        with torch.set_grad_enabled(training):
            assert _breaks(vit, x) == (0, [])
    assert torchvision is not None


def test_gpt2_lora_adds_no_graph_break():
    """Hugging Face code has graph breaks of its own: LoRA must not add any."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.GPT2LMHeadModel(cfg)
    model = add_lora(
        copy.deepcopy(base), ["*.c_attn", "*.c_proj", "*.c_fc", "transformer.wte"], rank=2
    )
    ids = torch.randint(0, 50, (2, 6))
    base_breaks = _breaks(base, input_ids=ids)
    assert _breaks(model, input_ids=ids) == base_breaks
