"""Finding packed weights in a model and swapping a packed weight for a plain one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from ..core.entries import register_entry, restore_order
from ..core.forward import install_forward, is_installed, layer_kind_of
from ..core.generated_class import own_class
from ..core.targets import join
from .weight import QuantizedWeight

__all__ = [
    "iter_quantized",
    "packed_head",
    "parametrization_list",
    "replace_packed",
    "stored_tensors",
]


def parametrization_list(module: nn.Module, name: str = "weight") -> ParametrizationList:
    """The ParametrizationList of a parametrized tensor, typed."""
    return cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])


def packed_head(module: nn.Module, name: str = "weight") -> QuantizedWeight | None:
    """The QuantizedWeight a tensor is stored through (always the first entry), or None."""
    if not parametrize.is_parametrized(module, name):
        return None
    head = parametrization_list(module, name)[0]
    return head if isinstance(head, QuantizedWeight) else None


def stored_tensors(module: nn.Module, name: str = "weight") -> tuple[Tensor, ...]:
    """The packed tensors (``original0``, ``original1``, ...) of a quantized tensor."""
    plist = parametrization_list(module, name)
    return tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))


def iter_quantized(model: nn.Module) -> Iterator[tuple[str, nn.Module, QuantizedWeight]]:
    """Yield ``(weight path, module, QuantizedWeight)`` for every packed weight of the model."""
    for module_name, module in model.named_modules():
        head = packed_head(module)
        if head is not None:
            yield join(module_name, "weight"), module, head


def replace_packed(module: nn.Module, value: nn.Parameter) -> None:
    """Make ``value`` the layer's plain weight in place of the packed one.

    Entries registered above the packed weight (adapters) stay, now on top of ``value``, with
    their parameters and the layer's adapted forward.
    """
    plist = parametrization_list(module)
    head = cast(QuantizedWeight, plist[0])
    above = list(plist)[1:]
    installed = is_installed(module)
    kind = layer_kind_of(module) if installed else head.kind
    order = module.__dict__.get("_lora_param_order")
    own_class(module)
    # parametrize removes a parametrization stored as several tensors only by evaluating it:
    # drop the entries above first, so that only the packed weight is dequantized (with our
    # kernel, which never refuses), and the result is replaced at once.
    for i in reversed(range(1, len(plist))):
        del plist[i]
    head.kernel = "torch"
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module._buffers.pop("weight", None)
    module._parameters.pop("weight", None)
    module.weight = value
    if order is not None:
        restore_order(module, order)
    for p in above:
        register_entry(module, "weight", p)
    if above and installed:
        install_forward(module, kind)
