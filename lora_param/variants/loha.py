"""LoHa (FedPara's low-rank Hadamard product): ``W' = W + s · (w1a @ w1b) ⊙ (w2a @ w2b)``.

Two rank-``r`` products multiplied entry by entry: the update has rank up to ``r²`` for the
parameters of two rank-``r`` LoRAs. ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA),
as PEFT's ``LoHaConfig`` and LyCORIS's ``LohaModule``. The tensors carry the references' names
and shapes, in the tensor's matrix view ``(fan_out, fan_in)`` (a conv weight
``(out, in/groups, *k)`` is ``(out, in/groups * prod(k))``; a Hugging Face ``Conv1D`` weight,
stored ``(in, out)``, is seen untransposed): ``hada_w1_a`` / ``hada_w2_a`` ``(fan_out, r)``,
``hada_w1_b`` / ``hada_w2_b`` ``(r, fan_in)``.

Convolutions with a kernel larger than 1 can use the *tucker* form (``use_tucker=True``,
PEFT's ``use_effective_conv2d``, FedPara's proposition 3; community files carry it as
``hada_t1`` / ``hada_t2``): ``hada_t1`` ``(r, r, *k)``, ``hada_w1_a`` ``(r, out)``,
``hada_w1_b`` ``(r, in/groups)``, each half rebuilt as
``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)``.

Initialization (``init="kaiming"``, PEFT's default): ``hada_w1_a``, ``hada_w1_b``,
``hada_w2_a`` (and ``hada_t*``) Kaiming-uniform, ``hada_w2_b`` zero, so the model starts
unchanged. ``init="lycoris"``: LyCORIS's normal draws with ``hada_w2_a`` zero.

Forward and its cost. The update is exactly a rank-``r²`` LoRA::

    ΔW = s · KR(w1a, w2a) @ KR'(w1b, w2b),   KR(P, Q)[:, i r + j] = P[:, i] * Q[:, j]

(the face-splitting products; :meth:`LoHaParametrization.lowrank`), so mixed batches stack
LoHa adapters and ``combine_adapters(method="cat")`` concatenates them. The factored forward
(``mode="factored"``) computes ``y + s · B̃(Ã x)`` through the layer's own op, keeping an
``(..., r²)`` activation and no weight-sized tensor, where that is the cheaper form: when
``r² (fan_in + fan_out) <= fan_in · fan_out`` (the factors are no larger than the weight, and
the per-token cost no more than the weight gradient the materialized form needs). Otherwise,
and for tensors without a factored forward (``nn.MultiheadAttention`` projections, named
parameters), the layer computes with the materialized ``W + ΔW``: one weight-sized tensor per
layer kept for backward (the layer's input gradient needs it, as PEFT's
``F.linear(x, ΔW)`` keeps ``ΔW``) and, for one step, two more weight-sized temporaries; the
Hadamard product's backward recomputes ``w1a @ w1b`` and ``w2a @ w2b`` instead of keeping them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.layer_ops import LayerOps
from ..core.targets import LayerSpec
from ..core.variant import AdapterVariant, VariantConfig, register_variant

__all__ = ["LoHaConfig", "LoHaParametrization", "ScaledUpdateVariant"]


@dataclass(frozen=True)
class LoHaConfig(VariantConfig):
    """LoHa's options (``add_lora(variant="loha")`` takes the defaults).

    Attributes:
        use_tucker: Tucker form for convolutions with a kernel larger than 1 (PEFT's
            ``use_effective_conv2d``; LyCORIS's ``use_tucker``): ``hada_t1`` / ``hada_t2``.
    """

    name: ClassVar[str] = "loha"
    use_tucker: bool = False


def check_bool(fields: Mapping[str, Any], name: str, path: str) -> None:
    """Raise LoRAError unless ``fields[name]`` (when present) is True or False."""
    if not isinstance(fields.get(name, False), bool):
        raise LoRAError(f"{name} for '{path}' must be True or False, got {fields[name]!r}.")


class ScaledUpdateVariant(AdapterVariant):
    """What LoHa and LoKr share: ``rank``, ``alpha``, ``scale = alpha / rank`` and strength.

    Subclasses build their tensors and set :attr:`variant`, :attr:`kinds`.
    """

    capabilities: ClassVar[frozenset[str]] = frozenset({"combine", "strength"})
    inits: ClassVar[tuple[str, ...]] = ("kaiming", "lycoris")

    def __init__(
        self,
        spec: LayerSpec,
        *,
        rank: int,
        alpha: float | None,
        adapter: str,
        dropout: float,
        init: str,
        use_rslora: bool,
    ) -> None:
        super().__init__(spec, adapter=adapter, dropout=dropout)
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if init not in self.inits:
            raise ValueError(f"init must be one of {self.inits}, got {init!r}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.init, self.use_rslora = init, bool(use_rslora)
        self.strength = 1.0
        self.scale = self.base_scale()

    def base_scale(self) -> float:
        """``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def set_strength(self, strength: float) -> None:
        """``scale = strength * alpha / rank``."""
        self.strength = float(strength)
        self.scale = self.base_scale() * self.strength
        self.clear_cache()

    def cache_key(self) -> tuple:
        """Enabled flag and scale."""
        return (self._enabled, self.scale)

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """rank a positive integer, alpha a positive number, use_rslora a bool, a known init."""
        rank, alpha = fields.get("rank"), fields.get("alpha")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise LoRAError(f"rank for '{path}' must be a positive integer, got {rank!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise LoRAError(f"alpha for '{path}' must be a positive number, got {alpha!r}.")
        check_bool(fields, "use_rslora", path)
        super().check_fields(spec, fields, path)

    def common_fields(self) -> dict[str, Any]:
        """rank, alpha, use_rslora, init."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "init": self.init,
        }

    @staticmethod
    def common_arguments(fields: Mapping[str, Any], adapter: str) -> dict[str, Any]:
        """The constructor arguments :meth:`common_fields` describe (and dropout)."""
        return {
            "rank": int(fields["rank"]),
            "alpha": float(fields["alpha"]),
            "adapter": adapter,
            "dropout": float(fields.get("dropout", 0.0)),
            "init": fields.get("init", "kaiming"),
            "use_rslora": bool(fields.get("use_rslora", False)),
        }

    # ---- the matrix view ----------------------------------------------------------------------

    def input_mask(self, like: Tensor) -> Tensor | None:
        """A dropout mask over the update's input features (``(1, fan_in)``) in training."""
        if self.dropout_p > 0 and self.training:
            return self.dropout(like.new_ones(1, self.fan_in))
        return None

    def matrix(self, weight: Tensor) -> Tensor:
        """``weight`` as its ``(fan_out, fan_in)`` matrix view (a view, transposed for HF
        ``Conv1D``)."""
        if self.fan_in_fan_out:
            return weight.t()
        return weight.reshape(self.fan_out, self.fan_in)

    def stored(self, matrix: Tensor) -> Tensor:
        """A ``(fan_out, fan_in)`` result back in the tensor's own layout."""
        if self.fan_in_fan_out:
            return matrix.t()
        return matrix.reshape(self.weight_shape)

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, kind={self.kind}, fan_in={self.fan_in}, "
            f"fan_out={self.fan_out}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scale={self.scale:g}, enabled={self._enabled}"
        )


class _HadamardUpdate(torch.autograd.Function):
    """``W + s · (b1 @ a1) ⊙ (b2 @ a2)`` that keeps the factors, not the products, for backward.

    The backward recomputes each product (as PEFT's and LyCORIS's ``HadaWeight``): the graph
    holds no weight-sized tensor of its own.
    """

    @staticmethod
    def forward(
        ctx: Any, w: Tensor, b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor, scale: float
    ) -> Tensor:
        ctx.save_for_backward(b1, a1, b2, a2)
        ctx.scale = scale
        return torch.addcmul(w, b1 @ a1, b2 @ a2, value=scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        b1, a1, b2, a2 = ctx.saved_tensors
        g = grad * ctx.scale
        grads: list[Tensor | None] = [grad if ctx.needs_input_grad[0] else None]
        for (b, a), (ob, oa) in (((b1, a1), (b2, a2)), ((b2, a2), (b1, a1))):
            temp = g * (ob @ oa)
            grads += [temp @ a.t(), b.t() @ temp]
        return (grads[0], grads[1], grads[2], grads[3], grads[4], None)


def face_split(p: Tensor, q: Tensor) -> Tensor:
    """Columns ``p[:, i] * q[:, j]`` at ``i * r + j``: ``(n, r) x (n, r) -> (n, r²)``."""
    return (p[:, :, None] * q[:, None, :]).reshape(p.shape[0], -1)


def row_split(p: Tensor, q: Tensor) -> Tensor:
    """Rows ``p[i] * q[j]`` at ``i * r + j``: ``(r, n) x (r, n) -> (r², n)``."""
    return (p[:, None, :] * q[None, :, :]).reshape(-1, p.shape[1])


def tucker_factors(t: Tensor, wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    """A tucker half ``einsum("i j ..., j r, i p -> p r ...", t, wb, wa)`` as ``(B, A)`` of the
    matrix view: ``B = wa^T (out, r)``, ``A = einsum(t, wb)`` ``(r, in * prod(k))``."""
    a = torch.einsum("ij...,jc->ic...", t, wb)
    return wa.t(), a.reshape(a.shape[0], -1)


class LoHaParametrization(ScaledUpdateVariant):
    """Adds ``s · (w1a @ w1b) ⊙ (w2a @ w2b)`` to the tensor it is registered on.

    Args:
        spec: The tensor seen as a matrix (see :class:`~lora_param.LayerSpec`).
        rank: Rank of each of the two products.
        alpha: Scale numerator; ``scale = alpha / rank`` (None: ``alpha = rank``).
        adapter: Name of the adapter.
        dropout: Dropout on the update's input (see :class:`~lora_param.LoRAParametrization`).
        init: ``"kaiming"`` (PEFT's default) or ``"lycoris"`` (LyCORIS's).
        use_rslora: ``scale = alpha / sqrt(rank)``.
        use_tucker: Tucker form on convolutions with a kernel larger than 1.
        device: Device of the tensors.
        dtype: Dtype of the tensors.
    """

    variant: ClassVar[str] = "loha"
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv", "conv1d_hf", "param"})
    lowrank_exact: ClassVar[bool] = True

    def __init__(
        self,
        spec: LayerSpec,
        *,
        rank: int = 4,
        alpha: float | None = None,
        adapter: str = "default",
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        use_tucker: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            spec,
            rank=rank,
            alpha=alpha,
            adapter=adapter,
            dropout=dropout,
            init=init,
            use_rslora=use_rslora,
        )
        self.tucker = self.tucker_applies(spec, use_tucker)
        shapes = self.tensor_shapes(spec, {"rank": rank, "use_tucker": use_tucker})
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    @staticmethod
    def tucker_applies(spec: LayerSpec, use_tucker: bool) -> bool:
        """Tucker form: asked for, on a convolution whose kernel is larger than 1."""
        return bool(use_tucker) and spec.kind == "conv" and any(k != 1 for k in spec.shape[2:])

    def reset_parameters(self) -> None:
        """Draw the factors anew (``hada_w2_b`` zero, or ``hada_w2_a`` for ``"lycoris"``)."""
        lycoris = self.init == "lycoris"
        zero = "hada_w2_a" if lycoris else "hada_w2_b"
        with torch.no_grad():
            for name, t in self.tensors().items():
                if name == zero:
                    t.zero_()
                elif lycoris:  # LyCORIS's draws: N(0, 1) for the *_b factors, N(0, 0.1) else
                    nn.init.normal_(t, std=1.0 if name.endswith("_b") else 0.1)
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    # ---- the protocol --------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and ``hada_t1/t2``)."""
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if self.tucker:
            names += ["hada_t1", "hada_t2"]
        return {n: getattr(self, n) for n in names}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """The references' shapes (see the module docstring)."""
        r = int(fields["rank"])
        if cls.tucker_applies(spec, bool(fields.get("use_tucker", False))):
            out, inner, *kernel = spec.shape
            half = {"t": (r, r, *kernel), "w_a": (r, out), "w_b": (r, inner)}
        else:
            half = {"w_a": (spec.fan_out, r), "w_b": (r, spec.fan_in)}
        return {_hada_name(part, i): shape for i in (1, 2) for part, shape in half.items()}

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """LoRA's checks and ``use_tucker`` a bool."""
        super().check_fields(spec, fields, path)
        check_bool(fields, "use_tucker", path)

    def halves(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(b1, a1, b2, a2)``: each product ``b @ a`` in the matrix view, in ``dtype``."""
        own = {n: t.to(dtype) for n, t in self.tensors().items()}
        if self.tucker:
            b1, a1 = tucker_factors(own["hada_t1"], own["hada_w1_a"], own["hada_w1_b"])
            b2, a2 = tucker_factors(own["hada_t2"], own["hada_w2_a"], own["hada_w2_b"])
            return b1, a1, b2, a2
        return own["hada_w1_a"], own["hada_w1_b"], own["hada_w2_a"], own["hada_w2_b"]

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + s · (w1a w1b) ⊙ (w2a w2b)``; ``dropout`` masks the update's inputs."""
        b1, a1, b2, a2 = self.halves(weight.dtype)
        mask = self.input_mask(a1) if dropout else None
        if mask is not None:
            a1 = a1 * mask
        out: Tensor = _HadamardUpdate.apply(self.matrix(weight), b1, a1, b2, a2, self.scale)
        return self.stored(out)

    def branch_pays(self) -> bool:
        """The rank-``r²`` factored form is no larger than the weight (module docstring)."""
        r2 = self.rank * self.rank
        return r2 * (self.fan_in + self.fan_out) <= self.fan_in * self.fan_out

    def has_branch(self) -> bool:  # type: ignore[override]  # decided per tensor
        """Factored where :meth:`branch_pays`; else the layer uses the materialized ``W'``."""
        return self.branch_pays()

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """``y + s · B̃(Ã(dropout(x)))`` with the rank-``r²`` factors of :meth:`lowrank`."""
        b1, a1, b2, a2 = self.halves(x.dtype)
        update = ops.lowrank(layer, self.dropout(x), row_split(a1, a2), face_split(b1, b2))
        return y.add(update, alpha=self.scale)

    def lowrank(self) -> tuple[Tensor, Tensor]:
        """``(Ã, s · B̃)`` of rank ``r²``: ``ΔW = s · B̃ @ Ã`` exactly (module docstring)."""
        b1, a1, b2, a2 = self.halves(self.anchor().dtype)
        return row_split(a1, a2), face_split(b1, b2) * self.scale

    def fields(self) -> dict[str, Any]:
        """rank, alpha, use_rslora, init, use_tucker (whether the tucker form is used)."""
        return {**self.common_fields(), "use_tucker": self.tucker}

    @classmethod
    def from_fields(
        cls,
        spec: LayerSpec,
        fields: Mapping[str, Any],
        *,
        adapter: str,
        device: torch.device | None,
        dtype: torch.dtype | None,
        base_weight: Tensor | None,
    ) -> LoHaParametrization:
        """Build from rank, alpha, use_rslora, init, use_tucker and dropout fields."""
        return cls(
            spec,
            **cls.common_arguments(fields, adapter),
            use_tucker=bool(fields.get("use_tucker", False)),
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (", tucker=True" if self.tucker else "")


def _hada_name(part: str, i: int) -> str:
    """``hada_t1``, ``hada_w1_a``, ``hada_w1_b`` ... for a half's part and index."""
    return f"hada_t{i}" if part == "t" else f"hada_w{i}_{part[-1]}"


def _register() -> None:
    register_variant(LoHaConfig, LoHaParametrization)
