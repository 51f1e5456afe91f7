"""PiSSA and OLoRA: LoRA (or DoRA) started from the weight itself, with the weight untouched.

``add_lora(init="pissa")`` (or ``"pissa_niter_<K>"``, ``"olora"``; with ``use_dora=True`` too)
starts ``B A`` from the weight's principal part instead of from zero. PEFT does this by
*rewriting the base weight* to the residual ``W - s B0 A0``: the model starts unchanged, but
"adapter off" is then the residual, not the pretrained model, and a saved adapter fits the
pretrained model only after a conversion. Here the weight stays untouched: the entry keeps its
start ``A0``, ``B0`` as frozen tensors (buffers, saved in adapter files) and computes::

    W' = W + s (B A - B0 A0)

so the adapter off is the pretrained model bit for bit, and the model starts exactly unchanged:
the update is computed as the rank-``2r`` product ``[B - B0, B0] @ [A; A - A0]``, whose factors
are exact zeros at the start (not a difference of two equal products, which would round).
Those are also the exact low-rank factors mixed batches stack and ``combine_adapters(method=
"cat")`` concatenates. With dropout in training the trained branch alone sees the dropped input,
as in PEFT: ``W x - s B0 A0 x + s B A dropout(x)``.

The starts, on the weight's matrix view ``M`` (``(out, in)``; a conv's ``(out, in * k)``; a
Hugging Face ``Conv1D`` weight transposed back), computed in float32 (float64 stays float64):

* ``"pissa"``: ``M = U S V^T`` (full SVD); ``B0 = U_r sqrt(S_r / s)``, ``A0 = sqrt(S_r / s) V_r^T``,
  so ``s B0 A0 = U_r S_r V_r^T`` (PEFT divides the singular values by the scale ``s``);
* ``"pissa_niter_<K>"``: the same from ``torch.svd_lowrank(M, q=r, niter=K)``, Halko et al.'s
  randomized SVD with ``K`` subspace iterations (fast on large weights; random, approximate);
* ``"olora"``: ``M = Q R``; ``B0 = Q[:, :r]``, ``A0 = R[:r]`` (not divided by ``s``, as PEFT).

The start is taken from the weight as the layer sees it when the adapter is added (a packed base
dequantized, earlier adapters included). ``load_lora`` reads the start from the file and
computes nothing from the weight.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.distributed import full_tensor
from ..core.errors import LoRAError
from ..core.layer_ops import LayerOps
from ..core.targets import LayerSpec
from ..core.variant import VariantConfig, register_init, register_variant
from .dora import DoRAParametrization
from .lora import LoRAParametrization, add_scaled

__all__ = [
    "PiSSAConfig",
    "PiSSADoRAConfig",
    "PiSSADoRAParametrization",
    "PiSSAParametrization",
    "is_weight_init",
    "start_factors",
]

_NITER = re.compile(r"pissa_niter_(\d+)")
INIT_HELP = (
    "'pissa' (top singular vectors), 'pissa_niter_<K>' (randomized SVD, K >= 0 iterations) or "
    "'olora' (QR)"
)


@dataclass(frozen=True)
class PiSSAConfig(VariantConfig):
    """LoRA started from the weight (``add_lora(init="pissa" | "pissa_niter_<K>" | "olora")``)."""

    name: ClassVar[str] = "pissa"


@dataclass(frozen=True)
class PiSSADoRAConfig(VariantConfig):
    """DoRA started from the weight (``add_lora(init="pissa", use_dora=True)``)."""

    name: ClassVar[str] = "pissa_dora"


def _parse(init: object) -> tuple[str, int | None] | None:
    """``("pissa", None)``, ``("pissa", K)`` or ``("olora", None)``; None for other inits."""
    if init in ("pissa", "olora"):
        return str(init), None
    match = _NITER.fullmatch(init) if isinstance(init, str) else None
    return ("pissa", int(match.group(1))) if match else None


def is_weight_init(init: object) -> bool:
    """Whether ``init`` is one of the initializations from the weight this module implements."""
    return _parse(init) is not None


def start_factors(matrix: Tensor, rank: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """The start ``(A0, B0)`` of an adapter of ``rank`` on ``matrix`` (float32 or wider).

    Args:
        matrix: The weight's matrix view ``(fan_out, fan_in)``.
        rank: The adapter's rank.
        scale: Its scale ``s`` (PiSSA's singular values are divided by it).
        init: ``"pissa"``, ``"pissa_niter_<K>"`` or ``"olora"``.

    Returns:
        ``A0`` ``(rank, fan_in)`` and ``B0`` ``(fan_out, rank)``, computed as PEFT 0.21 does.
    """
    parsed = _parse(init)
    if parsed is None:
        raise LoRAError(f"init={init!r} is not {INIT_HELP}.")
    method, niter = parsed
    wide = matrix.detach().to(torch.promote_types(matrix.dtype, torch.float32))
    if method == "olora":
        q, r = torch.linalg.qr(wide)
        return r[:rank].contiguous(), q[:, :rank].contiguous()
    if niter is None:
        u, s, vh = torch.linalg.svd(wide, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(wide, q=rank, niter=niter)
        vh = v.t()
    root = (s / scale).sqrt()
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


class _StartKept(LoRAParametrization):
    """What PiSSA-started LoRA and DoRA share: the frozen start and the rank-``2r`` update."""

    kinds: ClassVar[frozenset[str]] = frozenset(
        {"linear", "conv", "embedding", "conv1d_hf", "param"}
    )
    capabilities: ClassVar[frozenset[str]] = frozenset({"combine", "strength"})
    lowrank_exact: ClassVar[bool] = True
    needs_weight: ClassVar[bool] = True
    loads_without_weight: ClassVar[bool] = True
    lora_A0: Tensor
    lora_B0: Tensor

    def __init__(self, spec: LayerSpec, *, init: str = "pissa", **kwargs: Any) -> None:
        if not is_weight_init(init):
            raise ValueError(f"init must be {INIT_HELP}, got {init!r}")
        super().__init__(spec, init="kaiming", **kwargs)
        self.init = init  # type: ignore[assignment]  # LoRA's Init names the random ones only
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B))

    def start_from(self, weight: Tensor) -> None:
        """Compute the start from ``weight`` (as the layer sees it); ``A``, ``B`` start there."""
        matrix = weight.detach()
        matrix = matrix.t() if self.fan_in_fan_out else matrix.reshape(self.fan_out, self.fan_in)
        a0, b0 = start_factors(matrix, self.rank, float(self.scale), str(self.init))
        with torch.no_grad():
            for t, value in ((self.lora_A0, a0), (self.lora_A, a0)):
                t.copy_(value)
            for t, value in ((self.lora_B0, b0), (self.lora_B, b0)):
                t.copy_(value)
        self.clear_cache()

    def reset_parameters(self) -> None:
        """Set ``A`` and ``B`` back to the start (the update becomes zero)."""
        if "lora_A0" not in self._buffers:  # LoRA's __init__, before the start exists
            super().reset_parameters()
            return
        with torch.no_grad():
            self.lora_A.copy_(self.lora_A0)
            self.lora_B.copy_(self.lora_B0)

    # ---- the protocol ----------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """``lora_A``, ``lora_B`` (trained) and the start ``lora_A0``, ``lora_B0`` (frozen)."""
        return {**super().tensors(), "lora_A0": self.lora_A0, "lora_B0": self.lora_B0}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """LoRA's factors, and the start with the same shapes."""
        shapes = super().tensor_shapes(spec, fields)
        return {**shapes, "lora_A0": shapes["lora_A"], "lora_B0": shapes["lora_B"]}

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """LoRA's checks, and an init from the weight."""
        init = fields.get("init")
        if not is_weight_init(init):
            raise LoRAError(
                f"init={init!r} is not an initialization of the {cls.variant} variant (for "
                f"'{path}'); use {INIT_HELP}."
            )
        super().check_fields(spec, {**fields, "init": "kaiming"}, path)

    def pair(
        self, dtype: torch.dtype | None = None, dropout: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Unscaled rank-``2r`` factors ``(A', B')`` of ``B A - B0 A0``, in ``dtype``.

        ``[A; A - A0]`` and ``[B - B0, B0]`` (exact zeros at the start); with ``dropout`` (a
        training forward with dropout set) ``[A masked; A0]`` and ``[B, -B0]``, the input
        features of ``A`` alone dropped.
        """
        a: Tensor = self.lora_A
        b: Tensor = self.lora_B
        a0, b0 = self.lora_A0, self.lora_B0
        if dtype is not None and a.dtype != dtype:
            a, b, a0, b0 = a.to(dtype), b.to(dtype), a0.to(dtype), b0.to(dtype)
        if dropout and self.dropout_p > 0 and self.training:
            a = a * self.dropout(torch.ones_like(a[..., :1, :]))
            return torch.cat([a, a0]), torch.cat([b, -b0], dim=1)
        return torch.cat([a, a - a0]), torch.cat([b - b0, b0], dim=1)

    def _factors(self, dtype: torch.dtype, dropout: bool) -> tuple[Tensor, Tensor, float]:
        """LoRA's ``adapt`` computes ``W + s B' A'`` with the rank-``2r`` pair."""
        lora_a, lora_b = self.pair(dtype, dropout)
        return lora_a, lora_b, float(self.scale)

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """``y + s B' A' x``; with dropout in training ``y + s B A dropout(x) - s B0 A0 x``."""
        if self.dropout_p > 0 and self.training and self.kind != "embedding":
            y = add_scaled(
                y, ops.lowrank(layer, self.dropout(x), self.lora_A, self.lora_B), self.scale
            )
            return add_scaled(y, ops.lowrank(layer, x, self.lora_A0, self.lora_B0), -self.scale)
        lora_a, lora_b = self.pair()
        return add_scaled(y, ops.lowrank(layer, x, lora_a, lora_b), self.scale)

    def lowrank(self) -> tuple[Tensor, Tensor] | None:
        """``(A', s B')``, the exact rank-``2r`` factors."""
        lora_a, lora_b = self.pair()
        return lora_a, lora_b * self.scale

    def equivalent_lora(self) -> tuple[Tensor, Tensor, int, float]:
        """The plain LoRA of rank ``2r`` with the same update: ``(A, B, rank, alpha)``.

        PEFT's own conversion target (``save_pretrained(path_initial_model_for_weight_
        conversion=...)``): ``A = [A; A0]``, ``B = [B, -B0]``, alpha doubled (times ``sqrt(2)``
        with rsLoRA), so that the scale is unchanged. Loaded onto the pretrained weight it
        gives ``W + s (B A - B0 A0)``.
        """
        # whole tensors: a sharded (FSDP2) factor is all-gathered (a collective), the start
        # is a buffer (never sharded)
        a = torch.cat([full_tensor(self.lora_A), full_tensor(self.lora_A0)])
        b = torch.cat([full_tensor(self.lora_B), -full_tensor(self.lora_B0)], dim=1)
        alpha = self.alpha * (2**0.5 if self.use_rslora else 2.0)
        return a, b, 2 * self.rank, alpha

    def cache_tensors(self) -> list[Tensor]:
        """The factors and the start."""
        return [*super().cache_tensors(), self.lora_A0, self.lora_B0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", init={self.init!r}"


class PiSSAParametrization(_StartKept):
    """LoRA started from the weight, the weight untouched: ``W + s (B A - B0 A0)``.

    ``add_lora(init="pissa" | "pissa_niter_<K>" | "olora")`` builds it (the ``"pissa"``
    variant in files). ``A`` and ``B`` train; the start ``A0``, ``B0`` is frozen and saved.

    Args:
        spec: The tensor seen as a matrix (see :class:`~lora_param.LayerSpec`).
        base_weight: The weight the start is computed from (the layer's, as it sees it); None
            leaves the start zero, to be filled from a file.
        **kwargs: As :class:`~lora_param.LoRAParametrization` (rank, alpha, ...), with
            ``init`` one of ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"``.
    """

    variant: ClassVar[str] = "pissa"

    def __init__(
        self, spec: LayerSpec, *, base_weight: Tensor | None = None, **kwargs: Any
    ) -> None:
        super().__init__(spec, **kwargs)
        if base_weight is not None:
            self.start_from(base_weight)


class PiSSADoRAParametrization(DoRAParametrization, _StartKept):
    """DoRA started from the weight: ``m (W + s (B A - B0 A0)) / ||W + s (B A - B0 A0)||``.

    ``add_lora(init="pissa", use_dora=True)`` builds it (the ``"pissa_dora"`` variant in files).
    The magnitude starts at ``||W||``, so the model starts unchanged; PEFT's DoRA on its
    residual weight computes the same ``W'``.

    Args:
        spec: As :class:`PiSSAParametrization`.
        base_weight: As :class:`PiSSAParametrization` (also the magnitude's start).
        **kwargs: As :class:`PiSSAParametrization`.
    """

    variant: ClassVar[str] = "pissa_dora"

    def __init__(
        self, spec: LayerSpec, *, base_weight: Tensor | None = None, **kwargs: Any
    ) -> None:
        # DoRA sets the magnitude from the weight (reset_magnitude below: ones without one)
        super().__init__(spec, base_weight=base_weight, **kwargs)  # type: ignore[arg-type]
        if base_weight is not None:
            self.start_from(base_weight)

    def reset_magnitude(self, weight: Tensor | None) -> None:
        """``m = ||weight||``; ones when there is no weight (a file fills it)."""
        if weight is None:
            with torch.no_grad():
                self.lora_magnitude.fill_(1.0)
            return
        super().reset_magnitude(weight)

    def _oriented(self) -> tuple[Tensor, Tensor]:
        """The rank-``2r`` pair in the orientation DoRA takes norms in."""
        lora_a, lora_b = self.pair()
        if self.norm_columns and not self.fan_in_fan_out:
            return lora_a.t(), lora_b.t()
        return lora_b, lora_a


def _register() -> None:
    register_variant(PiSSAConfig, PiSSAParametrization)
    register_variant(PiSSADoRAConfig, PiSSADoRAParametrization)
    register_init("lora", is_weight_init, PiSSAConfig.name)
    register_init("dora", is_weight_init, PiSSADoRAConfig.name)
