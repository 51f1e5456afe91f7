"""Reference formulas, one per adapter variant: ``W' = f(W, the adapter's tensors)``.

Written from each variant's paper / PEFT's definition, independently of lora_param's code:
they read the adapter's tensors (``entry.tensors()``), its file fields (``entry.fields()``:
rank, alpha, ...) and the layer seen as a matrix (``entry.spec``), and compute in float64.

Adding a variant to lora_param means adding its formula here (``@formula("name")``), with
how the cross-product asks for it when that is not ``add_lora(variant="name")`` (``asked_as``:
an ``init=`` of another variant, as PiSSA is) and the ``add_lora`` options it needs (``first``,
``second``: the model's adapter and the second adapter of the ``second`` extras). The
cross-product picks the variant up from ``lora_param.variant_names()`` and fails every cell
of a variant without a formula, naming this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import lora_param as lp

__all__ = ["VARIANTS", "VariantSpec", "apply_formula", "formula"]

#: ``(W, tensors, fields, spec) -> W'``, all float64, ``W`` in the tensor's stored layout.
Formula = Callable[[Tensor, Mapping[str, Tensor], Mapping[str, Any], Any], Tensor]

#: The LoRA family's options: the adapter, and a second one that differs in every setting.
LORA_FIRST: dict[str, Any] = {"rank": 3, "alpha": 5.0}
LORA_SECOND: dict[str, Any] = {"rank": 2, "alpha": 3.0, "use_rslora": True}


@dataclass(frozen=True)
class VariantSpec:
    """How the cross-product builds and checks one registered variant.

    Attributes:
        formula: ``W'`` from the base weight and the entry's tensors.
        asked_as: ``(variant, init)`` pairs that build this variant's entries, when it is
            asked for as an ``init=`` of another variant; empty: ``variant=<name>``.
        first: ``add_lora`` options of the model's adapter (``"default"``).
        second: Those of the second adapter (``"b"``) in the ``second`` extras.
    """

    formula: Formula
    asked_as: tuple[tuple[str, str], ...] = ()
    first: Mapping[str, Any] = field(default_factory=lambda: LORA_FIRST)
    second: Mapping[str, Any] = field(default_factory=lambda: LORA_SECOND)


VARIANTS: dict[str, VariantSpec] = {}


def formula(
    name: str,
    *,
    asked_as: tuple[tuple[str, str], ...] = (),
    first: Mapping[str, Any] | None = None,
    second: Mapping[str, Any] | None = None,
) -> Callable[[Formula], Formula]:
    """Register the reference formula of variant ``name`` (see :class:`VariantSpec`)."""

    def register(f: Formula) -> Formula:
        VARIANTS[name] = VariantSpec(
            f, asked_as, LORA_FIRST if first is None else first, second or LORA_SECOND
        )
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


def _magnitude(v: Tensor, m: Tensor, spec: Any) -> Tensor:
    """DoRA's ``m * V / ||V||``, the norm per output (PEFT): per row of the ``(out, in)``
    matrix; for a tensor stored ``(in, out)`` (HF Conv1D) per column; for an embedding per
    embedding dimension (a column of the ``(vocabulary, dim)`` table)."""
    if spec.kind == "embedding" or spec.fan_in_fan_out:
        norm = v.reshape(v.shape[0], -1).norm(dim=0)
        return v * (m / norm).view(1, -1)
    norm = v.reshape(v.shape[0], -1).norm(dim=1)
    return v * (m / norm).view(-1, *([1] * (v.dim() - 1)))


@formula("lora")
def lora(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """LoRA (Hu et al. 2021), rsLoRA's ``alpha / sqrt(r)``: ``W + (alpha / r) B A``."""
    return w + _scale(fields) * _lowrank_update(w, t["lora_A"], t["lora_B"], spec)


@formula("dora")
def dora(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """DoRA (Liu et al. 2024): ``m * V / ||V||`` with ``V = W + s B A``."""
    return _magnitude(lora(w, t, fields, spec), t["lora_magnitude"], spec)


_STARTS = (("lora", "pissa"), ("lora", "olora"))


@formula("pissa", asked_as=_STARTS)
def pissa(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """PiSSA / OLoRA (Meng et al. 2024; Büyükakyüz 2024) with the weight kept: PEFT's residual
    ``W - s B0 A0`` plus ``s B A``, i.e. ``W + s (B A - B0 A0)`` (the start frozen)."""
    s = _scale(fields)
    update = _lowrank_update(w, t["lora_A"], t["lora_B"], spec)
    start = _lowrank_update(w, t["lora_A0"], t["lora_B0"], spec)
    return w + s * (update - start)


@formula("pissa_dora", asked_as=tuple(("dora", init) for _, init in _STARTS))
def pissa_dora(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """DoRA on PiSSA's residual: ``m * V / ||V||`` with ``V = W + s (B A - B0 A0)``."""
    return _magnitude(pissa(w, t, fields, spec), t["lora_magnitude"], spec)


@formula(
    "oft", first={"rank": 2}, second={"rank": 2, "variant": lp.OFTConfig(cayley_neumann=False)}
)
def oft(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """OFT: a block-diagonal ``R`` from skew-symmetric blocks ``Q``.

    Input side (PEFT's OFT, Qiu et al. 2023): ``Q`` from the strict upper triangle ``oft_R``
    (row by row), ``R`` the Cayley–Neumann series ``I + 2Q + 2Q² + ... + 2Q^(n-2) + Q^(n-1)``
    or PEFT's exact ``(I - Q)(I + Q)⁻¹``; ``W' = W Rᵀ`` (an embedding: ``W R``). Output side
    (LyCORIS diag-OFT): ``Q = B - Bᵀ`` (norm-limited by ``constraint * fan_out``), ``R = (I +
    Q)(I - Q)⁻¹``, ``W' = diag(rescale) Rᵀ W`` by blocks of output rows.
    """
    b = int(fields["rank"])
    eye = torch.eye(b, dtype=torch.float64)
    if fields["side"] == "input":
        vec = t["oft_R"]
        q = torch.zeros(vec.shape[0], b, b, dtype=torch.float64)
        rows, cols = torch.triu_indices(b, b, 1)
        q[:, rows, cols] = vec
        q = q - q.transpose(1, 2)
        if fields["cayley_neumann"]:
            n = int(fields["neumann_terms"])
            r = eye + 2 * q if n > 1 else eye.expand_as(q).clone()
            power = q
            for k in range(2, n):
                power = power @ q
                r = r + (1 if k == n - 1 else 2) * power
        else:
            r = (eye - q) @ torch.linalg.inv(eye + q)
        blocks = spec.fan_in // b
        r = r.expand(blocks, b, b) if r.shape[0] == 1 else r
        rot = torch.block_diag(*r)  # (fan_in, fan_in)
        if spec.fan_in_fan_out:  # stored (in, out): W'ᵀ = R Wᵀ
            return rot @ w
        matrix = w.reshape(spec.fan_out, spec.fan_in)
        out = matrix @ rot if spec.kind == "embedding" else matrix @ rot.t()
        return out.reshape(w.shape)
    q = t["oft_blocks"] - t["oft_blocks"].transpose(1, 2)
    limit = float(fields["constraint"]) * spec.fan_out
    if limit > 0 and q.norm() > limit:
        q = q * (limit / q.norm())
    rot = torch.block_diag(*((eye + q) @ torch.linalg.inv(eye - q)))  # (fan_out, fan_out)
    matrix = w.t() if spec.fan_in_fan_out else w.reshape(spec.fan_out, -1)
    out = rot.t() @ matrix
    if "rescale" in t:
        out = out * t["rescale"].view(-1, 1)
    return out.t() if spec.fan_in_fan_out else out.reshape(w.shape)


def _as_stored(w: Tensor, delta: Tensor, spec: Any) -> Tensor:
    """An update in the matrix view ``(fan_out, fan_in)`` laid out as the stored ``w``."""
    return (delta.t() if spec.fan_in_fan_out else delta).reshape(w.shape)


def _tucker(t: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """FedPara's tucker form: ``einsum("i j ..., j r, i p -> p r ...")``, ``(out, in, *k)``."""
    return torch.einsum("ij...,jr,ip->pr...", t, w_b, w_a)


@formula("loha")
def loha(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """LoHa (FedPara, Hyeon-Woo et al. 2022): ``W + s (w1a w1b) ⊙ (w2a w2b)``; each half in
    the tucker form ``t ×1 w_a ×2 w_b`` on a k×k convolution with ``use_tucker``."""
    if "hada_t1" in t:
        h1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"]).reshape(spec.fan_out, -1)
        h2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]).reshape(spec.fan_out, -1)
    else:
        h1 = t["hada_w1_a"] @ t["hada_w1_b"]
        h2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return w + _scale(fields) * _as_stored(w, h1 * h2, spec)


@formula("lokr")
def lokr(w: Tensor, t: Mapping[str, Tensor], fields: Mapping[str, Any], spec: Any) -> Tensor:
    """LoKr (LyCORIS, Yeh et al. 2024): ``W + s kron(w1, w2)``, ``w1`` ``(a, c)`` full or
    ``w1_a w1_b``, ``w2`` ``(b, d·k)`` full, ``w2_a w2_b`` or the tucker ``t2 ×1 w2_a ×2
    w2_b``; ``fan_out = a·b``, ``fan_in = c·d·k``."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:
        w2 = torch.einsum("ij...,ip,jr->pr...", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    elif "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    delta = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    return w + _scale(fields) * _as_stored(w, delta, spec)


def apply_formula(variant: str, weight: Tensor, entry: Any) -> Tensor:
    """``W'`` of ``entry`` (an adapter entry of ``variant``) on ``weight``, in float64.

    Raises:
        AssertionError: No formula is registered for the variant.
    """
    if variant not in VARIANTS:
        raise AssertionError(
            f"no reference formula for variant {variant!r}: add one to "
            "tests/crossproduct/formulas.py (@formula(name))."
        )
    tensors = {k: v.detach().to(torch.float64) for k, v in entry.tensors().items()}
    return VARIANTS[variant].formula(weight.to(torch.float64), tensors, entry.fields(), entry.spec)
