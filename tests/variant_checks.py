"""Shared checks for the LyCORIS-family variants (LoHa, LoKr): a small model, the operations
walk, the reference modules of PEFT and LyCORIS, and a tiny diffusers UNet / CLIP encoder.

Used by tests/test_variant_loha.py and tests/test_variant_lokr.py.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_param as lp

# float32: every output sums at most ~100 products of O(1) values, computed in another order
# than the reference (base and update apart, another association): differences are a few ulp
# of the largest partial sum, below 1e-5. float64 runs agree to 1e-12.
F32 = {"rtol": 1e-5, "atol": 1e-5}


class Net(nn.Module):
    """A Linear, a 3x3 Conv2d, a Conv1d and a head: the layer kinds PEFT and LyCORIS adapt."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.conv1 = nn.Conv1d(4, 8, 3)
        self.head = nn.Linear(16, 3)

    def forward(self, x, img, seq):
        return self.head(torch.relu(self.fc(x))), self.conv(img), self.conv1(seq)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def inputs(dtype=torch.float32):
    """A batch of 4 for each input (mixed batches route rows of all three layers)."""
    g = torch.Generator().manual_seed(1)
    xs = (
        torch.randn(4, 12, generator=g),
        torch.randn(4, 4, 5, 5, generator=g),
        torch.randn(4, 4, 7, generator=g),
    )
    return tuple(x.to(dtype) for x in xs)


def run(model, xs=None, grad=False):
    xs = inputs() if xs is None else xs
    with torch.set_grad_enabled(grad):
        return model(*xs)


def randomize(model, std=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lp.adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    lp.clear_lora_cache(model)
    return model


def close(a, b, **tol):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, **(tol or F32))


def peft_twin(base, config, ours):
    """PEFT's model of ``config`` on a copy of ``base``, holding the factor values of ``ours``."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    sd = pm.state_dict()
    for path, _, _, p in lp.iter_lora(ours):
        for name, t in p.tensors().items():
            key = f"base_model.model.{path.rpartition('.')[0]}.{name}.default"
            sd[key] = t.detach().reshape(sd[key].shape)
    pm.load_state_dict(sd)
    return pm


def factor_grads(model):
    """Gradients of every adapter tensor, by ``<module path>.<tensor name>``."""
    return {
        f"{path.rpartition('.')[0]}.{name}": t.grad
        for path, _, _, p in lp.iter_lora(model)
        for name, t in p.tensors().items()
    }


def walk_operations(variant, targets, **kw):
    """Every operation of the cross-product list on one model: works, or is refused clearly."""
    base = net()
    ref = run(base)
    for mode in ("factored", "materialized"):
        model = lp.add_lora(copy.deepcopy(base), targets, variant=variant, mode=mode, **kw)
        close(run(model), ref, rtol=0, atol=0)  # starts unchanged (a zero factor)
        randomize(model)
        on = run(model)
        assert (on[0] - ref[0]).abs().max() > 1e-3
        with lp.lora_disabled(model):
            close(run(model), ref, rtol=0, atol=0)  # off: the base, bit for bit
        # training forward == eval forward; gradients reach every factor only
        model.train()
        loss = sum(o.square().mean() for o in run(model, grad=True))
        loss.backward()
        assert all(g is not None for g in factor_grads(model).values())
        assert not any(p.grad is not None for n, p in model.named_parameters() if "original" in n)
        model.eval()
        close(run(model), on)  # the eval cache path
        close(run(model), on)
        assert lp.eval_cache_bytes(model) > 0
        lp.set_eval_cache(model, "never")
        close(run(model), on)
        assert lp.eval_cache_bytes(model) == 0
        lp.set_eval_cache(model, "auto")
        # merge, remove, deepcopy, dtype cast, compile
        close(run(lp.merge_lora(copy.deepcopy(model))), on)
        close(run(lp.remove_lora(copy.deepcopy(model))), ref, rtol=0, atol=0)
        close(run(copy.deepcopy(model)), on)
        double = copy.deepcopy(model).double()
        close(run(double, inputs(torch.float64)), [o.double() for o in on])
        compiled = torch.compile(copy.deepcopy(model), backend="eager")
        close(run(compiled), on)
        # strength
        twin = copy.deepcopy(model)
        lp.set_adapter_scale(twin, "default", 0.0)
        close(run(twin), ref)
        # state_dict round trip into a fresh model with the same adapter
        twin = lp.add_lora(copy.deepcopy(base), targets, variant=variant, mode=mode, **kw)
        twin.load_state_dict(model.state_dict())
        close(run(twin.eval()), on)
        # save / load
        buf = copy.deepcopy(base)
        path = f"{_tmp()}/{variant}.pt"
        lp.save_lora(model, path)
        close(run(lp.load_lora(buf, path, mode=mode)), on)
    return base, model, on


def walk_packed(variant, method, **kw):
    """On an NF4 / int8 base: off is the packed base; merges (plain and requantized) equal on."""
    base = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
    model = randomize(lp.add_lora(copy.deepcopy(base), variant=variant, quantize=method, **kw), 0.1)
    with torch.no_grad():
        on = model(x)
        with lp.lora_disabled(model):
            off = model(x)
        assert (on - off).abs().max() > 1e-3
        assert lp.eval_cache_bytes(model) == 0  # a packed base is never cached
        merged = lp.merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(merged(x), on, **F32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lp.RequantizationWarning)
            requantized = lp.merge_lora(copy.deepcopy(model), requantize=True)
        err = (requantized(x) - on).abs().max() / on.abs().max()
        assert err < 0.1  # requantizing the merged weight rounds it to the packed format
        torch.testing.assert_close(lp.remove_lora(copy.deepcopy(model))(x), off, rtol=0, atol=0)


def walk_hf_conv1d(variant, tmp_path, **kw):
    """On a Hugging Face ``Conv1D`` (weight stored ``(in, out)``): both modes compute the
    update transposed into the stored layout, and a kohya file round trip keeps it."""
    pytest.importorskip("safetensors")
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    base = nn.Sequential(conv1d(12, 8))
    x = torch.randn(3, 5, 8)
    outs = []
    for mode in ("factored", "materialized"):
        model = randomize(lp.add_lora(copy.deepcopy(base), variant=variant, mode=mode, **kw))
        p = next(p for *_, p in lp.iter_lora(model))
        assert p.fan_in_fan_out
        w = base[0].weight + p.delta().to(base[0].weight.dtype)  # stored (in, out)
        outs.append(run(model, (x,)))
        torch.testing.assert_close(outs[-1], x @ w + base[0].bias, **F32)
    torch.testing.assert_close(outs[0], outs[1], **F32)
    lp.export_kohya(model, tmp_path / "c.safetensors")
    back = lp.import_kohya(copy.deepcopy(base), tmp_path / "c.safetensors")
    torch.testing.assert_close(run(back, (x,)), outs[1], **F32)


def walk_adapters(variant, targets, **kw):
    """Two adapters: mixed batches, combine (svd; cat where the factors are exact), hot-swap."""
    base = net()
    model = lp.add_lora(copy.deepcopy(base), targets, variant=variant, adapter="a", **kw)
    lp.add_lora(model, targets, variant=variant, adapter="b", **kw)
    randomize(model)
    alone = {}
    for name in ("a", "b"):
        lp.set_active_adapters(model, name)
        alone[name] = run(model)
    lp.set_active_adapters(model, ["a", "b"])
    both = run(model)
    rows = ["a", "b", "__base__", "a"]
    with lp.mixed_adapters(model, rows):
        mixed = run(model)
    base_out = run(base)
    for i, name in enumerate(rows):
        for out, b, al in zip(mixed, base_out, alone.get(name, base_out), strict=True):
            torch.testing.assert_close(out[i], (b if name == "__base__" else al)[i], **F32)
    lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "sum", method="svd", rank=64)
    lp.set_active_adapters(model, "sum")
    close(run(model), both, rtol=1e-4, atol=1e-4)  # the sum, exact up to the SVD's rounding
    with pytest.raises(lp.LoRAError, match=f"hot-swapping does not support {variant}"):
        lp.prepare_hotswap(model, max_rank=8)
    return model


def _tmp():
    import tempfile

    return tempfile.mkdtemp()


# ---- diffusers / transformers models for kohya files -------------------------------------------


def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        sample_size=8,
        attention_head_dim=8,
    ).eval()


def tiny_text_encoder():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval()


def unet_out(model):
    g = torch.Generator().manual_seed(1)
    xs = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([10]),
        torch.randn(1, 5, 32, generator=g),
    )
    with torch.no_grad():
        return model(*xs).sample


def text_out(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(2, 10).view(1, 8)).last_hidden_state


UNET_TARGETS = ["*attn1.to_q", "*attn2.to_k", "*ff.net.2", "*resnets.0.conv1", "conv_in"]
TEXT_TARGETS = ["*q_proj", "*mlp.fc1"]


def lycoris_twin(model, sd, prefix, build=None):
    """``model`` with LyCORIS's own modules made from the file's entries (``prefix``), applied.

    ``build(stem, module, params)`` makes a module where LyCORIS's ``make_module_from_state_dict``
    cannot (None: always LyCORIS's).
    """
    pytest.importorskip("lycoris")
    from lycoris.modules import get_module, make_module

    twin = copy.deepcopy(model)
    names = {}
    for n, m in twin.named_modules():
        names[f"{prefix}_{n}".replace(".", "_")] = m
        names[f"{prefix}_text_model_{n}".replace(".", "_")] = m
    made = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stem in sorted({k.split(".")[0] for k in sd if k.startswith(prefix + "_")}):
            kind, params = get_module(sd, stem)
            module = build(stem, names[stem], sd) if build else None
            if module is None:
                module = make_module(kind, params, stem, names[stem])
            module.apply_to()
            made.append(module)
    twin._lycoris_modules = made  # keep them alive
    return twin
