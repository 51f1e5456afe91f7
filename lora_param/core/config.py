"""Configuration as data: :class:`LoRAConfig`, and the quantization methods' registry.

``add_lora(model, targets, rank=8, ...)`` and ``add_lora(model, config=LoRAConfig(...))`` do
the same thing: the keywords build a :class:`LoRAConfig`. Its per-layer fields (``rank``,
``alpha``, ``dropout``, ``init``, ``use_rslora``, ``variant`` and the variant's options) are
the fields an adapter file records per adapted tensor, and :meth:`LoRAConfig.to_peft` /
:meth:`LoRAConfig.from_peft` map it onto PEFT's ``LoraConfig`` where the two share meaning.

Quantization methods are data too: a :class:`QuantizationConfig` subclass per method (NF4's
block size, double quantization, compute dtype, kernel; int8's compute dtype), registered with
a handler by the package that implements it (:mod:`lora_param.quant`), as torchao registers
its ``quantize_`` handlers. The core never imports them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from .errors import LoRAError
from .matching import Targets
from .variant import VariantConfig, init_variant, variant_config

if TYPE_CHECKING:
    from .targets import AdaptTarget, ExpertLayout

__all__ = [
    "Bias",
    "LoRAConfig",
    "Mode",
    "QuantizationConfig",
    "QuantizationHandler",
    "quantization_config",
    "quantization_handler",
    "register_quantization",
]

Mode = Literal["factored", "materialized"]
Bias = Literal["none", "all", "lora_only"]


@dataclass(frozen=True)
class QuantizationConfig:
    """Options of one quantization method for the frozen base (subclass per method).

    ``add_lora(quantize=...)`` and :func:`lora_param.quantize_base` take an instance, or the
    method's name for its defaults (``"nf4"``, ``"int8"``).
    """

    name: ClassVar[str] = ""


#: ``(targets, config, root) -> undo``: packs the targets' weights, all or none; ``explicit``
#: says the user named these layers (a layer that cannot be packed is then an error).
QuantizationHandler = Callable[..., Callable[[], None]]
_METHODS: dict[str, tuple[type[QuantizationConfig], QuantizationHandler]] = {}


def register_quantization(config: type[QuantizationConfig], handler: QuantizationHandler) -> None:
    """Make a quantization method available under ``config.name``."""
    _METHODS[config.name] = (config, handler)


def quantization_config(value: str | QuantizationConfig) -> QuantizationConfig:
    """The options object for ``quantize=``: an instance, or a method's name (its defaults)."""
    if isinstance(value, QuantizationConfig):
        if type(value).name not in _METHODS:
            raise LoRAError(f"quantization method {type(value).__name__} is not registered.")
        return value
    if isinstance(value, str) and value in _METHODS:
        return _METHODS[value][0]()
    raise LoRAError(
        f"quantization method must be one of {list(_METHODS)} or an options object such as "
        f"lora_param.NF4Config(block_size=64), got {value!r}."
    )


def quantization_handler(config: QuantizationConfig) -> QuantizationHandler:
    """The handler registered for a quantization options object."""
    return _METHODS[type(config).name][1]


def pack_targets(
    found: Sequence[AdaptTarget],
    config: QuantizationConfig,
    root: nn.Module | None,
    explicit: bool = False,
) -> Callable[[], None]:
    """Pack the targets' weights with ``config``'s method; return the undo."""
    return quantization_handler(config)(found, config, root=root, explicit=explicit)


@dataclass
class LoRAConfig:
    """Everything ``add_lora`` needs to know, as one object (the keywords build one).

    Attributes:
        targets: Which layers (see :func:`lora_param.add_lora`).
        rank: Rank, or ``{glob: rank}``.
        alpha: Scale numerator (``scale = alpha / rank``), or ``{glob: alpha}``; None: the rank.
        exclude: Patterns removing matches.
        layer_types: Only layers of these classes.
        dropout: Dropout probability on the adapter's input.
        init: Initialisation of the factors (``"kaiming"``, ``"gaussian"``; from the weight:
            ``"pissa"``, ``"pissa_niter_<K>"``, ``"olora"``; variants may add more).
        use_rslora: Scale by ``alpha / sqrt(rank)``.
        variant: The adapter variant: a name (``"lora"``, ``"dora"``, ...) or its options
            object (``lora_param.DoRAConfig()``).
        trainable: Modules the adapter trains in full (its own copies; PEFT's
            ``modules_to_save``).
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: biases the adapter trains (own copies).
        mode: ``"factored"`` or ``"materialized"`` forward.
        expert_layout: Layout of 3-D expert tensors (``"out_in"``, ``"in_out"``, None: follow
            each experts module's ``is_transposed`` flag).
        quantize: Store the adapted layers' weights packed first: a method name (``"nf4"``,
            ``"int8"``) or its options (``lora_param.NF4Config(block_size=128)``).
        freeze: Freeze every parameter except what the adapters train.
    """

    targets: Targets = None
    rank: int | Mapping[str, int] = 4
    alpha: float | Mapping[str, float] | None = None
    exclude: Targets = None
    layer_types: type | Sequence[type] | None = None
    dropout: float = 0.0
    init: str = "kaiming"
    use_rslora: bool = False
    variant: str | VariantConfig = "lora"
    trainable: Targets = None
    bias: Bias = "none"
    mode: Mode = "factored"
    expert_layout: ExpertLayout | None = None
    quantize: str | QuantizationConfig | None = None
    freeze: bool = True

    def variant_options(self) -> VariantConfig:
        """The variant's options object (a name resolved to its defaults)."""
        return variant_config(self.variant)

    def replace(self, **changes: Any) -> LoRAConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    def to_peft(self) -> dict[str, Any]:
        """The fields PEFT's ``LoraConfig`` shares, under PEFT's names.

        Only what maps exactly: targets and trained modules given as plain module names
        (PEFT matches them as name suffixes), one rank and alpha, dropout, rsLoRA, bias, DoRA.
        To write a whole adapter in PEFT's format (per-layer ranks included), use
        :func:`lora_param.export_peft`.

        Raises:
            LoRAError: A field PEFT's ``LoraConfig`` cannot express the same way (globs,
                regexes, callables, per-pattern ranks, a variant PEFT keeps elsewhere).
        """
        out: dict[str, Any] = {"peft_type": "LORA"}
        for name, value, peft_name in (
            ("targets", self.targets, "target_modules"),
            ("trainable", self.trainable, "modules_to_save"),
        ):
            names: Any = [value] if isinstance(value, str) else value
            if names is not None and not (
                isinstance(names, Sequence)
                and all(isinstance(v, str) for v in names)
                and not any(set("*?[") & set(v) for v in names)
            ):
                raise LoRAError(
                    f"{name}={value!r} has no exact PEFT LoraConfig form (PEFT matches plain "
                    "module names as suffixes); use export_peft to write an adapter."
                )
            out[peft_name] = None if names is None else list(names)
        if isinstance(self.rank, Mapping) or isinstance(self.alpha, Mapping):
            raise LoRAError(
                "per-pattern rank/alpha have no exact LoraConfig form (PEFT's rank_pattern keys "
                "are regexes over module names); use export_peft to write an adapter."
            )
        variant = self.variant_options().name
        if variant not in ("lora", "dora"):
            raise LoRAError(
                f"PEFT's LoraConfig has no {variant} variant (PEFT keeps it in another config "
                "class); use export_peft to write an adapter."
            )
        out.update(
            r=self.rank,
            lora_alpha=self.rank if self.alpha is None else self.alpha,
            lora_dropout=self.dropout,
            use_rslora=self.use_rslora,
            bias=self.bias,
            use_dora=variant == "dora",
            init_lora_weights=True if self.init == "kaiming" else self.init,
        )
        return out

    @classmethod
    def from_peft(cls, config: Any) -> LoRAConfig:
        """A :class:`LoRAConfig` from a PEFT ``LoraConfig`` (the object or its dict).

        ``target_modules`` and ``modules_to_save`` names match as PEFT matches them (the name
        or a suffix after a dot); a string ``target_modules`` is a regex, as in PEFT.

        Raises:
            LoRAError: Not a LoRA config, or a PEFT feature this mapping does not model
                (``rank_pattern``, ``layers_to_transform``, other initializations, ...; an
                adapter folder with those loads through :func:`lora_param.import_peft`).
        """
        data = dict(config) if isinstance(config, Mapping) else dict(vars(config))
        if str(data.get("peft_type", "LORA")).upper().rsplit(".", 1)[-1] != "LORA":
            raise LoRAError(f"not a LoRA config: peft_type={data.get('peft_type')!r}.")
        unmodelled = [
            key
            for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "target_parameters")
            if data.get(key)
        ]
        init = data.get("init_lora_weights", True)
        from_weight = isinstance(init, str) and init_variant("lora", init) != "lora"  # PiSSA
        if init not in (True, "gaussian") and not from_weight:
            unmodelled.append(f"init_lora_weights={init!r}")
        if unmodelled:
            raise LoRAError(
                f"LoRAConfig.from_peft does not model {unmodelled}; load an adapter folder that "
                "uses them with import_peft."
            )

        def suffixes(names: Any) -> Any:
            """PEFT's name list as one regex: a name, or a name after a dot."""
            if names is None or isinstance(names, str):
                return names
            choice = "|".join(re.escape(n) for n in sorted(names))
            return re.compile(rf"(?:.*\.)?(?:{choice})")

        targets = data.get("target_modules")
        return cls(
            targets=re.compile(targets) if isinstance(targets, str) else suffixes(targets),
            rank=int(data.get("r", 8)),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout", 0.0) or 0.0),
            init=init if isinstance(init, str) else "kaiming",
            use_rslora=bool(data.get("use_rslora", False)),
            variant="dora" if data.get("use_dora", False) else "lora",
            trainable=suffixes(data.get("modules_to_save")),
            bias=data.get("bias", "none") or "none",
        )

    def keywords(self) -> dict[str, Any]:
        """The fields as ``add_lora`` keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
