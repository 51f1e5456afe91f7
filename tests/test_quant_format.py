"""NF4 / int8 packing: round to nearest, layout, chunking, and agreement with bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_param.quant import blockwise, int8
from lora_param.quant.blockwise import (
    dequantize_blockwise_8bit,
    dequantize_nf4,
    quantize_blockwise_8bit,
    quantize_nf4,
)
from lora_param.quant.codebooks import NF4_VALUES, dynamic_map, nf4_code
from lora_param.quant.int8 import dequantize_int8, quantize_int8


def _unpack(codes: torch.Tensor, n: int) -> torch.Tensor:
    flat = codes.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:n].long()


def _trained_weight() -> torch.Tensor:
    """A weight after a few hundred Adam steps: heavier tails than its Gaussian init."""
    torch.manual_seed(1)
    layer = nn.Linear(128, 96)
    target = nn.Linear(128, 96)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    for _ in range(150):
        x = torch.randn(64, 128)
        loss = (layer(x) - target(x).pow(3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.weight.detach().clone()


def test_nf4_codes_are_nearest_code_book_values():
    w = torch.randn(37, 19)  # 703 values: a short last block and an odd count
    codes, absmax = quantize_nf4(w, 64, double_quant=False)
    assert codes.shape == (352, 1) and codes.dtype == torch.uint8
    assert absmax.shape == (11,)
    flat = w.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, 11 * 64 - flat.numel()))
    assert torch.equal(absmax, padded.view(11, 64).abs().amax(1))
    scaled = (padded.view(11, 64) / absmax[:, None]).reshape(-1)[: flat.numel()]
    distance = (scaled[:, None] - nf4_code()[None, :]).abs()
    chosen = distance.gather(1, _unpack(codes, flat.numel())[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(1).values + 1e-6)
    assert codes.reshape(-1)[-1] & 15 == 7  # the odd element pads with the code of 0.0


def test_chunked_quantization_is_identical(monkeypatch):
    w = torch.randn(40, 50, dtype=torch.bfloat16)
    whole = quantize_nf4(w, 64, double_quant=True)
    rows_whole = quantize_int8(w)
    monkeypatch.setattr(blockwise, "_CHUNK", 128)
    monkeypatch.setattr(int8, "_CHUNK", 100)
    chunked = quantize_nf4(w, 64, double_quant=True)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(rows_whole, quantize_int8(w), strict=True):
        assert torch.equal(a, b)
    absmax = dequantize_blockwise_8bit(chunked[1], chunked[2]) + chunked[3]
    assert torch.equal(
        dequantize_nf4(chunked[0], absmax, (40, 50), torch.bfloat16, 64),
        dequantize_nf4(whole[0], absmax, (40, 50), torch.bfloat16, 64),
    )


def test_double_quant_scales_round_to_nearest():
    values = torch.rand(700) * 3 - 1
    codes, nested = quantize_blockwise_8bit(values)
    assert nested.shape == (3,)
    code = dynamic_map()
    scaled = values / nested.repeat_interleave(256)[:700]
    best = (scaled[:, None] - code[None, :]).abs().min(1).values
    got = (scaled - code[codes.long()]).abs()
    assert torch.all(got <= best + 1e-7)


def test_nf4_error_and_int8_error():
    w = torch.randn(256, 256)
    codes, *scales = quantize_nf4(w, 64, double_quant=True)
    absmax = dequantize_blockwise_8bit(scales[0], scales[1]) + scales[2]
    nf4_error = (dequantize_nf4(codes, absmax, (256, 256), torch.float32, 64) - w).norm() / w.norm()
    assert 0.05 < nf4_error < 0.11  # 4 bits: ~0.09 on a Gaussian
    q, row_max = quantize_int8(w)
    assert q.dtype == torch.int8 and row_max.shape == (256,)
    assert torch.equal(q.abs().amax(1), torch.full((256,), 127, dtype=torch.int8))
    int8_error = (dequantize_int8(q, row_max, (256, 256), torch.float32) - w).norm() / w.norm()
    assert int8_error < 0.01


def test_code_books_match_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_map(), functional.create_dynamic_map())
    assert torch.equal(nf4_code(), functional.get_4bit_type("nf4", device="cpu"))
    assert len(NF4_VALUES) == 16


@pytest.mark.parametrize("source", ["gaussian", "trained"])
def test_same_codes_and_values_as_bitsandbytes(source):
    functional = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(384, 512) if source == "gaussian" else _trained_weight()
    ours = quantize_nf4(w, 64, double_quant=True)
    packed, state = functional.quantize_4bit(
        w, blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    # 4-bit codes come from the exact absmax in both: identical, not merely 99.9%.
    assert packed.shape == ours[0].shape
    assert torch.equal(packed, ours[0])
    assert torch.equal(state.offset.reshape(1), ours[3])  # ours is 1-D (FSDP2 shards it)
    assert torch.equal(state.state2.absmax, ours[2])
    # Nested 8-bit scale codes: bitsandbytes' CPU kernel does not always round to nearest
    # (its CUDA kernel does); we round to nearest. The few differences are 1-3 codes apart
    # and ours is never farther from the true scale.
    differ = state.absmax != ours[1]
    assert differ.float().mean() < 0.01
    assert (state.absmax.int() - ours[1].int()).abs().max() <= 3
    centered = w.reshape(-1).abs().view(-1, 64).amax(1)
    target = (centered - ours[3]) / ours[2].repeat_interleave(256)[: centered.numel()]
    code = dynamic_map()
    assert torch.all(
        (code[ours[1].long()] - target).abs() <= (code[state.absmax.long()] - target).abs()
    )
    # bitsandbytes' dequantize reads our codes and scales to the same bits as ours.
    state.absmax = ours[1]
    absmax = dequantize_blockwise_8bit(ours[1], ours[2]) + ours[3]
    mine = dequantize_nf4(ours[0], absmax, tuple(w.shape), torch.float32, 64)
    assert torch.equal(functional.dequantize_4bit(ours[0], state), mine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [None, 128])
def test_dequantize_is_code_times_scale_cast_once(monkeypatch, dtype, chunk):
    """Every value is nf4[code] * absmax in float32, cast once: odd counts, short last blocks
    and chunk edges included."""
    if chunk is not None:
        monkeypatch.setattr(blockwise, "_CHUNK", chunk)
    w = torch.randn(37, 19)  # 703 values: an odd count and a short last block
    codes, absmax = quantize_nf4(w, 64, double_quant=False)
    expected = (nf4_code()[_unpack(codes, w.numel())] * absmax.repeat_interleave(64)[:703]).to(
        dtype
    )
    assert torch.equal(dequantize_nf4(codes, absmax, (37, 19), dtype, 64), expected.view(37, 19))
