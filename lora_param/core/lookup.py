"""Finding the adapters in a model: which entries, tensors and parameters are whose."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from torch import nn
from torch.nn.utils import parametrize

from .copies import iter_copies
from .entries import adapter_lists
from .entry import AdapterEntry
from .errors import LoRAError
from .targets import join
from .variant import AdapterVariant

__all__ = [
    "active_adapters",
    "adapter_parameters",
    "check_adapters_exist",
    "clear_lora_cache",
    "iter_entries",
    "iter_lora",
    "list_adapters",
    "owned_tensor_ids",
]


def iter_entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, AdapterEntry]]:
    """Yield ``(tensor path, module, tensor name, entry)`` for everything adapters own.

    Updates (:class:`~lora_param.AdapterVariant`) and trained copies
    (:class:`~lora_param.TrainableCopy`), in module order, then list order.

    Args:
        model: Any module, with or without adapters.

    Yields:
        One tuple per entry: what :func:`~lora_param.iter_lora` yields, plus the copies.
    """
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in cast(nn.ModuleDict, module.parametrizations).items():
            for p in cast(nn.ModuleList, plist):
                if isinstance(p, AdapterEntry):
                    yield join(module_name, tensor_name), module, tensor_name, p


def iter_lora(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, AdapterVariant]]:
    """Yield ``(tensor path, module, tensor name, entry)`` for every adapter update.

    Every variant (LoRA, DoRA, per-expert LoRA, ...); trained copies are in
    :func:`~lora_param.iter_copies`.

    Args:
        model: Any module, with or without adapters.

    Yields:
        One tuple per adapter per adapted tensor, in module order then registration order.
    """
    for path, module, name, p in iter_entries(model):
        if isinstance(p, AdapterVariant):
            yield path, module, name, p


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters present in the model, in order of first appearance.

    Args:
        model: Any module, with or without adapters.

    Returns:
        Every adapter name, enabled or not (an empty list for a model without adapters).
    """
    return list(dict.fromkeys(p.adapter for *_, p in iter_entries(model)))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters enabled on at least one tensor (update or trained copy).

    Args:
        model: Any module, with or without adapters.

    Returns:
        The enabled adapters' names, in order of first appearance.
    """
    return list(dict.fromkeys(p.adapter for *_, p in iter_entries(model) if p.enabled))


def check_adapters_exist(model: nn.Module, names: list[str]) -> None:
    """Raise a clear error if any name is not an adapter of the model."""
    present = list_adapters(model)
    missing = [n for n in names if n not in present]
    if missing:
        raise LoRAError(
            f"no adapter named {', '.join(map(repr, missing))} in this model; "
            f"it has {present if present else 'no adapters (call add_lora first)'}."
        )


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The parameters an adapter trains, of one adapter or of all.

    The trainable tensors of every update (``lora_A`` and ``lora_B``, DoRA's magnitude, ...),
    then the adapter's own copies of the tensors it trains in full (a head from
    ``trainable=``, biases from ``bias=``).

    Args:
        model: A model with adapters.
        adapter: Adapter name; None for every adapter.

    Returns:
        The parameters, ready to hand to an optimizer.
    """
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    updates = [
        t
        for *_, p in iter_lora(model)
        if adapter is None or p.adapter == adapter
        for t in p.trainable_tensors().values()
    ]
    copies = [c.value for *_, c in iter_copies(model) if adapter is None or c.adapter == adapter]
    return updates + copies


def owned_tensor_ids(model: nn.Module) -> set[int]:
    """``id`` of every tensor adapters own (updates' tensors, frozen ones too, and copies)."""
    ids = {id(t) for *_, p in iter_lora(model) for t in p.tensors().values()}
    ids |= {id(t) for *_, p in iter_lora(model) for t in p.parameters()}
    ids |= {id(c.value) for *_, c in iter_copies(model)}
    return ids


def clear_lora_cache(model: nn.Module) -> None:
    """Drop every cached adapted weight (the ``torch.no_grad()`` fast path).

    The cache notices optimizer steps, ``copy_``, ``load_state_dict``, ``.to()`` and
    ``model.train()/eval()`` by itself; only in-place edits through ``.data``
    (``p.data.mul_(2)``), which no version counter sees, need this call.

    Args:
        model: Any module; modules without adapters are left alone.
    """
    for _, plist in adapter_lists(model):
        plist.clear_cache()
