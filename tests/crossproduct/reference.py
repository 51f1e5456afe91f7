"""The expected outputs, computed without lora_param's forward, merge or routing code.

The reference model is the plain float model (``nn.Linear`` where the cell has a
bitsandbytes layer) in float64, whose tensors are set to what the formulas give: the base
weight (dequantized), the adapter's trained copies, and each active variant's ``W'`` from
``formulas.py``; then torch's own layers run it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import lora_param as lp

from .formulas import apply_formula
from .models import KINDS, build_plain, dequantized

__all__ = ["adapted_entries", "base_values", "reference_model", "reference_output"]


def adapted_entries(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Per tensor path, the adapters' entries in application order (copies, then updates)."""
    out: dict[str, list[nn.Module]] = {}
    for path, _, _, entry in lp.iter_entries(model):
        out.setdefault(path, []).append(entry)
    return out


def base_values(base: nn.Module, cell) -> dict[str, Tensor]:
    """Every tensor of the base model as the model computes with it (float64)."""
    values = {}
    plain = build_plain(cell.kind)
    for name, _ in plain.named_parameters():
        if name == KINDS[cell.kind].tensor:
            values[name] = dequantized(base, cell.kind, cell.store).double()
        else:
            owner, _, attr = name.rpartition(".")
            module = base.get_submodule(owner) if owner else base
            values[name] = getattr(module, attr).detach().double()
    return values


def _chain(value: Tensor, entries: list[nn.Module], active) -> Tensor:
    for e in entries:
        if not active(e):
            continue
        if isinstance(e, lp.TrainableCopy):
            value = e.value.detach().double()
        else:
            value = apply_formula(e.variant, value, e)
    return value


def reference_values(
    base: nn.Module,
    model: nn.Module,
    cell,
    active: Collection[str] | None = None,
    override: Mapping[str, Tensor] | None = None,
    under: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Every tensor's expected value (float64).

    Args:
        base: The base model (no adapters), for the base weights.
        model: The model with adapters, for their tensors.
        cell: The model cell.
        active: Adapters applied (None: the enabled ones, as the model's flags say).
        override: Values replacing the computed ones (by tensor path).
        under: Values replacing base values, under the adapters (by tensor path).
    """
    values = base_values(base, cell)
    values.update({k: v.double() for k, v in (under or {}).items()})
    entries = adapted_entries(model)

    def is_active(e) -> bool:
        return e.enabled if active is None else e.adapter in active

    for path, chain in entries.items():
        values[path] = _chain(values[path], chain, is_active)
    values.update({k: v.double() for k, v in (override or {}).items()})
    return values


def reference_model(values: Mapping[str, Tensor], cell, dtype=torch.float64) -> nn.Module:
    """The plain model holding ``values``."""
    ref = build_plain(cell.kind).to(dtype)
    for name, value in values.items():
        owner, _, attr = name.rpartition(".")
        module = ref.get_submodule(owner) if owner else ref
        assert not parametrize.is_parametrized(module)
        setattr(module, attr, nn.Parameter(value.to(dtype), requires_grad=False))
    ref.eval()
    return ref


def reference_output(
    base: nn.Module,
    model: nn.Module,
    cell,
    x: Tensor,
    active: Collection[str] | None = None,
    override: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The expected output for ``x`` (float64)."""
    ref = reference_model(reference_values(base, model, cell, active, override), cell)
    with torch.no_grad():
        return ref(x.double() if x.is_floating_point() else x)
