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
        return variant_class(cell.variant_name, spec_kind(cell))
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
        cells: The cells, in words (for the docs).
        match: A regular expression the LoRAError's message matches.
        gist: The message's gist (for the docs).
        why: Why it is refused, and what to do instead.
    """

    ops: tuple[str, ...]
    when: Callable[[ModelCell], bool]
    cells: str
    match: str
    gist: str
    why: str

    def matches(self, message: str) -> bool:
        return re.search(self.match, message) is not None


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
        "variants without an entry class for the layer kind (DoRA on 3-D experts tensors)",
        r"variant does not adapt",
        "the dora variant does not adapt 'experts' tensors",
        "The variant's paper defines no per-expert form (PEFT has none either). Use "
        "variant='lora' on the experts in a separate add_lora call.",
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
        lambda c: c.kind == "conv2d_grouped",
        "grouped convolutions",
        r"grouped convolution",
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
        r"out_proj of nn\.MultiheadAttention",
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
        lambda c: c.variant_name == "dora" and c.kind in ("mha_in_proj", "param"),
        "DoRA on tensors PEFT adapts as parameters (nn.MultiheadAttention's in_proj_weight, a "
        "parameter named explicitly: PEFT's target_parameters)",
        r"PEFT has no DoRA for parameters given by name",
        "'body': PEFT has no DoRA for parameters given by name (target_parameters)",
        "PEFT's target_parameters wrapper takes no use_dora, so no PEFT folder can hold the "
        "magnitude. Save with save_lora.",
    ),
    Refusal(
        ("combine_cat",),
        lambda c: (
            (cls := _entry_class(c)) is not None
            and "combine" in cls.capabilities
            and not cls.lowrank_exact
        ),
        "variants without exact low-rank factors (DoRA)",
        r"method='cat'\) concatenates exact low-rank factors",
        "combine_adapters(method='cat') concatenates exact low-rank factors, which a dora "
        "adapter does not have",
        "A DoRA update depends on the weight, so it has no B @ A to concatenate. "
        "method='svd' combines it (exactly at full rank: the combine_svd cells).",
    ),
    Refusal(
        ("combine_cat", "combine_svd"),
        lambda c: not variant_supports(c, "combine"),
        "variants without the 'combine' capability on the layer kind (per-expert LoRA)",
        r"combine_adapters does not support lora adapters on 'experts' tensors",
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
        lambda c: not variant_supports(c, "hotswap"),
        "variants without the 'hotswap' capability on the layer kind (DoRA; per-expert LoRA)",
        r"hot-swapping does not support (dora adapters|lora adapters on 'experts' tensors)",
        "hot-swapping does not support dora adapters (lora adapters on 'experts' tensors)",
        "Hot-swapping copies a file's factors into zero-padded ones of a fixed rank, which "
        "only plain LoRA's B @ A allows. Load the file with load_lora instead (a recompile "
        "under torch.compile).",
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
