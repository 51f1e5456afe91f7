"""Blockwise absmax quantization: NF4 (two codes per byte) and 8-bit codes for nested scales.

Layout follows ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``: the flattened
weight is cut into blocks of ``block_size`` values (the last block may be short), each block
is divided by its absolute maximum and every value is rounded to the nearest code book entry
(a value exactly between two entries takes the lower one). Codes are packed two per byte,
the first of each pair in the high nibble, into a ``(ceil(n / 2), 1)`` uint8 tensor; an odd
element count pads with the code of 0.0. Work proceeds in chunks, so quantizing a large
weight needs only a few chunk-sized temporaries besides the result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .codebooks import dynamic_map, midpoints, nf4_code

__all__ = [
    "NESTED_BLOCK",
    "dequantize_blockwise_8bit",
    "dequantize_nf4",
    "nf4_storage_sizes",
    "quantize_blockwise_8bit",
    "quantize_nf4",
]

#: Block size of the double quantization of the absmax values (QLoRA, bitsandbytes).
NESTED_BLOCK = 256
_CHUNK = 1 << 20  # elements per working chunk


def _chunk_elements(block_size: int) -> int:
    return max(1, _CHUNK // block_size) * block_size


def _scaled_blocks(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Values divided by their block's absmax (clamped to [-1, 1]) and the absmax per block."""
    full = x.numel() - x.numel() % block_size
    body = x[:full].view(-1, block_size)
    absmax = body.abs().amax(dim=1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1)
    if full == x.numel():
        return scaled, absmax
    # The short last block divides instead of multiplying by the reciprocal (as bitsandbytes).
    tail_max = x[full:].abs().amax().clamp(min=1e-38)
    tail = torch.clamp(x[full:] / tail_max, -1, 1)
    return torch.cat([scaled, tail]), torch.cat([absmax, tail_max.view(1)])


def _quantize(flat: Tensor, block_size: int, code: Tensor, pack: bool) -> tuple[Tensor, Tensor]:
    n = flat.numel()
    bounds = midpoints(code)
    absmax = torch.empty(math.ceil(n / block_size), dtype=torch.float32, device=flat.device)
    out = torch.empty((n + 1) // 2 if pack else n, dtype=torch.uint8, device=flat.device)
    step = _chunk_elements(block_size)
    for start in range(0, n, step):
        scaled, chunk_max = _scaled_blocks(flat[start : start + step].float(), block_size)
        first_block = start // block_size
        absmax[first_block : first_block + chunk_max.numel()] = chunk_max
        if pack and scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        if pack:
            out[start // 2 : start // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
        else:
            out[start : start + q.numel()] = q
    return out, absmax


def quantize_blockwise_8bit(
    values: Tensor, block_size: int = NESTED_BLOCK
) -> tuple[Tensor, Tensor]:
    """8-bit codes of bitsandbytes' dynamic map, rounded to nearest, with one absmax per block.

    Returns:
        ``(codes uint8 like values, absmax float32 per block)``.
    """
    return _quantize(values.reshape(-1), block_size, dynamic_map(values.device), pack=False)


def dequantize_blockwise_8bit(
    codes: Tensor, absmax: Tensor, block_size: int = NESTED_BLOCK
) -> Tensor:
    """Float32 values of 8-bit dynamic-map codes: ``map[code] * absmax[block]``."""
    values = dynamic_map(codes.device)[codes.reshape(-1).int()]
    return values * absmax.repeat_interleave(block_size)[: values.numel()]


def quantize_nf4(
    weight: Tensor, block_size: int, double_quant: bool
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Quantize a floating tensor to packed NF4 codes.

    Args:
        weight: Any floating tensor (any shape, any element count).
        block_size: Values per absmax block (even).
        double_quant: Quantize the absmax values too: subtract their mean, then 8-bit
            dynamic-map codes in blocks of 256 (rounded to nearest).

    Returns:
        ``(codes, absmax)`` or, with ``double_quant``, ``(codes, absmax_codes, nested_absmax,
        offset)``; codes are ``(ceil(n / 2), 1)`` uint8, scales float32, offset ``(1,)`` (a
        1-D tensor, so that FSDP2 can shard it; 0.2 stored it 0-d).
    """
    codes, absmax = _quantize(weight.reshape(-1), block_size, nf4_code(weight.device), pack=True)
    codes = codes.unsqueeze(1)
    if not double_quant:
        return codes, absmax
    offset = absmax.mean().reshape(1)
    absmax_codes, nested = quantize_blockwise_8bit(absmax - offset)
    return codes, absmax_codes, nested, offset


def _pair_table(device: torch.device) -> Tensor:
    """For every byte, its two NF4 values (high nibble first) as one 8-byte entry: ``(256,)``.

    The float32 pairs are viewed as int64 so that one gather per byte fetches both values.
    """
    byte = torch.arange(256, device=device)
    code = nf4_code(device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.int64).view(-1)


def dequantize_nf4(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype, block_size: int
) -> Tensor:
    """Values ``nf4[code] * absmax[block]`` in float32, cast once to ``dtype``, in ``shape``.

    Bit for bit what ``bitsandbytes.functional.dequantize_4bit`` returns for the same codes
    and float32 absmax values.
    """
    n = math.prod(shape)
    pairs = _pair_table(codes.device)
    flat_codes = codes.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    step = _chunk_elements(block_size)  # even: chunks start on a byte boundary
    for start in range(0, n, step):
        stop = min(start + step, n)
        byte_codes = flat_codes[start // 2 : (stop + 1) // 2].int()
        values = pairs.index_select(0, byte_codes).view(torch.float32)[: stop - start]
        first = start // block_size
        full = (stop - start) - (stop - start) % block_size
        values[:full].view(-1, block_size).mul_(absmax[first : first + full // block_size, None])
        if full < stop - start:
            values[full:].mul_(absmax[first + full // block_size])
        out[start:stop] = values
    return out.view(shape)


def nf4_storage_sizes(numel: int, block_size: int, double_quant: bool) -> list[tuple[int, ...]]:
    """Shapes of the tensors :func:`quantize_nf4` returns for ``numel`` values."""
    blocks = math.ceil(numel / block_size)
    if not double_quant:
        return [((numel + 1) // 2, 1), (blocks,)]
    return [((numel + 1) // 2, 1), (blocks,), (math.ceil(blocks / NESTED_BLOCK),), (1,)]
