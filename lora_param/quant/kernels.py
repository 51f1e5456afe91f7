"""Optional bitsandbytes kernel for NF4 dequantization (bit for bit what ours computes).

Pure PyTorch dequantization gathers through a lookup table; bitsandbytes' compiled kernel
is several times faster on CPU (and the fast path on CUDA). Both compute
``nf4[code] * absmax`` in float32 and cast once, so switching kernels never changes a value.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..core.errors import LoRAError

__all__ = ["KERNELS", "Kernel", "check_kernel", "dequantize_nf4_bitsandbytes", "usable"]

Kernel = Literal["torch", "bitsandbytes"]
KERNELS = ("torch", "bitsandbytes")


def check_kernel(kernel: object) -> None:
    """Raise LoRAError for an unknown kernel, or bitsandbytes asked for but not installed."""
    if kernel not in KERNELS:
        raise LoRAError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if kernel == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LoRAError(
                "kernel='bitsandbytes' needs bitsandbytes: pip install 'lora_param[quant]', or "
                "use kernel='torch'."
            ) from None


def usable(shape: tuple[int, ...]) -> bool:
    """Whether the bitsandbytes kernel runs natively for this shape (outside torch.compile).

    Its CPU kernel hands an odd last dimension to a torch.compile'd fallback (a long first
    call), where ours is as fast.
    """
    return not torch.compiler.is_compiling() and shape[-1] % 2 == 0


def dequantize_nf4_bitsandbytes(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype, block_size: int
) -> Tensor:
    """bitsandbytes' ``dequantize_4bit`` on our codes and float32 absmax values."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    out: Tensor = torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, absmax, block_size, "nf4", list(shape), dtype
    )
    return out
