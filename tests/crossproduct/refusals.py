"""The cells that refuse, declared: each refusal is a feature a user will hit, so each is
written down here with why, and the generated support matrix
(``docs/reference/support-matrix.md``) lists them.

The declarations are exact: a cell a declaration covers must raise a ``LoRAError`` whose
message matches it, and every other cell must give the right numbers. A new refusal (a
feature lost, or a variant without a capability) fails the cross-product until it is
declared here; a declared cell that starts to work fails it too, until the declaration goes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import lora_param as lp
from lora_param.core.variant import variant_class

from .cells import ModelCell
from .models import KINDS

__all__ = ["REFUSALS", "Refusal", "expected_refusals", "spec_kind", "variant_supports"]

#: The layer kind lora_param sees for each value of the kind axis.
SPEC_KIND = {
    "linear": "linear",
    "conv2d": "conv",
    "conv2d_grouped": "conv",
    "embedding": "embedding",
    "hf_conv1d": "conv1d_hf",
    "mha_in_proj": "param",
    "mha_out_proj": "linear",
    "experts": "experts",
    "param": "param",
}


def spec_kind(cell: ModelCell) -> str:
    """The lora_param layer kind of the cell's adapted tensor."""
    return SPEC_KIND[cell.kind]


def _entry_class(cell: ModelCell) -> type | None:
    try:
        return variant_class(cell.entry_variant, spec_kind(cell))
    except lp.LoRAError:
        return None


def variant_supports(cell: ModelCell, capability: str) -> bool:
    """The cell's variant has ``capability`` on the cell's layer kind."""
    cls = _entry_class(cell)
    return cls is not None and capability in cls.capabilities


@dataclass(frozen=True)
class Refusal:
    """Cells that raise a LoRAError, and why.

    Attributes:
        ops: The operations refused.
        when: Which model cells.
        cells: The cells, in words (for the docs); a callable computes them (from the
            variant registry).
        match: A regular expression the LoRAError's message matches.
        gist: The message's gist (for the docs).
        why: Why it is refused, and what to do instead.
    """

    ops: tuple[str, ...]
    when: Callable[[ModelCell], bool]
    cells: str | Callable[[], str]
    match: str
    gist: str
    why: str

    def matches(self, message: str) -> bool:
        return re.search(self.match, message) is not None

    def cells_text(self) -> str:
        """The cells, in words."""
        return self.cells if isinstance(self.cells, str) else self.cells()


def _where(label: str, pred: Callable[[ModelCell], bool]) -> Callable[[], str]:
    """Docs text: the variants (as users ask for them) for which ``pred`` holds, with the
    layer kinds unless it holds on every kind the variant adapts."""

    def text() -> str:
        from .cells import variant_values  # cells imports this module's users, not this

        parts = []
        for value in variant_values():
            cells = {k: ModelCell(value, "plain", k, "factored", "none") for k in SPEC_KIND}
            kinds = [k for k, c in cells.items() if pred(c)]
            adapted = {k for k, c in cells.items() if _entry_class(c) is not None}
            if kinds and adapted <= set(kinds):  # on every kind it adapts
                parts.append(f"`{value}`")
            elif kinds:
                parts.append(f"`{value}` on {', '.join(kinds)}")
        return f"{label}: " + ("; ".join(parts) or "none")

    return text


def _lacking(capability: str) -> Callable[[], str]:
    """Docs text: which variants lack ``capability``, and where."""
    return _where(
        f"variants without the {capability!r} capability",
        lambda c: _entry_class(c) is not None and not variant_supports(c, capability),
    )


def _no_lowrank(cell: ModelCell) -> bool:
    cls = _entry_class(cell)
    return cls is not None and "combine" in cls.capabilities and not cls.lowrank_exact


#: Variants PEFT holds in its LyCORIS-family folders (LOHA, LOKR): other layer kinds, other
#: refusals than its LoRA folders.
PEFT_LYCORIS = ("loha", "lokr")
_UNROUTABLE = ("mha_in_proj", "mha_out_proj", "experts", "param")

REFUSALS: list[Refusal] = [
    Refusal(
        ("add_lora",),
        lambda c: c.store in ("nf4", "int8") and not KINDS[c.kind].packable,
        "nf4/int8 stores on nn.MultiheadAttention's in_proj_weight, a 3-D experts tensor, a "
        "2-D parameter named explicitly",
        r"cannot quantize|no layer to quantize",
        "cannot quantize [...]: only the weight of Linear, Conv1d/2d/3d, Embedding and Hugging "
        "Face Conv1D layers is stored packed",
        "Packing needs a layer whose forward lora_param runs (its lean QLoRA forward); these "
        "tensors are read by their owners' own code. Quantize the layers around them; the "
        "adapter on these tensors works on the plain weight.",
    ),
    Refusal(
        ("add_lora",),
        lambda c: _entry_class(c) is None,
        _where("layer kinds a variant does not adapt", lambda c: _entry_class(c) is None),
        r"variant does not adapt",
        "the dora variant does not adapt 'experts' tensors",
        "These variants define no per-expert form (PEFT has none either). Use plain LoRA on "
        "the experts, in a separate add_lora call.",
    ),
    Refusal(
        ("mixed_batch",),
        lambda c: c.kind in _UNROUTABLE,
        "nn.MultiheadAttention (in_proj_weight, out_proj), 3-D experts tensors, parameters "
        "named explicitly",
        r"cannot route these tensors per example",
        "mixed_adapters cannot route these tensors per example (read directly by another "
        "module, or a module that does not treat rows independently)",
        "Per-example routing runs a layer's forward on each adapter's rows; these tensors are "
        "read by their owner's own code (attention, an experts router, a custom matmul), "
        "which lora_param cannot split by row. PEFT refuses mixed batches there too. Serve "
        "such adapters one at a time (set_active_adapters).",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.kind == "conv2d_grouped" and c.entry_variant not in PEFT_LYCORIS,
        "grouped convolutions (but LoHa, LoKr)",
        r"grouped (or dilated )?convolution",
        "'body.weight' is a grouped convolution (groups=2); PEFT's LoRA for grouped "
        "convolutions has a different structure",
        "PEFT's grouped-conv LoRA factors the weight per group, lora_param's over the whole "
        "(out, in/groups*k*k) matrix: no file form maps one onto the other exactly. Save "
        "with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.kind == "mha_out_proj",
        "nn.MultiheadAttention's out_proj",
        r"out_proj of (an )?nn\.MultiheadAttention",
        "adapter adapts the out_proj of nn.MultiheadAttention [...] PEFT wraps out_proj's "
        "forward, which MultiheadAttention never calls",
        "A PEFT model would load the file and silently ignore the update. Save with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.kind == "mha_in_proj" and c.extra in ("bias", "bias_all"),
        "nn.MultiheadAttention's in_proj_weight with bias='lora_only'/'all'",
        r"PEFT saves only trained biases named 'bias'",
        "adapter trains 'body.in_proj_bias'; PEFT saves only trained biases named 'bias'",
        "PEFT's bias= option covers parameters named 'bias'. Save with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.entry_variant in ("dora", "pissa_dora") and c.kind in ("mha_in_proj", "param"),
        "DoRA (from any start) on tensors PEFT adapts as parameters (nn.MultiheadAttention's "
        "in_proj_weight, a parameter named explicitly: PEFT's target_parameters)",
        r"PEFT has no DoRA for parameters given by name",
        "'body': PEFT has no DoRA for parameters given by name (target_parameters)",
        "PEFT's target_parameters wrapper takes no use_dora, so no PEFT folder can hold the "
        "magnitude. Save with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.entry_variant == "oft" and c.kind in ("hf_conv1d", "mha_in_proj", "param"),
        "OFT on Hugging Face Conv1D, nn.MultiheadAttention's in_proj_weight, named parameters",
        r"PEFT's OFT adapts only nn\.Linear, nn\.Conv2d and nn\.Embedding",
        "PEFT's OFT adapts only nn.Linear, nn.Conv2d and nn.Embedding layers",
        "PEFT 0.21 has no OFT layer for them, so no PEFT folder can hold the rotation. Save "
        "with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.entry_variant == "oft" and c.kind == "conv2d",
        "OFT on k×k convolutions (k > 1)",
        r"PEFT 0\.21's unmerged OFT forward on k×k convolutions",
        "'body.weight' has kernel (3, 3): PEFT 0.21's unmerged OFT forward on k×k convolutions "
        "(k > 1) folds overlapping patches back and does not compute its own merged weight",
        "A PEFT model would load the folder and compute something else than the adapter "
        "(PEFT's own merged and unmerged outputs differ there). Save with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: (
            c.entry_variant in PEFT_LYCORIS and c.kind in ("hf_conv1d", "mha_in_proj", "param")
        ),
        "LoHa, LoKr on Hugging Face Conv1D, nn.MultiheadAttention's in_proj_weight, named "
        "parameters",
        r"PEFT's (LOHA|LOKR) adapts the weight of nn\.Linear, nn\.Conv1d and nn\.Conv2d",
        "PEFT's LOHA adapts the weight of nn.Linear, nn.Conv1d and nn.Conv2d submodules only",
        "PEFT 0.21's LyCORIS-family layers wrap those modules only. Save with save_lora.",
    ),
    Refusal(
        ("peft_roundtrip",),
        lambda c: c.entry_variant in PEFT_LYCORIS and c.extra in ("bias", "bias_all"),
        "LoHa, LoKr adapters that train biases",
        r"config has no bias option",
        "adapter 'default' trains biases (bias='lora_only'); PEFT's LOHA config has no bias option",
        "PEFT's LoHaConfig and LoKrConfig have no bias= field, so a folder cannot say the "
        "biases are the adapter's. Save with save_lora.",
    ),
    Refusal(
        ("combine_cat",),
        _no_lowrank,
        _where("variants without exact low-rank factors", _no_lowrank),
        r"method='cat'\) concatenates exact low-rank factors",
        "combine_adapters(method='cat') concatenates exact low-rank factors, which a dora "
        "adapter does not have",
        "A DoRA or OFT update depends on the weight, so it has no B @ A to concatenate. "
        "method='svd' combines it (exactly at full rank: the combine_svd cells).",
    ),
    Refusal(
        ("combine_cat", "combine_svd"),
        lambda c: _entry_class(c) is not None and not variant_supports(c, "combine"),
        _lacking("combine"),
        r"combine_adapters does not support \w+ adapters",
        "combine_adapters does not support lora adapters on 'experts' tensors",
        "The combined adapter is one plain LoRA per tensor; a per-expert combination is not "
        "implemented. Merge a copy of the model instead.",
    ),
    Refusal(
        ("combine_cat", "combine_svd"),
        lambda c: c.extra == "second_heads",
        "two adapters that train the same head",
        r"both train 'head\.weight' in full",
        "adapters 'default' and 'b' both train 'head.weight' in full; combine_adapters cannot "
        "pick one of their values",
        "The combined adapter carries its sources' trained heads and biases over; two values "
        "of one tensor cannot be combined (PEFT refuses too). Combine adapters that train "
        "different heads.",
    ),
    Refusal(
        ("hotswap",),
        lambda c: _entry_class(c) is not None and not variant_supports(c, "hotswap"),
        _lacking("hotswap"),
        r"hot-swapping does not support \w+ adapters",
        "hot-swapping does not support dora adapters (oft adapters, lora adapters on 'experts' "
        "tensors, ...)",
        "Hot-swapping copies a file's factors into zero-padded ones of a fixed rank and a "
        "scale buffer, which only plain LoRA's B @ A allows (PiSSA's frozen start, DoRA's "
        "magnitude and OFT's rotation have no such form). Load the file with load_lora instead "
        "(a recompile under torch.compile).",
    ),
    Refusal(
        ("load_base_state_dict",),
        lambda c: c.store in ("bnb4", "bnb8"),
        "bitsandbytes layers",
        r"cannot store a checkpoint weight in BnbWeight storage",
        "load_base_state_dict cannot store a checkpoint weight in BnbWeight storage",
        "bitsandbytes quantizes a weight when it loads it (and its Linear4bit cannot load its "
        "own quantization state through load_state_dict). Load the base checkpoint before "
        "add_lora.",
    ),
]


def expected_refusals(cell: ModelCell, op: str) -> list[Refusal]:
    """The declarations covering ``op`` on ``cell``."""
    return [r for r in REFUSALS if op in r.ops and r.when(cell)]
