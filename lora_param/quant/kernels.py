"""Optional bitsandbytes kernel for NF4 dequantization (bit for bit what ours computes).

Pure PyTorch dequantization gathers through a lookup table; bitsandbytes' compiled kernel
is faster on CPU (1.3-1.9x on a 5,632 x 2,048 weight) and the fast path on CUDA. Both compute
``nf4[code] * absmax`` in float32 and cast once, so switching kernels never changes a value,
which is why ``"auto"`` (the default) may pick bitsandbytes whenever it is installed.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch import Tensor

from ..core.errors import LoRAError

__all__ = [
    "KERNELS",
    "Kernel",
    "bitsandbytes_runs",
    "check_kernel",
    "dequantize_nf4_bitsandbytes",
    "give_up_bitsandbytes",
    "usable",
]

Kernel = Literal["auto", "torch", "bitsandbytes"]
KERNELS = ("auto", "torch", "bitsandbytes")


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


@functools.cache
def bitsandbytes_runs() -> bool:
    """Whether bitsandbytes imports here (checked once; a broken install counts as absent)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FAILED_ON: set[str] = set()  # device types where bitsandbytes' kernel raised under "auto"


def give_up_bitsandbytes(device: torch.device, error: Exception) -> None:
    """Stop ``"auto"`` from using bitsandbytes on this device type, saying why (once)."""
    if device.type not in _FAILED_ON:
        _FAILED_ON.add(device.type)
        warnings.warn(
            f"bitsandbytes' NF4 dequantize failed on {device.type} ({type(error).__name__}: "
            f"{error}); kernel='auto' uses lora_param's own (the same values) from now on.",
            RuntimeWarning,
            stacklevel=3,
        )


def usable(
    kernel: Kernel, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> bool:
    """Whether to dequantize with bitsandbytes: asked for (or ``"auto"``, installed, and not
    failed on this device type before), outside torch.compile, on CPU or CUDA, for a dtype and
    shape its kernel runs natively.

    Its CPU kernel hands an odd last dimension to a torch.compile'd fallback (a long first
    call), where ours is as fast.
    """
    if kernel == "torch" or torch.compiler.is_compiling() or shape[-1] % 2:
        return False
    if device.type not in ("cpu", "cuda") or dtype not in _NATIVE_DTYPES:
        return False
    if kernel == "bitsandbytes":
        return True
    return device.type not in _FAILED_ON and bitsandbytes_runs()


def dequantize_nf4_bitsandbytes(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype, block_size: int
) -> Tensor:
    """bitsandbytes' ``dequantize_4bit`` on our codes and float32 absmax values."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    out: Tensor = torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, absmax, block_size, "nf4", list(shape), dtype
    )
    return out
