"""The adapted layer forward: the base once, then each adapter in factored form where it has one.

With ``mode="factored"`` (and always on bitsandbytes layers), ``add_lora`` sets the forward below on
the layer's (private, generated) class, for Linear, Conv, Embedding and Hugging Face Conv1D
layers. The weight stays parametrized, so code that reads ``layer.weight`` directly
(``nn.MultiheadAttention``'s ``out_proj``, fused transformer fast paths) still sees ``W'``.

Per call, with the entries that apply (enabled ones, or one adapter's inside a mixed batch):

* none: the frozen base alone (for a packed base its lean forward, which dequantizes again in
  backward instead of keeping the weight);
* under ``torch.no_grad()`` with the tensor's evaluation cache on: the layer's op with the
  cached ``W'`` (merged-model speed; see :mod:`.eval_cache`);
* only additive variants with a factored branch: ``base(x) + Σ Δy(x)``, no ``W'`` formed;
* one variant with its own factored layer forward (DoRA, OFT): that;
* anything else (a user's parametrization on the weight, several non-additive adapters): the
  layer's op with the materialized ``W'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .entries import AdapterList, selection
from .entry import AdapterEntry
from .generated_class import class_before_parametrizations, layer_class, own_class
from .layer_ops import OPS
from .store import BaseStore
from .variant import AdapterVariant

__all__ = [
    "FACTORED_KINDS",
    "base_output",
    "factored_forward_applies",
    "install_forward",
    "is_installed",
    "iter_installed",
    "layer_kind_of",
    "layer_output",
    "release_forward",
    "set_route",
]

FACTORED_KINDS = frozenset(OPS)
"""Layer kinds with a factored forward: ``"linear"``, ``"conv"``, ``"embedding"``, ``"conv1d_hf"``.

With ``mode="factored"`` (the default) such layers compute ``base(x) + s * B(A(x))``; other
adapted tensors (MultiheadAttention's ``in_proj_weight``, named parameters, 3-D expert tensors)
always read the adapted weight."""


def _weight_list(layer: Any) -> AdapterList:
    return cast(AdapterList, layer._modules["parametrizations"]._modules["weight"])


def base_output(layer: Any, x: Tensor, bias: bool = True, select: str | None = None) -> Tensor:
    """The layer's output with its frozen base weight and no adapter update.

    The base is the stored weight (packed: the store's lean forward) or, where an adapter that
    applies holds its own trained copy of the weight, that copy. ``bias=False`` leaves the bias
    out.
    """
    plist = _weight_list(layer)
    store, copy = None, None
    for p in plist._modules.values():
        if isinstance(p, BaseStore):
            store = p
        elif isinstance(p, AdapterEntry) and not isinstance(p, AdapterVariant) and p.active(select):
            copy = p
    return _base(layer, x, bias, plist, store, copy)


def _base(
    layer: Any,
    x: Tensor,
    bias: bool,
    plist: AdapterList,
    store: BaseStore | None,
    copy: AdapterEntry | None,
) -> Tensor:
    ops = OPS[layer._lora_kind]
    if copy is not None:
        weight = cast(Tensor, copy.value)
    elif store is not None:
        return store.base_output(layer, x, plist.stored(), bias)
    else:
        weight = plist._parameters["original"]  # type: ignore[assignment]
    return ops.base(layer, x, weight, _bias(layer) if bias else None)


def _bias(layer: Any) -> Tensor | None:
    return None if layer._lora_kind == "embedding" else layer.bias


def layer_output(layer: Any, x: Tensor) -> Tensor:
    """The adapted layer's output for ``x`` (see the module docstring for the cases)."""
    plist = _weight_list(layer)
    ops = OPS[layer._lora_kind]
    cached = plist.cached()  # evaluation at the merged model's speed: checked first, cheaply
    if cached is not None:
        return ops.base(layer, x, cached, _bias(layer))
    select = selection()
    active: list[AdapterVariant] = []
    foreign = False
    store: BaseStore | None = None
    copy: AdapterEntry | None = None
    for p in plist._modules.values():
        if isinstance(p, AdapterVariant):
            if p.active(select):
                active.append(p)
        elif isinstance(p, AdapterEntry):
            if p.active(select):
                copy = p
        elif isinstance(p, BaseStore):
            store = p
        else:
            foreign = True
    if foreign:
        return ops.base(layer, x, cast(Tensor, plist()), _bias(layer))
    if not active:
        return _base(layer, x, True, plist, store, copy)
    if not torch.compiler.is_compiling() and plist._value_cache.value is not None:
        plist.clear_cache()  # training moves on: free the evaluation copy
    if all(p.has_branch() for p in active):
        y = _base(layer, x, True, plist, store, copy)
        for p in active:
            y = p.add_branch(ops, layer, x, y)
        return y
    if len(active) == 1:
        out = active[0].layer_forward(
            ops,
            layer,
            x,
            lambda m, z, bias: _base(m, z, bias, plist, store, copy),
            lambda: plist.base_value() if copy is None else cast(Tensor, copy.value),
        )
        if out is not None:
            return out
    return ops.base(layer, x, cast(Tensor, plist()), _bias(layer))


_ROUTE = "_lora_route"


def set_route(layer: nn.Module, route: Callable[[Any, Tensor], Tensor] | None) -> None:
    """Make an adapted layer compute through ``route(layer, x)`` instead (None: stop).

    The seam for per-example routing (:mod:`lora_param.routing.mixed`): the route replaces
    :func:`layer_output` on this one instance while it is set.
    """
    if route is None:
        layer.__dict__.pop(_ROUTE, None)
    else:
        layer.__dict__[_ROUTE] = route


def layer_kind_of(layer: nn.Module) -> str:
    """The kind an adapted layer computes as (see :func:`install_forward`)."""
    return cast(str, cast(Any, type(layer))._lora_kind)


def _adapted_forward(self: Any, x: Tensor) -> Tensor:
    route = self.__dict__.get(_ROUTE)
    if route is not None:  # per-example adapters: lora_param.routing.mixed
        return route(self, x)
    return layer_output(self, x)


def _embedding_factorable(module: nn.Module) -> bool:
    # Padding rows, frequency scaling, renormalization and sparse gradients change how the
    # weight's gradient is formed; the materialized path keeps them exact.
    return (
        module.padding_idx is None
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


def factored_forward_applies(module: nn.Module, kind: str) -> bool:
    """True when the adapted forward computes exactly what the layer's own forward does.

    Subclasses that override ``forward`` (timm's ``Conv2dSame``, quantized layers) keep their
    own forward and the materialized path.
    """
    if kind not in OPS:
        return False
    cls: Any = class_before_parametrizations(module)
    if kind == "conv1d_hf":
        return True
    owners: tuple[type[nn.Module], ...] = {
        "linear": (nn.Linear,),
        "embedding": (nn.Embedding,),
        "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    }[kind]
    if not any(cls.forward is owner.forward for owner in owners):
        return False
    return kind != "embedding" or _embedding_factorable(module)


def install_forward(module: nn.Module, kind: str) -> None:
    """Make a parametrized layer compute through :func:`layer_output`."""
    own_class(module)
    cls: Any = type(module)
    cls.forward = _adapted_forward
    cls._lora_kind = kind


def is_installed(module: nn.Module) -> bool:
    """Whether the layer computes through :func:`layer_output`."""
    return "_lora_kind" in layer_class(module).__dict__


def release_forward(module: nn.Module) -> None:
    """Give a layer its own forward back once its weight holds no update and no store."""
    if not is_installed(module):
        return
    if parametrize.is_parametrized(module, "weight"):
        plist = cast(nn.ModuleDict, module.parametrizations)["weight"]
        if isinstance(plist, AdapterList) and (plist.variants() or plist.store() is not None):
            return
    own_class(module)
    generated: Any = type(module)
    del generated.forward
    del generated._lora_kind


def iter_installed(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer computing through :func:`layer_output`."""
    return [(n, m) for n, m in model.named_modules() if is_installed(m)]
