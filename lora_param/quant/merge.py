"""Merging LoRA into a packed base: plain weights ``dequant(Q) + s·B·A`` (float32 sum), or
the same requantized into the packed storage with the error that adds reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.merge import drop_adapters
from ..variants.lora import LoRAParametrization
from .bnb import BnbWeight, requantized, set_bnb_weight, to_plain_linear
from .packed import iter_quantized, parametrization_list, replace_packed, stored_tensors
from .weight import QuantizedWeight

__all__ = ["PackedMerges", "RequantizationWarning", "merged_fp32", "plan_packed_merges"]


class RequantizationWarning(UserWarning):
    """``merge_lora(requantize=True)`` rounded the merged weights back to the packed format."""


def _add_update_fp32(p: LoRAParametrization, weight: Tensor) -> Tensor:
    """``weight + scale * B @ A`` with ``A`` and ``B`` widened to float32 (``weight`` is)."""
    a, b = p.lora_A.float(), p.lora_B.float()
    if p.fan_in_fan_out:
        return torch.addmm(weight, a.t(), b.t(), alpha=p.scale)
    matrix = weight.reshape(p.fan_out, p.fan_in)
    return torch.addmm(matrix, b, a, alpha=p.scale).view(weight.shape)


def merged_fp32(module: nn.Module, head: QuantizedWeight) -> Tensor:
    """The dequantized base (as the model sees it) plus every enabled update, in float32."""
    weight = head.dequantize_fp32(*stored_tensors(module))
    for p in parametrization_list(module):
        if isinstance(p, LoRAParametrization) and p.enabled:
            weight = _add_update_fp32(p, weight)
    return weight


@dataclass
class PackedMerges:
    """Merges into packed weights, computed in full before :meth:`apply` changes anything.

    Attributes:
        steps: ``(module id, tensor name) -> function`` applying one merge.
        errors: With ``requantize``, per weight path the relative Frobenius error
            ``|dq(requant(M)) - M| / |M|`` the requantization added to the merged weight ``M``.
    """

    steps: dict[tuple[int, str], Callable[[], None]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)

    def covers(self, module: nn.Module, name: str) -> bool:
        """Whether this plan merges ``module.<name>`` (the generic merge must skip it)."""
        return (id(module), name) in self.steps

    def apply(self) -> None:
        """Apply every merge; with requantization, warn with the error it added."""
        for step in self.steps.values():
            step()
        if self.errors:
            worst = max(self.errors, key=self.errors.__getitem__)
            warnings.warn(
                f"merge_lora(requantize=True) rounded {len(self.errors)} merged weights back to "
                f"their packed format, adding a relative error up to {self.errors[worst]:.3g} "
                f"(at '{worst}') on top of the merge; merge_lora(model) without requantize "
                "keeps the merged weights exact in the compute dtype.",
                RequantizationWarning,
                stacklevel=3,
            )


def _plain_step(module: nn.Module, value: Tensor) -> Callable[[], None]:
    def step() -> None:
        drop_adapters(module, "weight", lambda p: True)
        replace_packed(module, nn.Parameter(value, requires_grad=False))

    return step


def _requantized_step(module: nn.Module, packed: tuple[Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            for old, new in zip(stored_tensors(module), packed, strict=True):
                old.copy_(new)
        drop_adapters(module, "weight", lambda p: True)

    return step


def _bnb_steps(plan: PackedMerges, model: nn.Module, requantize: bool) -> None:
    """Merges into bitsandbytes layers: ``nn.Linear`` with plain weights, or requantized."""
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = parametrization_list(module)
        head = plist[0]
        if not isinstance(head, BnbWeight) or len(plist) == 1:
            continue
        path = f"{name}.weight" if name else "weight"
        with torch.no_grad():
            merged = head.dequantize_fp32(plist.original)
            for p in plist:
                if isinstance(p, LoRAParametrization) and p.enabled:
                    merged = _add_update_fp32(p, merged)
            if requantize:
                fresh = requantized(head, plist.original, merged)
                rounded = head.dequantize_fp32(fresh)
                plan.errors[path] = float(
                    (rounded - merged).norm() / merged.norm().clamp(min=1e-30)
                )
                plan.steps[(id(module), "weight")] = _bnb_step(module, fresh, set_bnb_weight)
            else:
                value = merged.to(head.compute_dtype)
                plan.steps[(id(module), "weight")] = _bnb_step(module, value, to_plain_linear)


def _bnb_step(
    module: nn.Module, value: Tensor, install: Callable[[nn.Module, Tensor], None]
) -> Callable[[], None]:
    def step() -> None:
        drop_adapters(module, "weight", lambda p: True)  # gives the bitsandbytes weight back
        install(module, value)

    return step


def plan_packed_merges(model: nn.Module, requantize: bool = False) -> PackedMerges:
    """Plan the merge of every packed weight that carries LoRA.

    Args:
        model: The model ``merge_lora`` works on.
        requantize: Keep the base packed: requantize ``dequant(Q) + s·B·A`` with the weight's
            own settings (lossy: the added error is recorded). Otherwise the weight becomes
            a plain Parameter in the compute dtype, rounded once from the float32 sum.
    """
    plan = PackedMerges()
    for path, module, head in iter_quantized(model):
        if not any(isinstance(p, LoRAParametrization) for p in parametrization_list(module)):
            continue
        with torch.no_grad():
            merged = merged_fp32(module, head)
            if requantize:
                packed = head.right_inverse(merged)
                rounded = head.dequantize_fp32(*packed)
                error = (rounded - merged).norm() / merged.norm().clamp(min=1e-30)
                plan.errors[path] = float(error)
                plan.steps[(id(module), "weight")] = _requantized_step(module, packed)
            else:
                value = merged.to(head.compute_dtype)
                plan.steps[(id(module), "weight")] = _plain_step(module, value)
    _bnb_steps(plan, model, requantize)
    return plan
