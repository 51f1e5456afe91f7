"""Writing a ``.safetensors`` file one tensor at a time, without the safetensors package.

The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range, plus string metadata), padded with spaces to a multiple of 8, then the
tensors' bytes back to back. Shapes and dtypes are known before any value is computed, so the
header goes first and each tensor is written as soon as it exists, then dropped: a file of
any size is written holding one tensor at a time (``safetensors.torch.save_file`` needs every
tensor in memory at once).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import torch
from torch import Tensor

from .errors import LoRAError

__all__ = ["DTYPE_NAMES", "SafetensorsStream", "TensorSpec"]

#: safetensors' dtype names.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the file, before its value exists."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of its data."""
        n = torch.empty(0, dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class SafetensorsStream:
    """A safetensors file written in the order of ``specs``, one :meth:`write` per tensor.

    Args:
        f: The open (binary) file; the header is written at once.
        specs: Every tensor, in the order they will be written.
        metadata: String metadata of the header (``{"format": "pt"}`` for transformers).

    Raises:
        LoRAError: A dtype safetensors has no name for.
    """

    def __init__(
        self, f: BinaryIO, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
    ) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for spec in specs:
            if spec.dtype not in DTYPE_NAMES:
                raise LoRAError(f"{spec.key!r} is {spec.dtype}, which safetensors cannot store.")
            header[spec.key] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        self._f = f
        self._pending = list(reversed(specs))

    def write(self, key: str, value: Tensor) -> None:
        """Write the next tensor's bytes (it must be the next spec's key, shape and dtype)."""
        if not self._pending:
            raise LoRAError(f"{key!r} was not planned for this file.")
        spec = self._pending.pop()
        if (key, tuple(value.shape), value.dtype) != (spec.key, spec.shape, spec.dtype):
            raise LoRAError(
                f"{key!r} came out as {value.dtype} {tuple(value.shape)}, but the file's header "
                f"says {spec.key!r} is {spec.dtype} {spec.shape}."
            )
        data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(cast(Any, data.numpy())))

    def close(self) -> None:
        """Check that every planned tensor was written."""
        if self._pending:
            raise LoRAError(f"{self._pending[-1].key!r} and others were never written.")
