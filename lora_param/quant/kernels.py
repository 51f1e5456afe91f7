"""Optional bitsandbytes kernel for NF4 dequantization, used only where it gives our values.

Pure PyTorch dequantization gathers through a lookup table; bitsandbytes' compiled kernel
is the fast path on CUDA. Both should compute ``nf4[code] * absmax`` in float32 and cast
once, but bitsandbytes 0.50's native *CPU* kernel works row by row and mixes up the per-block
scales when a row is not a multiple of the block size (a ``(48, 32)`` weight dequantizes with
0.83 relative error). So a kernel from another library is trusted only once it has been
checked, per device type, shape, dtype and block size, to give exactly our values:

* ``kernel="torch"``: ours, everywhere (CPU and CUDA, traceable by ``torch.compile``).
* ``kernel="auto"`` (the default): ours on the CPU, where bitsandbytes is not even imported;
  on CUDA bitsandbytes' kernel when it is installed, after its first result for each
  (shape, dtype, block size) matched ours bit for bit, else ours (with one warning).
* ``kernel="bitsandbytes"``: bitsandbytes' kernel, checked the same way; where it does not give
  our values a :class:`~lora_param.LoRAError` says so (``quantize_base`` checks the weights it
  packs before changing the model).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
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
    "nf4_dequantizer",
]

Kernel = Literal["auto", "torch", "bitsandbytes"]
KERNELS = ("auto", "torch", "bitsandbytes")
#: Device types where ``"auto"`` may use bitsandbytes' kernel (after checking it).
AUTO_DEVICE_TYPES = frozenset({"cuda"})
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Dequantize = Callable[[Tensor, Tensor, tuple[int, ...], torch.dtype, int], Tensor]
# (device type, shape, dtype, block size) -> whether bitsandbytes gave our values there.
_CHECKED: dict[tuple[str, tuple[int, ...], torch.dtype, int], bool] = {}
_FAILED_ON: set[str] = set()  # device types where bitsandbytes' kernel raised under "auto"


def check_kernel(kernel: object) -> None:
    """Raise LoRAError for an unknown kernel, or bitsandbytes asked for but not installed."""
    if kernel not in KERNELS:
        raise LoRAError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    if kernel != "bitsandbytes":
        return
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


def dequantize_nf4_bitsandbytes(
    codes: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype, block_size: int
) -> Tensor:
    """bitsandbytes' ``dequantize_4bit`` on our codes and float32 absmax values."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    out: Tensor = torch.ops.bitsandbytes.dequantize_4bit.default(
        codes, absmax, block_size, "nf4", list(shape), dtype
    )
    return out


def _wanted(kernel: Kernel, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether to try bitsandbytes' kernel at all for this call."""
    if kernel == "torch" or torch.compiler.is_compiling() or dtype not in _NATIVE_DTYPES:
        return False
    if kernel == "bitsandbytes":
        return device.type in ("cpu", "cuda")
    return (
        device.type in AUTO_DEVICE_TYPES and device.type not in _FAILED_ON and bitsandbytes_runs()
    )


def _mismatch(key: tuple[str, tuple[int, ...], torch.dtype, int]) -> str:
    device, shape, dtype, block = key
    return (
        f"bitsandbytes' NF4 dequantize gives other values than lora_param's for a weight of "
        f"shape {shape} ({dtype}, blocks of {block}) on {device} (bitsandbytes' native CPU "
        "kernel mixes up block scales when a row is not a multiple of the block size)"
    )


def nf4_dequantizer(
    kernel: Kernel,
    ours: Dequantize,
    codes: Tensor,
    absmax: Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    block_size: int,
) -> Tensor:
    """Dequantize NF4 with the kernel ``kernel`` selects, never giving other values than ours.

    The first call for a (device type, shape, dtype, block size) runs both kernels and
    compares them bit for bit; later calls run the chosen one only.

    Raises:
        LoRAError: ``kernel="bitsandbytes"`` where its kernel fails or does not give our
            values.
    """
    device = codes.device
    if not _wanted(kernel, device, dtype):
        return ours(codes, absmax, shape, dtype, block_size)
    key = (device.type, tuple(shape), dtype, block_size)
    verdict = _CHECKED.get(key)
    if verdict is False:
        if kernel == "bitsandbytes":
            raise LoRAError(_mismatch(key) + "; use kernel='auto' or kernel='torch'.")
        return ours(codes, absmax, shape, dtype, block_size)
    try:
        fast = dequantize_nf4_bitsandbytes(codes, absmax, shape, dtype, block_size)
    except Exception as error:  # e.g. a bitsandbytes build without this device's code
        if kernel != "auto":
            raise LoRAError(
                f"kernel='bitsandbytes' failed on {device.type} ({type(error).__name__}: "
                f"{error}); use kernel='auto' or kernel='torch'."
            ) from error
        _give_up(device, error)
        return ours(codes, absmax, shape, dtype, block_size)
    if verdict is None:
        reference = ours(codes, absmax, shape, dtype, block_size)
        verdict = _CHECKED[key] = torch.equal(fast, reference)
        if not verdict:
            if kernel == "bitsandbytes":
                raise LoRAError(_mismatch(key) + "; use kernel='auto' or kernel='torch'.")
            warnings.warn(
                _mismatch(key) + "; kernel='auto' uses lora_param's own for it.",
                RuntimeWarning,
                stacklevel=3,
            )
            return reference
    return fast


def _give_up(device: torch.device, error: Exception) -> None:
    """Stop ``"auto"`` from using bitsandbytes on this device type, saying why (once)."""
    if device.type not in _FAILED_ON:
        _FAILED_ON.add(device.type)
        warnings.warn(
            f"bitsandbytes' NF4 dequantize failed on {device.type} ({type(error).__name__}: "
            f"{error}); kernel='auto' uses lora_param's own (the same values) from now on.",
            RuntimeWarning,
            stacklevel=3,
        )
