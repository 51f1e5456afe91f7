"""Turning adapters on and off, for A/B evaluation and for switching tasks.

Each switch covers everything an adapter trains: its LoRA updates and its own copies of heads
and biases (:mod:`.trainable_copies`), so a disabled adapter leaves the pretrained model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .entry import AdapterEntry
from .lookup import check_adapters_exist, iter_entries, list_adapters

__all__ = ["disable_lora", "enable_lora", "lora_disabled", "set_active_adapters"]


def _select(model: nn.Module, adapter: str | Sequence[str] | None) -> list[str]:
    if adapter is None:
        names = list_adapters(model)
    else:
        names = [adapter] if isinstance(adapter, str) else list(adapter)
    check_adapters_exist(model, names)
    return names


def _entries(model: nn.Module) -> list[AdapterEntry]:
    """Every switchable entry: updates and trained copies."""
    return [p for *_, p in iter_entries(model)]


def _set(model: nn.Module, adapter: str | Sequence[str] | None, enabled: bool) -> None:
    names = set(_select(model, adapter))
    for p in _entries(model):
        if p.adapter in names:
            p.enabled = enabled


def enable_lora(model: nn.Module, adapter: str | Sequence[str] | None = None) -> None:
    """Apply the named adapters (all by default); an enabled adapter is also trainable.

    Heads and biases that the adapters train (their own copies) switch with them.

    Args:
        model: A model with adapters.
        adapter: An adapter name, a list of names, or None for every adapter.

    Raises:
        LoRAError: A name that is not an adapter of the model.
    """
    _set(model, adapter, True)


def disable_lora(model: nn.Module, adapter: str | Sequence[str] | None = None) -> None:
    """Stop applying the named adapters (all by default): outputs equal the base model's.

    A disabled adapter is also frozen, so that it takes no gradient and DDP sees no unused
    trainable parameter. With every adapter disabled the model computes exactly what the
    pretrained model computes, bit for bit.

    Args:
        model: A model with adapters.
        adapter: An adapter name, a list of names, or None for every adapter.

    Raises:
        LoRAError: A name that is not an adapter of the model.
    """
    _set(model, adapter, False)


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Enable exactly these adapters and disable every other one (W0 + B1A1 -> W0 + B2A2).

    Heads and biases that the adapters train switch with them. The disabled adapters are
    frozen, the enabled ones trainable again.

    Args:
        model: A model with adapters.
        names: One adapter name or a list of them.

    Raises:
        LoRAError: A name that is not an adapter of the model.
    """
    active = set(_select(model, names))
    for p in _entries(model):
        p.enabled = p.adapter in active


@contextmanager
def lora_disabled(
    model: nn.Module, adapter: str | Sequence[str] | None = None
) -> Iterator[nn.Module]:
    """Disable adapters inside a ``with`` block, then restore each layer's previous state.

    Nested blocks and exceptions restore exactly what each layer had, not "all enabled".

    Args:
        model: A model with adapters.
        adapter: An adapter name, a list of names, or None for every adapter.

    Yields:
        The model, with those adapters disabled until the block ends.

    Raises:
        LoRAError: A name that is not an adapter of the model.

    Example:
        >>> with lora_disabled(model):
        ...     base_out = model(x)   # exactly the pretrained model's output
    """
    names = set(_select(model, adapter))
    saved = [(p, p.enabled) for p in _entries(model) if p.adapter in names]
    try:
        for p, _ in saved:
            p.enabled = False
        yield model
    finally:
        for p, state in saved:
            p.enabled = state
