"""Freezing: only what the adapters train (LoRA factors, their own copies) stays trainable."""

from __future__ import annotations

from typing import Literal

from torch import nn

from .errors import LoRAError
from .lookup import iter_lora, owned_tensor_ids
from .matching import Targets, as_patterns, is_literal, matches, nearest
from .targets import base_tensor, tensor_names

__all__ = ["Bias", "freeze_base", "trainable_modules"]

Bias = Literal["none", "all", "lora_only"]


def trainable_modules(model: nn.Module, trainable: Targets) -> list[nn.Module]:
    """Modules matching ``trainable`` patterns; a string pattern matching nothing is an error."""
    patterns = as_patterns(trainable, "trainable")
    named = [(n, m) for n, m in model.named_modules() if n and ".parametrizations" not in f".{n}"]
    found: dict[int, nn.Module] = {}
    for pattern in patterns:
        hits = [m for n, m in named if matches(pattern, n, m)]
        if not hits and isinstance(pattern, str):
            names = [n for n, _ in named]
            hint = nearest(pattern, names)
            raise LoRAError(
                f"trainable pattern {pattern!r} matches no module"
                + (f"; did you mean {hint}?" if hint else "")
                + ("" if not is_literal(pattern) else " (patterns match full module names)")
            )
        found.update((id(m), m) for m in hits)
    for name, module in named:
        if id(module) not in found:
            continue
        packed = [t for t, p in module.named_parameters() if _is_packed(t, p)]
        if packed:
            raise LoRAError(
                f"trainable= names '{name}', whose weight is stored packed (quantized: "
                f"{packed[0]}) and cannot train; dequantize_base(model) first, or train it "
                "through LoRA instead of trainable=."
            )
    return list(found.values())


def _is_packed(name: str, param: nn.Parameter) -> bool:
    """A module's own parametrized tensor stored as integers (lora_param.quant's packing)."""
    return (
        name.startswith("parametrizations.")
        and name.count(".") == 2
        and not (param.is_floating_point())
    )


def _biases(module: nn.Module) -> list[nn.Parameter]:
    """The module's own bias parameters (``bias``, ``in_proj_bias``, ...), parametrized or not."""
    found = []
    for name in tensor_names(module):
        if "bias" in name:
            tensor = base_tensor(module, name)
            if isinstance(tensor, nn.Parameter):
                found.append(tensor)
    return found


def freeze_base(model: nn.Module, keep: list[nn.Module], bias: Bias) -> None:
    """Freeze every parameter except the adapters' own (which follow ``enabled``).

    An adapter's own parameters are its LoRA factors and its copies of the heads and biases it
    trains (``add_lora(trainable=, bias=)`` puts those in the adapter, see
    :mod:`.trainable_copies`). ``keep`` and ``bias`` make base tensors trainable *in place*,
    shared by every adapter; ``add_lora`` no longer uses them.

    Args:
        model: The model with adapters.
        keep: Modules whose parameters stay trainable in place.
        bias: ``"none"``, ``"all"`` (every bias trains in place) or ``"lora_only"`` (biases of
            adapted layers); a bias is a parameter with "bias" in its name (``in_proj_bias`` too).
    """
    lora = owned_tensor_ids(model)
    for param in model.parameters():
        if id(param) not in lora:
            param.requires_grad_(False)
    for module in keep:
        for param in module.parameters():
            if id(param) not in lora and param.is_floating_point():
                param.requires_grad_(True)
    if bias == "all":
        modules = list(model.modules())
    elif bias == "lora_only":
        modules = list({id(m): m for _, m, _, _ in iter_lora(model)}.values())
    else:
        modules = []
    for module in modules:
        for b in _biases(module):
            b.requires_grad_(True)
