"""Finding the adapters in a model: an explicit notion of which parameters are LoRA's."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from torch.nn.utils import parametrize

from ..variants.lora import LoRAParametrization
from .copies import iter_copies
from .errors import LoRAError
from .targets import join

__all__ = [
    "active_adapters",
    "adapter_parameters",
    "check_adapters_exist",
    "clear_lora_cache",
    "iter_lora",
    "list_adapters",
]


def iter_lora(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LoRAParametrization]]:
    """Yield ``(tensor path, module, tensor name, parametrization)`` for every adapter.

    Args:
        model: Any module, with or without adapters.

    Yields:
        One tuple per adapter per adapted tensor, in module order then registration order.
    """
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LoRAParametrization):
                    yield join(module_name, tensor_name), module, tensor_name, p


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters present in the model, in order of first appearance."""
    names = [p.adapter for *_, p in iter_lora(model)]
    names += [c.adapter for *_, c in iter_copies(model)]
    return list(dict.fromkeys(names))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters enabled on at least one layer (LoRA update or trained copy)."""
    names = [p.adapter for *_, p in iter_lora(model) if p.enabled]
    names += [c.adapter for *_, c in iter_copies(model) if c.enabled]
    return list(dict.fromkeys(names))


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

    ``lora_A`` and ``lora_B`` of every adapted tensor, then the adapter's own copies of the
    tensors it trains in full (a head from ``trainable=``, biases from ``bias=``).

    Args:
        model: A model with adapters.
        adapter: Adapter name; None for every adapter.

    Returns:
        The parameters, ready to hand to an optimizer.
    """
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    factors = [
        t
        for *_, p in iter_lora(model)
        if adapter is None or p.adapter == adapter
        for t in p.parameters()
    ]
    copies = [c.value for *_, c in iter_copies(model) if adapter is None or c.adapter == adapter]
    return factors + copies


def clear_lora_cache(model: nn.Module) -> None:
    """Drop every adapter's cached weight (the ``torch.no_grad()`` fast path).

    The cache notices optimizer steps, ``copy_``, ``load_state_dict``, ``.to()`` and
    ``model.train()/eval()`` by itself; only in-place edits through ``.data``
    (``p.data.mul_(2)``), which no version counter sees, need this call.
    """
    for *_, p in iter_lora(model):
        p.clear_cache()
