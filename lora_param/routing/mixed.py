"""Per-example adapters in one batch: ``with mixed_adapters(model, names): out = model(x)``.

Example ``i`` of the batch uses adapter ``names[i]`` alone (``"__base__"``: no adapter). Inside
the block every adapted tensor that no route below covers reads its base value, and each layer
holding entries of the adapters in the mix is routed in one of two ways:

* **stacked** (factored Linear, Conv, Embedding and HF Conv1D layers whose entries in the mix
  have exact low-rank factors: LoRA, rsLoRA): the base runs once for the whole batch and each
  example adds a low-rank update gathered from stacked factors, as multi-LoRA serving systems
  do. Every such adapter of the model has a slot: factors ``(slots, rank, fan_in)`` and
  ``(slots, fan_out, rank)``, slot 0 zeros (no adapter, or one that does not target the
  layer), ranks zero-padded to the largest on that layer, scales folded into ``B``. An index
  tensor gives each example its slot, so the shapes never depend on the mix: under
  ``torch.compile`` changing the mix (same batch size) does not recompile. Under
  ``torch.no_grad()`` (outside compilation) the stacks are cached (:class:`VersionedCache`)
  and rebuilt only when an adapter's tensors change;
* **grouped** (everything else on a layer that treats rows independently: DoRA and other
  variants, trained copies of heads and biases, ``mode="materialized"`` layers, LayerNorms
  whose bias an adapter trains): the layer runs once per adapter present in the batch, on that
  adapter's rows, with exactly that adapter's entries applied (PEFT's way for
  ``modules_to_save``); the base runs on the whole batch, so that its rows are the base
  model's bit for bit whatever the batch size does to a kernel's rounding.

Both train: gradients reach each adapter from its own rows. Batches are batch-first. A layer
that sees ``k * len(names)`` rows (``generate()`` with ``num_beams=k``, which
repeat-interleaves the batch; tokens flattened into rows) routes row ``j`` to example
``j // k``. Tensors read directly by another module (``nn.MultiheadAttention``'s weights) and
modules that do not treat rows independently cannot be routed: an adapter in the mix on them
is refused by name.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ..core.distributed import fsdp_modules
from ..core.entries import BASE, AdapterList, adapter_lists, selecting
from ..core.errors import LoRAError
from ..core.eval_cache import VersionedCache
from ..core.forward import base_output, is_installed, layer_kind_of, layer_output, set_route
from ..core.generated_class import class_before_parametrizations
from ..core.layer_ops import OPS
from ..core.lookup import list_adapters
from ..core.targets import is_hf_conv1d
from ..core.variant import AdapterVariant

__all__ = ["BASE", "mixed_adapters"]

#: Modules that treat the rows of a batch independently (the grouped route runs them on a
#: subset of rows); BatchNorm only in eval mode.
_ROW_WISE: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
)


class MixState:
    """What every routed layer of one model shares: the adapter slots and the example index.

    Attributes:
        slots: Adapter name -> slot (1, 2, ...); slot 0 means no adapter.
        names: Slot -> adapter name (slot 0: ``"__base__"``).
        index: ``(examples,)`` long tensor, the slot of each example (updated in place).
        mixed: Names of the adapters used by the current mix.
        cache_stacks: Whether stacked factors may be kept across no_grad forwards: not on a
            sharded (FSDP2) model, whose forward all-gathers into the same tensors without
            bumping their version counters (a kept stack would miss an optimizer step).
    """

    def __init__(self, slots: dict[str, int], index: Tensor) -> None:
        self.slots = slots
        self.names = [BASE, *slots]
        self.index = index
        self.mixed: frozenset[str] = frozenset()
        self.cache_stacks = True

    def rows(self, n: int, layer: str) -> Tensor:
        """The slot of each of ``n`` rows: example ``j // k`` when ``n = k * examples``."""
        index = self.index
        m = index.shape[0]
        if n == m:
            return index
        if n % m:
            raise LoRAError(
                f"mixed_adapters: layer '{layer}' got a batch of {n} rows, which is not a "
                f"multiple of the {m} adapter names given; pass one name per example "
                "(inputs must be batch-first)."
            )
        return index.repeat_interleave(n // m)


class StackedRoute:
    """The mixed forward of a factored layer through stacked low-rank factors."""

    def __init__(self, state: MixState, name: str) -> None:
        self.state = state
        self.name = name
        self._stacks = VersionedCache()

    def __call__(self, module: nn.Module, x: Tensor) -> Tensor:
        y = base_output(module, x, True, BASE)
        plist = cast(AdapterList, module._modules["parametrizations"]._modules["weight"])  # type: ignore[union-attr]
        entries = [p for p in plist.variants() if p.adapter in self.state.slots]
        if not entries:
            return y
        for p in entries:
            if p.training and p.dropout_p > 0:
                raise LoRAError(
                    f"mixed_adapters applies no LoRA dropout, but adapter {p.adapter!r} on "
                    f"'{self.name}' has dropout={p.dropout_p} in training mode; call "
                    "model.eval() or train these adapters one at a time."
                )
        kind = layer_kind_of(module)
        lora_a, lora_b = self._stacked(entries)
        idx = self.state.rows(x.shape[0], self.name)
        if len(self.state.names) > len(self.state.slots) + 1:  # grouped-only adapters' rows
            idx = idx.masked_fill(idx > len(self.state.slots), 0)
        # y is this forward's fresh base output (no backward reads it): updated in place.
        return OPS[kind].routed(module, x, lora_a, lora_b, idx, plist_shape(plist), y)

    def _stacked(self, entries: list[AdapterVariant]) -> tuple[Tensor, Tensor]:
        """``A`` stacked ``(slots, rank, fan_in)``, scaled ``B`` ``(slots, fan_out, rank)``."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or not self.state.cache_stacks:
            self._stacks.clear()
            return self._build(entries)
        tensors = [t for p in entries for t in p.cache_tensors()]
        key = (tuple(p.cache_key() for p in entries), len(self.state.slots))
        cached = self._stacks.get(tensors, key)
        if cached is not None:
            return cast(tuple[Tensor, Tensor], cached)
        stacks = self._build(entries)
        self._stacks.put(tensors, key, stacks)
        return stacks

    def _build(self, entries: list[AdapterVariant]) -> tuple[Tensor, Tensor]:
        factors = [(p, cast(tuple[Tensor, Tensor], p.lowrank())) for p in entries]
        rank = max(a.shape[0] for _, (a, _) in factors)
        a0, b0 = factors[0][1]
        zero_a = a0.new_zeros(rank, a0.shape[1])
        zero_b = b0.new_zeros(b0.shape[0], rank)
        a_slots = [zero_a] * (len(self.state.slots) + 1)
        b_slots = [zero_b] * (len(self.state.slots) + 1)
        for p, (a, b) in factors:
            pad = rank - a.shape[0]
            slot = self.state.slots[p.adapter]
            a_slots[slot] = F.pad(a, (0, 0, 0, pad))
            b_slots[slot] = F.pad(b, (0, pad))
        return torch.stack(a_slots), torch.stack(b_slots)

    def cache_nbytes(self) -> int:
        """Bytes of the cached stacks."""
        return self._stacks.nbytes


def plist_shape(plist: AdapterList) -> tuple[int, ...]:
    """Shape of the tensor a list computes (its store's, or its original's)."""
    store = plist.store()
    return tuple(store.shape) if store is not None else tuple(plist.stored()[0].shape)


_IN_ROUTE: set[int] = set()  # ids of modules a grouped route is running right now


class GroupedRoute:
    """The mixed forward of a layer run once per adapter on that adapter's rows."""

    def __init__(self, state: MixState, name: str, forward: Callable[..., Tensor]) -> None:
        self.state = state
        self.name = name
        self.forward = forward

    def __call__(self, module: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        idx = self.state.rows(x.shape[0], self.name)
        out: Tensor | None = None
        slots = idx.unique().tolist()
        _IN_ROUTE.add(id(module))
        try:
            parts = []
            for slot in slots:
                rows = (idx == slot).nonzero().squeeze(1)
                name = self.state.names[slot]
                with selecting(name):
                    if name == BASE and len(slots) > 1:
                        # The base on the whole batch, then its rows: a kernel's rounding can
                        # depend on the batch size, and base rows must equal the base model's.
                        part = self.forward(module, x, *args, **kwargs)
                        if isinstance(part, Tensor) and part.shape[:1] == x.shape[:1]:
                            part = part.index_select(0, rows)
                    else:
                        part = self.forward(module, x.index_select(0, rows), *args, **kwargs)
                parts.append((rows, part))
        finally:
            _IN_ROUTE.discard(id(module))
        for rows, part in parts:
            if not isinstance(part, Tensor) or part.shape[:1] != rows.shape:
                raise LoRAError(
                    f"mixed_adapters: '{self.name}' ({type(module).__name__}) does not return "
                    "one row per input row, so it cannot run per adapter; leave the adapters on "
                    "it out of the mix."
                )
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, rows, part)
        assert out is not None
        return out


def _class_forward(module: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The module's own forward (bypassing a route set on the instance)."""
    return cast(Tensor, type(module).forward(module, x, *args, **kwargs))


def _factored_forward(module: nn.Module, x: Tensor) -> Tensor:
    return layer_output(module, x)


class _Router:
    """Per-model routing objects, kept across ``mixed_adapters`` blocks (stable for compile)."""

    def __init__(self, state: MixState, stacked: dict[nn.Module, StackedRoute]) -> None:
        self.state = state
        self.stacked = stacked
        self.active = False


_ROUTERS: weakref.WeakKeyDictionary[nn.Module, _Router] = weakref.WeakKeyDictionary()


def _read_directly(model: nn.Module) -> set[int]:
    """Layers whose weight their owner reads without calling them (MHA's ``out_proj``)."""
    return {
        id(m.out_proj)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Module)
    }


def _row_wise(module: nn.Module) -> bool:
    cls = class_before_parametrizations(module)
    if is_hf_conv1d(module):
        return True
    if issubclass(cls, nn.modules.batchnorm._BatchNorm) and module.training:
        return False
    return issubclass(cls, _ROW_WISE) and not getattr(module, "transposed", False)


def _check_names(model: nn.Module, names: Sequence[str]) -> frozenset[str]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise LoRAError(
            f"mixed_adapters needs a list with one adapter name per example, got {names!r}."
        )
    if not names or not all(isinstance(n, str) for n in names):
        raise LoRAError(
            f"mixed_adapters needs a non-empty list of adapter names (or {BASE!r}); "
            f"got {list(names)!r}."
        )
    present = list_adapters(model)
    unknown = sorted(set(names) - set(present) - {BASE})
    if unknown:
        raise LoRAError(
            f"mixed_adapters: no adapter named {', '.join(map(repr, unknown))} in this model; "
            f"it has {present} (and {BASE!r} for the base model)."
        )
    return frozenset(names) - {BASE}


def _plan(
    model: nn.Module, mixed: frozenset[str]
) -> tuple[list[str], dict[nn.Module, str], dict[str, nn.Module]]:
    """Slots, the route of every module holding entries of the mix, and module names.

    Returns:
        The adapters that get a slot (every adapter whose entries are all stackable), the
        route per module (``"stacked"`` or ``"grouped"``), and each routed module's name.

    Raises:
        LoRAError: An adapter in the mix sits on a tensor that cannot be routed.
    """
    direct = _read_directly(model)
    names = {id(m): n for n, m in model.named_modules()}
    lists = adapter_lists(model)
    stackable: dict[str, bool] = {}
    by_module: dict[nn.Module, list[tuple[str, str, AdapterList]]] = {}
    for path, plist in lists:
        for p in plist.owned():
            ok = isinstance(p, AdapterVariant) and p.lowrank_exact
            stackable[p.adapter] = stackable.get(p.adapter, True) and ok
        module_name, _, tensor = path.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        by_module.setdefault(module, []).append((path, tensor, plist))
    routes: dict[nn.Module, str] = {}
    modules: dict[str, nn.Module] = {}
    refused: list[str] = []
    for module, tensors in by_module.items():
        owned = [(path, p) for path, _, plist in tensors for p in plist.owned()]
        mine = [(path, p) for path, p in owned if p.adapter in mixed]
        # A layer whose every entry stacks is routed whatever the mix (stable under compile).
        stacked = (
            is_installed(module)
            and id(module) not in direct
            and all(t == "weight" for _, t, _ in tensors)
            and all(isinstance(p, AdapterVariant) and stackable[p.adapter] for _, p in owned)
        )
        if stacked:
            routes[module] = "stacked"
        elif not mine:
            continue
        elif id(module) not in direct and (is_installed(module) or _row_wise(module)):
            routes[module] = "grouped"
        else:
            refused.extend(f"{path} ({p.adapter!r})" for path, p in mine)
            continue
        modules[names.get(id(module), "?")] = module
    for module in [m for m, r in routes.items() if r == "grouped"]:
        inner = [
            n
            for n, sub in module.named_modules()
            if n and sub in routes and ".parametrizations" not in f".{n}"
        ]
        if inner:
            refused.append(f"{names.get(id(module), '?')} (holds routed layers {inner[:3]})")
    if refused:
        raise LoRAError(
            "mixed_adapters cannot route these tensors per example (they are read directly "
            "by another module, or their module does not treat the rows of a batch "
            "independently): "
            + ", ".join(refused[:10])
            + (" ..." if len(refused) > 10 else "")
            + ". Leave these adapters out of the mix."
        )
    slots = [a for a in list_adapters(model) if stackable.get(a, False)]
    return slots, routes, modules


def _router(
    model: nn.Module, slots: list[str], stacked: list[tuple[str, nn.Module]], device: torch.device
) -> _Router:
    slot_of = {name: i + 1 for i, name in enumerate(slots)}
    router = _ROUTERS.get(model)
    layers = {m for _, m in stacked}
    if (
        router is None
        or router.state.slots != slot_of
        or not layers <= set(router.stacked)
        or router.state.index.device != device
    ):
        state = MixState(slot_of, torch.zeros(0, dtype=torch.long, device=device))
        routes = {m: StackedRoute(state, n) for n, m in stacked}
        router = _Router(state, routes)
        _ROUTERS[model] = router
    return router


def _on_direct_read(
    path: str, owner: nn.Module, state: MixState, plist: nn.Module, args: Any, out: Tensor
) -> Any:
    if id(owner) in _IN_ROUTE:
        return out  # read by its own layer's grouped route
    entries = cast(AdapterList, plist).owned()
    if any(p.adapter in state.mixed for p in entries):
        raise LoRAError(
            f"'{path}' was read directly (not through its layer's forward) inside "
            "mixed_adapters, so it cannot be routed per example; leave the adapters on it "
            "out of the mix."
        )
    return out


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run each example of a batch with its own adapter, in one forward.

    Inside the block, example ``i`` uses adapter ``names[i]`` alone (whatever adapters are
    enabled outside it), with its trained heads and biases; ``"__base__"`` means the base
    model. Adapters of different variants, ranks, alphas and target sets mix: a layer an
    adapter does not target adds nothing to its rows. Rows of ``"__base__"`` equal the base
    model's on the same batch bit for bit (their update is exactly zero); other rows equal
    their adapter alone to float rounding.

    Args:
        model: A model with adapters.
        names: One adapter name per example (the batch's first dimension). A layer that sees
            ``k`` times as many rows (beam search with ``num_beams=k``, tokens flattened
            into rows) gives rows ``k*i .. k*i+k-1`` to example ``i``.

    Yields:
        The model.

    Raises:
        LoRAError: An unknown name (the message lists the adapters); an adapter in the mix
            on a tensor read directly by another module (``nn.MultiheadAttention``'s
            ``in_proj_weight`` and ``out_proj``) or held by a module that does not treat rows
            independently; LoRA dropout in training mode on a stacked layer; a nested block.
            Nothing is changed then.
    """
    mixed = _check_names(model, names)
    router = _ROUTERS.get(model)
    if router is not None and router.active:
        raise LoRAError("mixed_adapters blocks on the same model cannot be nested.")
    slots, routes, modules = _plan(model, mixed)
    like = next((t for _, plist in adapter_lists(model) for t in plist.stored()), None)
    device = like.device if like is not None else torch.device("cpu")
    stacked = [(n, m) for n, m in modules.items() if routes[m] == "stacked"]
    router = _router(model, slots, stacked, device)
    state = router.state
    # An adapter without a slot (not stackable everywhere) is grouped wherever it is mixed.
    grouped_names = [BASE, *slots] + [a for a in sorted(mixed) if a not in state.slots]
    state.names = grouped_names
    slot_of = {name: i for i, name in enumerate(grouped_names)}
    index = torch.tensor([slot_of[n] for n in names], dtype=torch.long)
    if state.index.shape == index.shape:
        state.index.copy_(index)  # in place: a compiled model sees the same input tensor
    else:
        state.index = index.to(device)
    state.mixed = mixed
    state.cache_stacks = not fsdp_modules(model)
    handles: list[RemovableHandle] = []
    overridden: list[nn.Module] = []
    with ExitStack() as stack:
        try:
            for module_name, module in model.named_modules():
                if not parametrize.is_parametrized(module):
                    continue
                for tensor, plist in cast(nn.ModuleDict, module.parametrizations).items():
                    if isinstance(plist, AdapterList) and plist.owned():
                        hook = functools.partial(
                            _on_direct_read, f"{module_name}.{tensor}".lstrip("."), module, state
                        )
                        handles.append(plist.register_forward_hook(hook))
            for name, module in modules.items():
                if routes[module] == "stacked":
                    set_route(module, router.stacked[module])
                elif is_installed(module):
                    set_route(module, GroupedRoute(state, name, _factored_forward))
                else:
                    route = GroupedRoute(state, name, _class_forward)
                    module.__dict__["forward"] = functools.partial(route, module)
                    overridden.append(module)
            stack.enter_context(selecting(BASE))
            router.active = True
            yield model
        finally:
            router.active = False
            for module in modules.values():
                set_route(module, None)
            for module in overridden:
                module.__dict__.pop("forward", None)
            for handle in handles:
                handle.remove()
            state.mixed = frozenset()
