"""The axes of the cross-product and the cells they span.

A *model cell* is one (variant, store, kind, mode, extra): one tiny model set up with
``add_lora``; every operation of :data:`OPERATIONS` then runs on it, giving one *cell* per
operation. The variants come from ``lora_param.variant_names()`` (and the ``init=`` options
each variant accepts beyond ``"kaiming"``/``"gaussian"``), so a variant registered later is
in the product without an edit here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import lora_param as lp
from lora_param.core.variant import init_variant, variant_config

from .formulas import VARIANTS
from .models import KINDS, STORES, applicable

__all__ = [
    "EXTRAS",
    "MODES",
    "OPERATIONS",
    "SAMPLED",
    "ModelCell",
    "all_cells",
    "compile_sample",
    "covering_cells",
    "has_model",
    "variant_values",
]

MODES = ["factored", "materialized"]

#: What the model holds besides one adapter on the body:
#: ``head``: the adapter trains the head (``trainable=["head"]``);
#: ``bias``: it trains the body's bias (``bias="lora_only"``);
#: ``bias_all``: it trains every bias (``bias="all"``);
#: ``second``: a second adapter ``"b"`` (rsLoRA, another rank and alpha) on the same tensor;
#: ``second_heads``: a second adapter, and both adapters train the head.
EXTRAS = ["none", "head", "bias", "bias_all", "second", "second_heads"]

#: The operations run on every model cell, in this order (see ``operations.py``).
OPERATIONS = [
    "add_lora",
    "forward",
    "lora_off",
    "merge",
    "merge_requantize",
    "merge_adapter",
    "remove",
    "save_load",
    "peft_roundtrip",
    "eval_cache",
    "mixed_batch",
    "combine_cat",
    "combine_svd",
    "hotswap",
    "deepcopy",
    "state_dict",
    "load_base_state_dict",
    "parameter_counts",
    "double",
    "bfloat16",
    "compile",
]

#: Operations too costly to run on every model cell: run on a covering sample (see
#: :func:`compile_sample`).
SAMPLED = ("compile",)


def variant_values() -> list[str]:
    """Every variant lora_param registers, as users ask for it: its name (``variant=``), or
    ``"<variant>+<init>"`` for one built by an ``init=`` of another variant (PiSSA:
    ``"lora+pissa"``; see ``asked_as`` in formulas.py). Variants registered from elsewhere (a
    user's, the docs' example) are left out."""
    values = []
    for name in lp.variant_names():
        if not type(variant_config(name)).__module__.startswith("lora_param."):
            continue
        spec = VARIANTS.get(name)
        if spec is not None and spec.asked_as:
            values += [f"{variant}+{init}" for variant, init in spec.asked_as]
        else:
            values.append(name)
    return values


@dataclass(frozen=True, order=True)
class ModelCell:
    """One model of the product: which variant, base store, layer kind, mode and extras."""

    variant: str
    store: str
    kind: str
    mode: str
    extra: str

    @property
    def id(self) -> str:
        """Test id, e.g. ``dora-nf4-linear-factored-head``."""
        return f"{self.variant}-{self.store}-{self.kind}-{self.mode}-{self.extra}"

    @property
    def variant_name(self) -> str:
        """The registered variant (without an ``+init`` option)."""
        return self.variant.partition("+")[0]

    @property
    def init(self) -> str:
        """The ``init=`` option (``"kaiming"`` unless the variant value names one)."""
        return self.variant.partition("+")[2] or "kaiming"

    @property
    def entry_variant(self) -> str:
        """The registered variant of the adapter entries ``add_lora`` builds for the cell."""
        return init_variant(self.variant_name, self.init)

    @property
    def second(self) -> bool:
        """The model has a second adapter ``"b"``."""
        return self.extra.startswith("second")

    @classmethod
    def parse(cls, text: str) -> ModelCell:
        """The cell a test id names."""
        return cls(*text.split("-"))


AXES = ("variant", "store", "kind", "mode", "extra")


def _axis_values() -> dict[str, list[str]]:
    return {
        "variant": variant_values(),
        "store": list(STORES),
        "kind": list(KINDS),
        "mode": list(MODES),
        "extra": list(EXTRAS),
    }


def all_cells() -> list[ModelCell]:
    """The full product (bitsandbytes stores with Linear only), in a fixed order."""
    values = _axis_values()
    return [
        ModelCell(*combo)
        for combo in itertools.product(*(values[a] for a in AXES))
        if applicable(combo[1], combo[2])
    ]


#: Model cells always in the covering subset: the weak spots the redesign fixed (issue 18).
PINNED = [
    ModelCell("dora", "nf4", "linear", "factored", "none"),
    ModelCell("dora", "int8", "conv2d", "materialized", "none"),
    ModelCell("dora", "bnb4", "linear", "factored", "bias"),
    ModelCell("dora", "bnb8", "linear", "materialized", "second"),
    ModelCell("lora", "bnb4", "linear", "factored", "bias"),
    ModelCell("lora", "bnb8", "linear", "factored", "head"),
    ModelCell("lora", "nf4", "mha_out_proj", "materialized", "none"),
    ModelCell("lora", "nf4", "conv2d", "factored", "second_heads"),
    ModelCell("lora", "int8", "hf_conv1d", "factored", "second"),
    ModelCell("dora", "plain", "embedding", "factored", "second_heads"),
    ModelCell("lora", "plain", "linear", "factored", "bias_all"),
]


def _pairs(cell: ModelCell) -> set[tuple[str, str, str, str]]:
    values = [getattr(cell, a) for a in AXES]
    return {
        (AXES[i], values[i], AXES[j], values[j])
        for i, j in itertools.combinations(range(len(AXES)), 2)
    }


def has_model(cell: ModelCell) -> bool:
    """``add_lora`` is not declared refused for the cell (its operations exist)."""
    from .refusals import expected_refusals  # refusals imports this module

    return not expected_refusals(cell, "add_lora")


def _greedy(candidates: list[ModelCell], chosen: list[ModelCell], needed: set) -> list[ModelCell]:
    needed = needed - set().union(set(), *(_pairs(c) for c in chosen))
    while needed:
        best = max(candidates, key=lambda c: len(_pairs(c) & needed))
        chosen.append(best)
        needed -= _pairs(best)
    return chosen


def covering_cells(pinned: list[ModelCell] | None = None) -> list[ModelCell]:
    """A deterministic subset holding every valid pair of axis values (all-pairs).

    Every pair that a model with operations holds is covered by such a model (a model
    ``add_lora`` refuses covers only that refusal); the pairs only refused models hold (an
    NF4 store on an MHA in_proj) by one of those. Greedy: start from the pinned weak spots,
    then repeatedly take the first cell (in :func:`all_cells` order) covering the most pairs
    not covered yet.
    """
    candidates = all_cells()
    live = [c for c in candidates if has_model(c)]
    chosen = [c for c in (PINNED if pinned is None else pinned) if c in set(candidates)]
    live_pairs: set = set().union(*(_pairs(c) for c in live))
    chosen = _greedy(live, [c for c in chosen if has_model(c)], live_pairs)
    all_pairs: set = set().union(*(_pairs(c) for c in candidates))
    return _greedy(candidates, chosen, all_pairs - live_pairs)


def compile_sample(cells: list[ModelCell], *, pairs: bool = False) -> set[ModelCell]:
    """The cells whose ``compile`` operation runs (torch.compile is the costly operation).

    Among the cells that have a model: the first holding each value of each axis, and with
    ``pairs`` (the full product) the first of each (variant, kind) and (store, mode) pair.
    """
    seen: set[tuple[str, ...]] = set()
    out: set[ModelCell] = set()
    for c in cells:
        if not has_model(c):
            continue
        keys = {(a, getattr(c, a)) for a in AXES}
        if pairs:
            keys |= {("vk", c.variant, c.kind), ("sm", c.store, c.mode)}
        if not keys <= seen:
            out.add(c)
            seen |= keys
    return out
