"""Merging adapters into the weights, and removing them; other parametrizations stay."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .classes import own_class
from .distributed import refuse_sharded
from .errors import LoRAError
from .factored import remove_factored_forward
from .parametrization import LoRAParametrization
from .registry import check_adapters_exist, iter_lora

__all__ = ["drop_adapters", "merge_lora", "remove_lora"]

_UNSHARDED_COPY = (
    "Call save_lora on every rank, then on one rank load_lora the file into an unsharded copy "
    "of the base model and change that copy."
)


def _has_lora(module: nn.Module, tensor_name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, LoRAParametrization) for p in module.parametrizations[tensor_name]
    )


def drop_adapters(
    module: nn.Module, tensor_name: str, doomed: Callable[[LoRAParametrization], bool]
) -> None:
    """Remove the LoRA entries ``doomed`` selects from one tensor's parametrizations.

    When no parametrization is left, the tensor's ``original`` becomes the module's parameter
    again: the very object it was before ``add_lora``, in its original position.
    """
    plist = module.parametrizations[tensor_name]
    drop = [i for i, p in enumerate(plist) if isinstance(p, LoRAParametrization) and doomed(p)]
    if not drop:
        return
    own_class(module)
    rest = [p for i, p in enumerate(plist) if i not in drop]
    # An entry that exists only to carry LoRA (lora_param.quant's bitsandbytes weight) goes too.
    if len(drop) == len(plist) or all(getattr(p, "removed_with_lora", False) for p in rest):
        order = module.__dict__.get("_lora_param_order")
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        if order is not None:
            _restore_order(module, order)
    else:
        for i in reversed(drop):
            del plist[i]
    if not _has_lora(module):
        remove_factored_forward(module)


def _restore_order(module: nn.Module, order: list[str]) -> None:
    """Put parameters back in their original order (optimizer state is positional)."""
    params = module._parameters
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    items = [(k, params[k]) for k in keys]
    params.clear()
    params.update(items)


def _tensors_with_lora(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    seen: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    for path, module, name, _ in iter_lora(model):
        seen.setdefault((id(module), name), (module, name, path))
    return list(seen.values())


def _chain(entries: list[nn.Module], x: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Apply parametrizations in order; enabled LoRA entries add their update without dropout."""
    for p in entries:
        if isinstance(p, LoRAParametrization):
            x = p.add_update(x) if p.enabled else x  # type: ignore[arg-type]
        else:
            x = p(*x) if isinstance(x, tuple) else p(x)
    return x  # type: ignore[return-value]


def _plan_merge_through(module: nn.Module, name: str, path: str) -> tuple[list, dict]:
    """Plan a merge where other parametrizations precede LoRA on the tensor.

    Works on copies of those parametrizations (their ``right_inverse`` and power iterations
    may change their state), so a refusal leaves the model untouched.

    Returns:
        New values for the originals, and the planned copies by position in the list.
    """
    plist = module.parametrizations[name]
    entries = list(plist)
    last = max(i for i, p in enumerate(entries) if isinstance(p, LoRAParametrization))
    originals = (
        (plist.original,)
        if plist.is_tensor
        else tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    )
    planned = {
        i: copy.deepcopy(p)
        for i, p in enumerate(entries[: last + 1])
        if not isinstance(p, LoRAParametrization)
    }
    chain = [planned.get(i, p) for i, p in enumerate(entries[: last + 1])]
    prefix = [planned[i] for i in sorted(planned)]
    names = [type(p).__name__ for p in prefix]
    with torch.no_grad():
        target = _chain(chain, originals if len(originals) > 1 else originals[0])
        value: Tensor | tuple[Tensor, ...] = target
        try:
            for p in reversed(prefix):
                value = p.right_inverse(value)
        except (AttributeError, NotImplementedError):
            raise LoRAError(
                f"cannot merge LoRA into '{path}': the parametrizations {names} before it have "
                "no right_inverse to absorb the update. Use remove_lora, or remove them first."
            ) from None
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        check = _chain(prefix, values if len(values) > 1 else values[0])
        if check.shape != target.shape or not torch.allclose(check, target, rtol=1e-4, atol=1e-5):
            raise LoRAError(
                f"cannot merge LoRA into '{path}': the parametrizations {names} cannot "
                "represent the merged weight (their right_inverse does not invert them). "
                "Use remove_lora instead."
            )
    return list(values), planned


def merge_lora(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Bake the enabled adapters into the weights and drop every adapter.

    The result is a plain model (state_dict keys such as ``fc.weight``) whose outputs equal
    the LoRA-enabled ones to float tolerance. The merged weight is a new parameter: the
    pretrained tensor is not modified in place. Other parametrizations (weight_norm, a
    user's own) stay; LoRA is folded into their inputs through their ``right_inverse``.
    Everything is computed and checked before anything changes.

    A packed (quantized) base becomes a plain weight in its compute dtype,
    ``dequant(Q) + s·B·A`` summed in float32 and rounded once; with ``requantize=True`` it
    stays packed instead, and a ``RequantizationWarning`` reports the error that added.

    Args:
        model: A model with adapters.
        requantize: Keep packed weights packed (lossy, see above).

    Returns:
        The same model object, merged.
    """
    refuse_sharded(model, "merge_lora", _UNSHARDED_COPY)
    from ..quant.merge import plan_packed_merges  # the quant package builds on core

    packed = plan_packed_merges(model, requantize)
    plans = []
    for module, name, path in _tensors_with_lora(model):
        if packed.covers(module, name):
            continue
        plist = module.parametrizations[name]
        if all(isinstance(p, LoRAParametrization) for p in plist):
            with torch.no_grad():
                merged = _chain(list(plist), plist.original)
            plans.append((module, name, merged, plist.original.requires_grad))
        else:
            plans.append((module, name, _plan_merge_through(module, name, path), None))
    packed.apply()
    for module, name, value, requires_grad in plans:
        if requires_grad is not None:
            drop_adapters(module, name, lambda p: True)
            setattr(module, name, nn.Parameter(value.detach(), requires_grad=requires_grad))
            continue
        values, planned = value
        plist = module.parametrizations[name]
        for i, p in planned.items():
            plist[i] = p
        slots = ["original"] if plist.is_tensor else [f"original{i}" for i in range(len(values))]
        for slot, v in zip(slots, values):
            old = getattr(plist, slot)
            setattr(plist, slot, nn.Parameter(v.detach().clone(), requires_grad=old.requires_grad))
        drop_adapters(module, name, lambda p: True)
    return model


def remove_lora(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Drop adapters (all, or one by name) and give back the original weights bit-for-bit.

    Args:
        model: A model with adapters.
        adapter: The adapter to remove; None removes every adapter.

    Returns:
        The same model object.
    """
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    refuse_sharded(model, "remove_lora", _UNSHARDED_COPY)
    for module, name, _ in _tensors_with_lora(model):
        drop_adapters(module, name, lambda p: adapter is None or p.adapter == adapter)
    return model
