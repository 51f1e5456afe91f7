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
    # No skip on failure: bitsandbytes is installed, so a layer that does not run here is a
    # broken integration, not a missing dependency.
    layer = layer.to("cpu")  # quantizes
    layer(torch.randn(1, 64))
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


def _nf4_pair(shape, dtype=torch.float32):
    """Our packed codes and float32 absmax of a random weight."""
    from lora_param.quant.blockwise import quantize_nf4

    weight = torch.randn(shape, dtype=dtype)
    codes, absmax = quantize_nf4(weight, 64, False)
    return codes, absmax.view(torch.float32) if absmax.dtype != torch.float32 else absmax


@pytest.mark.parametrize("shape", [(32, 64), (7, 32), (48, 32), (33, 65), (64, 64), (7, 64)])
def test_bitsandbytes_kernel_gives_our_values_or_is_refused(shape):
    """kernel="bitsandbytes" never gives other values than kernel="torch": where its CPU kernel
    mixes up block scales (rows that are not a multiple of the block size), it is refused."""
    pytest.importorskip("bitsandbytes")
    from lora_param.quant import kernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(shape[1], shape[0]))
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    codes, absmax = _nf4_pair(shape)
    theirs = kernels.dequantize_nf4_bitsandbytes(codes, absmax, shape, torch.float32, 64)
    from lora_param.quant.blockwise import dequantize_nf4

    agrees = torch.equal(theirs, dequantize_nf4(codes, absmax, shape, torch.float32, 64))
    if not agrees:
        before = copy.deepcopy(model)
        with pytest.raises(LoRAError, match="other values"):
            lp.quantize_base(model, kernel="bitsandbytes")
        assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before[0].weight)
        return
    fast = lp.quantize_base(copy.deepcopy(model), kernel="bitsandbytes")
    x = torch.randn(3, shape[1])
    with torch.no_grad():
        assert torch.equal(fast[0].weight, plain[0].weight)
        assert torch.equal(fast(x), plain(x))


def test_bitsandbytes_cpu_kernel_is_wrong_for_rows_off_the_block_size():
    """Why "auto" does not use bitsandbytes on the CPU (bitsandbytes 0.50.2): keep this test
    to notice when a bitsandbytes release fixes its native kernel."""
    pytest.importorskip("bitsandbytes")
    from lora_param.quant import kernels
    from lora_param.quant.blockwise import dequantize_nf4

    codes, absmax = _nf4_pair((48, 32))
    theirs = kernels.dequantize_nf4_bitsandbytes(codes, absmax, (48, 32), torch.float32, 64)
    ours = dequantize_nf4(codes, absmax, (48, 32), torch.float32, 64)
    if torch.equal(theirs, ours):
        pytest.xfail("this bitsandbytes build dequantizes (48, 32) right; auto could use it")
    assert not torch.equal(theirs, ours)


def _count_bitsandbytes_calls(monkeypatch) -> list[tuple[int, ...]]:
    from lora_param.quant import kernels

    calls: list[tuple[int, ...]] = []
    real = kernels.dequantize_nf4_bitsandbytes

    def counting(codes, absmax, shape, dtype, block_size):
        calls.append(tuple(shape))
        return real(codes, absmax, shape, dtype, block_size)

    monkeypatch.setattr(kernels, "dequantize_nf4_bitsandbytes", counting)
    return calls


def test_auto_kernel_on_cpu_never_imports_bitsandbytes():
    """import lora_param, add_lora(quantize="nf4"), train and evaluate: no bitsandbytes."""
    code = (
        "import sys, torch, lora_param as lp\n"
        "m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 7))\n"
        "lp.add_lora(m, rank=2, quantize='nf4')\n"
        "m(torch.randn(3, 64)).sum().backward()\n"
        "with torch.no_grad(): m(torch.randn(3, 64))\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr
    assert "gemm_4bit" not in out.stderr


def test_auto_kernel_checks_bitsandbytes_per_shape(monkeypatch):
    """Where "auto" may use bitsandbytes (CUDA; here the CPU, pretending), each shape's first
    result is compared with ours: shapes that agree use bitsandbytes, others ours (warned)."""
    pytest.importorskip("bitsandbytes")
    from lora_param.quant import kernels

    monkeypatch.setattr(kernels, "AUTO_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(kernels, "_CHECKED", {})
    monkeypatch.setattr(kernels, "_FAILED_ON", set())
    calls = _count_bitsandbytes_calls(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 4))
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    auto = lp.quantize_base(copy.deepcopy(model))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="other values"):
        for layer, reference in zip(auto, plain, strict=True):
            assert torch.equal(layer.weight, reference.weight)
    assert set(calls) == {(32, 64), (48, 32), (4, 48)}
    assert kernels._CHECKED[("cpu", (32, 64), torch.float32, 64)] is True
    assert kernels._CHECKED[("cpu", (48, 32), torch.float32, 64)] is False
    calls.clear()
    with torch.no_grad():
        for layer, reference in zip(auto, plain, strict=True):
            assert torch.equal(layer.weight, reference.weight)
    assert (48, 32) not in calls and (32, 64) in calls  # checked once: no second comparison


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
    from lora_param.quant import kernels

    def broken(*args):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(kernels, "dequantize_nf4_bitsandbytes", broken)
    monkeypatch.setattr(kernels, "AUTO_DEVICE_TYPES", frozenset({"cpu"}))
    monkeypatch.setattr(kernels, "_CHECKED", {})
    monkeypatch.setattr(kernels, "_FAILED_ON", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    plain = lp.quantize_base(copy.deepcopy(model), kernel="torch")
    auto = lp.quantize_base(copy.deepcopy(model))
    with pytest.warns(RuntimeWarning, match="dequantize failed on cpu"):
        assert torch.equal(auto[0].weight, plain[0].weight)
    assert torch.equal(auto[0].weight, plain[0].weight)  # warned once, then ours directly
    required = copy.deepcopy(model)
    with pytest.raises(LoRAError, match="no kernel"):
        lp.quantize_base(required, kernel="bitsandbytes")  # checked before changing the model
    assert type(required[0]) is nn.Linear


@pytest.mark.parametrize("ran", [False, True], ids=["fresh", "after_forward"])
def test_linear8bit_state_dict_carries_its_row_scales(ran):
    """An adapted Linear8bitLt saves its row scales (SCB) and loads them, before and after its
    first forward (which moves them into the matmul state), into a model on other weights."""
    model = _bnb_model("8bit")
    lp.add_lora(model, rank=2)
    x = torch.randn(3, 64)
    if ran:
        with torch.no_grad():
            model(x)
    state = model.state_dict()
    assert "0.SCB" in state
    torch.manual_seed(1)
    other = _bnb_model("8bit")
    with torch.no_grad():
        other[0].weight.data.copy_(torch.randint(-127, 127, other[0].weight.shape))
    lp.add_lora(other, rank=2)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_linear4bit_repacked_for_cpu_inference_reads_right():
    """bitsandbytes' Linear4bit eval forward on an AVX512-BF16 CPU repacks its weight in place
    (its CPU inference layout); an adapter added afterwards must read the weight right."""
    modules = pytest.importorskip("bitsandbytes.nn.modules")
    convert = getattr(modules, "_convert_weight_packed_for_cpu", None)
    if convert is None:
        pytest.skip("this bitsandbytes has no CPU inference layout")
    bnb = pytest.importorskip("bitsandbytes")
    model = _bnb_model("4bit")
    weight = model[0].weight
    plain = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    weight.data, weight.quant_state = convert(weight.data, weight.quant_state)  # as eval does
    lp.add_lora(model, ["0"], rank=2, mode="materialized")
    x = torch.randn(3, 64)
    with torch.no_grad():
        read = model[0].weight
        # bfloat16 block scales: 2^-8 relative; the layer computes with what it reads.
        torch.testing.assert_close(read, plain, rtol=0.01, atol=1e-6)
        with lp.lora_disabled(model):
            off = model[0](x)
        torch.testing.assert_close(off, x @ read.t() + model[0].bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_layer_sharded_by_fsdp2_is_refused(kind):
    """fully_shard turns bitsandbytes' packed parameter into a plain one without its
    quantization state (torch.chunk returns plain tensors: bitsandbytes#1424); the forward then
    raises LoRAError naming the fix instead of an AttributeError deep in bitsandbytes. The
    plain Parameter below is what FSDP2 leaves there (checked on 2 gloo ranks when written)."""
    model = _bnb_model(kind)
    lp.add_lora(model, rank=4)
    plist = model[0].parametrizations.weight
    plist.original = nn.Parameter(plist.original.data.clone(), requires_grad=False)
    with pytest.raises(LoRAError, match=r"sharded.*FSDP2.*quantize='nf4'"):
        model(torch.randn(2, 64))
