"""Per-example adapters in one batch: ``with mixed_adapters(model, names): out = model(x)``.

Example ``i`` of the batch uses adapter ``names[i]`` (``"__base__"``: no adapter). Every
factored layer (Linear, Conv, Embedding, HF Conv1D) runs its base weight once for the whole
batch and adds a low-rank update gathered per example from stacked factors, as multi-LoRA
serving systems do:

- each layer stacks the factors of every plain LoRA adapter of the model into one tensor per
  factor, ``(slots, rank, fan_in)`` and ``(slots, fan_out, rank)``, slot 0 being zeros (no
  adapter, or an adapter that does not target the layer), ranks zero-padded to the largest
  one on that layer and each adapter's scale folded into its ``B``;
- an index tensor gives each example its slot, so the shapes never depend on the mix: under
  ``torch.compile`` changing the mix (same batch size) does not recompile;
- under ``torch.no_grad()`` (outside compilation) the stacks are cached and rebuilt only when an
  adapter's tensors change (version counters); with gradients they are built in the forward,
  so a mixed batch also trains every adapter in it.

Batches are batch-first. A layer that sees ``k * len(names)`` rows (``generate()`` with
``num_beams=k``, which repeat-interleaves the batch; tokens flattened into rows) routes row
``j`` to example ``j // k``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ..core.errors import LoRAError
from ..core.forward import base_forward
from ..core.lookup import iter_lora, list_adapters
from ..core.targets import join
from ..variants.lora import LoRAParametrization

__all__ = ["BASE", "mixed_adapters"]

BASE = "__base__"
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class MixState:
    """What every routed layer of one model shares: the adapter slots and the example index.

    Attributes:
        slots: Adapter name -> slot (1, 2, ...); slot 0 means no adapter.
        index: ``(examples,)`` long tensor, the slot of each example (updated in place).
        mixed: Names of the adapters used by the current mix.
    """

    def __init__(self, slots: dict[str, int], index: Tensor) -> None:
        self.slots = slots
        self.index = index
        self.mixed: frozenset[str] = frozenset()

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


def _scale_key(scale: float | Tensor) -> Any:
    return (scale._version, scale.data_ptr()) if isinstance(scale, Tensor) else scale


def _base_weight(plist: Any) -> Tensor:
    """The weight with every non-LoRA parametrization applied and no adapter."""
    entries = list(plist._modules.values())
    if plist.is_tensor and all(isinstance(p, LoRAParametrization) for p in entries):
        return plist._parameters["original"]
    x: Any = (
        plist.original
        if plist.is_tensor
        else tuple(getattr(plist, f"original{i}") for i in range(plist.ntensors))
    )
    for p in entries:
        if not isinstance(p, LoRAParametrization):
            x = p(*x) if isinstance(x, tuple) else p(x)
    return x


class LayerRoute:
    """The mixed forward of one factored layer (installed on it inside ``mixed_adapters``)."""

    def __init__(self, state: MixState, name: str) -> None:
        self.state = state
        self.name = name
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def __call__(self, module: nn.Module, x: Tensor) -> Tensor:
        # Routes sit only on layers whose weight is parametrized, so neither entry is None.
        plist: Any = module._modules["parametrizations"]._modules["weight"]  # type: ignore[union-attr]
        head = next(iter(plist._modules.values()))
        packed = (
            None if isinstance(head, LoRAParametrization) else getattr(head, "base_forward", None)
        )
        if packed is not None:  # a packed frozen base (lora_param.quant) computes its own output
            y = packed(module, x)
        else:
            y = base_forward(module, x, _base_weight(plist))
        entries = [
            p
            for p in plist._modules.values()
            if type(p) is LoRAParametrization and p.adapter in self.state.slots
        ]
        if not entries:
            return y
        for p in entries:
            if p.training and p.dropout_p > 0:
                raise LoRAError(
                    f"mixed_adapters applies no LoRA dropout, but adapter {p.adapter!r} on "
                    f"'{self.name}' has dropout={p.dropout_p} in training mode; call "
                    "model.eval() or train these adapters one at a time."
                )
        kind = module._lora_kind
        lora_a, lora_b = self._stacks(entries, kind == "embedding" or kind == "conv")
        idx = self.state.rows(x.shape[0], self.name)
        if kind == "embedding":
            return y + _embedding_update(x, lora_a, lora_b, idx).view(y.shape)
        if kind == "conv":
            return y + _conv_update(module, x, lora_a, lora_b, idx)
        return _linear_add(y, x, lora_a, lora_b, idx)

    def _stacks(self, entries: list[LoRAParametrization], canonical: bool) -> tuple[Tensor, Tensor]:
        """The stacked factors: canonical, or transposed for ``x @ A^T @ B^T`` (linear kinds)."""
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            self._cache = None
            return self._build(entries, canonical)
        versions = [
            (p, p.lora_A._version, p.lora_A.data_ptr(), p.lora_B._version, p.lora_B.data_ptr())
            for p in entries
        ]
        stamp = (
            tuple(versions),
            tuple(_scale_key(p.scale) for p in entries),
            len(self.state.slots),
        )
        cache = self._cache
        if cache is not None and cache[0] == stamp:
            return cache[1], cache[2]
        lora_a, lora_b = self._build(entries, canonical)
        self._cache = (stamp, lora_a, lora_b)
        return lora_a, lora_b

    def _build(self, entries: list[LoRAParametrization], canonical: bool) -> tuple[Tensor, Tensor]:
        """``A`` stacked ``(slots, rank, fan_in)`` and scaled ``B`` ``(slots, fan_out, rank)``;
        not ``canonical``: both transposed, contiguous (gathers then feed bmm directly)."""
        rank = max(p.lora_A.shape[0] for p in entries)
        first = entries[0]
        zero_a = first.lora_A.new_zeros(rank, first.lora_A.shape[1])
        zero_b = first.lora_B.new_zeros(first.lora_B.shape[0], rank)
        a_slots = [zero_a] * (len(self.state.slots) + 1)
        b_slots = [zero_b] * (len(self.state.slots) + 1)
        for p in entries:
            pad = rank - p.lora_A.shape[0]
            slot = self.state.slots[p.adapter]
            a_slots[slot] = F.pad(p.lora_A, (0, 0, 0, pad))
            b_slots[slot] = F.pad(p.lora_B * p.scale, (0, pad))
        lora_a, lora_b = torch.stack(a_slots), torch.stack(b_slots)
        if canonical:
            return lora_a, lora_b
        return lora_a.transpose(1, 2).contiguous(), lora_b.transpose(1, 2).contiguous()


def _linear_add(y: Tensor, x: Tensor, a_t: Tensor, b_t: Tensor, idx: Tensor) -> Tensor:
    """``y + x A_i^T B_i^T`` per row, from ``A^T`` ``(slots, fan_in, rank)`` and ``B^T``."""
    n = x.shape[0]
    z = torch.bmm(x.reshape(n, -1, x.shape[-1]), a_t[idx])
    # In place: y is this forward's fresh base output, which the base op's backward does not use.
    y.view(n, -1, y.shape[-1]).baddbmm_(z, b_t[idx])
    return y


def _embedding_update(x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor) -> Tensor:
    slots, vocab, rank = lora_b.shape
    offset = (idx * vocab).view(-1, *([1] * (x.dim() - 1)))
    rows = F.embedding(x + offset, lora_b.reshape(slots * vocab, rank))
    return torch.bmm(rows.reshape(x.shape[0], -1, rank), lora_a[idx])


def _conv_update(module: Any, x: Tensor, lora_a: Tensor, lora_b: Tensor, idx: Tensor) -> Tensor:
    # Each example gets its own kernels: fold the batch into conv groups.
    n, groups, rank = x.shape[0], module.groups, lora_a.shape[1]
    kernel = module._modules["parametrizations"]._modules["weight"].original.shape[1:]
    conv = _CONV[len(kernel) - 1]
    a = lora_a[idx].view(n, rank, *kernel)
    if groups > 1:
        a = a.repeat(1, groups, *([1] * len(kernel)))
    x1 = x.reshape(1, n * x.shape[1], *x.shape[2:])
    padding = module.padding
    if module.padding_mode != "zeros":
        x1 = F.pad(x1, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    a = a.reshape(n * groups * rank, *kernel)
    z = conv(x1, a, None, module.stride, padding, module.dilation, n * groups)
    fan_out = lora_b.shape[1]
    b = lora_b[idx].reshape(n * fan_out, rank, *([1] * (len(kernel) - 1)))
    out = conv(z, b, None, 1, 0, 1, n * groups)
    return out.view(n, fan_out, *out.shape[2:])


class _Router:
    """Per-model routing objects, kept across ``mixed_adapters`` blocks (stable for compile)."""

    def __init__(self, state: MixState, routes: dict[nn.Module, LayerRoute]) -> None:
        self.state = state
        self.routes = routes
        self.active = False


_ROUTERS: weakref.WeakKeyDictionary[nn.Module, _Router] = weakref.WeakKeyDictionary()


def _is_routed(module: nn.Module) -> bool:
    return "_lora_kind" in type(module).__dict__


def _read_directly(model: nn.Module) -> set[int]:
    """Layers whose weight their owner reads without calling them (MHA's ``out_proj``)."""
    return {
        id(m.out_proj)
        for m in model.modules()
        if isinstance(m, nn.MultiheadAttention) and isinstance(m.out_proj, nn.Module)
    }


def _check_mix(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Validate the names against the model; return the plain LoRA adapters that get slots."""
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
    mixed = set(names) - {BASE}
    plain: list[str] = []
    not_plain: dict[str, str] = {}
    direct = _read_directly(model)
    unroutable: list[str] = []
    for path, module, tensor, p in iter_lora(model):
        if type(p) is not LoRAParametrization:
            not_plain.setdefault(p.adapter, type(p).__name__)
        elif p.adapter not in plain:
            plain.append(p.adapter)
        if p.adapter in mixed and (
            tensor != "weight" or not _is_routed(module) or id(module) in direct
        ):
            unroutable.append(f"{path} ({p.adapter!r})")
    bad = {a: k for a, k in not_plain.items() if a in mixed}
    if bad:
        raise LoRAError(
            "mixed_adapters routes plain LoRA adapters only; "
            + ", ".join(f"{a!r} is a {k}" for a, k in bad.items())
            + ". Leave them out of the mix (merge_lora a copy to serve them)."
        )
    if unroutable:
        raise LoRAError(
            "mixed_adapters cannot route these tensors per example (they are read directly "
            "by their module or adapted with mode='materialized'): "
            + ", ".join(unroutable[:10])
            + (" ..." if len(unroutable) > 10 else "")
            + ". Use adapters on Linear/Conv/Embedding/Conv1D layers added with "
            "mode='factored', or leave these adapters out of the mix."
        )
    return [a for a in present if a in plain]


def _router(model: nn.Module, plain: list[str], device: torch.device) -> _Router:
    slots = {name: i + 1 for i, name in enumerate(plain)}
    router = _ROUTERS.get(model)
    routed = {m for _, m, t, _ in iter_lora(model) if t == "weight" and _is_routed(m)}
    if (
        router is None
        or router.state.slots != slots
        or set(router.routes) != routed
        or router.state.index.device != device
    ):
        state = MixState(slots, torch.zeros(0, dtype=torch.long, device=device))
        names = {id(m): n for n, m in model.named_modules()}
        routes = {m: LayerRoute(state, names.get(id(m), "?")) for m in routed}
        router = _Router(state, routes)
        _ROUTERS[model] = router
    return router


def _on_direct_read(path: str, state: MixState, plist: nn.Module, args: Any, out: Tensor) -> Any:
    if any(getattr(p, "adapter", None) in state.mixed for p in plist._modules.values()):
        raise LoRAError(
            f"'{path}' was read directly (not through its layer's forward) inside "
            "mixed_adapters, so it cannot be routed per example; leave the adapters on it "
            "out of the mix."
        )
    return _base_weight(plist)  # no row of this mix uses an adapter on it: the base weight


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run each example of a batch with its own adapter, in one forward.

    Inside the block, example ``i`` uses adapter ``names[i]`` alone (whatever adapters are
    enabled outside it); ``"__base__"`` means the base model. Adapters of different ranks,
    alphas and target sets mix: a layer an adapter does not target adds nothing to its rows.
    Rows of ``"__base__"`` equal the base model's on the same batch bit for bit (their update
    is exactly zero); other rows equal their adapter alone to float rounding.

    Args:
        model: A model with adapters added in ``mode="factored"`` (the default).
        names: One adapter name per example (the batch's first dimension). A layer that sees
            ``k`` times as many rows (beam search with ``num_beams=k``, tokens flattened
            into rows) gives rows ``k*i .. k*i+k-1`` to example ``i``.

    Yields:
        The model.

    Raises:
        LoRAError: An unknown name (the message lists the adapters); an adapter in the mix
            that is not plain LoRA (e.g. DoRA) or that adapts a tensor read directly by its
            module (``nn.MultiheadAttention``'s ``in_proj_weight`` and ``out_proj``,
            ``mode="materialized"``); a nested block. Nothing is changed then.
    """
    plain = _check_mix(model, names)
    router = _ROUTERS.get(model)
    if router is not None and router.active:
        raise LoRAError("mixed_adapters blocks on the same model cannot be nested.")
    like = next((p.lora_A for *_, p in iter_lora(model)), None)
    device = like.device if like is not None else torch.device("cpu")
    router = _router(model, plain, device)
    state = router.state
    slot_of = {**state.slots, BASE: 0}
    index = torch.tensor([slot_of[n] for n in names], dtype=torch.long)
    if state.index.shape == index.shape:
        state.index.copy_(index)  # in place: a compiled model sees the same input tensor
    else:
        state.index = index.to(device)
    state.mixed = frozenset(names) - {BASE}
    handles: list[RemovableHandle] = []
    try:
        for module_name, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            for tensor, plist in module.parametrizations.items():
                if any(isinstance(p, LoRAParametrization) for p in plist):
                    hook = functools.partial(_on_direct_read, join(module_name, tensor), state)
                    handles.append(plist.register_forward_hook(hook))
        for module, route in router.routes.items():
            module.__dict__["_lora_route"] = route
        router.active = True
        yield model
    finally:
        router.active = False
        for module in router.routes:
            module.__dict__.pop("_lora_route", None)
        for handle in handles:
            handle.remove()
        state.mixed = frozenset()
