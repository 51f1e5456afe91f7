"""The factored forward: ``base(x) + scale * B(A(dropout(x)))`` without materializing ``W + sBA``.

With ``mode="factored"``, ``add_lora`` sets the forward below on the (private, generated) class
of Linear, Conv, Embedding and Hugging Face Conv1D layers. The weight stays parametrized, so
code that reads ``layer.weight`` directly (``nn.MultiheadAttention``'s ``out_proj``, fused
transformer fast paths) still sees ``W + sBA``. Under ``torch.no_grad()`` the forward uses the
weight the parametrization caches (when its ``eval_cache`` is on), which makes evaluation cost
what the merged model costs; otherwise it stays factored and keeps no copy of the weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..variants.lora import LoRAParametrization
from .generated_class import own_class

__all__ = [
    "FACTORED_KINDS",
    "base_forward",
    "factored_forward_applies",
    "install_factored_forward",
    "remove_factored_forward",
]

# Layers are typed Any here: their attributes (bias, groups, _conv_forward, ...) depend on the kind.
BaseOp = Callable[[Any, Tensor, Tensor], Tensor]
BranchOp = Callable[[Any, Tensor, LoRAParametrization, Tensor], Tensor]


def _add_scaled(y: Tensor, update: Tensor, scale: float | Tensor) -> Tensor:
    # A hot-swap-ready adapter keeps its scale in a tensor; add's alpha takes numbers only.
    return y + update * scale if isinstance(scale, Tensor) else y.add(update, alpha=scale)


def _linear_base(m: Any, x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w, m.bias)


def _linear_branch(m: Any, x: Tensor, p: LoRAParametrization, y: Tensor) -> Tensor:
    return _add_scaled(y, F.linear(F.linear(p.dropout(x), p.lora_A), p.lora_B), p.scale)


def _conv_base(m: Any, x: Tensor, w: Tensor) -> Tensor:
    return m._conv_forward(x, w, m.bias)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_branch(m: Any, x: Tensor, p: LoRAParametrization, y: Tensor) -> Tensor:
    groups, rank = m.groups, p.rank
    lora_a = p.lora_A.view(rank, *p.weight_shape[1:])
    if groups > 1:
        lora_a = lora_a.repeat(groups, *([1] * (lora_a.dim() - 1)))
    z = m._conv_forward(p.dropout(x), lora_a, None)
    lora_b = p.lora_B.view(p.fan_out, rank, *([1] * (lora_a.dim() - 2)))
    return _add_scaled(y, _CONV[lora_a.dim() - 2](z, lora_b, None, 1, 0, 1, groups), p.scale)


def _embedding_base(m: Any, x: Tensor, w: Tensor) -> Tensor:
    return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _embedding_branch(m: Any, x: Tensor, p: LoRAParametrization, y: Tensor) -> Tensor:
    rows = F.embedding(x, p.lora_B)
    return _add_scaled(y, rows @ p.lora_A, p.scale)


def _conv1d_hf_base(m: Any, x: Tensor, w: Tensor) -> Tensor:
    return torch.addmm(m.bias, x.reshape(-1, x.shape[-1]), w).view((*x.shape[:-1], m.nf))


_OPS: dict[str, tuple[BaseOp, BranchOp]] = {
    "linear": (_linear_base, _linear_branch),
    "conv": (_conv_base, _conv_branch),
    "embedding": (_embedding_base, _embedding_branch),
    "conv1d_hf": (_conv1d_hf_base, _linear_branch),
}
FACTORED_KINDS = frozenset(_OPS)


def base_forward(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """What a factored layer computes with ``weight`` and no adapter (its own forward's math)."""
    return _OPS[str(module._lora_kind)][0](module, x, weight)


def _factored_forward(self: Any, x: Tensor) -> Tensor:
    route = self.__dict__.get("_lora_route")
    if route is not None:  # per-example adapters: lora_param.routing.mixed
        return route(self, x)
    base, branch = _OPS[self._lora_kind]
    plist = self._modules["parametrizations"]._modules["weight"]
    entries = plist._modules.values()
    head = next(iter(entries))
    packed = getattr(head, "base_forward", None) if type(head) is not LoRAParametrization else None
    if packed is not None:
        return _packed_base_forward(self, x, packed, list(entries)[1:], base, branch)
    compiling = torch.compiler.is_compiling()
    cached = not compiling and not torch.is_grad_enabled()
    for p in entries:
        if type(p) is not LoRAParametrization:
            if len(entries) == 1 and hasattr(p, "factored_forward"):
                return p.factored_forward(self, x, branch)  # DoRA alone on the layer
            return base(self, x, self.weight)
        if (p.training and p.dropout_p > 0) or not p.eval_cache:
            cached = False
    weight = plist._parameters["original"]
    if cached:
        for p in entries:
            weight = p.forward(weight)
        return base(self, x, weight)
    y = base(self, x, weight)
    for p in entries:
        if not compiling and p._cache is not None:
            p._cache = None  # training moves on; free the eval copy
        if p._enabled:
            y = branch(self, x, p, y)
    return y


def _packed_base_forward(
    self: nn.Module,
    x: Tensor,
    base_forward: Callable[[nn.Module, Tensor], Tensor],
    entries: list[nn.Module | None],
    base: BaseOp,
    branch: BranchOp,
) -> Tensor:
    """A packed frozen base (``lora_param.quant``) first, then LoRA branches; never cached.

    The base entry computes its own output (dequantizing again in backward); caching
    ``W + sBA`` would keep a full-precision copy of the weight the packing exists to avoid.
    """
    if not all(type(p) is LoRAParametrization for p in entries):
        return base(self, x, cast(Tensor, self.weight))
    y = base_forward(self, x)
    for p in entries:
        if isinstance(p, LoRAParametrization) and p._enabled:
            y = branch(self, x, p, y)
    return y


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
    """True when the factored forward computes exactly what the layer's own forward does.

    Subclasses that override ``forward`` (timm's ``Conv2dSame``, quantized layers) keep their
    own forward and the materialized path.
    """
    if kind not in _OPS:
        return False
    cls: Any = parametrize.type_before_parametrizations(module)
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


def install_factored_forward(module: nn.Module, kind: str) -> None:
    """Make a parametrized layer compute its adapters in factored form."""
    own_class(module)
    cls: Any = type(module)
    cls.forward = _factored_forward
    cls._lora_kind = kind


def remove_factored_forward(module: nn.Module) -> None:
    """Give a layer (still parametrized by something else) its own forward back."""
    cls = type(module)
    if "_lora_kind" in cls.__dict__:
        own_class(module)
        generated: Any = type(module)
        del generated.forward
        del generated._lora_kind
