"""Benchmark-only workaround for PyTorch's slow reduced-precision matmul on CPUs without bf16.

On an AVX2-only CPU (no ``avx512_bf16`` / AMX), PyTorch 2.14's CPU matmul in bf16 or fp16 is
fast only when the left operand is row-major and the right one column-major (``x @ W.T``,
every Linear's forward); ``grad @ W`` (every Linear's input gradient) is up to ~60x slower
(measured: 44 s instead of 0.6 s for 512 x 5,632 @ 5,632 x 2,048; pytorch/pytorch#146508). A
542 M bf16 training step then takes tens of minutes for every variant alike.
:class:`FastReducedPrecisionMatmul` copies an operand into the fast order before the product
(one transient copy), so the bf16 rows can be measured at all. The product is the same up to float
rounding (another kernel accumulates it), it applies to every variant alike, and its transient
copies are included in the peaks measured under it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FastReducedPrecisionMatmul", "cpu_lacks_bf16_matmul"]

_aten = torch.ops.aten
# op -> index of the left operand (the right one follows it)
_LEFT = {
    _aten.mm.default: 0,
    _aten.bmm.default: 0,
    _aten.addmm.default: 1,
    _aten.baddbmm.default: 1,
}
_REDUCED = (torch.bfloat16, torch.float16)


def cpu_lacks_bf16_matmul() -> bool:
    """Whether this CPU has no native bf16 matmul (Linux flags; False where unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and "avx512_bf16" not in flags and "amx_bf16" not in flags


class FastReducedPrecisionMatmul(TorchDispatchMode):
    """Reduced-precision CPU matmuls get a row-major left and a column-major right operand."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None) -> Any:  # noqa: ANN001
        index = _LEFT.get(func)
        if index is not None and args[index].device.type == "cpu":
            left, right = args[index], args[index + 1]
            if left.dtype in _REDUCED:
                if left.size(-1) > 1 and left.stride(-1) != 1:
                    left = left.contiguous()
                    self.copies += 1
                if right.size(-2) > 1 and right.stride(-2) != 1:
                    right = right.transpose(-1, -2).contiguous().transpose(-1, -2)
                    self.copies += 1
                args = (*args[:index], left, right, *args[index + 2 :])
        return func(*args, **(kwargs or {}))
