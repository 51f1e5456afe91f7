"""Parameter counts and a PEFT-style trainable-parameter summary."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .entries import adapter_lists
from .lookup import iter_lora, owned_tensor_ids

__all__ = ["ParameterCounts", "parameter_counts", "trainable_summary"]


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model with adapters.

    Attributes:
        trainable: Parameters with ``requires_grad``.
        total: All parameters, adapters included.
        lora: Adapter parameters: every adapter's tensors (``lora_A``, ``lora_B``, a DoRA
            magnitude, ...) and its own trained copies of heads and biases.
        base: The pretrained model's parameters.
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
    """Weights a packed (stored) tensor stands for: its first stored tensor counts as the
    weight, the others (scales) as 0."""
    counts: dict[int, int] = {}
    for _, plist in adapter_lists(model):
        store = plist.store()
        if store is None:
            continue
        stored = plist.stored()
        counts.update((id(t), 0) for t in stored)
        counts[id(stored[0])] = store.numel()
    return counts


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count trainable, total, adapter and base parameters (shared tensors counted once).

    A packed (quantized) weight counts as the weights it stores, not its bytes or scales.
    What the adapters own (their updates' tensors and their trained copies of heads and
    biases) counts as adapter parameters, not base.

    Args:
        model: Any model.

    Returns:
        The counts; see :class:`ParameterCounts`.
    """
    params = {id(p): p for p in model.parameters()}
    packed = _packed_counts(model)
    sizes = {i: packed.get(i, p.numel()) for i, p in params.items()}
    owned = owned_tensor_ids(model)
    total = sum(sizes.values())
    lora_n = sum(n for i, n in sizes.items() if i in owned)
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
                p.variant if p.variant != "lora" else p.kind,
                "x".join(map(str, p.weight_shape)),
                str(getattr(p, "rank", "-")),
                f"{getattr(p, 'alpha', float('nan')):g}",
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
