"""Per-row absmax int8: one float32 scale per row of the weight (its first dimension).

Values are ``round(w * 127 / absmax_row)`` in [-127, 127]; dequantized as
``q * absmax_row / 127`` in float32, cast once to the compute dtype (the layout of
bitsandbytes' LLM.int8 weights: int8 codes and a per-row ``SCB``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dequantize_int8", "int8_storage_sizes", "quantize_int8"]

_CHUNK = 1 << 20
_INV_127 = 1.0 / 127


def _rows_per_chunk(cols: int) -> int:
    return max(1, _CHUNK // max(cols, 1))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(codes int8 (rows, cols), absmax float32 (rows,))`` of a tensor seen as rows."""
    matrix = weight.reshape(weight.shape[0], -1)
    codes = torch.empty(matrix.shape, dtype=torch.int8, device=weight.device)
    absmax = torch.empty(matrix.shape[0], dtype=torch.float32, device=weight.device)
    step = _rows_per_chunk(matrix.shape[1])
    for start in range(0, matrix.shape[0], step):
        rows = matrix[start : start + step].float()
        row_max = rows.abs().amax(dim=1)
        scaled = rows * (127.0 / row_max.clamp(min=1e-38)).unsqueeze(1)
        codes[start : start + step] = torch.round(scaled).clamp(-127, 127).to(torch.int8)
        absmax[start : start + step] = row_max
    return codes, absmax


def dequantize_int8(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor:
    """``codes * absmax_row / 127`` in float32, cast once to ``dtype``, in ``shape``."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    step = _rows_per_chunk(codes.shape[1])
    for start in range(0, codes.shape[0], step):
        rows = codes[start : start + step].float() * absmax[start : start + step, None]
        out[start : start + step] = rows * _INV_127
    return out.view(shape)


def int8_storage_sizes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes of the tensors :func:`quantize_int8` returns for a weight of ``shape``."""
    cols = 1
    for d in shape[1:]:
        cols *= d
    return [(shape[0], cols), (shape[0],)]
