"""The adapter-variant protocol: what every kind of adapter tells the rest of the library.

An adapter *variant* (plain LoRA, DoRA, per-expert LoRA, LoHa, OFT, ...) is a
:class:`AdapterVariant` subclass in its own file under :mod:`lora_param.variants`, registered
with :func:`register_variant` together with its options class (a :class:`VariantConfig`).
Toggles, merge, removal, files, the eval cache, routing and arithmetic talk to variants only
through this protocol; none of them knows a variant by name. The protocol is public: a user
can add a variant the same way (see the "Writing a variant" page of the docs).

A variant maps the frozen weight ``W`` to the adapted weight ``W' = adapt(W)``. It declares:

* its tensors and their shapes (:meth:`~AdapterVariant.tensors`,
  :meth:`~AdapterVariant.tensor_shapes`), trainable or frozen, saved in adapter files;
* ``W'`` in the weight's dtype for the forward (:meth:`~AdapterVariant.adapt`) and in at
  least float32 for merging (:meth:`~AdapterVariant.merged`; float64 stays float64;
  optionally in place, :meth:`~AdapterVariant.merged_inplace`, for merged exports);
  *additive* variants (``W' = W + ΔW`` with ``ΔW`` independent of ``W``) also give ``ΔW``
  without ``W`` (:meth:`~AdapterVariant.delta`);
* optionally a factored forward: an additive branch ``Δy(x)`` (:meth:`~AdapterVariant.add_branch`)
  or, for variants whose update depends on ``W`` (DoRA, OFT), the whole layer output
  (:meth:`~AdapterVariant.layer_forward`), computed without forming ``W'``;
* optionally its exact low-rank factors ``ΔW = B @ A`` (:meth:`~AdapterVariant.lowrank`,
  :attr:`~AdapterVariant.lowrank_exact`), which mixed batches stack and exact adapter
  concatenation uses;
* its fields in the adapter file (:meth:`~AdapterVariant.fields`);
* its :attr:`~AdapterVariant.capabilities`: which operations it supports beyond the ones
  every variant has (forward, toggles, merge, including into a packed base, remove,
  save/load). An operation a variant cannot do is refused with a ``LoRAError`` naming the
  variant and the operation, before anything changes (:func:`require`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .entry import AdapterEntry
from .errors import LoRAError

if TYPE_CHECKING:
    from .layer_ops import LayerOps
    from .targets import LayerSpec

__all__ = [
    "CAPABILITIES",
    "AdapterVariant",
    "BaseOutput",
    "VariantConfig",
    "init_variant",
    "register_init",
    "register_variant",
    "require",
    "variant_class",
    "variant_config",
    "variant_names",
]

#: Operations a variant may support (see :attr:`AdapterVariant.capabilities`):
#: ``"hotswap"``: swapped in place under ``torch.compile`` (fixed-rank padding);
#: ``"combine"``: a source of ``combine_adapters`` (its update, weighted and summed);
#: ``"strength"``: ``set_adapter_scale`` (a scale multiplies its update).
#: Every variant supports forward, toggles, merge (into packed bases too), removal, files and
#: mixed batches; file formats other than lora_param's own depend on codecs in ``interop``.
CAPABILITIES = ("hotswap", "combine", "strength")

# (layer, x, bias) -> the layer's output with its frozen base weight (packed or not).
BaseOutput = Callable[[Any, Tensor, bool], Tensor]


@dataclass(frozen=True)
class VariantConfig:
    """Options of one variant, beyond rank, alpha, dropout and init (which every family has).

    Subclass it per variant (a frozen dataclass, JSON-ready fields) and register it with the
    variant's entry classes (:func:`register_variant`). ``add_lora(variant=...)`` takes an
    instance or the variant's name (its default options).
    """

    name: ClassVar[str] = ""

    def to_fields(self) -> dict[str, Any]:
        """The options as adapter-file fields."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class AdapterVariant(AdapterEntry):
    """One adapter of one variant on one tensor: the parametrization registered on it.

    Subclasses set :attr:`variant`, :attr:`kinds`, :attr:`additive`, :attr:`capabilities` and
    implement :meth:`tensors`, :meth:`tensor_shapes`, :meth:`adapt`, :meth:`fields` and
    :meth:`from_fields`; the other methods have defaults built on those.

    Args:
        spec: The tensor adapted, seen as a matrix (kind, shape, fan_in, fan_out).
        adapter: Name of the adapter this entry belongs to.
        dropout: Dropout probability on the adapter's input (factored forward) or on the
            input features of its update (materialized forward).
    """

    #: The variant's name, as written in adapter files.
    variant: ClassVar[str] = ""
    #: Layer kinds this class adapts (a variant may register one class per group of kinds).
    kinds: ClassVar[frozenset[str]] = frozenset()
    #: ``W' = W + ΔW`` with ``ΔW`` independent of ``W``.
    additive: ClassVar[bool] = True
    #: Operations from :data:`CAPABILITIES` this variant supports.
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: :meth:`lowrank` gives exact factors (mixed batches stack them; ``"cat"`` concatenates).
    lowrank_exact: ClassVar[bool] = False
    #: :meth:`from_fields` needs the weight as the layer sees it (DoRA's magnitude, PiSSA).
    needs_weight: ClassVar[bool] = False
    #: Everything :meth:`from_fields` derives from the weight is among :meth:`tensors` (saved
    #: in files): ``load_lora``, which fills every tensor from the file, then passes
    #: ``base_weight=None`` and skips the work (PiSSA's SVD).
    loads_without_weight: ClassVar[bool] = False

    def __init__(self, spec: LayerSpec, *, adapter: str = "default", dropout: float = 0.0) -> None:
        super().__init__(adapter)
        self.spec = spec
        self.dropout_p = float(dropout)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # ---- the layer seen as a matrix --------------------------------------------------------

    @property
    def kind(self) -> str:
        """Kind of the layer the tensor belongs to."""
        return self.spec.kind

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the adapted tensor."""
        return self.spec.shape

    @property
    def fan_in(self) -> int:
        """Columns of the tensor's matrix view."""
        return self.spec.fan_in

    @property
    def fan_out(self) -> int:
        """Rows of the tensor's matrix view."""
        return self.spec.fan_out

    @property
    def fan_in_fan_out(self) -> bool:
        """The tensor is stored transposed, ``(fan_in, fan_out)`` (Hugging Face ``Conv1D``)."""
        return self.spec.fan_in_fan_out

    # ---- tensors ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor the adapter file holds for this entry, by name (trainable and frozen)."""
        raise NotImplementedError

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """The tensors the adapter trains (the others in :meth:`tensors` are frozen)."""
        return {n: t for n, t in self.tensors().items() if isinstance(t, nn.Parameter)}

    @classmethod
    def tensor_shapes(cls, spec: LayerSpec, fields: Mapping[str, Any]) -> dict[str, tuple]:
        """The shape of each tensor of :meth:`tensors`, from the layer and the file's fields."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, spec: LayerSpec) -> int:
        """The largest ``rank`` this variant can have on the tensor (default: min of the fans)."""
        return min(spec.fan_in, spec.fan_out)

    @classmethod
    def rank_limit_text(cls, spec: LayerSpec) -> str:
        """How :meth:`max_rank` is computed, for messages."""
        return f"min(fan_in={spec.fan_in}, fan_out={spec.fan_out})"

    @classmethod
    def check_fields(cls, spec: LayerSpec, fields: Mapping[str, Any], path: str) -> None:
        """Raise LoRAError for fields this variant cannot use on the tensor (before any change).

        The default checks ``init`` against :attr:`inits`.
        """
        if fields.get("init", "kaiming") not in cls.inits:
            raise LoRAError(
                f"init={fields.get('init')!r} is not an initialization of the {cls.variant} "
                f"variant (for '{path}'); use one of {list(cls.inits)}."
            )

    #: Values of ``init`` the variant accepts.
    inits: ClassVar[tuple[str, ...]] = ("kaiming", "gaussian")

    # ---- the math ---------------------------------------------------------------------------

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``W'`` in ``weight``'s dtype, whether enabled or not.

        Computed in ``weight``'s dtype: the entry's own tensors are cast to it (a no-op in the
        forward, where they share it; float32 or float64 when :meth:`merged` widens it).

        Args:
            weight: The weight before this entry (the base, or earlier entries' result).
            dropout: Apply the adapter's dropout (training forward only).
        """
        raise NotImplementedError

    def merged(self, weight: Tensor) -> Tensor:
        """``W'`` computed in at least float32 (float64 stays float64), for merging."""
        with torch.no_grad():
            return self.adapt(weight.detach().to(self.compute_dtype_for(weight)))

    def merged_inplace(self, weight: Tensor) -> Tensor:
        """:meth:`merged`'s ``W'``, computed over ``weight`` where the variant can.

        ``weight`` is float32 or wider and the caller's to overwrite (a gathered or dequantized
        copy, never a model's parameter). A variant that can form ``W'`` in place overrides
        this, so that a merged export holds one weight-sized tensor per layer instead of two;
        the default returns :meth:`merged` (a new tensor).
        """
        return self.merged(weight)

    def delta(self, weight: Tensor | None = None) -> Tensor:
        """``ΔW = W' - W`` in at least float32; additive variants need no ``weight``."""
        if weight is None:
            if not self.additive:
                raise LoRAError(
                    f"the update of a {self.variant} adapter depends on the weight it adapts; "
                    "pass the weight (delta(weight))."
                )
            like = self.anchor()
            weight = like.new_zeros(self.weight_shape, dtype=self.compute_dtype_for(like))
        wide = weight.detach().to(self.compute_dtype_for(weight))
        return self.merged(wide) - wide

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """``y`` plus the output of ``ΔW`` for input ``x``, without forming ``ΔW`` or ``W'``.

        Additive variants with a factored form override this; the default has none (the
        layer then computes with the materialized ``W'``). ``ops`` is the layer kind's entry of
        the op table (:data:`lora_param.core.layer_ops.OPS`).
        """
        raise NotImplementedError

    @classmethod
    def has_branch(cls) -> bool:
        """Whether the variant computes in factored form through :meth:`add_branch`."""
        return cls.additive and cls.add_branch is not AdapterVariant.add_branch

    def layer_forward(
        self,
        ops: LayerOps,
        layer: Any,
        x: Tensor,
        base: BaseOutput,
        weight: Callable[[], Tensor],
    ) -> Tensor | None:
        """The whole layer output in factored form, for a variant alone on the layer, or None.

        For variants whose update depends on ``W`` (DoRA, OFT). ``base(layer, x, bias)`` is the
        frozen base's output (lean for a packed base); ``weight()`` gives the base weight (the
        stored tensor, or a dequantized copy). None (the default) means: compute with the
        materialized ``W'``.
        """
        return None

    def lowrank(self) -> tuple[Tensor, Tensor] | None:
        """Exact factors ``(A, B)``, ``ΔW = B @ A`` in the matrix view, scale included, or None.

        ``A`` is ``(r, fan_in)``, ``B`` ``(fan_out, r)`` (for a per-expert tensor, stacked
        over experts). Differentiable: mixed batches train through them.
        """
        return None

    def set_strength(self, strength: float) -> None:
        """Scale the update by ``strength`` (1: as trained); only with ``"strength"``."""
        raise NotImplementedError

    def swap_room(self) -> int:
        """The rank the entry holds now (``"hotswap"`` variants)."""
        raise NotImplementedError

    def swap_prepared(self) -> bool:
        """Whether :meth:`prepare_swap` ran (``"hotswap"`` variants)."""
        raise NotImplementedError

    def prepare_swap(self, max_rank: int) -> None:
        """Pad to ``max_rank`` and make every compile-visible number a tensor (same output)."""
        raise NotImplementedError

    def plan_swap(
        self, fields: Mapping[str, Any] | None, tensors: Mapping[str, Tensor], where: str
    ) -> Callable[[], None]:
        """Check a file's entry (None: none there, a zero update) against this prepared entry.

        Returns:
            The function that copies it in place (no new tensor, no new Python number).

        Raises:
            LoRAError: It does not fit (other sizes, a larger rank than prepared).
        """
        raise NotImplementedError

    # ---- description -------------------------------------------------------------------------

    def fields(self) -> dict[str, Any]:
        """The entry's settings as adapter-file fields (JSON-ready), beyond the layer's."""
        raise NotImplementedError

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
    ) -> AdapterVariant:
        """Build an entry from adapter-file (or ``add_lora``) fields."""
        raise NotImplementedError

    # ---- helpers ------------------------------------------------------------------------------

    def anchor(self) -> Tensor:
        """One of the entry's tensors, for device and dtype."""
        return next(iter(self.tensors().values()))

    @staticmethod
    def compute_dtype_for(t: Tensor) -> torch.dtype:
        """At least float32 (float64 stays float64)."""
        return torch.promote_types(t.dtype, torch.float32)

    def forward(self, weight: Tensor) -> Tensor:
        """``W'`` when enabled (with dropout in training), else ``weight`` unchanged."""
        if not self._enabled:
            return weight
        return self.adapt(weight, dropout=True)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, adapter={self.adapter!r}, kind={self.kind}, "
            f"shape={tuple(self.weight_shape)}, enabled={self._enabled}"
        )


# ---- the registry ----------------------------------------------------------------------------

_CLASSES: dict[str, list[type[AdapterVariant]]] = {}
_CONFIGS: dict[str, type[VariantConfig]] = {}


def register_variant(config: type[VariantConfig], *classes: type[AdapterVariant]) -> None:
    """Make a variant available to ``add_lora`` and adapter files.

    Args:
        config: Its options class; ``config.name`` is the variant's name.
        *classes: Its entry classes, each covering some layer kinds (:attr:`~AdapterVariant.kinds`).
    """
    name = config.name
    if not name or any(c.variant != name for c in classes):
        raise ValueError(f"variant classes must all have variant == {name!r}")
    _CONFIGS[name] = config
    _CLASSES[name] = list(classes)


_INITS: list[tuple[str, Callable[[object], bool], str]] = []


def register_init(variant: str, accepts: Callable[[object], bool], implemented_by: str) -> None:
    """Let variant ``implemented_by`` build ``variant``'s adapters for some ``init`` values.

    An initialization that changes what an entry holds (PiSSA and OLoRA keep a frozen copy of
    their start) is a variant of its own in files and codecs, while users ask for it as an
    ``init`` of the variant they use: ``add_lora(init="pissa")`` builds entries of the variant
    registered for ``("lora", "pissa")``.

    Args:
        variant: The variant users name (``"lora"``, ``"dora"``).
        accepts: Whether an ``init`` value is one of these initializations.
        implemented_by: The registered variant whose entries implement them.
    """
    _INITS.append((variant, accepts, implemented_by))


def init_variant(variant: str, init: object) -> str:
    """The variant whose entries ``add_lora(variant=variant, init=init)`` builds.

    Returns:
        ``variant`` itself unless :func:`register_init` gave that init to another variant.
    """
    for name, accepts, implemented_by in _INITS:
        if name == variant and accepts(init):
            return implemented_by
    return variant


def variant_names() -> list[str]:
    """Names of the registered variants (``"lora"``, ``"dora"``, ...): what ``variant=`` takes.

    Returns:
        The names, in registration order.
    """
    return list(_CONFIGS)


def variant_config(value: str | VariantConfig | None) -> VariantConfig:
    """The options object for ``add_lora(variant=...)``: an instance, a name, or None (LoRA)."""
    if value is None:
        value = "lora"
    if isinstance(value, VariantConfig):
        if type(value).name not in _CONFIGS:
            raise LoRAError(f"variant {type(value).__name__} is not registered.")
        return value
    if isinstance(value, str) and value in _CONFIGS:
        return _CONFIGS[value]()
    raise LoRAError(
        f"unknown variant {value!r}; registered variants: {variant_names()} (or pass an "
        "options object such as lora_param.DoRAConfig())."
    )


def variant_class(name: str, kind: str, where: str = "") -> type[AdapterVariant]:
    """The entry class of variant ``name`` for a layer kind; LoRAError where it has none."""
    classes = _CLASSES.get(name)
    if classes is None:
        raise LoRAError(f"unknown variant {name!r}; registered variants: {variant_names()}.")
    for cls in classes:
        if kind in cls.kinds:
            return cls
    kinds = sorted({k for c in classes for k in c.kinds})
    such = f" such as {where!r}" if where else ""
    raise LoRAError(
        f"the {name} variant does not adapt {kind!r} tensors{such} "
        f"(it adapts {kinds}). Exclude them from targets, or add them in a separate add_lora call "
        "with another variant."
    )


def require(entry: AdapterVariant, capability: str, operation: str, path: str = "") -> None:
    """Raise LoRAError unless ``entry``'s variant supports ``capability``.

    Args:
        entry: The adapter entry.
        capability: One of :data:`CAPABILITIES`.
        operation: The call, for the message (``"mixed_adapters"``).
        path: The tensor path, for the message.
    """
    if capability not in entry.capabilities:
        where = f" on '{path}'" if path else ""
        # A variant may support it on other layer kinds (LoRA does, but not per expert).
        elsewhere = any(
            capability in c.capabilities for c in _CLASSES.get(entry.variant, []) if c.kinds
        )
        what = f"{entry.variant} adapters"
        if elsewhere:
            what += f" on {entry.kind!r} tensors"
        raise LoRAError(
            f"{operation} does not support {what}: adapter {entry.adapter!r}{where} is a "
            f"{entry.variant} adapter on a {entry.kind!r} tensor. Leave it out of this call "
            "(or merge_lora a copy of the model to serve it)."
        )
