"""The code books: NF4's 16 values and the signed 8-bit dynamic map used for nested scales.

Both are the exact float32 values bitsandbytes uses, so that codes written here decode there.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NF4_VALUES", "dynamic_map", "midpoints", "nf4_code"]

#: QLoRA's NormalFloat-4 code book (quantiles of N(0, 1), normalized to [-1, 1], exact zero).
NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def _build_dynamic_map() -> Tensor:
    # Signed dynamic type (Dettmers, arXiv 1511.04561) with 7 exponent bits: for each decade
    # 10^(e-6), e = 0..6, the midpoints of 2^e equal steps over [0.1, 1], with both signs;
    # plus 0 and 1. Computed in float32 exactly as bitsandbytes builds its default map.
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        magnitude = mids * 10.0 ** (e - 6)
        values += magnitude.tolist() + (-magnitude).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


# Built once at import: torch.compile then reads constants instead of tracing their making.
_NF4 = torch.tensor(NF4_VALUES, dtype=torch.float32)
_DYNAMIC = _build_dynamic_map()


def nf4_code(device: torch.device | str | None = None) -> Tensor:
    """The 16 NF4 values, float32, on ``device``."""
    return _NF4.to(device)


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The 256 values of bitsandbytes' signed 8-bit dynamic map, sorted, float32."""
    return _DYNAMIC.to(device)


def midpoints(code: Tensor) -> Tensor:
    """Decision boundaries between neighbouring values of a sorted code book (round to nearest)."""
    return (code[:-1] + code[1:]) / 2
