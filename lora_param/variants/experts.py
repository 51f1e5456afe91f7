"""Per-expert LoRA on the 3-D expert tensors of mixture-of-experts models.

transformers 5 stores the experts of Mixtral, Qwen-MoE, gpt-oss and others as one 3-D
parameter per projection, ``(experts, out, in)`` or ``(experts, in, out)``. Such a tensor gets
one low-rank update per expert along its first dimension: ``A (E, r, in)``, ``B (E, out, r)``
and ``W[e] + s * B[e] @ A[e]`` (transposed for the ``(experts, in, out)`` layout).

The layout follows the ``is_transposed`` flag that transformers' experts classes carry (PEFT
reads the same flag); ``expert_layout=`` overrides it. The update is always materialized: the
experts' code (a loop or a grouped matmul) reads the tensor itself.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.errors import LoRAError
from .lora import LoRAParametrization

__all__ = [
    "ExpertLayout",
    "ExpertLoRAParametrization",
    "expert_transposed",
    "is_experts_module",
]

ExpertLayout = Literal["out_in", "in_out"]


def is_experts_module(module: nn.Module) -> bool:
    """True for a mixture-of-experts block holding its experts as 3-D parameters.

    transformers' experts classes (``@use_experts_implementation``) carry ``is_transposed``;
    other classes qualify by a name containing ``Expert``.
    """
    cls = parametrize.type_before_parametrizations(module)
    if not (hasattr(module, "is_transposed") or "Expert" in cls.__name__):
        return False
    return bool(expert_tensor_names(module))


def expert_tensor_names(module: nn.Module) -> list[str]:
    """The module's own 3-D floating-point parameters (parametrized ones included)."""
    from ..core.targets import base_tensor, tensor_names  # layers imports this module

    names = []
    for name in tensor_names(module):
        tensor = base_tensor(module, name)
        if tensor is not None and tensor.dim() == 3 and tensor.is_floating_point():
            names.append(name)
    return names


def expert_transposed(module: nn.Module, path: str, layout: ExpertLayout | None) -> bool:
    """Whether a 3-D expert tensor is stored ``(experts, in, out)``.

    Args:
        module: The module owning the tensor.
        path: The tensor's path (for error messages).
        layout: ``"out_in"``, ``"in_out"``, or None to follow the module's ``is_transposed``
            flag (absent: ``"out_in"``, as ``F.linear(x, W[e])`` reads it).
    """
    if layout is None:
        return bool(getattr(module, "is_transposed", False))
    if layout not in ("out_in", "in_out"):
        raise LoRAError(
            f"expert_layout for '{path}' must be 'out_in', 'in_out' or None (follow the "
            f"module's is_transposed flag), got {layout!r}."
        )
    return layout == "in_out"


class ExpertLoRAParametrization(LoRAParametrization):
    """One LoRA per expert on a 3-D tensor: ``W[e] + scale * B[e] @ A[e]``.

    ``A`` is ``(experts, rank, fan_in)`` and ``B`` ``(experts, fan_out, rank)``; ``fan_in`` and
    ``fan_out`` are one expert's. With ``fan_in_fan_out`` the tensor is stored
    ``(experts, fan_in, fan_out)`` and each expert gets the transposed update. Everything else
    (toggles, the eval cache, merge, files) is the parent's.

    Args:
        fan_in: Input features of one expert.
        fan_out: Output features of one expert.
        weight_shape: The 3-D shape ``(experts, ...)``.
        **kwargs: As :class:`LoRAParametrization` (``kind`` is always ``"experts"``).
    """

    def __init__(
        self, fan_in: int, fan_out: int, weight_shape: tuple[int, ...], **kwargs: Any
    ) -> None:
        if len(weight_shape) != 3:
            raise ValueError(f"expert tensors are 3-D, got shape {tuple(weight_shape)}")
        kwargs["kind"] = "experts"
        super().__init__(fan_in, fan_out, weight_shape, **kwargs)
        self.experts = int(weight_shape[0])
        like = self.lora_A
        rank = self.rank
        self.lora_A = nn.Parameter(like.new_empty(self.experts, rank, fan_in))
        self.lora_B = nn.Parameter(like.new_zeros(self.experts, fan_out, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw each expert's ``A`` as a Linear's (PEFT's bound ``1/sqrt(fan_in)``); ``B`` = 0."""
        if self.lora_A.dim() != 3:  # the parent's 2-D placeholders, during __init__
            return
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            else:
                bound = 1.0 / math.sqrt(self.fan_in)
                nn.init.uniform_(self.lora_A, -bound, bound)
            self.lora_B.zero_()

    def add_update(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + scale * B[e] @ A[e]`` for every expert; ``dropout`` masks A's inputs."""
        lora_a = self.lora_A
        if dropout and self.dropout_p > 0 and self.training:
            lora_a = lora_a * self.dropout(torch.ones_like(lora_a[:, :1]))
        if self.fan_in_fan_out:
            return torch.baddbmm(
                weight, lora_a.transpose(1, 2), self.lora_B.transpose(1, 2), alpha=self.scale
            )
        return torch.baddbmm(weight, self.lora_B, lora_a, alpha=self.scale)

    def extra_repr(self) -> str:
        layout = "in_out" if self.fan_in_fan_out else "out_in"
        return f"experts={self.experts}, layout={layout}, " + super().extra_repr()
