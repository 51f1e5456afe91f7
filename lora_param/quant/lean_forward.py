"""The base output of a quantized layer without keeping its dequantized weight for backward.

Autograd would save the dequantized weight from forward to backward (``x @ W^T`` needs ``W``
to form the input gradient). Here a custom autograd function dequantizes in forward, drops
the weight, and dequantizes again in backward, so a training step holds one layer's
dequantized weight at a time. The base weight is frozen: only the input (and a trainable
bias) get gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["base_output", "layer_op"]

LayerOp = Callable[[Any, Tensor, Tensor, Tensor | None], Tensor]


def _linear(layer: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, w, bias)


def _conv(layer: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return layer._conv_forward(x, w, bias)


def _embedding(layer: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    return F.embedding(
        x, w, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
        layer.sparse,
    )  # fmt: skip


def _conv1d_hf(layer: Any, x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    assert bias is not None  # Hugging Face's Conv1D always has one
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), w).view((*x.shape[:-1], layer.nf))


_OPS: dict[str, LayerOp] = {
    "linear": _linear,
    "conv": _conv,
    "embedding": _embedding,
    "conv1d_hf": _conv1d_hf,
}


def layer_op(kind: str) -> LayerOp:
    """The call the layer's own forward makes with its weight (same op, same rounding)."""
    return _OPS[kind]


def _sum_to_bias(grad: Tensor, kind: str) -> Tensor:
    if kind == "conv":
        return grad.sum(dim=[d for d in range(grad.dim()) if d != 1])
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)


class _DequantizeTwice(torch.autograd.Function):
    """``op(x, dequant(stored), bias)`` that dequantizes again in backward instead of saving."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias: Tensor | None,
        quant: Any,
        layer: Any,
        *stored: Tensor,
    ) -> Tensor:
        ctx.quant, ctx.layer = quant, layer
        ctx.save_for_backward(x if quant.kind == "conv" else None, *stored)
        ctx.x_shape = x.shape
        return _OPS[quant.kind](layer, x, quant(*stored), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *stored = ctx.saved_tensors
        quant, layer = ctx.quant, ctx.layer
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = quant(*stored)
        grad_x = grad_bias = None
        if quant.kind == "conv":
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(need_x)
                bias = layer.bias.detach().requires_grad_(need_bias) if need_bias else layer.bias
                y = layer._conv_forward(x_in, w, bias)
                inputs = [t for t, need in ((x_in, need_x), (bias, need_bias)) if need]
                grads = list(torch.autograd.grad(y, inputs, grad))
            grad_x = grads.pop(0) if need_x else None
            grad_bias = grads.pop(0) if need_bias else None
        else:
            if need_x:
                flat = grad.reshape(-1, grad.shape[-1])
                weight = w if quant.kind == "linear" else w.t()
                grad_x = (flat @ weight).view(ctx.x_shape)
            if need_bias:
                grad_bias = _sum_to_bias(grad, quant.kind)
        return (grad_x, grad_bias, None, None, *([None] * len(stored)))


def base_output(quant: Any, layer: Any, x: Tensor, stored: tuple[Tensor, ...]) -> Tensor:
    """The layer's base output for input ``x`` with its weight dequantized from ``stored``.

    Under ``torch.compile`` the plain expression is traced (the compiler plans what backward
    keeps); without gradients, or for embeddings (an integer input), nothing is saved anyway.
    """
    bias = getattr(layer, "bias", None) if quant.kind != "embedding" else None
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
    )
    if quant.kind == "embedding" or not needs_grad or torch.compiler.is_compiling():
        return _OPS[quant.kind](layer, x, quant(*stored), bias)
    out: Tensor = _DequantizeTwice.apply(x, bias, quant, layer, *stored)
    return out
