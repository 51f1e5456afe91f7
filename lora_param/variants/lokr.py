"""LoKr (low-rank Kronecker product): ``W' = W + s · kron(w1, w2)``.

The matrix view ``(fan_out, fan_in)`` is split as ``out = a · b`` and ``in = c · d`` (LyCORIS's
``factorization(dim, factor)``: the two factors closest to ``factor``, or to the square root
with ``factor=-1``; the smaller first), and ``ΔW = s · kron(w1, w2)`` with the small factor
``w1`` ``(a, c)`` and the large one ``w2`` ``(b, d · prod(kernel))``. Tensors, with the names
and shapes of PEFT's ``LoKrConfig`` and LyCORIS's ``LokrModule``:

* ``w1``: ``lokr_w1`` ``(a, c)``, or, with ``decompose_both=True`` and
  ``rank < max(a, c) / 2``, ``lokr_w1_a`` ``(a, r)`` @ ``lokr_w1_b`` ``(r, c)``;
* ``w2``: ``lokr_w2_a`` ``(b, r)`` @ ``lokr_w2_b`` ``(r, d · prod(kernel))`` when
  ``rank < max(b, d) / 2``, else the full ``lokr_w2`` ``(b, d, *kernel)``; with
  ``use_tucker=True`` on a convolution whose kernel is larger than 1, ``lokr_t2``
  ``(r, r, *kernel)``, ``lokr_w2_a`` ``(r, b)``, ``lokr_w2_b`` ``(r, d)``, rebuilt as
  ``einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b)``;
* ``full_matrix=True`` keeps both full (LyCORIS's ``full_matrix``).

Scale: ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA) always, PEFT's rule. LyCORIS
uses 1 instead when both factors are full (its ``alpha`` is then ignored);
:func:`lora_param.import_kohya` and :func:`lora_param.export_kohya` translate (a file with
both factors full loads with ``alpha = rank``; an adapter whose scale is not 1 is written with
``s`` folded into ``lokr_w1``).

Initialization (``init="kaiming"``, PEFT's default): ``w1`` (or ``lokr_w1_a``) zero, the other
factors Kaiming-uniform, so the model starts unchanged; ``init="lycoris"``: ``w2`` (or
``lokr_w2_b``) zero, the others Kaiming-uniform.

Forward and its cost. The factored forward (``mode="factored"``) never forms the weight-sized
``ΔW``: it forms ``w1`` and ``w2`` (small: ``a·c`` and ``b·d·prod(kernel)`` elements) and
computes ``vec(w1 · X · w2ᵀ)`` with ``X`` the input reshaped ``(c, d)`` (for a convolution,
the layer's own convolution with ``w2`` as a ``(b, d, *kernel)`` kernel on the ``c`` input
groups, then ``w1`` across them). Per token that costs ``c·d·b·prod(kernel) + a·c·b``
multiplications against ``fan_in·fan_out`` for the weight, and keeps an activation of
``c·b`` values for backward; it is used where it is the cheaper form (always, unless one
factor has a dimension of 1, e.g. for a prime size). Grouped convolutions, tensors without a
factored forward (``nn.MultiheadAttention`` projections, named parameters) and
``mode="materialized"`` compute with ``W + ΔW``: one weight-sized tensor per layer kept for
backward, formed in one fused op from the two small factors (no further temporary).
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
from ..core.variant import VariantConfig, register_variant
from .loha import ScaledUpdateVariant, check_bool

__all__ = ["KronLayout", "LoKrConfig", "LoKrParametrization", "factorization"]


@dataclass(frozen=True)
class LoKrConfig(VariantConfig):
    """LoKr's options (``add_lora(variant="lokr")`` takes the defaults).

    Attributes:
        factor: Split sizes as close to ``factor`` as the dimensions allow; ``-1``: as close to
            the square root (PEFT's ``decompose_factor``, LyCORIS's ``factor``).
        decompose_both: Also factor the small ``w1`` as ``lokr_w1_a @ lokr_w1_b`` where the
            rank is below half its size.
        use_tucker: Tucker form of ``w2`` on convolutions with a kernel larger than 1 (PEFT's
            ``use_effective_conv2d``).
        full_matrix: Keep both factors full whatever the rank (LyCORIS's ``full_matrix``).
    """

    name: ClassVar[str] = "lokr"
    factor: int = -1
    decompose_both: bool = False
    use_tucker: bool = False
    full_matrix: bool = False


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of ``dimension`` into ``(m, n)``, ``m <= n``, ``m`` closest to ``factor``.

    ``factor=-1`` splits as close to the square root as the divisors allow (``128 -> (8, 16)``,
    ``127 -> (1, 127)``); a factor that divides the dimension is taken as it is.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class KronLayout:
    """How a LoKr update is laid out on one tensor.

    Attributes:
        out_split: ``(a, b)``, ``a · b = fan_out``.
        in_split: ``(c, d)``, ``c · d`` = the input channels (``fan_in`` for matrices).
        kernel: The convolution kernel (empty for matrices).
        w1_factored: ``w1 = lokr_w1_a @ lokr_w1_b``.
        w2_factored: ``w2 = lokr_w2_a @ lokr_w2_b`` (or the tucker form).
        tucker: ``w2`` in tucker form (``lokr_t2``).
    """

    out_split: tuple[int, int]
    in_split: tuple[int, int]
    kernel: tuple[int, ...]
    w1_factored: bool
    w2_factored: bool
    tucker: bool

    def shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """The shape of each tensor, by name."""
        (a, b), (c, d), r = self.out_split, self.in_split, rank
        out: dict[str, tuple[int, ...]] = {}
        if self.w1_factored:
            out.update(lokr_w1_a=(a, r), lokr_w1_b=(r, c))
        else:
            out["lokr_w1"] = (a, c)
        if self.tucker:
            out.update(lokr_t2=(r, r, *self.kernel), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
        elif self.w2_factored:
            out.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(self.kernel)))
        else:
            out["lokr_w2"] = (b, d, *self.kernel)
        return out

    def fields(self) -> dict[str, Any]:
        """The layout as adapter-file fields."""
        return {
            "out_split": list(self.out_split),
            "in_split": list(self.in_split),
            "w1_factored": self.w1_factored,
            "w2_factored": self.w2_factored,
            "use_tucker": self.tucker,
        }


def _geometry(spec: LayerSpec) -> tuple[int, tuple[int, ...]]:
    """Input channels and kernel of the tensor (``fan_in`` and ``()`` for matrices)."""
    if spec.kind == "conv":
        return int(spec.shape[1]), tuple(int(k) for k in spec.shape[2:])
    return spec.fan_in, ()


def layout_for(spec: LayerSpec, fields: Mapping[str, Any]) -> KronLayout:
    """The layout the fields describe: explicit (``out_split`` ...), else LyCORIS's rules."""
    inputs, kernel = _geometry(spec)
    conv_kernel = any(k != 1 for k in kernel)
    if "out_split" in fields:
        return KronLayout(
            tuple(fields["out_split"]),
            tuple(fields["in_split"]),
            kernel,
            bool(fields["w1_factored"]),
            bool(fields["w2_factored"]),
            bool(fields.get("use_tucker", False)),
        )
    rank, factor = int(fields["rank"]), int(fields.get("factor", -1))
    full = bool(fields.get("full_matrix", False))
    c, d = factorization(inputs, factor)
    a, b = factorization(spec.fan_out, factor)
    w1_factored = bool(fields.get("decompose_both", False)) and rank < max(a, c) / 2 and not full
    w2_factored = rank < max(b, d) / 2 and not full
    tucker = bool(fields.get("use_tucker", False)) and w2_factored and conv_kernel
    return KronLayout((a, b), (c, d), kernel, w1_factored, w2_factored, tucker)


class LoKrParametrization(ScaledUpdateVariant):
    """Adds ``s · kron(w1, w2)`` to the tensor it is registered on (see the module docstring).

    Args:
        spec: The tensor seen as a matrix (see :class:`~lora_param.LayerSpec`).
        layout: The factors' layout (:func:`layout_for`).
        rank: Rank of the factored factors; ``scale = alpha / rank``.
        alpha: Scale numerator (None: ``alpha = rank``).
        adapter: Name of the adapter.
        dropout: Dropout on the update's input.
        init: ``"kaiming"`` (PEFT's default) or ``"lycoris"``.
        use_rslora: ``scale = alpha / sqrt(rank)``.
        options: The :class:`LoKrConfig` fields it was made with (kept in files).
        device: Device of the tensors.
        dtype: Dtype of the tensors.
    """

    variant: ClassVar[str] = "lokr"
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv", "conv1d_hf", "param"})

    def __init__(
        self,
        spec: LayerSpec,
        layout: KronLayout,
        *,
        rank: int = 4,
        alpha: float | None = None,
        adapter: str = "default",
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        options: Mapping[str, Any] | None = None,
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
        self.layout = layout
        self.options = {
            "factor": -1,
            "decompose_both": layout.w1_factored,
            "full_matrix": False,
            **(options or {}),
        }
        for name, shape in layout.shapes(self.rank).items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the factors anew; ``w1`` (``"kaiming"``) or ``w2`` (``"lycoris"``) zero."""
        own = self.tensors()
        zero = ("lokr_w1", "lokr_w1_a") if self.init == "kaiming" else ("lokr_w2", "lokr_w2_b")
        with torch.no_grad():
            for name, t in own.items():
                if name in zero:
                    t.zero_()
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))

    # ---- the protocol --------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """The layout's tensors (``lokr_w1`` or ``lokr_w1_a/b``; ``lokr_w2``, ``lokr_w2_a/b``
        or those and ``lokr_t2``)."""
        return {n: getattr(self, n) for n in self.layout.shapes(self.rank)}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """The layout's shapes (see the module docstring)."""
        return dict(layout_for(spec, fields).shapes(int(fields["rank"])))

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """LoRA's checks, the options' types, and an explicit layout that fits the tensor."""
        super().check_fields(spec, fields, path)
        for name in ("decompose_both", "use_tucker", "full_matrix", "w1_factored", "w2_factored"):
            check_bool(fields, name, path)
        factor = fields.get("factor", -1)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor == 0:
            raise LoRAError(
                f"factor for '{path}' must be a positive integer or -1, got {factor!r}."
            )
        inputs, kernel = _geometry(spec)
        if "out_split" not in fields:
            return
        for name, total in (("out_split", spec.fan_out), ("in_split", inputs)):
            split = fields.get(name)
            if (
                not isinstance(split, (list, tuple))
                or len(split) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in split)
                or split[0] * split[1] != total
            ):
                raise LoRAError(
                    f"{name} for '{path}' must be two positive sizes whose product is {total}, "
                    f"got {split!r}."
                )
        if "w1_factored" not in fields or "w2_factored" not in fields:
            raise LoRAError(f"a LoKr layout for '{path}' needs w1_factored and w2_factored.")
        if fields.get("use_tucker", False) and not (
            fields["w2_factored"] and any(k != 1 for k in kernel)
        ):
            raise LoRAError(
                f"'{path}': the tucker form needs a factored w2 on a convolution with a kernel "
                "larger than 1."
            )

    def kron_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(w1, w2)`` in ``dtype``: ``(a, c)`` and ``(b, d · prod(kernel))``."""
        own = {name: t.to(dtype) for name, t in self.tensors().items()}
        w1 = own["lokr_w1_a"] @ own["lokr_w1_b"] if self.layout.w1_factored else own["lokr_w1"]
        rows = self.layout.out_split[1]
        if self.layout.tucker:
            w2 = torch.einsum(
                "ij...,ip,jr->pr...", own["lokr_t2"], own["lokr_w2_a"], own["lokr_w2_b"]
            )
        elif self.layout.w2_factored:
            w2 = own["lokr_w2_a"] @ own["lokr_w2_b"]
        else:
            w2 = own["lokr_w2"]
        return w1, w2.reshape(rows, -1)

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + s · kron(w1, w2)``, in one op without a weight-sized temporary."""
        w1, w2 = self.kron_factors(weight.dtype)
        mask = self.input_mask(w2) if dropout else None
        if self.fan_in_fan_out:  # stored (fan_in, fan_out): kron(w1, w2)^T = kron(w1^T, w2^T)
            w1, w2 = w1.t(), w2.t()
            stored = weight
        else:
            stored = weight.reshape(self.fan_out, self.fan_in)
        (p, s), (q, t) = w1.shape, w2.shape
        grid = stored.reshape(p, q, s, t)
        f1, f2 = w1[:, None, :, None], w2[None, :, None, :]
        if mask is None:
            out = torch.addcmul(grid, f1, f2, value=self.scale)
        else:
            cols = mask.view(s, t) if not self.fan_in_fan_out else mask.view(p, q)
            drop = cols[None, None] if not self.fan_in_fan_out else cols[:, :, None, None]
            out = grid + (f1 * f2 * drop) * self.scale
        return out.reshape(weight.shape)

    def branch_pays(self) -> bool:
        """The factored form costs no more per token than the weight (module docstring)."""
        (a, b), (c, d) = self.layout.out_split, self.layout.in_split
        cost = c * d * b * math.prod(self.layout.kernel) + a * c * b
        return cost <= self.fan_in * self.fan_out

    def has_branch(self) -> bool:  # type: ignore[override]  # decided per tensor
        """Factored where :meth:`branch_pays`; else the layer uses the materialized ``W'``."""
        return self.branch_pays()

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """``y + s · vec(w1 · X · w2ᵀ)`` without forming ``ΔW`` (a grouped conv forms it)."""
        w1, w2 = self.kron_factors(x.dtype)
        x_in = self.dropout(x)
        (_, b), (c, d) = self.layout.out_split, self.layout.in_split
        if self.kind == "conv":
            if layer.groups != 1:
                delta = self.stored(torch.kron(w1, w2)).to(x.dtype)
                return y.add(ops.base(layer, x_in, delta, None), alpha=self.scale)
            spatial = x.shape[x.dim() - len(self.layout.kernel) :]
            h = layer._conv_forward(
                x_in.reshape(-1, d, *spatial), w2.view(b, d, *self.layout.kernel), None
            )
            h = h.reshape(-1, c, b, *h.shape[2:])
            update = torch.einsum("ac,ncb...->nab...", w1, h)
        else:
            h = x_in.reshape(*x.shape[:-1], c, d) @ w2.t()
            update = torch.matmul(w1, h)
        return y.add(update.reshape(y.shape), alpha=self.scale)

    def fields(self) -> dict[str, Any]:
        """rank, alpha, use_rslora, init, the options and the layout (explicit)."""
        return {**self.common_fields(), **self.options, **self.layout.fields()}

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
    ) -> LoKrParametrization:
        """Build from the fields (LyCORIS's layout rules unless the layout is explicit)."""
        options = {k: fields[k] for k in ("factor", "decompose_both", "full_matrix") if k in fields}
        return cls(
            spec,
            layout_for(spec, fields),
            **cls.common_arguments(fields, adapter),
            options=options,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        lay = self.layout
        return super().extra_repr() + (
            f", w1=({lay.out_split[0]}, {lay.in_split[0]}), "
            f"w2=({lay.out_split[1]}, {lay.in_split[1]}), "
            f"factored=({lay.w1_factored}, {lay.w2_factored})"
            + (", tucker=True" if lay.tucker else "")
        )


def _register() -> None:
    register_variant(LoKrConfig, LoKrParametrization)
