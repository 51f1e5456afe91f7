"""Where two features meet: each combination issue 18 found wrong, reproduced and checked."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _perturb(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lp.adapter_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("requantize", [False, True])
def test_dora_on_a_packed_base_merges_with_its_magnitude(method, requantize):
    """Bug 1: the merge of DoRA into a packed base dropped the magnitude (30-34% off)."""
    model = lp.add_lora(_mlp(), rank=4, use_dora=True, quantize=method)
    _perturb(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        on = model(x)
    merged = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lp.RequantizationWarning)
        lp.merge_lora(merged, requantize=requantize)
    with torch.no_grad():
        error = float((merged(x) - on).norm() / on.norm())
    # exact in the compute dtype; requantized: NF4/int8's own rounding of the merged weight
    assert error < ({"nf4": 0.2, "int8": 0.02}[method] if requantize else 1e-5)
    if requantize:
        plain = lp.merge_lora(copy.deepcopy(model))
        with torch.no_grad():
            assert float((merged(x) - plain(x)).norm() / on.norm()) < error + 1e-6


def test_dora_eval_cache_bytes_and_never():
    """Bug 2: eval_cache_bytes raised IndexError on DoRA; DoRA ignored "never"."""
    model = lp.add_lora(nn.Sequential(nn.Linear(8, 8)), rank=2, use_dora=True).eval()
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert lp.eval_cache_bytes(model) == 8 * 8 * 4
    lp.set_eval_cache(model, "never")
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert lp.eval_cache_bytes(model) == 0


@pytest.mark.parametrize("mode", ["materialized", "factored"])
def test_a_packed_base_is_never_cached(mode):
    """Bug 3: a packed weight was cached in materialized mode and on MHA's out_proj."""
    model = lp.add_lora(nn.Sequential(nn.Linear(64, 64)), rank=2, quantize="nf4", mode=mode)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert lp.eval_cache_bytes(model) == 0
    mha = nn.MultiheadAttention(64, 2, batch_first=True)
    lp.quantize_base(mha, ["out_proj"])
    lp.add_lora(mha, ["out_proj"], rank=2, mode=mode)
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        mha.eval()(x, x, x)
    assert lp.eval_cache_bytes(mha) == 0


def test_dora_in_float64_trains_in_both_modes():
    """Bug 7: DoRA's norm raised on a float64 model (vector_norm(dtype=float32))."""
    for mode in ("factored", "materialized"):
        model = lp.add_lora(nn.Sequential(nn.Linear(8, 8)), rank=2, use_dora=True, mode=mode)
        model.double()
        x = torch.randn(3, 8, dtype=torch.float64)
        out = model(x)
        out.sum().backward()
        assert out.dtype == torch.float64
        merged = lp.merge_lora(copy.deepcopy(model))
        with torch.no_grad():
            torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)


def _bnb_layer(kind: str) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(
            dense.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        layer.bias = nn.Parameter(dense.bias.data.clone())
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    layer(torch.randn(1, 64))
    return layer


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_merge_with_trained_biases(kind):
    """Bug 6: merge_lora on a bitsandbytes layer whose bias the adapter trains raised."""
    model = nn.Sequential(_bnb_layer(kind), nn.ReLU(), nn.Linear(32, 4))
    lp.add_lora(model, rank=2, bias="lora_only")
    _perturb(model)
    x = torch.randn(3, 64)
    with torch.no_grad():
        on = model(x)
    merged = lp.merge_lora(copy.deepcopy(model))
    assert type(merged[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(merged(x), on, **TOL)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_files_load_into_a_bitsandbytes_base(kind, tmp_path):
    """load_lora, combine_adapters and import_peft into a bitsandbytes base were refused."""
    pytest.importorskip("safetensors")
    source = nn.Sequential(_bnb_layer(kind), nn.ReLU(), nn.Linear(32, 4))
    lp.add_lora(source, rank=2, adapter="a")
    lp.add_lora(source, rank=2, adapter="b")
    _perturb(source)
    x = torch.randn(3, 64)
    lp.save_lora(source, tmp_path / "a.pt", adapter="a")
    lp.export_peft(source, tmp_path / "peft", adapter="a")
    with torch.no_grad():
        lp.set_active_adapters(source, ["a"])
        only_a = source(x)
        lp.enable_lora(source)
        both = source(x)
    for load in (
        lambda m: lp.load_lora(m, tmp_path / "a.pt"),
        lambda m: lp.import_peft(m, tmp_path / "peft", adapter="a"),
    ):
        target = nn.Sequential(_bnb_layer(kind), nn.ReLU(), nn.Linear(32, 4))  # the same base
        load(target)
        with torch.no_grad():
            torch.testing.assert_close(target(x), only_a, **TOL)
    lp.combine_adapters(source, {"a": 1.0, "b": 1.0}, "ab")
    with torch.no_grad():
        lp.set_active_adapters(source, ["ab"])
        torch.testing.assert_close(source(x), both, **TOL)


def _headed(adapter: str, seed: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    lp.add_lora(model, ["0"], rank=2, trainable=["2"], bias="lora_only", adapter=adapter)
    _perturb(model, seed)
    return model


def test_combine_carries_heads_over_and_refuses_two_of_the_same():
    model = _headed("a", 1)
    lp.add_lora(model, ["0"], rank=2, adapter="b")
    _perturb(model, 2)
    x = torch.randn(4, 8)
    lp.combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    with torch.no_grad():
        lp.enable_lora(model, ["a", "b"])
        lp.disable_lora(model, "ab")
        both = model(x)
        lp.set_active_adapters(model, ["ab"])
        torch.testing.assert_close(model(x), both, **TOL)  # a's head and bias came along
    lp.add_lora(model, ["0"], rank=2, trainable=["2"], adapter="c")
    with pytest.raises(LoRAError, match="both train '2.weight'"):
        lp.combine_adapters(model, {"ab": 1.0, "c": 1.0}, "abc")
    assert "abc" not in lp.list_adapters(model)


def test_base_checkpoint_and_counts_with_trained_copies():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    base_state = copy.deepcopy(plain.state_dict())
    model = copy.deepcopy(plain)
    base_params = sum(p.numel() for p in plain.parameters())
    lp.add_lora(model, ["0"], rank=2, trainable=["2"], bias="all")
    counts = lp.parameter_counts(model)
    assert counts.base == base_params  # the copies are the adapter's, not base
    assert counts.lora == 2 * (8 + 16) + (16 * 3 + 3) + 16  # factors, head, fc1's bias copy
    lp.load_base_state_dict(model, base_state, strict=True)  # complete: accepted


def test_hotswap_copies_heads_and_biases_in_place(tmp_path):
    source = _headed("default", 3)
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected = source(x)
    lp.save_lora(source, tmp_path / "s.pt")
    target = _headed("default", 4)
    lp.prepare_hotswap(target, max_rank=4)
    lp.hotswap_lora(target, tmp_path / "s.pt")
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, **TOL)
