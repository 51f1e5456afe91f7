"""LoRA on layers bitsandbytes quantized (Linear4bit, Linear8bitLt), on the CPU."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError, RequantizationWarning


def _bnb_model(kind: str) -> nn.Sequential:
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
    try:
        layer = layer.to("cpu")  # quantizes
        layer(torch.randn(1, 64))
    except Exception as error:  # a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes cannot run {kind} layers on this CPU: {error}")
    return nn.Sequential(layer, nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_lora_beside_bitsandbytes_layers(kind):
    model = _bnb_model(kind)
    layer_type = type(model[0])
    packed = model[0].weight
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
    lp.add_lora(model, rank=4)
    assert lp.list_adapters(model) == ["default"]
    with torch.no_grad():
        for *_, p in lp.iter_lora(model):
            p.lora_B.normal_(0, 0.1)
    with torch.no_grad(), lp.lora_disabled(model):
        assert torch.equal(model(x), before)  # bitsandbytes' own forward, bit for bit
    model(x).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {
        "0.parametrizations.weight.1.lora_A",
        "0.parametrizations.weight.1.lora_B",
        "2.parametrizations.weight.0.lora_A",
        "2.parametrizations.weight.0.lora_B",
    }
    assert set(lp.lora_state_dict(model)) == {
        "default.0.weight.lora_A",
        "default.0.weight.lora_B",
        "default.2.weight.lora_A",
        "default.2.weight.lora_B",
    }
    with torch.no_grad():
        lora_on = model(x)

    merged = copy.deepcopy(model)
    lp.merge_lora(merged)
    assert type(merged[0]) is nn.Linear and merged[0].weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora_on, atol=1e-4, rtol=1e-4)

    kept = copy.deepcopy(model)
    with pytest.warns(RequantizationWarning):
        lp.merge_lora(kept, requantize=True)
    assert type(kept[0]) is layer_type and type(kept[0].weight) is type(packed)

    lp.remove_lora(model)
    assert type(model[0]) is layer_type and model[0].weight is packed
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_bitsandbytes_layers_without_bitsandbytes(monkeypatch):
    fake = type("Linear4bit", (nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    model = nn.Sequential(fake(8, 8), nn.Linear(8, 2))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(LoRAError, match="pip install"):
        lp.add_lora(model, rank=2)
    assert type(model[0]) is fake and not lp.list_adapters(model)


def test_bitsandbytes_kernel_gives_the_same_values():
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 7))  # 7: odd, the torch path
    fast = lp.quantize_base(copy.deepcopy(model), kernel="bitsandbytes")
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fast[0].weight, plain[0].weight)
        assert torch.equal(fast(x), plain(x))
    for dtype in (torch.bfloat16, torch.float16):
        fast = lp.quantize_base(copy.deepcopy(model), compute_dtype=dtype, kernel="bitsandbytes")
        plain = lp.quantize_base(copy.deepcopy(model), compute_dtype=dtype, kernel="torch")
        assert torch.equal(fast[0].weight, plain[0].weight)


def _count_bitsandbytes_calls(monkeypatch) -> list[tuple[int, ...]]:
    from lora_param.quant import weight

    calls: list[tuple[int, ...]] = []
    real = weight.dequantize_nf4_bitsandbytes

    def counting(codes, absmax, shape, dtype, block_size):
        calls.append(tuple(shape))
        return real(codes, absmax, shape, dtype, block_size)

    monkeypatch.setattr(weight, "dequantize_nf4_bitsandbytes", counting)
    return calls


def test_auto_kernel_uses_bitsandbytes_where_installed(monkeypatch):
    pytest.importorskip("bitsandbytes")
    calls = _count_bitsandbytes_calls(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Linear(32, 7), nn.Linear(7, 4), nn.Linear(4, 2, dtype=torch.float64)
    )
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    lp.add_lora(model, rank=2, quantize="nf4")  # the default kernel is "auto"
    x = torch.randn(3, 64)
    with torch.no_grad(), lp.lora_disabled(model):
        assert torch.equal(model[0](x), plain[0](x))
        for layer, reference in zip(model, plain, strict=True):
            assert torch.equal(layer.weight, reference.weight)
    # bitsandbytes where its kernel runs natively (float32, even rows); ours for an odd row
    # length (4, 7) and for float64
    assert set(calls) == {(32, 64), (7, 32)}
    calls.clear()
    with torch.no_grad():
        lp.quantize_base(nn.Linear(64, 32), kernel="torch")(x)
    assert calls == []


def test_auto_kernel_without_bitsandbytes(monkeypatch):
    from lora_param.quant import kernels

    calls = _count_bitsandbytes_calls(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    kernels.bitsandbytes_runs.cache_clear()
    try:
        model = lp.quantize_base(nn.Sequential(nn.Linear(64, 32)))
        with torch.no_grad():
            assert model(torch.randn(2, 64)).shape == (2, 32)
        assert calls == []
    finally:
        kernels.bitsandbytes_runs.cache_clear()


def test_bitsandbytes_kernel_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(LoRAError, match="pip install"):
        lp.quantize_base(model, kernel="bitsandbytes")
    with pytest.raises(LoRAError, match="kernel must be"):
        lp.quantize_base(model, kernel="cuda")
    assert type(model[0]) is nn.Linear


def test_auto_kernel_falls_back_when_bitsandbytes_fails(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lora_param.quant import kernels, weight

    def broken(*args):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(weight, "dequantize_nf4_bitsandbytes", broken)
    monkeypatch.setattr(kernels, "_FAILED_ON", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    auto = lp.quantize_base(copy.deepcopy(model))
    with pytest.warns(RuntimeWarning, match="dequantize failed on cpu"):
        assert torch.equal(auto[0].weight, plain[0].weight)
    assert torch.equal(auto[0].weight, plain[0].weight)  # warned once, then ours directly
    required = lp.quantize_base(copy.deepcopy(model), kernel="bitsandbytes")
    with pytest.raises(RuntimeError, match="no kernel"):
        _ = required[0].weight
