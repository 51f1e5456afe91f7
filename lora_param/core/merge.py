"""Merging adapters into the weights, and removing them; other parametrizations stay."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .copies import TrainableCopy
from .distributed import refuse_sharded
from .entries import AdapterList, drop_entries, entry_list
from .entry import AdapterEntry
from .errors import LoRAError
from .lookup import check_adapters_exist, iter_entries
from .variant import AdapterVariant

__all__ = ["RequantizationWarning", "merge_chain", "merge_lora", "remove_lora"]

Take = Callable[[AdapterEntry], bool]

_UNSHARDED_COPY = (
    "Call save_lora on every rank, then on one rank load_lora the file into an unsharded copy "
    "of the base model and change that copy."
)
_SAVE_MERGED = (
    "For a merged checkpoint call save_merged(model, folder) on every rank (rank 0 writes the "
    "merged weights, gathered one layer at a time). To change the model itself, call "
    "save_lora on every rank, then on one rank load_lora the file into an unsharded copy of "
    "the base model and merge that copy."
)


class RequantizationWarning(UserWarning):
    """``merge_lora(requantize=True)`` rounded the merged weights back to the packed format.

    Requantizing the merged weight is lossy (PEFT does the same when it merges into a 4-bit
    base); the warning's message gives the relative error it added, per weight. Merge without
    ``requantize`` to keep the exact result in the compute dtype.
    """


@dataclass
class _Plan:
    """One tensor's merge, computed in full before anything changes."""

    module: nn.Module
    name: str
    path: str
    doomed: Callable[[nn.Module], bool]
    install: Callable[[], None]
    error: float | None = None
    packed: bool = False


def _tensors_with_entries(model: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Tensors carrying adapter entries (updates or trained copies), each once."""
    seen: dict[tuple[int, str], tuple[nn.Module, str, str]] = {}
    for path, module, name, _ in iter_entries(model):
        seen.setdefault((id(module), name), (module, name, path))
    return list(seen.values())


def merge_chain(
    entries: list[nn.Module], x: Tensor | tuple[Tensor, ...], take: Take, owned: bool = False
) -> Tensor:
    """Apply a list's entries in at least float32; adapter entries ``take`` selects apply.

    Updates compute through their :meth:`~AdapterVariant.merged` (float32, float64 for
    float64 weights); a trained copy replaces the value; other parametrizations (a store, a
    user's own) apply as they are. Once the value is a tensor of the chain's own (``owned``:
    the caller's copy, or any intermediate result), updates are formed in it
    (:meth:`~AdapterVariant.merged_inplace`): one weight-sized tensor at a time.
    """
    for p in entries:
        if isinstance(p, AdapterVariant):
            if take(p):
                w = cast(Tensor, x)
                wide = p.compute_dtype_for(w)
                if w.dtype != wide:
                    w, owned = w.detach().to(wide), True
                x = p.merged_inplace(w) if owned else p.merged(w)
                owned = True
        elif isinstance(p, AdapterEntry):
            if take(p):
                value = cast(TrainableCopy, p).value.detach()
                x = value.to(torch.promote_types(value.dtype, torch.float32))
                owned = x is not value
        else:
            inputs = x if isinstance(x, tuple) else (x,)
            x = p(*x) if isinstance(x, tuple) else p(x)
            # the result may be (a view of) an input: it is ours only if that input was
            owned = owned or not any(_same_storage(x, t) for t in inputs)
            if isinstance(x, Tensor) and x.is_floating_point():
                wider = x.to(torch.promote_types(x.dtype, torch.float32))
                owned, x = owned or wider is not x, wider
    return cast(Tensor, x)


def _same_storage(a: Any, b: Any) -> bool:
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    )


def _plan_merge_through(
    plist: AdapterList, path: str, take: Take
) -> tuple[list[Tensor], dict[int, nn.Module]]:
    """Plan a merge where a user's parametrizations precede the adapters on the tensor.

    Works on copies of those parametrizations (their ``right_inverse`` and power iterations
    may change their state), so a refusal leaves the model untouched.

    Returns:
        New values for the originals, and the planned copies by position in the list.
    """
    entries = list(plist)
    last = max(i for i, p in enumerate(entries) if isinstance(p, AdapterEntry))
    planned = {
        i: copy.deepcopy(p)
        for i, p in enumerate(entries[: last + 1])
        if not isinstance(p, AdapterEntry)
    }
    chain = [planned.get(i, p) for i, p in enumerate(entries[: last + 1])]
    # User parametrizations, duck-typed: right_inverse is optional (AttributeError below).
    prefix: list[Any] = [planned[i] for i in sorted(planned)]
    names = [type(p).__name__ for p in prefix]
    originals = plist.stored()
    dtype = originals[0].dtype
    with torch.no_grad():
        target = merge_chain(chain, originals if len(originals) > 1 else originals[0], take)
        if target.dtype != dtype and dtype.is_floating_point:
            target = target.to(dtype)
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
        check = merge_chain(prefix, values if len(values) > 1 else values[0], take)
        if check.shape != target.shape or not torch.allclose(
            check.to(target.dtype), target, rtol=1e-4, atol=1e-5
        ):
            raise LoRAError(
                f"cannot merge LoRA into '{path}': the parametrizations {names} cannot "
                "represent the merged weight (their right_inverse does not invert them). "
                "Use remove_lora instead."
            )
    return list(values), planned


def _check_one_adapter_merge(plist: AdapterList, adapter: str, path: str) -> None:
    """Refuse merging one adapter where the others' result would change (exactness first)."""
    entries = list(plist)
    owned = [(i, p) for i, p in enumerate(entries) if isinstance(p, AdapterEntry)]
    mine = [i for i, p in owned if p.adapter == adapter]
    others = [(i, p) for i, p in owned if p.adapter != adapter]
    foreign = [type(p).__name__ for p in plist.foreign()]
    # Another adapter's copy replaces whatever lies under it: merging is exact only when this
    # adapter contributes nothing but copies that come before every other adapter's copy.
    theirs = [i for i, p in others if isinstance(p, TrainableCopy)]
    hidden = theirs and (
        any(isinstance(entries[i], AdapterVariant) for i in mine) or max(mine) > min(theirs)
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
    # An update whose result depends on the weight under it (DoRA, OFT) does not commute with
    # the others: merging is exact only where this adapter's entries come first.
    for i, p in others:
        if not isinstance(p, AdapterVariant):
            continue
        for j in mine:
            q = entries[j]
            if i < j and isinstance(q, AdapterVariant) and not (p.additive and q.additive):
                raise LoRAError(
                    f"cannot merge adapter {adapter!r} alone into '{path}': adapter "
                    f"{p.adapter!r} ({p.variant}) comes before it there and the two do not "
                    "commute (one is not additive), so the others' result would change. Merge "
                    "every adapter (merge_lora(model)) or remove_lora the other first."
                )


def _check_finite(path: str, value: Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise LoRAError(
            f"merge_lora(safe=True): merging into '{path}' gives NaN or inf values; nothing was "
            "changed. The adapter has diverged: check its factors (lora_state_dict) or its copies."
        )


def _install_plain(module: nn.Module, name: str, value: Tensor, requires_grad: bool) -> None:
    fresh = nn.Parameter(value.detach(), requires_grad=requires_grad)
    if parametrize.is_parametrized(module, name):
        cast(AdapterList, cast(nn.ModuleDict, module.parametrizations)[name]).original = fresh
    else:
        setattr(module, name, fresh)


def _install_through(
    module: nn.Module, name: str, values: list[Tensor], planned: dict[int, nn.Module]
) -> None:
    plist = cast(AdapterList, cast(nn.ModuleDict, module.parametrizations)[name])
    for i, p in planned.items():
        plist[i] = p
    slots = ["original"] if plist.is_tensor else [f"original{i}" for i in range(len(values))]
    for slot, v in zip(slots, values, strict=True):
        old = getattr(plist, slot)
        setattr(plist, slot, nn.Parameter(v.detach().clone(), requires_grad=old.requires_grad))
    plist.clear_cache()


def _plan(
    module: nn.Module,
    name: str,
    path: str,
    adapter: str | None,
    safe: bool,
    requantize: bool,
) -> _Plan | None:
    plist = entry_list(module, name)
    assert plist is not None
    owned = plist.owned()
    if adapter is not None and not any(p.adapter == adapter for p in owned):
        return None

    def take(p: AdapterEntry) -> bool:
        return p.enabled if adapter is None else p.adapter == adapter

    def doomed(p: nn.Module) -> bool:
        return isinstance(p, AdapterEntry) and (adapter is None or p.adapter == adapter)

    if adapter is not None:
        _check_one_adapter_merge(plist, adapter, path)
    store = plist.store()
    if store is not None:
        with torch.no_grad():
            value = merge_chain(list(plist)[1:], store.weight_fp32(*plist.stored()), take, True)
        if safe:
            _check_finite(path, value)
        install, error = store.merge_step(module, plist.stored(), value, requantize)
        return _Plan(module, name, path, doomed, install, error, packed=True)
    if not plist.foreign():
        original = plist.stored()[0]
        with torch.no_grad():
            value = merge_chain(list(plist), original, take).to(original.dtype)
        if safe:
            _check_finite(path, value)
        requires_grad = original.requires_grad
        return _Plan(
            module, name, path, doomed, lambda: _install_plain(module, name, value, requires_grad)
        )
    values, planned = _plan_merge_through(plist, path, take)
    if safe:
        for v in values:
            _check_finite(path, v)
    return _Plan(
        module, name, path, doomed, lambda: _install_through(module, name, values, planned)
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

    Every variant merges through its own formula (DoRA's magnitude included), computed in at
    least float32 (float64 stays float64) and rounded once to the weight's dtype. The merged
    weight is a new parameter: the pretrained tensor is not modified in place. Other
    parametrizations (weight_norm, a user's own) stay; adapters are folded into their inputs
    through their ``right_inverse``. Everything is computed and checked before anything
    changes.

    A packed (quantized) base becomes a plain weight in its compute dtype, ``W'`` of
    ``dequant(Q)`` rounded once; with ``requantize=True`` it stays packed instead, and a
    ``RequantizationWarning`` reports the error that added.

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
            cannot be merged alone exactly (another adapter holds its own copy of that tensor,
            or comes before it with an update that does not commute with it).
    """
    refuse_sharded(model, "merge_lora", _SAVE_MERGED)
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    plans = [
        plan
        for module, name, path in _tensors_with_entries(model)
        if (plan := _plan(module, name, path, adapter, safe, requantize)) is not None
    ]
    # Plain tensors (biases, copies) first: a packed layer's step may change the layer's class.
    for plan in sorted(plans, key=lambda p: p.packed):
        drop_entries(plan.module, plan.name, plan.doomed)
        plan.install()
    errors = {p.path: p.error for p in plans if p.error is not None}
    if errors:
        worst = max(errors, key=errors.__getitem__)
        warnings.warn(
            f"merge_lora(requantize=True) rounded {len(errors)} merged weights back to "
            f"their packed format, adding a relative error up to {errors[worst]:.3g} "
            f"(at '{worst}') on top of the merge; merge_lora(model) without requantize "
            "keeps the merged weights exact in the compute dtype.",
            RequantizationWarning,
            stacklevel=2,
        )
    return model


def remove_lora(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Drop adapters (all, or one by name) and give back the original weights bit-for-bit.

    The adapters' own copies of heads and biases go with them; a packed base stays packed.

    Args:
        model: A model with adapters.
        adapter: The adapter to remove; None removes every adapter.

    Returns:
        The same model object.
    """
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    refuse_sharded(model, "remove_lora", _UNSHARDED_COPY)
    for module, name, _ in _tensors_with_entries(model):
        drop_entries(
            module,
            name,
            lambda p: isinstance(p, AdapterEntry) and (adapter is None or p.adapter == adapter),
        )
    return model
