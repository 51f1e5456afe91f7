"""Reference formulas, one per adapter variant: ``W' = f(W, the adapter's tensors)``.

Written from each variant's paper / PEFT's definition, independently of lora_param's code:
they read the adapter's tensors (``entry.tensors()``), its file fields (``entry.fields()``:
rank, alpha, ...) and the layer seen as a matrix (``entry.spec``), and compute in float64.

Adding a variant to lora_param means adding its formula here (``@formula("name")``); the
cross-product picks the variant up from ``lora_param.variant_names()`` and fails every cell of
a variant without a formula, naming this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["FORMULAS", "apply_formula", "formula"]

#: ``(W, tensors, fields, spec) -> W'``, all float64, ``W`` in the tensor's stored layout.
Formula = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, Any], Any], Tensor]
FORMULAS: dict[str, Formula] = {}


def formula(name: str) -> Callable[[Formula], Formula]:
    """Register the reference formula of variant ``name``."""

    def register(f: Formula) -> Formula:
        FORMULAS[name] = f
        return f

    return register


def _scale(fields: Mapping[str, Any]) -> float:
    rank, alpha = int(fields["rank"]), float(fields["alpha"])
    return alpha / (math.sqrt(rank) if fields.get("use_rslora") else rank)


def _lowrank_update(w: Tensor, a: Tensor, b: Tensor, spec: Any) -> Tensor:
    """``B @ A`` laid out as the stored tensor ``w``.

    The matrix view is ``(fan_out, fan_in)``: a conv weight ``(out, in/groups, k, k)`` is
    ``(out, in/groups*k*k)``; a tensor stored transposed (HF Conv1D, ``(in, out)``) takes the
    transposed update; a 3-D experts tensor takes one update per expert.
    """
    if spec.kind == "experts":
        delta = torch.bmm(b, a)  # (E, out, in)
        return delta.transpose(1, 2) if spec.fan_in_fan_out else delta
    delta = b @ a  # (fan_out, fan_in)
    if spec.fan_in_fan_out:
        return delta.t().reshape(w.shape)
    return delta.reshape(w.shape)


@formula("lora")
def lora(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """LoRA (Hu et al. 2021), rsLoRA's ``alpha / sqrt(r)``: ``W + (alpha / r) B A``."""
    return w + _scale(fields) * _lowrank_update(w, t["lora_A"], t["lora_B"], spec)


@formula("dora")
def dora(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """DoRA (Liu et al. 2024): ``m * V / ||V||`` with ``V = W + s B A``.

    The norm is per output (PEFT): per row of the ``(out, in)`` matrix; for a tensor stored
    ``(in, out)`` (HF Conv1D) per column; for an embedding per embedding dimension (a column
    of the ``(vocabulary, dim)`` table).
    """
    v = lora(w, t, fields, spec)
    m = t["lora_magnitude"]
    if spec.kind == "embedding" or spec.fan_in_fan_out:
        norm = v.reshape(v.shape[0], -1).norm(dim=0)
        return v * (m / norm).view(1, -1)
    norm = v.reshape(v.shape[0], -1).norm(dim=1)
    return v * (m / norm).view(-1, *([1] * (v.dim() - 1)))


def apply_formula(variant: str, weight: Tensor, entry: Any) -> Tensor:
    """``W'`` of ``entry`` (an adapter entry of ``variant``) on ``weight``, in float64.

    Raises:
        AssertionError: No formula is registered for the variant.
    """
    if variant not in FORMULAS:
        raise AssertionError(
            f"no reference formula for variant {variant!r}: add one to "
            "tests/crossproduct/formulas.py (@formula(name))."
        )
    tensors = {k: v.detach().to(torch.float64) for k, v in entry.tensors().items()}
    return FORMULAS[variant](weight.to(torch.float64), tensors, entry.fields(), entry.spec)
