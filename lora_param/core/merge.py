"""Merging adapters into the weights, and removing them; other parametrizations stay."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..variants.lora import LoRAParametrization
from .copies import TrainableCopy, drop_copies, iter_copies, parametrization_list
from .distributed import refuse_sharded
from .errors import LoRAError
from .forward import remove_factored_forward
from .generated_class import own_class
from .lookup import check_adapters_exist, iter_lora

Entry = LoRAParametrization | TrainableCopy
Take = Callable[[Entry], bool]

__all__ = ["drop_adapters", "merge_lora", "remove_lora"]

_UNSHARDED_COPY = (
    "Call save_lora on every rank, then on one rank load_lora the file into an unsharded copy "
    "of the base model and change that copy."
)


def _has_lora(module: nn.Module, tensor_name: str = "weight") -> bool:
    return parametrize.is_parametrized(module, tensor_name) and any(
        isinstance(p, LoRAParametrization) for p in parametrization_list(module, tensor_name)
    )


def drop_adapters(
    module: nn.Module, tensor_name: str, doomed: Callable[[LoRAParametrization], bool]
) -> None:
    """Remove the LoRA entries ``doomed`` selects from one tensor's parametrizations.

    When no parametrization is left, the tensor's ``original`` becomes the module's parameter
    again: the very object it was before ``add_lora``, in its original position.
    """
    plist = parametrization_list(module, tensor_name)
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
    """Tensors carrying adapter entries (LoRA updates or trained copies), each once."""
    seen: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    for path, module, name, _ in [*iter_lora(model), *iter_copies(model)]:
        seen.setdefault((id(module), name), (module, name, path))
    return list(seen.values())


def _enabled(p: Entry) -> bool:
    return p.enabled


def _chain(
    entries: list[nn.Module], x: Tensor | tuple[Tensor, ...], take: Take = _enabled
) -> Tensor:
    """Apply parametrizations in order; adapter entries ``take`` selects apply (no dropout)."""
    for p in entries:
        if isinstance(p, LoRAParametrization):
            # A LoRA entry adapts one tensor, so x is a single tensor by now.
            x = p.add_update(x) if take(p) else x  # type: ignore[arg-type]
        elif isinstance(p, TrainableCopy):
            x = p.value.detach().clone() if take(p) else x
        else:
            x = p(*x) if isinstance(x, tuple) else p(x)
    return x  # type: ignore[return-value]  # every chain ends in a single tensor


def _drop(module: nn.Module, name: str, doomed: Take) -> None:
    """Remove the adapter entries (LoRA updates and copies) ``doomed`` selects from a tensor."""
    drop_adapters(module, name, doomed)
    drop_copies(module, name, doomed)


def _plan_merge_through(
    module: nn.Module, name: str, path: str, take: Take = _enabled
) -> tuple[list, dict]:
    """Plan a merge where other parametrizations precede LoRA on the tensor.

    Works on copies of those parametrizations (their ``right_inverse`` and power iterations
    may change their state), so a refusal leaves the model untouched.

    Returns:
        New values for the originals, and the planned copies by position in the list.
    """
    plist = parametrization_list(module, name)
    entries = list(plist)
    last = max(i for i, p in enumerate(entries) if _is_entry(p))
    originals = (
        (plist.original,)
        if plist.is_tensor
        else tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    )
    planned = {
        i: copy.deepcopy(p)
        for i, p in enumerate(entries[: last + 1])
        if not isinstance(p, (LoRAParametrization, TrainableCopy))
    }
    chain = [planned.get(i, p) for i, p in enumerate(entries[: last + 1])]
    # User parametrizations, duck-typed: right_inverse is optional (AttributeError below).
    prefix: list[Any] = [planned[i] for i in sorted(planned)]
    names = [type(p).__name__ for p in prefix]
    with torch.no_grad():
        target = _chain(chain, originals if len(originals) > 1 else originals[0], take)
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


def _is_entry(p: nn.Module) -> bool:
    return isinstance(p, (LoRAParametrization, TrainableCopy))


def _check_one_adapter_merge(plist: nn.ModuleList, adapter: str, path: str) -> None:
    """Refuse merging one adapter where the others' result would change (exactness first)."""
    entries = list(plist)
    others = [p for p in entries if _is_entry(p) and p.adapter != adapter]
    foreign = [type(p).__name__ for p in entries if not _is_entry(p)]
    # Another adapter's copy replaces whatever lies under it: merging is exact only when this
    # adapter contributes nothing but copies that come before every other adapter's copy.
    mine = [i for i, p in enumerate(entries) if _is_entry(p) and p.adapter == adapter]
    theirs = [i for i, p in enumerate(entries) if isinstance(p, TrainableCopy) and p in others]
    hidden = theirs and (
        any(isinstance(entries[i], LoRAParametrization) for i in mine) or max(mine) > min(theirs)
    )
    if hidden:
        names = sorted({cast(TrainableCopy, entries[i]).adapter for i in theirs})
        raise LoRAError(
            f"cannot merge adapter {adapter!r} alone into '{path}': adapter(s) {names} hold their "
            "own copy of it, which would hide the merged change. Merge every adapter "
            "(merge_lora(model)) or remove_lora the others first."
        )
    if others and foreign:
        raise LoRAError(
            f"cannot merge adapter {adapter!r} alone into '{path}': other adapters share it with "
            f"the parametrizations {foreign}. Merge every adapter, or remove the others first."
        )


def _own(p: nn.Module) -> list[Tensor]:
    """The tensors an adapter entry holds (factors, or a copy)."""
    if isinstance(p, LoRAParametrization):
        return [p.lora_A, p.lora_B]
    return [cast(TrainableCopy, p).value]


def _check_finite(path: str, values: list[Tensor]) -> None:
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise LoRAError(
            f"merge_lora(safe=True): merging into '{path}' gives NaN or inf values; nothing was "
            "changed. The adapter has diverged: check its factors (lora_state_dict) or its copies."
        )


def merge_lora(
    model: nn.Module, adapter: str | None = None, *, safe: bool = False, requantize: bool = False
) -> nn.Module:
    """Bake adapters into the weights: every enabled adapter (dropping all), or one by name.

    With ``adapter=None`` the result is a plain model (state_dict keys such as ``fc.weight``)
    whose outputs equal the LoRA-enabled ones to float tolerance; disabled adapters are dropped
    unmerged. With ``adapter="name"`` only that adapter is merged (whether enabled or not) and
    dropped; the others stay, switchable, on top of the new weights. Heads and biases an
    adapter trains (its own copies) are merged too: the copy becomes the weight.

    The merged weight is a new parameter: the pretrained tensor is not modified in place.
    Other parametrizations (weight_norm, a user's own) stay; LoRA is folded into their inputs
    through their ``right_inverse``. Everything is computed and checked before anything
    changes.

    A packed (quantized) base becomes a plain weight in its compute dtype,
    ``dequant(Q) + s·B·A`` summed in float32 and rounded once; with ``requantize=True`` it
    stays packed instead, and a ``RequantizationWarning`` reports the error that added.

    Args:
        model: A model with adapters.
        adapter: Merge only this adapter; None merges every enabled one and drops them all.
        safe: Check every merged weight for NaN/inf first; raise (naming the layer) before any
            weight changes.
        requantize: Keep packed weights packed (lossy, see above).

    Returns:
        The same model object, merged.

    Raises:
        LoRAError: No such adapter; a merged weight is not finite (``safe=True``); one adapter
            cannot be merged alone exactly (another adapter holds its own copy of that tensor).
    """
    refuse_sharded(model, "merge_lora", _UNSHARDED_COPY)
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    from ..quant.merge import plan_packed_merges  # the quant package builds on core

    packed = plan_packed_merges(model, requantize)

    def take(p: Entry) -> bool:
        return p.enabled if adapter is None else p.adapter == adapter

    def doomed(p: Entry) -> bool:
        return adapter is None or p.adapter == adapter

    plans: list[tuple[nn.Module, str, Any, bool | None]] = []
    for module, name, path in _tensors_with_lora(model):
        plist = parametrization_list(module, name)
        if adapter is not None and not any(_is_entry(p) and p.adapter == adapter for p in plist):
            continue
        if packed.covers(module, name):
            if adapter is not None:
                raise LoRAError(
                    f"merge_lora(adapter={adapter!r}) cannot merge one adapter into the packed "
                    f"(quantized) base of '{path}'; merge every adapter (merge_lora(model)) or "
                    "dequantize_base(model) first."
                )
            if safe:
                _check_finite(
                    path, [t for p in plist if _is_entry(p) and p.enabled for t in _own(p)]
                )
            continue
        if adapter is not None:
            _check_one_adapter_merge(plist, adapter, path)
        if all(_is_entry(p) for p in plist):
            with torch.no_grad():
                merged = _chain(list(plist), plist.original, take)
            if safe:
                _check_finite(path, [merged])
            plans.append((module, name, merged, plist.original.requires_grad))
        else:
            values, planned = _plan_merge_through(module, name, path, take)
            if safe:
                _check_finite(path, values)
            plans.append((module, name, (values, planned), None))
    if adapter is None:
        packed.apply()
    for module, name, value, requires_grad in plans:
        if requires_grad is not None:
            _drop(module, name, doomed)
            fresh = nn.Parameter(value.detach(), requires_grad=requires_grad)
            if parametrize.is_parametrized(module, name):
                parametrization_list(module, name).original = fresh
            else:
                setattr(module, name, fresh)
            continue
        values, planned = value
        plist = parametrization_list(module, name)
        for i, p in planned.items():
            plist[i] = p
        slots = ["original"] if plist.is_tensor else [f"original{i}" for i in range(len(values))]
        for slot, v in zip(slots, values, strict=True):
            old = getattr(plist, slot)
            setattr(plist, slot, nn.Parameter(v.detach().clone(), requires_grad=old.requires_grad))
        _drop(module, name, doomed)
    return model


def remove_lora(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Drop adapters (all, or one by name) and give back the original weights bit-for-bit.

    The adapters' own copies of heads and biases go with them.

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
        _drop(module, name, lambda p: adapter is None or p.adapter == adapter)
    return model
