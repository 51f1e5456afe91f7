"""The base output of a packed layer without keeping its dequantized weight for backward.

Autograd would save the dequantized weight from forward to backward (``x @ W^T`` needs ``W``
to form the input gradient). Here a custom autograd function dequantizes in forward, drops
the weight, and dequantizes again in backward, so a training step holds one layer's
dequantized weight at a time. The base weight is frozen: only the input (and a trainable
bias) get gradients. The layer's math comes from the op table
(:data:`lora_param.core.layer_ops.OPS`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.layer_ops import OPS

__all__ = ["base_output"]


def _sum_to_bias(grad: Tensor, channel_dim: int) -> Tensor:
    if channel_dim == 1:
        return grad.sum(dim=[d for d in range(grad.dim()) if d != 1])
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)


class _DequantizeTwice(torch.autograd.Function):
    """``op(x, dequant(stored), bias)`` that dequantizes again in backward instead of saving."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        bias: Tensor | None,
        store: Any,
        layer: Any,
        *stored: Tensor,
    ) -> Tensor:
        ops = OPS[store.kind]
        ctx.store, ctx.layer = store, layer
        ctx.save_for_backward(x if ops.input_grad is None else None, *stored)
        ctx.x_shape = x.shape
        return ops.base(layer, x, store(*stored), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *stored = ctx.saved_tensors
        store, layer = ctx.store, ctx.layer
        ops = OPS[store.kind]
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = store(*stored)
        grad_x = grad_bias = None
        if ops.input_grad is None:  # convolutions: let autograd form the input gradient
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(need_x)
                bias = layer.bias.detach().requires_grad_(need_bias) if need_bias else None
                y = ops.base(layer, x_in, w, bias)
                inputs = [
                    t for t, need in ((x_in, need_x), (bias, need_bias)) if need and t is not None
                ]
                grads = list(torch.autograd.grad(y, inputs, grad))
            grad_x = grads.pop(0) if need_x else None
            grad_bias = grads.pop(0) if need_bias else None
        else:
            if need_x:
                grad_x = ops.input_grad(layer, grad, w, ctx.x_shape)
            if need_bias:
                grad_bias = _sum_to_bias(grad, ops.channel_dim)
        return (grad_x, grad_bias, None, None, *([None] * len(stored)))


def base_output(
    store: Any, layer: Any, x: Tensor, stored: tuple[Tensor, ...], bias: bool
) -> Tensor:
    """The layer's base output for input ``x`` with its weight dequantized from ``stored``.

    Under ``torch.compile`` the plain expression is traced (the compiler plans what backward
    keeps); without gradients, or for embeddings (an integer input), nothing is saved anyway.

    Args:
        store: The packed weight (:class:`~lora_param.quant.QuantizedWeight`).
        layer: The layer.
        x: Its input.
        stored: The packed tensors.
        bias: Add the layer's bias.
    """
    ops = OPS[store.kind]
    b = getattr(layer, "bias", None) if bias and store.kind != "embedding" else None
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (b is not None and b.requires_grad)
    )
    if store.kind == "embedding" or not needs_grad or torch.compiler.is_compiling():
        return ops.base(layer, x, store(*stored), b)
    out: Tensor = _DequantizeTwice.apply(x, b, store, layer, *stored)
    return out
