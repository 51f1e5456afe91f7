"""A tensor's parametrization list as lora_param keeps it: what it holds, in which order.

``torch.nn.utils.parametrize`` keeps each parametrized tensor's entries in a
``ParametrizationList``. For tensors lora_param touches, that list is an :class:`AdapterList`
(the same class with lora_param's evaluation cache), holding, in this order:

1. at most one base store (:class:`~.store.BaseStore`, a packed frozen weight);
2. the adapters' trained copies of the tensor (:class:`~.copies.TrainableCopy`);
3. the adapters' updates (:class:`~.variant.AdapterVariant`), in registration order;

and any parametrization of the user's (weight_norm, orthogonal, ...) before or between them.
This module is the one place that registers entries, drops them (giving the original tensor
back, in its original position, when nothing is left) and evaluates the list, honouring the
per-example adapter selection of mixed batches (:func:`selecting`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from .entry import AdapterEntry
from .eval_cache import AUTO_EVAL_CACHE_MAX_NUMEL, VersionedCache
from .generated_class import own_class
from .store import BaseStore
from .variant import AdapterVariant

__all__ = [
    "BASE",
    "AdapterList",
    "adapter_lists",
    "drop_entries",
    "entry_list",
    "register_entry",
    "selecting",
    "selection",
]

#: Name selecting no adapter at all (the pretrained model) in :func:`selecting`.
BASE = "__base__"
_SELECTION: list[str | None] = [None]


@contextlib.contextmanager
def selecting(adapter: str | None) -> Iterator[None]:
    """Inside the block, every adapted tensor applies exactly ``adapter``'s entries.

    Whatever is enabled; ``BASE`` applies none; None restores the enabled flags' rule. Used by
    mixed batches to run a group of rows with one adapter.
    """
    saved = _SELECTION[0]
    _SELECTION[0] = adapter
    try:
        yield
    finally:
        _SELECTION[0] = saved


def selection() -> str | None:
    """The adapter :func:`selecting` chose, or None (the enabled flags decide)."""
    return _SELECTION[0]


class AdapterList(ParametrizationList):
    """A ParametrizationList holding lora_param's entries, with one evaluation cache.

    Under ``torch.no_grad()`` (outside ``torch.compile`` and mixed batches) the list's value
    is kept while nothing it depends on changes, when :attr:`eval_cache` is on (see
    :mod:`.eval_cache`); a packed base or a user's parametrization is never cached.
    """

    eval_cache: bool
    _value_cache: VersionedCache

    # ---- what the list holds -----------------------------------------------------------------

    def entries(self) -> list[nn.Module]:
        """Every entry, in order."""
        return list(self._modules.values())

    def store(self) -> BaseStore | None:
        """The base store (a packed weight), or None for a plain weight."""
        head = next(iter(self._modules.values()), None)
        return head if isinstance(head, BaseStore) else None

    def variants(self) -> list[AdapterVariant]:
        """The adapters' updates, in order."""
        return [p for p in self._modules.values() if isinstance(p, AdapterVariant)]

    def owned(self) -> list[AdapterEntry]:
        """Everything adapters own here: trained copies and updates, in order."""
        return [p for p in self._modules.values() if isinstance(p, AdapterEntry)]

    def foreign(self) -> list[nn.Module]:
        """Parametrizations that are not lora_param's (a user's own)."""
        return [p for p in self._modules.values() if not isinstance(p, (AdapterEntry, BaseStore))]

    def stored(self) -> tuple[Tensor, ...]:
        """The tensors parametrize stores (``original`` or ``original0``, ``original1``, ...)."""
        if self.is_tensor:
            return (self._parameters["original"],)  # type: ignore[return-value]
        return tuple(getattr(self, f"original{i}") for i in range(self.ntensors))

    def weight_numel(self) -> int:
        """Elements of the tensor the list computes."""
        store = self.store()
        if store is not None:
            return store.numel()
        return self.stored()[0].numel()

    # ---- the value ------------------------------------------------------------------------------

    def base_value(self) -> Tensor:
        """The frozen base tensor: the plain original, or the store's weight (compute dtype)."""
        store = self.store()
        if store is not None:
            return store(*self.stored())
        return self.stored()[0]

    def chain(self, select: str | None = None, *, dropout: bool = True) -> Tensor:
        """Evaluate the list: entries that are active (enabled, or ``select``'s) apply."""
        entries = self._modules.values()
        stored = self.stored()
        x: Any = stored if len(stored) > 1 else stored[0]
        first = True
        for p in entries:
            if isinstance(p, AdapterVariant):
                if p.active(select):
                    x = p.adapt(x, dropout=dropout)
            elif isinstance(p, AdapterEntry):  # a trained copy replaces what is under it
                if p.active(select):
                    x = p.value
            else:
                x = p(*x) if first and isinstance(x, tuple) else p(x)
            first = False
        return cast(Tensor, x)

    def cacheable(self) -> bool:
        """Whether an evaluation cache may hold this tensor's value at all."""
        store = self.store()
        return (store is None or store.cacheable) and not self.foreign()

    def cached(self) -> Tensor | None:
        """The value through the evaluation cache, or None where the cache does not apply.

        It applies under ``torch.no_grad()``, outside ``torch.compile`` and mixed batches, with
        the cache on, some update enabled, and no enabled update dropping its input in training
        mode. One pass over the entries: this runs in every evaluation forward of every
        adapted layer, where it is all the time the adapter adds to the merged model's.
        """
        if (
            torch.compiler.is_compiling()
            or not self.eval_cache
            or _SELECTION[0] is not None
            or torch.is_grad_enabled()
        ):
            return None
        original = self._parameters.get("original")
        tensors: list[Tensor] = [original] if original is not None else list(self.stored())
        key: list[Any] = []
        applies = False
        for p in self._modules.values():
            if isinstance(p, AdapterEntry):
                key.append(p.cache_key())
                if p._enabled:
                    if isinstance(p, AdapterVariant):
                        if p.training and p.dropout_p > 0:
                            return None
                        applies = True
                    tensors += p.cache_tensors()
        if not applies:
            return None
        stamp = tuple(key)
        value = self._value_cache.get(tensors, stamp)
        if value is None:
            value = self.chain()
            self._value_cache.put(tensors, stamp, value)
        return cast(Tensor, value)

    def forward(self) -> Tensor:
        """The tensor's value: the cached one when the eval cache applies, else computed."""
        value = self.cached()
        if value is not None:
            return value
        if not torch.compiler.is_compiling() and self._value_cache.value is not None:
            self._value_cache.clear()  # training moves on: free the evaluation copy
        return self.chain(_SELECTION[0])

    def cache_nbytes(self) -> int:
        """Bytes the evaluation cache holds now."""
        return self._value_cache.nbytes

    def cache_cost(self) -> int:
        """Bytes a cached value of this tensor would take."""
        store = self.store()
        if store is not None:
            return self.weight_numel() * torch.empty(0, dtype=store.compute_dtype).element_size()
        original = self.stored()[0]
        return original.numel() * original.element_size()

    def clear_cache(self) -> None:
        """Forget the cached value (needed only after edits through ``.data``)."""
        self._value_cache.clear()
        for p in self.owned():
            p.clear_cache()

    def train(self, mode: bool = True) -> AdapterList:
        """Set train/eval mode, dropping the cache (``model.eval()`` always starts fresh)."""
        self._value_cache.clear()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to() / .half() swap tensor data without bumping version counters: drop the cache.
        self._value_cache.clear()
        return super()._apply(fn, recurse)


def _adopt(plist: ParametrizationList) -> AdapterList:
    """Make a tensor's list an :class:`AdapterList` (once), with the default cache rule."""
    if not isinstance(plist, AdapterList):
        plist.__class__ = AdapterList
        adopted = cast(AdapterList, plist)
        adopted._value_cache = VersionedCache()
        adopted.eval_cache = adopted.weight_numel() <= AUTO_EVAL_CACHE_MAX_NUMEL
    plist = cast(AdapterList, plist)
    plist.eval_cache = plist.eval_cache and plist.cacheable()
    return plist


def entry_list(module: nn.Module, name: str) -> AdapterList | None:
    """The :class:`AdapterList` of ``module.<name>`` (None: lora_param holds nothing there)."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = cast(nn.ModuleDict, module.parametrizations)[name]
    return plist if isinstance(plist, AdapterList) else None


def register_entry(
    module: nn.Module, name: str, entry: nn.Module, position: int | None = None
) -> None:
    """Register ``entry`` on ``module.<name>`` at ``position`` (None: at the end).

    The first registration on a tensor remembers the module's parameter order, so that
    :func:`drop_entries` can restore it (optimizer state is positional). ``unsafe=True``
    skips parametrize's trial evaluation (a weight-sized temporary per layer): entries keep
    shape and dtype by construction.
    """
    own_class(module)
    module.__dict__.setdefault("_lora_param_order", list(module._parameters))
    if parametrize.is_parametrized(module, name):
        plist = cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])
        if position is None:
            plist.append(entry)
        else:
            plist.insert(position, entry)
    else:
        parametrize.register_parametrization(module, name, entry, unsafe=True)
        plist = cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])
    _adopt(plist).clear_cache()


def drop_entries(module: nn.Module, name: str, doomed: Callable[[nn.Module], bool]) -> None:
    """Remove the entries ``doomed`` selects from ``module.<name>``; the one removal helper.

    When nothing is left (or only a store that exists for the adapters' sake), the tensor's
    ``original`` becomes the module's parameter again: the very object it was, in its original
    position. A packed store that remains keeps the weight packed.
    """
    if not parametrize.is_parametrized(module, name):
        return
    plist = cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[name])
    entries = list(plist)
    drop = [i for i, p in enumerate(entries) if doomed(p)]
    if not drop:
        return
    own_class(module)
    rest = [p for i, p in enumerate(entries) if i not in drop]
    if all(isinstance(p, BaseStore) and p.removed_with_adapters for p in rest):
        order = module.__dict__.get("_lora_param_order")
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        if order is not None:
            restore_order(module, order)
    else:
        for i in reversed(drop):
            del plist[i]
        if isinstance(plist, AdapterList):
            plist.clear_cache()
    from .forward import release_forward  # forward imports this module

    release_forward(module)


def restore_order(module: nn.Module, order: list[str]) -> None:
    """Put the module's parameters back in ``order`` (optimizer state is positional)."""
    params = module._parameters
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    items = [(k, params[k]) for k in keys]
    params.clear()
    params.update(items)


def adapter_lists(
    model: nn.Module, *, with_adapters: bool = False
) -> list[tuple[str, AdapterList]]:
    """``(tensor path, AdapterList)`` of every tensor lora_param holds entries on.

    Args:
        model: Any module.
        with_adapters: Only tensors carrying at least one adapter update.
    """
    found = []
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name, plist in cast(nn.ModuleDict, module.parametrizations).items():
            if isinstance(plist, AdapterList) and (not with_adapters or plist.variants()):
                found.append((f"{module_name}.{name}" if module_name else name, plist))
    return found
