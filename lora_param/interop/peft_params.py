"""PEFT's layout for parameters adapted by name (``target_parameters``, ``lora.ParamWrapper``).

* A 3-D expert tensor ``(E, ...)`` gets one LoRA per expert, stored flattened as two
  ``nn.Linear`` weights: ``lora_A.weight`` ``(E*r, in)`` with ``A[e] = A.reshape(E, r, in)[e]``
  and ``lora_B.weight`` ``(out, r*E)`` with the expert index fastest,
  ``B[e] = B.reshape(out, r, E)[:, :, e]``. "in" and "out" follow the owning module's
  ``is_transposed`` flag, as lora_param's default ``expert_layout`` does.
* Several adapted tensors of one module are nested wrappers: PEFT wraps the module's
  parameters in their registration order, so the first one ends up innermost, under
  ``base_layer.`` repeated once per wrapper around it (``experts.base_layer.lora_A.weight``
  for ``gate_up_proj``, ``experts.lora_A.weight`` for ``down_proj``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.targets import tensor_names

__all__ = [
    "BASE_LAYER",
    "experts_from_peft",
    "experts_to_peft",
    "parameter_order",
    "split_wrappers",
    "wrapper_depths",
]

BASE_LAYER = "base_layer"


def experts_to_peft(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """lora_param's ``A (E, r, in)``, ``B (E, out, r)`` as PEFT's ``(E*r, in)``, ``(out, r*E)``."""
    experts, rank, fan_in = lora_a.shape
    flat_a = lora_a.reshape(experts * rank, fan_in)
    flat_b = lora_b.permute(1, 2, 0).reshape(lora_b.shape[1], rank * experts)
    return flat_a, flat_b


def experts_from_peft(flat_a: Tensor, flat_b: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's flattened factors of an expert tensor as ``A (E, r, in)``, ``B (E, out, r)``."""
    rank = flat_a.shape[0] // experts
    lora_a = flat_a.reshape(experts, rank, flat_a.shape[1])
    lora_b = flat_b.reshape(flat_b.shape[0], rank, experts).permute(2, 0, 1)
    return lora_a, lora_b


def parameter_order(module: nn.Module) -> list[str]:
    """The module's parameters in the order a fresh copy registers them."""
    order = module.__dict__.get("_lora_param_order")
    names = tensor_names(module)
    if order is None:
        return names
    return [n for n in order if n in names] + [n for n in names if n not in order]


def wrapper_depths(module: nn.Module, adapted: list[str]) -> dict[str, int]:
    """How many ``base_layer.`` levels PEFT puts before each adapted tensor's factors."""
    ordered = [n for n in parameter_order(module) if n in adapted]
    return {name: len(ordered) - 1 - i for i, name in enumerate(ordered)}


def split_wrappers(module_path: str) -> tuple[str, int]:
    """``"a.experts.base_layer"`` -> ``("a.experts", 1)``: the module and its wrapper depth."""
    parts = module_path.split(".")
    depth = 0
    while len(parts) > 1 and parts[-1] == BASE_LAYER:
        parts.pop()
        depth += 1
    return ".".join(parts), depth
