"""Parameter counts and a PEFT-style trainable-parameter summary."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

from torch import nn
from torch.nn.utils import parametrize

from .lookup import iter_lora
from .targets import parametrization_list

__all__ = ["ParameterCounts", "parameter_counts", "trainable_summary"]


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model with adapters.

    Attributes:
        trainable: Parameters with ``requires_grad``.
        total: All parameters, adapters included.
        lora: Adapter parameters (``lora_A`` and ``lora_B`` of every adapter).
        base: Parameters that are not adapters.
    """

    trainable: int
    total: int
    lora: int
    base: int

    @property
    def trainable_percent(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def lora_percent_of_base(self) -> float:
        """Adapter parameters as a percentage of the base model's parameters."""
        return 100.0 * self.lora / self.base if self.base else 0.0


def _packed_counts(model: nn.Module) -> dict[int, int]:
    """Weights a packed (quantized) tensor stands for: codes count as the weight, scales as 0."""
    counts: dict[int, int] = {}
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in cast(nn.ModuleDict, module.parametrizations):
            plist = parametrization_list(module, name)
            head = plist[0]
            if not hasattr(head, "base_forward"):  # not a packed weight (lora_param.quant)
                continue
            stored = (
                [plist.original]
                if plist.is_tensor
                else [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
            )
            counts.update((id(t), 0) for t in stored)
            counts[id(stored[0])] = math.prod(cast("tuple[int, ...]", head.shape))
    return counts


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count trainable, total, adapter and base parameters (shared tensors counted once).

    A packed (quantized) weight counts as the weights it stores, not its bytes or scales.
    """
    params = {id(p): p for p in model.parameters()}
    packed = _packed_counts(model)
    sizes = {i: packed.get(i, p.numel()) for i, p in params.items()}
    lora = {id(t) for *_, p in iter_lora(model) for t in p.parameters()}
    total = sum(sizes.values())
    lora_n = sum(n for i, n in sizes.items() if i in lora)
    trainable = sum(sizes[i] for i, p in params.items() if p.requires_grad)
    return ParameterCounts(trainable, total, lora_n, total - lora_n)


def trainable_summary(model: nn.Module, per_layer: bool = False) -> str:
    """A one-line summary like PEFT's ``print_trainable_parameters``, and a per-layer table.

    Args:
        model: Any model.
        per_layer: Add one row per adapted tensor and adapter.

    Returns:
        The text (print it).
    """
    c = parameter_counts(model)
    text = (
        f"trainable params: {c.trainable:,} || all params: {c.total:,} || "
        f"trainable%: {c.trainable_percent:.4f} || LoRA params: {c.lora:,} "
        f"({c.lora_percent_of_base:.3f}% of {c.base:,} base)"
    )
    if not per_layer:
        return text
    rows = [("layer", "adapter", "kind", "shape", "rank", "alpha", "params", "on")]
    for path, _, _, p in iter_lora(model):
        rows.append(
            (
                path,
                p.adapter,
                p.kind,
                "x".join(map(str, p.weight_shape)),
                str(p.rank),
                f"{p.alpha:g}",
                f"{sum(t.numel() for t in p.parameters()):,}",
                "yes" if p.enabled else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return text + "\n" + "\n".join(lines)
