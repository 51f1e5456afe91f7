"""``QuantizedWeight``: a packed frozen weight, dequantized on use, as a parametrization.

Registered first on a layer's ``weight`` (LoRA goes on top), its ``right_inverse`` packs a
floating weight into the tensors parametrize stores as ``original0``, ``original1``, ...
and its ``forward`` dequantizes them to the compute dtype. Float32 scales are stored
bit-cast to int32 so that ``model.half()`` or ``model.to(torch.bfloat16)`` cannot round them;
the compute dtype follows such casts through a tiny non-persistent buffer.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.store import BaseStore, MergeStep
from .blockwise import (
    dequantize_blockwise_8bit,
    dequantize_nf4,
    nf4_storage_sizes,
    quantize_nf4,
)
from .int8 import dequantize_int8, int8_storage_sizes, quantize_int8
from .kernels import Kernel, nf4_dequantizer
from .lean_forward import base_output

__all__ = ["BNB_BLOCK_SIZES", "METHODS", "Method", "QuantizedWeight", "check_method"]

Method = Literal["nf4", "int8"]
METHODS = ("nf4", "int8")
#: Block sizes bitsandbytes' 4-bit kernels accept (so its dequantize can read our codes).
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_method(method: object, block_size: object) -> None:
    """Raise LoRAError for an unknown method or a block size NF4 cannot use."""
    if method not in METHODS:
        raise LoRAError(f"quantization method must be one of {METHODS}, got {method!r}.")
    if method == "nf4" and block_size not in BNB_BLOCK_SIZES:
        raise LoRAError(
            f"block_size {block_size!r} does not divide the NF4 layout: blocks must hold a "
            f"power-of-two count of values that packs two per byte, one of {BNB_BLOCK_SIZES} "
            "(64 is QLoRA's)."
        )


def _as_float(stored: Tensor) -> Tensor:
    return stored.view(torch.float32)


def _as_int(scale: Tensor) -> Tensor:
    return scale.contiguous().view(torch.int32)


class QuantizedWeight(BaseStore):
    """Packed storage of a frozen weight: NF4 blocks (optionally double-quantized) or int8 rows.

    A base store (:class:`lora_param.core.store.BaseStore`): the first entry of the weight's
    parametrization list, adapters go on top.

    Args:
        shape: Shape of the weight.
        method: ``"nf4"`` or ``"int8"``.
        block_size: Values per absmax block (NF4 only).
        double_quant: Quantize NF4's absmax values again (8-bit, blocks of 256).
        compute_dtype: Dtype the weight is dequantized to.
        kind: Kind of the layer owning the weight (decides the memory-lean base forward).
        kernel: ``"auto"`` (ours on the CPU; on CUDA bitsandbytes' compiled kernel where it is
            installed and checked to give our values), ``"torch"`` or ``"bitsandbytes"``: the
            same values either way (see :mod:`lora_param.quant.kernels`).
        residual_rank: Keep the weight's best rank-``r`` part ``L R`` (its top singular
            vectors, float32) beside the codes and quantize only the residual ``W - L R``
            (QPiSSA's residual, LQ-LoRA's decomposition): the stored weight is
            ``dequantize(codes) + L R``, closer to ``W`` where a few directions carry its
            largest values. 0: none.
        residual_niter: Compute ``L R`` with ``torch.svd_lowrank`` and this many subspace
            iterations (fast, approximate, random) instead of a full SVD; None: full SVD.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        *,
        method: Method = "nf4",
        block_size: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        kind: str = "param",
        kernel: Kernel = "auto",
        residual_rank: int = 0,
        residual_niter: int | None = None,
    ) -> None:
        super().__init__()
        check_method(method, block_size)
        self.shape = tuple(shape)
        self.residual_rank = int(residual_rank)
        self.residual_niter = residual_niter
        self.method: Method = method
        self.block_size = block_size
        self.double_quant = bool(double_quant) and method == "nf4"
        self.kind = kind
        self.kernel = kernel
        self.register_buffer("_compute", torch.empty(0, dtype=compute_dtype), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype ``forward`` returns (follows ``.to(dtype)`` / ``.half()`` of the model)."""
        return cast(Tensor, self._compute).dtype

    def storage_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each stored tensor, in ``original0, original1, ...`` order."""
        layout = self._codes_layout()
        if self.residual_rank:  # L and R, float32 stored bit-cast as int32
            rows, cols, r = self.shape[0], math.prod(self.shape[1:]), self.residual_rank
            layout += [((rows, r), torch.int32), ((r, cols), torch.int32)]
        return layout

    def _codes_layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        if self.method == "int8":
            rows, scales = int8_storage_sizes(self.shape)
            return [(rows, torch.int8), (scales, torch.int32)]
        shapes = nf4_storage_sizes(math.prod(self.shape), self.block_size, self.double_quant)
        dtypes = [torch.uint8, torch.uint8, torch.int32, torch.int32]
        if not self.double_quant:
            dtypes = [torch.uint8, torch.int32]
        return list(zip(shapes, dtypes, strict=True))

    def principal_part(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(L, R)``, float32 (float64 stays float64): the best rank-``residual_rank`` part of
        ``weight`` seen as ``(shape[0], rest)``, ``L = U_r S_r``, ``R = V_r^T``."""
        matrix = weight.detach().reshape(self.shape[0], -1)
        matrix = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
        r = self.residual_rank
        if self.residual_niter is None:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            return u[:, :r] * s[:r], vh[:r].contiguous()
        u, s, v = torch.svd_lowrank(matrix, q=r, niter=self.residual_niter)
        return u * s, v.t().contiguous()

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, ...]:
        """Pack a floating weight of this shape into the stored tensors."""
        if tuple(weight.shape) != self.shape:
            raise LoRAError(
                f"cannot quantize a weight of shape {tuple(weight.shape)} into storage made for "
                f"{self.shape}."
            )
        with torch.no_grad():
            weight = weight.detach()
            if self.residual_rank:
                left, right = (t.float() for t in self.principal_part(weight))
                principal = (left @ right).view(self.shape)
                codes = self._pack_codes(weight.to(principal.dtype) - principal)
                return (*codes, _as_int(left), _as_int(right))
            return self._pack_codes(weight)

    def _pack_codes(self, weight: Tensor) -> tuple[Tensor, ...]:
        with torch.no_grad():
            if self.method == "int8":
                codes, absmax = quantize_int8(weight)
                return codes, _as_int(absmax)
            packed = quantize_nf4(weight, self.block_size, self.double_quant)
            if not self.double_quant:
                return packed[0], _as_int(packed[1])
            codes, absmax_codes, nested, offset = cast(
                tuple[Tensor, Tensor, Tensor, Tensor], packed
            )
            return codes, absmax_codes, _as_int(nested), _as_int(offset)

    def absmax(self, *stored: Tensor) -> Tensor:
        """The float32 absmax per block (NF4) or per row (int8), nested scales decoded."""
        if self.method == "nf4" and self.double_quant:
            _, codes, nested, offset = stored
            return dequantize_blockwise_8bit(codes, _as_float(nested)) + _as_float(offset)
        return _as_float(stored[1])

    def forward(self, *stored: Tensor) -> Tensor:
        """Dequantize the stored tensors to the compute dtype (the principal part added)."""
        if self.residual_rank:
            *codes, left, right = stored
            wide = torch.promote_types(self.compute_dtype, torch.float32)
            residual = self._dequantize(*codes, dtype=wide)  # one rounding, at the end
            principal = (_as_float(left) @ _as_float(right)).view(self.shape)
            return (residual + principal).to(self.compute_dtype)
        return self._dequantize(*stored, dtype=self.compute_dtype)

    def _dequantize(self, *stored: Tensor, dtype: torch.dtype) -> Tensor:
        absmax = self.absmax(*stored)
        if self.method == "int8":
            return dequantize_int8(stored[0], absmax, self.shape, dtype)
        return nf4_dequantizer(
            self.kernel, dequantize_nf4, stored[0], absmax, self.shape, dtype, self.block_size
        )

    def dequantize_fp32(self, *stored: Tensor) -> Tensor:
        """The weight as the model sees it (compute dtype), widened to float32."""
        return self.weight_fp32(*stored)

    def base_output(self, layer: Any, x: Tensor, stored: tuple[Any, ...], bias: bool) -> Tensor:
        """The layer's output without adapters, dequantizing again in backward (no saved W)."""
        return base_output(self, layer, x, stored, bias)

    def pack(self, value: Tensor) -> tuple[Tensor, ...]:
        """The packed tensors of a plain weight (``load_base_state_dict``)."""
        if not value.is_floating_point():
            raise LoRAError(f"a packed weight takes a floating tensor, got {value.dtype}.")
        return self.right_inverse(value)

    def merge_step(
        self, layer: nn.Module, stored: tuple[Any, ...], merged: Tensor, requantize: bool
    ) -> MergeStep:
        """A plain weight in the compute dtype, or ``merged`` requantized in place."""
        from .packed import replace_packed  # packed imports this module

        if requantize:
            packed = self.right_inverse(merged)
            rounded = self.weight_fp32(*packed)
            error = float((rounded - merged).norm() / merged.norm().clamp(min=1e-30))

            def write() -> None:
                with torch.no_grad():
                    for old, new in zip(stored, packed, strict=True):
                        old.copy_(new)

            return write, error
        value = nn.Parameter(merged.to(self.compute_dtype), requires_grad=False)
        return lambda: replace_packed(layer, value), None

    def stored_bytes(self, *stored: Tensor) -> int:
        """Bytes of the packed tensors."""
        return sum(t.numel() * t.element_size() for t in stored)

    def extra_repr(self) -> str:
        extra = f", block_size={self.block_size}, double_quant={self.double_quant}"
        residual = f", residual_rank={self.residual_rank}" if self.residual_rank else ""
        return (
            f"method={self.method!r}, shape={self.shape}"
            + (extra if self.method == "nf4" else "")
            + residual
            + f", compute_dtype={self.compute_dtype}"
        )
