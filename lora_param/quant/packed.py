"""Finding packed weights in a model and swapping a packed weight for a plain one."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from ..core.forward import install_factored_forward
from ..core.generated_class import own_class
from ..core.targets import join
from ..variants.lora import LoRAParametrization
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

    LoRA entries registered above the packed weight stay, now on top of ``value``, with
    their parameters and their factored forward.
    """
    lora = [p for p in parametrization_list(module) if isinstance(p, LoRAParametrization)]
    factored = getattr(type(module), "_lora_kind", None)
    order = module.__dict__.get("_lora_param_order")
    own_class(module)
    # Evaluating the packed weight once here is the only way parametrize removes a
    # parametrization stored as several tensors; the result is replaced at once (so any
    # kernel will do: ours, which never refuses).
    head = packed_head(module)
    if head is not None:
        head.kernel = "torch"
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module._buffers.pop("weight", None)
    module._parameters.pop("weight", None)
    module.weight = value
    if order is not None:
        items = [(k, module._parameters[k]) for k in order if k in module._parameters]
        items += [(k, v) for k, v in module._parameters.items() if k not in order]
        module._parameters.clear()
        module._parameters.update(items)
    for p in lora:
        parametrize.register_parametrization(module, "weight", p, unsafe=True)
    if lora and factored is not None:
        install_factored_forward(module, factored)
