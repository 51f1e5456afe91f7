"""DoRA (weight-decomposed LoRA): ``W' = m * (W + sBA) / ||W + sBA||``, one norm per output.

``DoRAParametrization`` is LoRA with a trainable magnitude vector ``m`` (``lora_magnitude``),
initialised to the norms of the base weight so that the model starts unchanged. The norm is
taken, as in PEFT, per output row of the ``(out, in)`` matrix for Linear, Conv (over
``in * k``), Hugging Face Conv1D and plain parameters, and per embedding dimension (over the
vocabulary) for ``nn.Embedding``.

The norm is detached from the gradient, as the DoRA paper (section 4.3) suggests and PEFT does:
it rescales the output but receives no gradient, which saves the memory of its backward.

Factored forward: ``y = m / ||W + sBA|| * (x W^T + s (x A^T) B^T) + bias``. The norms are
computed without building ``W + sBA``::

    ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T

``W A^T`` is ``(out, r)``, ``||W_i||^2`` is cached while ``W`` is unchanged, so a training step
costs one extra ``(out, in) x (in, r)`` product and no weight-sized temporary (for a packed
base, the dequantized weight the norm needs is one layer's temporary). The rescaling keeps its
output, not its input, for backward (:class:`_RescaleShift`), so DoRA adds no activation-sized
tensor to the graph. Norms are computed in float32 (float64 for float64 weights). Dropout,
when set, applies to the low-rank branch's input only, in both paths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.eval_cache import VersionedCache
from ..core.layer_ops import LayerOps
from ..core.targets import LayerSpec
from ..core.variant import BaseOutput, VariantConfig, register_variant
from .lora import LoRAParametrization

__all__ = ["DoRAConfig", "DoRAParametrization", "is_dora"]


@dataclass(frozen=True)
class DoRAConfig(VariantConfig):
    """DoRA: LoRA plus a learned magnitude per output (``add_lora(variant="dora")``)."""

    name: ClassVar[str] = "dora"


def _row_norms(matrix: Tensor, lora_b: Tensor, lora_a: Tensor, scale: float, sq: Tensor) -> Tensor:
    """Row norms of ``matrix + scale * lora_b @ lora_a`` without forming that sum.

    ``sq`` holds the squared row norms of ``matrix``, in the dtype the norms are computed in.
    """
    dtype = sq.dtype
    # (rows, r) as the transpose of A·matrixᵀ: the same product, about twice as fast on CPUs
    # as matrix·Aᵀ (a skinny right operand).
    wa = nn.functional.linear(lora_a.to(matrix.dtype), matrix).t().to(dtype)
    b = lora_b.to(dtype)
    a = lora_a.to(dtype)
    # 2s·<B_i, (W·Aᵀ)_i> + s²·B_i·(A·Aᵀ)·B_iᵀ, as one row-wise dot of B with
    # (2s·W·Aᵀ + s²·B·A·Aᵀ): few small ops, each one a dispatch in every training step.
    inner = torch.addmm(wa, b, a @ a.t(), beta=2 * scale, alpha=scale * scale)
    return (b * inner).sum(1).add_(sq).clamp_min_(0).sqrt_()


class DoRAParametrization(LoRAParametrization):
    """LoRA with a learned magnitude per output: ``m * (W + sBA) / ||W + sBA||``.

    Takes the arguments of :class:`LoRAParametrization` plus the base weight, from which the
    magnitude is initialised (``m = ||W||``, so the wrapped model starts unchanged).

    Args:
        spec: As for :class:`LoRAParametrization`.
        base_weight: The weight the adapter is registered on (the base, as the layer sees it).
        **kwargs: As for :class:`LoRAParametrization`.
    """

    variant: ClassVar[str] = "dora"
    additive: ClassVar[bool] = False
    capabilities: ClassVar[frozenset[str]] = frozenset({"combine", "strength"})
    lowrank_exact: ClassVar[bool] = False
    needs_weight: ClassVar[bool] = True

    def __init__(self, spec: LayerSpec, *, base_weight: Tensor, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        # Embeddings are normalized per embedding dimension (a column), as PEFT does.
        self.norm_columns = self.kind == "embedding" or self.fan_in_fan_out
        size = self.magnitude_size(spec)
        self.lora_magnitude = nn.Parameter(
            torch.empty(size, device=self.lora_A.device, dtype=self.lora_A.dtype)
        )
        self._squares = VersionedCache()  # ||W_i||^2 while the base weight is unchanged
        self.reset_magnitude(base_weight)

    @staticmethod
    def magnitude_size(spec: LayerSpec) -> int:
        """Length of the magnitude vector: the outputs (the embedding dimension for embeddings)."""
        if spec.kind == "embedding" and not spec.fan_in_fan_out:
            return spec.fan_in
        return spec.fan_out

    def reset_magnitude(self, weight: Tensor) -> None:
        """Set ``m`` to the norms of ``weight`` (the model then computes ``weight`` exactly)."""
        with torch.no_grad():
            matrix = self._matrix(weight.detach())
            norms = torch.linalg.vector_norm(matrix.to(self.compute_dtype_for(matrix)), dim=1)
            self.lora_magnitude.copy_(norms.to(self.lora_magnitude.dtype))

    # ---- layout helpers -------------------------------------------------------------------

    def _matrix(self, weight: Tensor) -> Tensor:
        """The weight as a matrix whose rows are the normalized vectors (a view when possible)."""
        if self.fan_in_fan_out or self.norm_columns:
            return weight.reshape(weight.shape[0], -1).t()
        return weight.reshape(weight.shape[0], -1)

    def _oriented(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` of the update expressed in ``_matrix``'s orientation."""
        if self.norm_columns and not self.fan_in_fan_out:
            return self.lora_A.t(), self.lora_B.t()
        return self.lora_B, self.lora_A

    def _broadcast(self, vector: Tensor) -> Tensor:
        """A per-output vector shaped to multiply the stored weight."""
        if self.norm_columns:
            return vector.view(1, -1)
        return vector.view(-1, *([1] * (len(self.weight_shape) - 1)))

    # ---- the norm -------------------------------------------------------------------------

    def _squared_norms(self, weight: Tensor) -> Tensor:
        """``||W_i||^2`` per output (float32 or wider), kept while the base weight is unchanged."""
        if torch.compiler.is_compiling():
            matrix = self._matrix(weight.detach())
            return torch.linalg.vector_norm(
                matrix, dim=1, dtype=self.compute_dtype_for(matrix)
            ).square()
        cached = self._squares.get((weight,), weight.shape)
        if cached is not None:
            return cached  # type: ignore[return-value]
        with torch.no_grad():
            matrix = self._matrix(weight.detach())
            sq = torch.linalg.vector_norm(
                matrix, dim=1, dtype=self.compute_dtype_for(matrix)
            ).square()
        self._squares.put((weight,), weight.shape, sq)
        return sq

    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W + sBA||`` per output (detached), in factored form: no weight-sized temporary."""
        with torch.no_grad():
            lora_b, lora_a = self._oriented()
            norms = _row_norms(
                self._matrix(weight.detach()),
                lora_b.detach(),
                lora_a.detach(),
                float(self.scale),
                self._squared_norms(weight),
            )
        return norms.to(weight.dtype)

    def magnitude_scale(self, weight: Tensor) -> Tensor:
        """``m / ||W + sBA||``, the per-output factor (differentiable in ``m`` only)."""
        return self.lora_magnitude.to(weight.dtype) / self.weight_norm(weight)

    def cache_tensors(self) -> list[Tensor]:
        """LoRA's and the magnitude."""
        return [*super().cache_tensors(), self.lora_magnitude]

    def clear_cache(self) -> None:
        """Forget the cached squared norms of the base weight."""
        self._squares.clear()

    # ---- the protocol ------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """``lora_A``, ``lora_B`` and ``lora_magnitude``."""
        return {**super().tensors(), "lora_magnitude": self.lora_magnitude}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """LoRA's factors and the magnitude ``(outputs,)``."""
        return {
            **super().tensor_shapes(spec, fields),
            "lora_magnitude": (cls.magnitude_size(spec),),
        }

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """The DoRA weight ``m * (W + sBA) / ||W + sBA||`` (whether enabled or not)."""
        merged = super().adapt(weight, dropout=dropout)
        if dropout and self.dropout_p > 0 and self.training:
            norms = self.weight_norm(weight)  # the norm of the full update, as PEFT takes it
        else:
            matrix = self._matrix(merged.detach())
            norms = torch.linalg.vector_norm(
                matrix, dim=1, dtype=self.compute_dtype_for(matrix)
            ).to(weight.dtype)
        return merged * self._broadcast(self.lora_magnitude.to(weight.dtype) / norms)

    def merged_inplace(self, weight: Tensor) -> Tensor:
        """:meth:`adapt`'s ``m * (W + sBA) / ||W + sBA||`` formed in ``weight`` itself."""
        if not weight.is_contiguous():
            return self.merged(weight)
        with torch.no_grad():
            merged = self._add_update_(weight)
            matrix = self._matrix(merged)
            norms = torch.linalg.vector_norm(matrix, dim=1, dtype=self.compute_dtype_for(matrix))
            scale = self.lora_magnitude.to(weight.dtype) / norms.to(weight.dtype)
            return merged.mul_(self._broadcast(scale))

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """Not additive: DoRA computes the whole layer in :meth:`layer_forward`."""
        raise NotImplementedError

    @classmethod
    def has_branch(cls) -> bool:
        """DoRA's update depends on the weight: no additive branch."""
        return False

    def lowrank(self) -> None:
        """No exact low-rank form: the update depends on the weight."""
        return None

    def layer_forward(
        self,
        ops: LayerOps,
        layer: Any,
        x: Tensor,
        base: BaseOutput,
        weight: Callable[[], Tensor],
    ) -> Tensor:
        """``m / ||W + sBA|| * (base(x) + s * B A x) + bias``, without forming ``W + sBA``."""
        w = weight()
        y = super().add_branch(ops, layer, x, base(layer, x, False))
        scale = self.magnitude_scale(w)
        bias = None if self.kind == "embedding" else getattr(layer, "bias", None)
        if ops.channel_dim == 1:
            shape = (1, -1) + (1,) * (y.dim() - 2)
            scale = scale.view(shape)
            bias = None if bias is None else bias.view(shape)
        if torch.compiler.is_compiling() or not bool(scale.detach().abs().min() > 0):
            return y * scale if bias is None else torch.addcmul(bias, y, scale)
        out: Tensor = _RescaleShift.apply(y, scale, bias)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"

    def delta_for(self, weight: Tensor) -> Tensor:
        """The change DoRA makes to ``weight``, ``DoRA(weight) - weight`` (see :meth:`delta`)."""
        return self.delta(weight)


class _RescaleShift(torch.autograd.Function):
    """``y * scale + bias`` that keeps its output, not ``y``, for the backward pass.

    ``scale``'s gradient, ``sum(grad * y)`` with ``y = (out - bias) / scale``, is taken as
    ``(sum(grad * out) - bias * sum(grad)) / scale``: no activation-sized ``y`` is formed, and
    ``sum(grad)`` is the bias gradient anyway. The output is what the next layer keeps anyway,
    so DoRA adds no activation-sized tensor to the graph (a plain ``y * scale`` would keep
    ``y``, one more copy of every adapted layer's output). Used only when no scale is zero.
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        out = y * scale if bias is None else torch.addcmul(bias, y, scale)
        ctx.save_for_backward(out, scale, bias)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        out, scale, bias = ctx.saved_tensors
        grad_y = grad * scale if ctx.needs_input_grad[0] else None
        summed = None
        if ctx.has_bias and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            summed = _sum_to(grad, bias.shape)
        grad_scale = None
        if ctx.needs_input_grad[1]:
            grad_scale = _sum_to(grad * out, scale.shape)
            if summed is not None:
                grad_scale = grad_scale.sub_(bias * summed)
            grad_scale = grad_scale.div_(scale)
        grad_bias = summed if ctx.needs_input_grad[2] else None
        return grad_y, grad_scale, grad_bias


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to ``shape`` (the inverse of broadcasting)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1]
    return t.sum(dims, keepdim=False).reshape(shape) if dims else t


def is_dora(p: object) -> bool:
    """True for a DoRA entry (0.2's helper; 0.3 code asks ``entry.variant == "dora"``)."""
    return isinstance(p, DoRAParametrization)


def _register() -> None:
    register_variant(DoRAConfig, DoRAParametrization)
