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
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core.layer_ops import LayerOps
from ..core.targets import LayerSpec
from .lora import LoRAParametrization

__all__ = ["ExpertLoRAParametrization"]


class ExpertLoRAParametrization(LoRAParametrization):
    """One LoRA per expert on a 3-D tensor: ``W[e] + scale * B[e] @ A[e]``.

    ``A`` is ``(experts, rank, fan_in)`` and ``B`` ``(experts, fan_out, rank)``; ``fan_in`` and
    ``fan_out`` are one expert's. With ``fan_in_fan_out`` the tensor is stored
    ``(experts, fan_in, fan_out)`` and each expert gets the transposed update. It is plain LoRA
    (variant ``"lora"``) on expert tensors: everything but the shapes is the parent's.

    Args:
        spec: The 3-D expert tensor (kind ``"experts"``), fans of one expert.
        **kwargs: As :class:`LoRAParametrization`.
    """

    kinds: ClassVar[frozenset[str]] = frozenset({"experts"})
    capabilities: ClassVar[frozenset[str]] = frozenset({"strength"})

    def __init__(self, spec: LayerSpec, **kwargs: Any) -> None:
        if len(spec.shape) != 3:
            raise ValueError(f"expert tensors are 3-D, got shape {tuple(spec.shape)}")
        super().__init__(spec, **kwargs)

    @property
    def experts(self) -> int:
        """Number of experts."""
        return int(self.weight_shape[0])

    @staticmethod
    def _factor_shapes(spec: LayerSpec, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (spec.experts, rank, spec.fan_in), (spec.experts, spec.fan_out, rank)

    def reset_parameters(self) -> None:
        """Draw each expert's ``A`` as a Linear's (PEFT's bound ``1/sqrt(fan_in)``); ``B`` = 0."""
        with torch.no_grad():
            if self.init == "gaussian":
                torch.nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            else:
                bound = 1.0 / math.sqrt(self.fan_in)
                torch.nn.init.uniform_(self.lora_A, -bound, bound)
            self.lora_B.zero_()

    def adapt(self, weight: Tensor, dropout: bool = False) -> Tensor:
        """``weight + scale * B[e] @ A[e]`` for every expert; ``dropout`` masks A's inputs."""
        lora_a, lora_b, scale = self._factors(weight.dtype, dropout)
        if self.fan_in_fan_out:
            return torch.baddbmm(
                weight, lora_a.transpose(1, 2), lora_b.transpose(1, 2), alpha=scale
            )
        return torch.baddbmm(weight, lora_b, lora_a, alpha=scale)

    def add_branch(self, ops: LayerOps, layer: Any, x: Tensor, y: Tensor) -> Tensor:
        """Expert tensors are read by their block's own code: no factored form."""
        raise NotImplementedError

    @classmethod
    def has_branch(cls) -> bool:
        """No factored form (the block reads the tensor itself)."""
        return False

    def extra_repr(self) -> str:
        layout = "in_out" if self.fan_in_fan_out else "out_in"
        return f"experts={self.experts}, layout={layout}, " + super().extra_repr()
