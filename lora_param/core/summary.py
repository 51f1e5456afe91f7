"""Parameter counts and a PEFT-style trainable-parameter summary."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .registry import iter_lora

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


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Count trainable, total, adapter and base parameters (shared tensors counted once)."""
    params = {id(p): p for p in model.parameters()}
    lora = {id(t) for *_, p in iter_lora(model) for t in p.parameters()}
    total = sum(p.numel() for p in params.values())
    lora_n = sum(p.numel() for i, p in params.items() if i in lora)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
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
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return text + "\n" + "\n".join(lines)
