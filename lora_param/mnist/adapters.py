"""Which adapter the MNIST job trains: a registered variant, its init, and an equal budget.

``lora-param-mnist --variant NAME`` takes any registered variant (``lora_param.variant_names()``)
that adapts Linear layers, except the ones that implement another variant's initialization
(``pissa``, ``pissa_dora``: reached with ``--init pissa``). A variant's options follow its name:
``oft:side=output``, ``lokr:factor=4,decompose_both=true`` (the fields of its options class, e.g.
``lora_param.OFTConfig``). A variant registered later joins without a change here.

Budget: every variant gets, per layer, the rank (OFT: the block size) that brings its trainable
parameter count closest to plain LoRA's at the reference rank (``--rank``, 1 by default: 6,794
trainable parameters on the MLP). :func:`match_budget` searches the ranks each layer accepts
and keeps the combination whose total is closest to LoRA's; combinations within 1% of the
reference of that best total are equally close, and among them the one whose per-layer counts
are closest to LoRA's wins. Where a variant cannot come close (LoHa's rank 1 already has
twice LoRA's rank-1 count, DoRA adds a magnitude per output), the table says so with the counts.
Every variant is trained at LoRA's scale ``alpha / rank`` (its own alpha is
``scale * its rank``; OFT has no scale).
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from lora_param import LoRAError, VariantConfig, add_lora, parameter_counts, variant_names
from lora_param.core.targets import LayerSpec
from lora_param.core.variant import init_variant, variant_class, variant_config

__all__ = [
    "INIT_CHOICES",
    "Budget",
    "VariantSpec",
    "add_adapter",
    "init_applies",
    "init_value",
    "match_budget",
    "mlp_variants",
    "parse_variant",
]

#: ``--init`` values: the variant's own start, or one computed from the weight.
INIT_CHOICES = ("default", "pissa", "olora")
#: Combinations whose total is within this fraction of the reference of the best total count
#: as equally close; the per-layer counts decide between them.
BUDGET_SLACK = 0.01
#: A rank scan stops after this many ranks in a row that add no new parameter count.
_PLATEAU = 64
_MAX_COMBINATIONS = 200_000


@dataclass(frozen=True)
class VariantSpec:
    """A variant and its options, as ``--variant`` names them (``"oft:side=output"``).

    Attributes:
        name: The registered variant's name.
        options: ``(field, value)`` pairs of its options class, in the order given.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``name`` or ``name:key=value,...`` (parses back to the same spec)."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_text(v)}" for k, v in self.options)

    def config(self) -> VariantConfig:
        """The variant's options object (LoRAError: an unknown field or variant)."""
        default = variant_config(self.name)
        known = [f.name for f in fields(default)]
        unknown = [k for k, _ in self.options if k not in known]
        if unknown:
            have = ", ".join(known) if known else "none"
            raise LoRAError(
                f"variant {self.name!r} has no option {unknown[0]!r} (its options: {have})."
            )
        return type(default)(**dict(self.options))


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return value if isinstance(value, (int, float)) else text


def parse_variant(text: str) -> VariantSpec:
    """``"oft:side=output,constraint=0.1"`` -> ``VariantSpec("oft", (("side", "output"), ...))``.

    Raises:
        LoRAError: Not a variant the MLP takes, or not ``key=value`` options of its class.
    """
    name, _, rest = text.partition(":")
    choices = mlp_variants()
    if name not in choices:
        raise LoRAError(
            f"unknown --variant {name!r}: the MLP takes {', '.join(choices)}" + _init_hint(name)
        )
    options: list[tuple[str, Any]] = []
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise LoRAError(f"variant options look like {name}:key=value,key=value, got {text!r}")
        options.append((key.strip(), _value(value.strip())))
    spec = VariantSpec(name, tuple(options))
    spec.config()  # unknown fields fail here
    return spec


def _init_hint(name: str) -> str:
    for variant in variant_names():
        for init in INIT_CHOICES[1:]:
            if init_variant(variant, init) == name != variant:
                return f" ({name!r} is {variant} with --init {init})"
    return ""


def _linear_class(name: str) -> type | None:
    try:
        return variant_class(name, "linear")
    except LoRAError:
        return None


def mlp_variants() -> list[str]:
    """Registered variants that adapt Linear layers, less those implementing another's init."""
    names = variant_names()
    implementations = {
        init_variant(n, i) for n in names for i in INIT_CHOICES[1:] if init_variant(n, i) != n
    }
    return [n for n in names if n not in implementations and _linear_class(n) is not None]


def init_value(name: str, init: str) -> str:
    """The ``add_lora(init=...)`` value: ``"default"`` is the tutorial's ``"gaussian"``
    (A ~ N(0, 1)) where the variant takes it, else the variant's own first init."""
    if init != "default":
        return init
    cls = variant_class(name, "linear")
    return "gaussian" if "gaussian" in cls.inits else cls.inits[0]


def init_applies(name: str, init: str) -> bool:
    """Whether ``--init init`` is an initialization of variant ``name``."""
    if init == "default":
        return True
    return init_variant(name, init) != name or init in variant_class(name, "linear").inits


@dataclass(frozen=True)
class Budget:
    """Ranks per layer and the trainable counts they give, next to LoRA's reference.

    Attributes:
        ranks: Rank (OFT: block size) per layer.
        counts: The variant's trainable parameters per layer at those ranks.
        reference: Plain LoRA's trainable parameters per layer at the reference rank.
        reference_rank: That rank.
    """

    ranks: dict[str, int]
    counts: dict[str, int]
    reference: dict[str, int]
    reference_rank: int

    @property
    def trainable(self) -> int:
        """The variant's trainable parameters."""
        return sum(self.counts.values())

    @property
    def reference_trainable(self) -> int:
        """LoRA's trainable parameters at the reference rank."""
        return sum(self.reference.values())

    def rank_arg(self) -> int | dict[str, int]:
        """``add_lora``'s ``rank``: one number when every layer has the same."""
        values = set(self.ranks.values())
        return values.pop() if len(values) == 1 else dict(self.ranks)

    def rank_text(self) -> str:
        """``"1"`` or ``"7/8/2"`` (per layer, in order)."""
        values = list(self.ranks.values())
        return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the reports."""
        return {
            "ranks": dict(self.ranks),
            "trainable": self.trainable,
            "per_layer": dict(self.counts),
            "reference_rank": self.reference_rank,
            "reference_trainable": self.reference_trainable,
        }


def _count(fan_in: int, fan_out: int, config: VariantConfig, init: str, rank: int) -> int | None:
    """Trainable parameters of one adapted Linear (built on the meta device); None: refused."""
    layer = nn.Sequential(nn.Linear(fan_in, fan_out, device="meta"))
    try:
        add_lora(layer, ["0"], rank=rank, variant=config, init=init)
    except LoRAError:
        return None
    return parameter_counts(layer).trainable


def _candidates(
    fan_in: int, fan_out: int, config: VariantConfig, init: str, limit: int
) -> list[tuple[int, int]]:
    """``(rank, count)`` for the smallest rank of each count, up to the first above ``limit``."""
    name = init_variant(config.name, init)
    top = variant_class(name, "linear").max_rank(
        LayerSpec("linear", (fan_out, fan_in), fan_in, fan_out)
    )
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    idle = 0
    for rank in range(1, top + 1):
        n = _count(fan_in, fan_out, config, init, rank)
        if n is None or n in seen:
            idle += 1
        else:
            seen.add(n)
            out.append((rank, n))
            idle = 0
        if (n is not None and n > limit) or idle >= _PLATEAU:
            break  # counts grow with the rank: a larger one only costs more
    return out


@functools.lru_cache(maxsize=64)
def _match(
    shapes: tuple[tuple[str, int, int], ...], spec: VariantSpec, init: str, reference_rank: int
) -> Budget:
    plain = variant_config("lora")
    reference = {}
    for name, fan_in, fan_out in shapes:
        n = _count(fan_in, fan_out, plain, "gaussian", reference_rank)
        if n is None:
            raise LoRAError(f"LoRA rank {reference_rank} does not fit layer {name!r}")
        reference[name] = n
    total = sum(reference.values())
    config = spec.config()
    lists = []
    for name, fan_in, fan_out in shapes:
        found = _candidates(fan_in, fan_out, config, init, total)
        if not found:
            raise LoRAError(
                f"variant {spec.label!r} with init {init!r} fits no rank on layer {name!r} "
                f"({fan_in} -> {fan_out}); check its options"
            )
        lists.append(found)
    names = [name for name, _, _ in shapes]
    if _product(len(x) for x in lists) <= _MAX_COMBINATIONS:
        combos: Sequence[Sequence[tuple[int, int]]] = list(itertools.product(*lists))
    else:  # too many to try: each layer on its own
        combos = [[_closest(found, reference[n]) for n, found in zip(names, lists, strict=True)]]
    best = min(abs(sum(n for _, n in c) - total) for c in combos)
    close = [c for c in combos if abs(sum(n for _, n in c) - total) <= best + BUDGET_SLACK * total]
    chosen = min(
        close,
        key=lambda c: (
            sum(abs(n - reference[name]) for name, (_, n) in zip(names, c, strict=True)),
            sum(n for _, n in c),
            [r for r, _ in c],
        ),
    )
    return Budget(
        ranks={name: r for name, (r, _) in zip(names, chosen, strict=True)},
        counts={name: n for name, (_, n) in zip(names, chosen, strict=True)},
        reference=reference,
        reference_rank=reference_rank,
    )


def _closest(found: list[tuple[int, int]], target: int) -> tuple[int, int]:
    """The ``(rank, count)`` whose count is closest to ``target``."""
    return min(found, key=lambda rc: abs(rc[1] - target))


def _product(values: Any) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def match_budget(
    model: nn.Module, layers: Sequence[str], spec: VariantSpec, init: str, reference_rank: int
) -> Budget:
    """Ranks per layer that give ``spec`` LoRA rank-``reference_rank``'s trainable count.

    Args:
        model: The model (its Linear layers' sizes are read; nothing changes).
        layers: Names of the Linear layers the adapter goes on.
        spec: The variant and its options.
        init: The ``add_lora`` init (``init_value``'s result).
        reference_rank: The LoRA rank whose trainable count is the budget.

    Raises:
        LoRAError: The variant (with these options and init) fits no rank on a layer.
    """
    shapes = []
    for name in layers:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise LoRAError(f"{name!r} is not a Linear layer")
        shapes.append((name, layer.in_features, layer.out_features))
    return _match(tuple(shapes), spec, init, int(reference_rank))


def add_adapter(
    model: nn.Module,
    layers: Sequence[str],
    spec: VariantSpec,
    init: str,
    reference_rank: int,
    alpha: float,
) -> Budget:
    """Add ``spec``'s adapter to ``layers`` at the budget of LoRA rank ``reference_rank``.

    The scale is LoRA's, ``alpha / reference_rank``: a layer at rank ``r`` gets alpha
    ``scale * r``. Plain LoRA with the default init is exactly
    ``add_lora(model, layers, rank=reference_rank, alpha=alpha, init="gaussian")``.

    Returns:
        The budget the adapter was built with.
    """
    value = init_value(spec.name, init)
    if not init_applies(spec.name, init):
        raise LoRAError(f"--init {init} is not an initialization of the {spec.name} variant")
    budget = match_budget(model, layers, spec, value, reference_rank)
    scale = alpha / reference_rank
    rank = budget.rank_arg()
    alphas: float | dict[str, float] = (
        scale * rank if isinstance(rank, int) else {k: scale * r for k, r in rank.items()}
    )
    add_lora(model, list(layers), rank=rank, alpha=alphas, variant=spec.config(), init=value)
    return budget
