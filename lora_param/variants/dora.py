"""DoRA (weight-decomposed LoRA): ``W' = m * (W + sBA) / ||W + sBA||``, one norm per output.

``DoRAParametrization`` is a :class:`LoRAParametrization` with a trainable magnitude vector ``m``
(``lora_magnitude``), initialised to the norms of the base weight so that the model starts
unchanged. The norm is taken, as in PEFT, per output row of the ``(out, in)`` matrix for Linear,
Conv (over ``in * k``), Hugging Face Conv1D and plain parameters, and per embedding dimension
(over the vocabulary) for ``nn.Embedding``.

The norm is detached from the gradient, as the DoRA paper (section 4.3) suggests and PEFT does:
it rescales the output but receives no gradient, which saves the memory of its backward.

Factored forward (Linear): ``y = m / ||W + sBA|| * (x W^T + s (x A^T) B^T) + bias``. The norms
are computed without building ``W + sBA``::

    ||W_i + s(BA)_i||^2 = ||W_i||^2 + 2s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T

``W A^T`` is ``(out, r)``, ``||W_i||^2`` is cached while ``W`` is unchanged, so a training step
costs one extra ``(out, in) x (in, r)`` product and no weight-sized temporary. Under
``torch.no_grad()`` the DoRA weight is cached as the LoRA weight is (evaluation at merged speed).
Dropout, when set, applies to the low-rank branch's input only, in both paths.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora import LoRAParametrization

__all__ = ["DoRAParametrization", "is_dora", "magnitude_size"]


def magnitude_size(layer: dict[str, Any]) -> int:
    """Length of the magnitude vector for a layer described as in ``adapter_config``."""
    if layer["kind"] == "embedding" and not layer["fan_in_fan_out"]:
        return int(layer["fan_in"])
    return int(layer["fan_out"])


def is_dora(p: object) -> TypeGuard[DoRAParametrization]:
    """True for a DoRA adapter entry."""
    return isinstance(p, DoRAParametrization)


def _row_norms(matrix: Tensor, lora_b: Tensor, lora_a: Tensor, scale: float, sq: Tensor) -> Tensor:
    """Row norms of ``matrix + scale * lora_b @ lora_a`` without forming that sum.

    ``sq`` holds the squared row norms of ``matrix`` (float32).
    """
    wa = (matrix @ lora_a.t()).float()  # (rows, r)
    b = lora_b.float()
    a = lora_a.float()
    cross = (b * wa).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    return (sq + (2 * scale) * cross + (scale * scale) * quad).clamp_min(0).sqrt()


class DoRAParametrization(LoRAParametrization):
    """LoRA with a learned magnitude per output: ``m * (W + sBA) / ||W + sBA||``.

    Takes the arguments of :class:`LoRAParametrization` plus the base weight, from which the
    magnitude is initialised (``m = ||W||``, so the wrapped model starts unchanged).

    Args:
        *args: As for :class:`LoRAParametrization`.
        base_weight: The weight the adapter is registered on (its original, unparametrized).
        **kwargs: As for :class:`LoRAParametrization`.
    """

    def __init__(self, *args: Any, base_weight: Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Embeddings are normalized per embedding dimension (a column), as PEFT does.
        self.norm_columns = self.kind == "embedding" or self.fan_in_fan_out
        size = self.fan_in if self.norm_columns and not self.fan_in_fan_out else self.fan_out
        self.lora_magnitude = nn.Parameter(
            torch.empty(size, device=self.lora_A.device, dtype=self.lora_A.dtype)
        )
        self._magnitude_grad = True
        self._sq_cache: tuple | None = None  # (weight, version, data_ptr, squared norms)
        self.reset_magnitude(base_weight)

    def reset_magnitude(self, weight: Tensor) -> None:
        """Set ``m`` to the norms of ``weight`` (the model then computes ``weight`` exactly)."""
        with torch.no_grad():
            norms = torch.linalg.vector_norm(self._matrix(weight.detach()), dim=1)
            self.lora_magnitude.copy_(norms.to(self.lora_magnitude.dtype))

    # ---- layout helpers -------------------------------------------------------------------

    def _matrix(self, weight: Tensor) -> Tensor:
        """The weight as a matrix whose rows are the normalized vectors (a view when possible)."""
        if self.fan_in_fan_out or self.norm_columns:
            return weight.reshape(weight.shape[0], -1).t()
        return weight.reshape(weight.shape[0], -1)

    def _factors(self) -> tuple[Tensor, Tensor]:
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
        """``||W_i||^2`` per output, cached while the base weight is unchanged."""
        cache = self._sq_cache
        stamp = (weight._version, weight.data_ptr(), weight.shape)
        if cache is not None and cache[0] is weight and cache[1] == stamp:
            return cache[2]
        with torch.no_grad():
            matrix = self._matrix(weight.detach())
            sq = torch.linalg.vector_norm(matrix, dim=1, dtype=torch.float32).square()
        self._sq_cache = (weight, stamp, sq)
        return sq

    def weight_norm(self, weight: Tensor) -> Tensor:
        """``||W + sBA||`` per output (detached), in factored form: no weight-sized temporary."""
        with torch.no_grad():
            lora_b, lora_a = self._factors()
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
        return self.lora_magnitude / self.weight_norm(weight)

    # ---- LoRAParametrization interface ----------------------------------------------------

    @LoRAParametrization.enabled.setter  # type: ignore[attr-defined]
    def enabled(self, value: bool) -> None:
        value = bool(value)
        if value != self._enabled:
            if value:
                self.lora_magnitude.requires_grad_(self._magnitude_grad)
            else:
                self._magnitude_grad = self.lora_magnitude.requires_grad
                self.lora_magnitude.requires_grad_(False)
        LoRAParametrization.enabled.fset(self, value)  # type: ignore[attr-defined]

    def add_update(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """The DoRA weight ``m * (W + sBA) / ||W + sBA||`` (whether enabled or not)."""
        merged = super().add_update(weight, dropout=dropout)
        if dropout and self.dropout_p > 0 and self.training:
            norms = self.weight_norm(weight)  # the norm of the full update, as PEFT takes it
        else:
            norms = torch.linalg.vector_norm(self._matrix(merged.detach()), dim=1)
        return merged * self._broadcast(self.lora_magnitude / norms)

    def delta(self) -> Tensor:
        """Not defined without the base weight; use :meth:`delta_for`."""
        raise NotImplementedError(
            "a DoRA update depends on the base weight: use delta_for(weight) instead."
        )

    def delta_for(self, weight: Tensor) -> Tensor:
        """The change DoRA makes to ``weight``: ``DoRA(weight) - weight``."""
        return self.add_update(weight) - weight

    def forward(self, weight: Tensor) -> Tensor:
        """Return the DoRA weight (or ``weight`` itself when disabled); cached under no_grad."""
        if not self._enabled:
            return weight
        if (
            torch.compiler.is_compiling()
            or torch.is_grad_enabled()
            or (self.training and self.dropout_p > 0)
        ):
            self._cache = None
            return self.add_update(weight, dropout=True)
        tensors = (weight, self.lora_A, self.lora_B, self.lora_magnitude)
        stamp = (*((t._version, t.data_ptr()) for t in tensors), self.scale)
        cache = self._cache
        if (
            cache is not None
            and all(c is t for c, t in zip(cache[0], tensors, strict=True))
            and cache[1] == stamp
        ):
            return cache[2]
        out = self.add_update(weight)
        self._cache = (tensors, stamp, out)
        return out

    def factored_forward(self, module: Any, x: Tensor, branch: Any) -> Tensor:
        """``m / ||W + sBA|| * (base(x) + s * B A x) + bias`` for a layer with only this adapter.

        Args:
            module: The layer (Linear, Conv, Embedding or HF Conv1D).
            x: Its input.
            branch: The factored low-rank branch for the layer's kind, ``(m, x, p, y) -> y + sBAx``.
        """
        kind = module._lora_kind
        weight = module.parametrizations.weight.original
        bias = getattr(module, "bias", None)
        if not self._enabled:
            return _plain(kind, module, x, weight, bias)
        compiling = torch.compiler.is_compiling()
        dropping = self.training and self.dropout_p > 0
        if not compiling and not torch.is_grad_enabled() and not dropping:
            return _plain(kind, module, x, self.forward(weight), bias)
        if self._cache is not None and not compiling:
            self._cache = None  # training moves on; free the eval copy
        y = branch(module, x, self, _plain(kind, module, x, weight, None))
        scale = self.magnitude_scale(weight)
        if kind == "conv":
            shape = (1, -1) + (1,) * (y.dim() - 2)
            scale = scale.view(shape)
            bias = None if bias is None else bias.view(shape)
        if compiling or not bool(scale.detach().abs().min() > 0):
            return y * scale if bias is None else torch.addcmul(bias, y, scale)
        return _RescaleShift.apply(y, scale, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


class _RescaleShift(torch.autograd.Function):
    """``y * scale + bias`` that keeps its output, not ``y``, for the backward pass.

    ``scale``'s gradient needs ``y``; it is recomputed as ``(out - bias) / scale``. The output
    is what the next layer keeps anyway, so DoRA adds no activation-sized tensor to the
    graph (a plain ``y * scale`` would keep ``y``, one more copy of every adapted layer's
    output). Used only when no scale is zero.
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
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[1]:
            y = out / scale if bias is None else (out - bias).div_(scale)
            grad_scale = _sum_to(grad * y, scale.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = _sum_to(grad, bias.shape)
        return grad_y, grad_scale, grad_bias


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast result back to ``shape`` (the inverse of broadcasting)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1]
    return t.sum(dims, keepdim=False).reshape(shape) if dims else t


def _plain(kind: str, m: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """The layer's own computation with weight ``w`` and the given bias (None: no bias)."""
    if kind == "linear":
        return F.linear(x, w, bias)
    if kind == "conv":
        return m._conv_forward(x, w, bias)
    if kind == "embedding":
        return F.embedding(
            x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse
        )
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if bias is None else torch.addmm(bias, flat, w)
    return out.view((*x.shape[:-1], m.nf))
