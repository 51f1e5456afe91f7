"""Plain LoRA (and rsLoRA): ``W' = W + scale * B @ A``, the variant every other builds on.

``A`` is ``(rank, fan_in)`` and ``B`` ``(fan_out, rank)`` in the tensor's matrix view (a conv
weight ``(out, in/groups, *k)`` is ``(out, in/groups * prod(k))``; a Hugging Face ``Conv1D``
weight, stored ``(in, out)``, is seen untransposed). ``B`` starts at zero, so registering the
adapter leaves the model unchanged. ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
rsLoRA).

Memory: the factored forward computes ``base(x) + scale * B(A(dropout(x)))`` and keeps only
the ``(..., rank)`` activation of ``A x`` for backward besides what the layer keeps; the
materialized forward forms ``W + sBA`` (one weight-sized temporary per layer and step).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..core.distributed import copy_into
from ..core.errors import LoRAError
from ..core.layer_ops import LayerKind, LayerOps
from ..core.targets import LayerSpec
from ..core.variant import AdapterVariant, VariantConfig, register_variant

__all__ = ["Init", "LayerKind", "LoRAParametrization", "PlainLoRAConfig", "add_scaled"]

Init = Literal["kaiming", "gaussian"]
INITS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class PlainLoRAConfig(VariantConfig):
    """Plain LoRA (the default variant): no options beyond rank, alpha, dropout and init."""

    name: ClassVar[str] = "lora"


def add_scaled(y: Tensor, update: Tensor, scale: float | Tensor) -> Tensor:
    """``y + scale * update`` in one op where the scale is a number."""
    # A hot-swap-ready adapter keeps its scale in a tensor; add's alpha takes numbers only.
    return y + update * scale if isinstance(scale, Tensor) else y.add(update, alpha=scale)


def _legacy_spec(args: tuple, kwargs: dict[str, Any]) -> LayerSpec:
    """0.2's ``LoRAParametrization(fan_in, fan_out, weight_shape, kind=, fan_in_fan_out=)``."""
    warnings.warn(
        "LoRAParametrization(fan_in, fan_out, weight_shape, ...) is deprecated: pass a "
        "lora_param.LayerSpec(kind, shape, fan_in, fan_out, fan_in_fan_out) instead "
        "(removed in 0.4).",
        DeprecationWarning,
        stacklevel=3,
    )
    fan_in, fan_out, shape = args
    return LayerSpec(
        str(kwargs.pop("kind", "param")),
        tuple(shape),
        int(fan_in),
        int(fan_out),
        bool(kwargs.pop("fan_in_fan_out", False)),
    )


class LoRAParametrization(AdapterVariant):
    """Adds a low-rank update ``scale * B @ A`` to the tensor it is registered on.

    Args:
        spec: The tensor seen as a matrix (see :class:`~lora_param.LayerSpec`).
        rank: Rank of the update.
        alpha: Scaling numerator; ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
            rsLoRA); None means ``alpha = rank``.
        adapter: Name of the adapter this update belongs to.
        dropout: Dropout probability on the layer input (factored path) or on the input
            features of ``A`` (materialized path).
        init: ``"kaiming"`` (uniform, as loralib/PEFT; N(0, 1) for embeddings, as PEFT) or
            ``"gaussian"`` (A ~ N(0, 1), as the well-known tutorial) for ``A``.
        use_rslora: Use ``alpha / sqrt(rank)`` as the scale.
        device: Device of ``A`` and ``B`` (the weight's).
        dtype: Dtype of ``A`` and ``B`` (the weight's).
    """

    variant: ClassVar[str] = "lora"
    kinds: ClassVar[frozenset[str]] = frozenset(
        {"linear", "conv", "embedding", "conv1d_hf", "param"}
    )
    capabilities: ClassVar[frozenset[str]] = frozenset({"hotswap", "combine", "strength"})
    lowrank_exact: ClassVar[bool] = True

    def __init__(
        self,
        spec: LayerSpec | int,
        *args: Any,
        rank: int = 4,
        alpha: float | None = None,
        adapter: str = "default",
        dropout: float = 0.0,
        init: Init = "kaiming",
        use_rslora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **legacy: Any,
    ) -> None:
        if not isinstance(spec, LayerSpec):
            spec = _legacy_spec((spec, *args), legacy)
        if legacy:
            raise TypeError(f"unexpected arguments {sorted(legacy)}")
        super().__init__(spec, adapter=adapter, dropout=dropout)
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.init, self.use_rslora = init, bool(use_rslora)
        self.scale: float | Tensor = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        shape_a, shape_b = self._factor_shapes(spec, self.rank)
        self.lora_A = nn.Parameter(torch.empty(shape_a, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(shape_b, device=device, dtype=dtype))
        self.reset_parameters()

    @staticmethod
    def _factor_shapes(spec: LayerSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, spec.fan_in), (spec.fan_out, rank)

    def reset_parameters(self) -> None:
        """Draw ``A`` anew with the chosen init and set ``B`` to zero (the update becomes zero).

        For embeddings ``A`` is always N(0, 1), as PEFT: PEFT zeroes ``lora_embedding_A`` and
        draws ``lora_embedding_B`` N(0, 1), which are this layout's ``B`` and ``A`` transposed.
        """
        with torch.no_grad():
            if self.init == "gaussian" or self.kind == "embedding":
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    # ---- the protocol ----------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """``lora_A`` and ``lora_B``."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """``lora_A`` ``(rank, fan_in)``, ``lora_B`` ``(fan_out, rank)``."""
        shape_a, shape_b = cls._factor_shapes(spec, int(fields["rank"]))
        return {"lora_A": shape_a, "lora_B": shape_b}

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """rank a positive integer, alpha a positive number, use_rslora a bool, a known init."""
        rank, alpha = fields.get("rank"), fields.get("alpha")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise LoRAError(f"rank for '{path}' must be a positive integer, got {rank!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise LoRAError(f"alpha for '{path}' must be a positive number, got {alpha!r}.")
        if not isinstance(fields.get("use_rslora", False), bool):
            raise LoRAError(f"use_rslora for '{path}' must be True or False.")
        super().check_fields(spec, fields, path)

    def _factors(self, dtype: torch.dtype, dropout: bool) -> tuple[Tensor, Tensor, float]:
        """``A`` (input features dropped when ``dropout``), ``B`` and a number scale."""
        lora_a: Tensor = self.lora_A
        lora_b: Tensor = self.lora_B
        scale = self.scale
        if dropout and self.dropout_p > 0 and self.training:
            lora_a = lora_a * self.dropout(torch.ones_like(lora_a[..., :1, :]))
        if isinstance(scale, Tensor):  # hot-swap-ready (routing.hotswap): alpha takes numbers
            lora_b, scale = lora_b * scale, 1.0
        if lora_a.dtype != dtype:
            lora_a, lora_b = lora_a.to(dtype), lora_b.to(dtype)
        return lora_a, lora_b, float(scale)

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + scale * B @ A`` (whether enabled or not); ``dropout`` masks A's inputs."""
        lora_a, lora_b, scale = self._factors(weight.dtype, dropout)
        if self.fan_in_fan_out:
            return torch.addmm(weight, lora_a.t(), lora_b.t(), alpha=scale)
        matrix = weight.reshape(self.fan_out, self.fan_in)
        return torch.addmm(matrix, lora_b, lora_a, alpha=scale).view(weight.shape)

    def merged_inplace(self, weight: Tensor) -> Tensor:
        """``weight += scale * B @ A`` in place (float32 or wider; no second weight-sized tensor).

        A subclass with its own :meth:`adapt` gets :meth:`merged` unless it overrides this too.
        """
        if type(self).adapt is not LoRAParametrization.adapt or not weight.is_contiguous():
            return self.merged(weight)
        return self._add_update_(weight)

    def _add_update_(self, weight: Tensor) -> Tensor:
        """``weight + scale * B @ A`` written into ``weight`` (contiguous, the update's dtype)."""
        with torch.no_grad():
            lora_a, lora_b, scale = self._factors(weight.dtype, dropout=False)
            if self.fan_in_fan_out:
                weight.addmm_(lora_a.t(), lora_b.t(), alpha=scale)
            else:
                weight.view(self.fan_out, self.fan_in).addmm_(lora_b, lora_a, alpha=scale)
        return weight

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """``y + scale * B(A(dropout(x)))`` in the layer's geometry."""
        x_in = x if self.kind == "embedding" else self.dropout(x)
        return add_scaled(y, ops.lowrank(layer, x_in, self.lora_A, self.lora_B), self.scale)

    def lowrank(self) -> tuple[Tensor, Tensor] | None:
        """``(A, scale * B)``."""
        return self.lora_A, self.lora_B * self.scale

    def base_scale(self) -> float:
        """The adapter's own scale, ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def set_strength(self, strength: float) -> None:
        """``scale = strength * alpha / rank``; a tensor scale (hot-swap) keeps its identity."""
        value = self.base_scale() * float(strength)
        if isinstance(self.scale, Tensor):
            with torch.no_grad():
                self.scale.fill_(value)
        else:
            self.scale = value
        self.strength = float(strength)
        self.clear_cache()

    # ---- hot-swapping -------------------------------------------------------------------------

    def swap_room(self) -> int:
        """The rank ``A`` and ``B`` hold now."""
        return int(self.lora_A.shape[-2])

    def swap_prepared(self) -> bool:
        """Whether the scale is a tensor (``prepare_swap`` ran)."""
        return isinstance(self.scale, Tensor)

    def prepare_swap(self, max_rank: int) -> None:
        """Zero-pad ``A`` and ``B`` to ``max_rank``; the scale becomes a 0-d tensor buffer."""
        rank, scale = self.swap_room(), self.scale
        if rank < max_rank:
            a, b = self.lora_A, self.lora_B
            new_a = a.new_zeros(max_rank, a.shape[1])
            new_b = b.new_zeros(b.shape[0], max_rank)
            new_a[:rank] = a
            new_b[:, :rank] = b
            self.lora_A = nn.Parameter(new_a, requires_grad=a.requires_grad)
            self.lora_B = nn.Parameter(new_b, requires_grad=b.requires_grad)
        if not isinstance(scale, Tensor):
            del self.__dict__["scale"]
            self.register_buffer(
                "scale", torch.tensor(float(scale), device=self.lora_A.device), persistent=False
            )
        self.rank = max_rank
        self.alpha = self._alpha_for(float(self.scale), max_rank)
        self.clear_cache()

    def _alpha_for(self, scale: float, rank: int) -> float:
        """The alpha that gives ``scale`` at ``rank`` (so saved files keep the update)."""
        return scale * (math.sqrt(rank) if self.use_rslora else rank)

    def plan_swap(
        self, fields: Mapping[str, Any] | None, tensors: Mapping[str, Tensor], where: str
    ) -> Any:
        """Copy another LoRA's factors and scale into the padded tensors (the rest zeroed)."""
        if fields is None:
            lora_a = lora_b = None
            scale = 1.0
        else:
            rank, room = int(fields["rank"]), self.swap_room()
            if (fields["fan_in"], fields["fan_out"]) != (self.fan_in, self.fan_out):
                raise LoRAError(
                    f"{where} is {fields['fan_out']}x{fields['fan_in']}, but the model's "
                    f"tensor is {self.fan_out}x{self.fan_in}."
                )
            if rank > room:
                raise LoRAError(
                    f"{where} has rank {rank}, more than the {room} prepare_hotswap made room "
                    "for; prepare with a larger max_rank."
                )
            lora_a, lora_b = tensors.get("lora_A"), tensors.get("lora_B")
            shapes = self.tensor_shapes(self.spec, {"rank": rank})
            if (
                lora_a is None
                or lora_b is None
                or tuple(lora_a.shape) != shapes["lora_A"]
                or tuple(lora_b.shape) != shapes["lora_B"]
            ):
                raise LoRAError(f"{where} lacks well-shaped factors.")
            denom = math.sqrt(rank) if fields.get("use_rslora", False) else rank
            scale = float(fields["alpha"]) / denom

        def copy_in() -> None:
            rank = 0 if lora_a is None else lora_a.shape[0]
            padded_a = torch.zeros(self.lora_A.shape, dtype=self.lora_A.dtype)
            padded_b = torch.zeros(self.lora_B.shape, dtype=self.lora_B.dtype)
            if lora_a is not None and lora_b is not None:
                padded_a[:rank] = lora_a
                padded_b[:, :rank] = lora_b
            copy_into(self.lora_A, padded_a)  # this rank's shard of a sharded (FSDP2) factor
            copy_into(self.lora_B, padded_b)
            self.scale.fill_(scale)  # type: ignore[union-attr]  # a tensor once prepared
            self.alpha = self._alpha_for(scale, self.swap_room())
            self.clear_cache()

        return copy_in

    def fields(self) -> dict[str, Any]:
        """rank, alpha, use_rslora, init."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "init": self.init,
        }

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
    ) -> LoRAParametrization:
        """Build from rank, alpha, use_rslora, init and dropout fields (and the base weight,
        for subclasses that need it: :attr:`needs_weight`)."""
        extra: dict[str, Any] = {}
        if cls.needs_weight:
            if base_weight is None and not cls.loads_without_weight:
                raise ValueError(f"a {cls.variant} adapter needs the base weight to start from")
            extra["base_weight"] = base_weight
        return cls(
            spec,
            rank=int(fields["rank"]),
            alpha=float(fields["alpha"]),
            adapter=adapter,
            dropout=float(fields.get("dropout", 0.0)),
            init=fields.get("init", "kaiming"),
            use_rslora=bool(fields.get("use_rslora", False)),
            device=device,
            dtype=dtype,
            **extra,
        )

    def cache_tensors(self) -> list[Tensor]:
        """``A``, ``B`` (and a tensor scale)."""
        scale = self.scale
        params = self._parameters  # not two nn.Module.__getattr__ calls: evaluation reads this
        out: list[Tensor] = [params["lora_A"], params["lora_B"]]  # type: ignore[list-item]
        return [*out, scale] if isinstance(scale, Tensor) else out

    def cache_key(self) -> tuple:
        """Enabled flag and a number scale (a tensor scale is one of the cached tensors)."""
        scale = self.scale
        return (self._enabled, None if isinstance(scale, Tensor) else scale)

    def extra_repr(self) -> str:
        scale = float(self.scale)
        return (
            f"adapter={self.adapter!r}, kind={self.kind}, fan_in={self.fan_in}, "
            f"fan_out={self.fan_out}, rank={self.rank}, alpha={self.alpha:g}, "
            f"scale={scale:g}, enabled={self._enabled}"
        )


def _register() -> None:
    from .experts import ExpertLoRAParametrization  # experts builds on this module

    register_variant(PlainLoRAConfig, LoRAParametrization, ExpertLoRAParametrization)
