"""The one per-layer-kind op table: what each supported layer computes with a given weight.

Every place that needs a layer's own math with another weight (the factored forward, the
lean QLoRA backward, DoRA's rescaled output, per-example routing) takes it from :data:`OPS`,
so a layer kind is described once:

==============  =====================================  ===========================================
kind            layers                                  weight as a matrix ``(fan_out, fan_in)``
==============  =====================================  ===========================================
``linear``      ``nn.Linear`` and subclasses            the weight itself
``conv``        ``nn.Conv1d/2d/3d`` (groups too)         ``(out, in/groups * prod(kernel))``
``embedding``   ``nn.Embedding``                        ``(num_embeddings, dim)``
``conv1d_hf``   Hugging Face ``Conv1D``                 the transpose of its ``(in, out)`` weight
==============  =====================================  ===========================================

``nn.MultiheadAttention``'s projection weights (kind ``param``) and 3-D expert tensors (kind
``experts``) are read directly by their modules: they have no entry here and are always
adapted through the materialized weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPS", "LayerKind", "LayerOps", "ops_for"]

LayerKind = Literal["linear", "conv", "embedding", "conv1d_hf", "param", "experts"]

# Layers are typed Any: their attributes (bias, groups, _conv_forward, ...) depend on the kind.
BaseOp = Callable[[Any, Tensor, Tensor, "Tensor | None"], Tensor]
LowRankOp = Callable[[Any, Tensor, Tensor, Tensor], Tensor]
InputGradOp = Callable[[Any, Tensor, Tensor, "torch.Size"], Tensor]
RoutedOp = Callable[[Any, Tensor, Tensor, Tensor, Tensor, "tuple[int, ...]", Tensor], Tensor]


@dataclass(frozen=True)
class LayerOps:
    """What one layer kind computes.

    Attributes:
        kind: The layer kind.
        base: ``(layer, x, weight, bias) -> y``: the layer's own forward with ``weight`` and
            ``bias`` (None: no bias), the same op and rounding as the layer's ``forward``.
        lowrank: ``(layer, x, A, B) -> B A x``: the output of the update ``B @ A`` (``A`` is
            ``(r, fan_in)``, ``B`` ``(fan_out, r)``, in the matrix view) without forming it.
        input_grad: ``(layer, grad_y, weight, x_shape) -> grad_x`` for a frozen weight, or None
            where autograd recomputes it (convolutions) or there is none (embeddings).
        channel_dim: The output dimension holding the matrix rows' outputs (``-1``; ``1`` for
            convolutions): per-output scales (DoRA) broadcast along it.
        routed: ``(layer, x, A_stack, B_stack, index, weight_shape, y) -> y + update``:
            per-example low-rank updates added to the base output ``y``, example ``i`` using
            ``A_stack[index[i]]`` and ``B_stack[index[i]]`` (``(slots, r, fan_in)`` and
            ``(slots, fan_out, r)``). ``y`` must be the forward's fresh base output, which no
            backward uses: the update is added into it in place.
    """

    kind: str
    base: BaseOp
    lowrank: LowRankOp
    input_grad: InputGradOp | None
    channel_dim: int
    routed: RoutedOp


def _linear_base(m: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, w, bias)


def _linear_lowrank(m: Any, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return F.linear(F.linear(x, a), b)


def _linear_input_grad(m: Any, grad: Tensor, w: Tensor, shape: torch.Size) -> Tensor:
    return (grad.reshape(-1, grad.shape[-1]) @ w).view(shape)


def _writable(y: Tensor) -> Tensor:
    """``y``, or a copy where autograd forbids writing into it: a view a custom Function
    returned (a packed base's lean forward may), and under torch.compile (which fuses the copy).
    Other views (``F.linear`` on a 3-D input returns one) take the update in place."""
    if torch.compiler.is_compiling():
        return y.clone()
    if isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction) and y._is_view():
        return y.clone()
    return y


def _linear_routed(
    m: Any, x: Tensor, a: Tensor, b: Tensor, idx: Tensor, shape: tuple[int, ...], y: Tensor
) -> Tensor:
    n = x.shape[0]
    z = torch.bmm(x.reshape(n, -1, x.shape[-1]), a[idx].transpose(1, 2))
    # Into y: no activation-sized update tensor, no second one for the sum.
    out = _writable(y)
    out.view(n, -1, y.shape[-1]).baddbmm_(z, b[idx].transpose(1, 2))
    return out


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_base(m: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return m._conv_forward(x, w, bias)


def _conv_lowrank(m: Any, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    # A as a conv kernel (r, in/groups, *k), repeated per group; B as a grouped 1x1 conv.
    groups, rank = m.groups, a.shape[0]
    kernel = m.kernel_size
    lora_a = a.view(rank, -1, *kernel)
    if groups > 1:
        lora_a = lora_a.repeat(groups, *([1] * (lora_a.dim() - 1)))
    z = m._conv_forward(x, lora_a, None)
    lora_b = b.view(b.shape[0], rank, *([1] * len(kernel)))
    return _CONV[len(kernel)](z, lora_b, None, 1, 0, 1, groups)


def _conv_routed(
    m: Any, x: Tensor, a: Tensor, b: Tensor, idx: Tensor, shape: tuple[int, ...], y: Tensor
) -> Tensor:
    # Each example gets its own kernels: fold the batch into conv groups.
    n, groups, rank = x.shape[0], m.groups, a.shape[1]
    kernel = shape[1:]
    conv = _CONV[len(kernel) - 1]
    ka = a[idx].view(n, rank, *kernel)
    if groups > 1:
        ka = ka.repeat(1, groups, *([1] * len(kernel)))
    x1 = x.reshape(1, n * x.shape[1], *x.shape[2:])
    padding = m.padding
    if m.padding_mode != "zeros":
        x1 = F.pad(x1, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = 0
    ka = ka.reshape(n * groups * rank, *kernel)
    z = conv(x1, ka, None, m.stride, padding, m.dilation, n * groups)
    fan_out = b.shape[1]
    kb = b[idx].reshape(n * fan_out, rank, *([1] * (len(kernel) - 1)))
    out = conv(z, kb, None, 1, 0, 1, n * groups)
    return _writable(y).add_(out.view(y.shape))


def _embedding_base(m: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _embedding_lowrank(m: Any, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return F.embedding(x, b) @ a


def _embedding_routed(
    m: Any, x: Tensor, a: Tensor, b: Tensor, idx: Tensor, shape: tuple[int, ...], y: Tensor
) -> Tensor:
    slots, vocab, rank = b.shape
    offset = (idx * vocab).view(-1, *([1] * (x.dim() - 1)))
    rows = F.embedding(x + offset, b.reshape(slots * vocab, rank))
    out = torch.bmm(rows.reshape(x.shape[0], -1, rank), a[idx])
    return _writable(y).add_(out.view(y.shape))


def _conv1d_hf_base(m: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ w if bias is None else torch.addmm(bias, flat, w)
    return out.view((*x.shape[:-1], m.nf))


def _conv1d_hf_input_grad(m: Any, grad: Tensor, w: Tensor, shape: torch.Size) -> Tensor:
    return (grad.reshape(-1, grad.shape[-1]) @ w.t()).view(shape)


OPS: dict[str, LayerOps] = {
    "linear": LayerOps(
        "linear", _linear_base, _linear_lowrank, _linear_input_grad, -1, _linear_routed
    ),
    "conv": LayerOps("conv", _conv_base, _conv_lowrank, None, 1, _conv_routed),
    "embedding": LayerOps(
        "embedding", _embedding_base, _embedding_lowrank, None, -1, _embedding_routed
    ),
    "conv1d_hf": LayerOps(
        "conv1d_hf", _conv1d_hf_base, _linear_lowrank, _conv1d_hf_input_grad, -1, _linear_routed
    ),
}


def ops_for(kind: str) -> LayerOps:
    """The ops of a layer kind (``linear``, ``conv``, ``embedding``, ``conv1d_hf``)."""
    return OPS[kind]
