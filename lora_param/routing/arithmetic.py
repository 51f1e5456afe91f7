"""Exact adapter arithmetic: a new adapter from a weighted combination of existing ones.

Every method works on each layer's true update ``ΔWᵢ = sᵢ · Bᵢ Aᵢ`` in the adapter's matrix
view ``(fan_out, fan_in)`` (a conv weight flattened over its input channels and kernel, an HF
Conv1D seen untransposed), so scales (rsLoRA included), negative weights and layer kinds need
no special case: the new adapter's ``A`` and ``B`` live in that same view.

- ``"cat"``: ``A = [A₁; A₂; ...]``, ``B = [w₁s₁B₁, w₂s₂B₂, ...]``: exactly ``Σ wᵢ ΔWᵢ`` at
  rank ``Σ rᵢ``.
- ``"svd"``: ``Σ wᵢ ΔWᵢ`` truncated to ``rank`` by SVD (the best approximation of that rank,
  computed from the factors through two QR decompositions, never the full matrix).
- ``"ties"``, ``"dare"``, ``"magnitude_prune"``: the task-vector merges applied to the full
  ``wᵢ ΔWᵢ`` (not to A and B separately), then SVD to ``rank``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..core.copies import CopyPlan, TrainableCopy, iter_copies, register_copies
from ..core.distributed import refuse_sharded
from ..core.entries import entry_list
from ..core.errors import LoRAError
from ..core.forward import is_installed
from ..core.inject import Mode, check_adapter_name, inject
from ..core.lookup import check_adapters_exist, iter_lora, list_adapters
from ..core.merge import remove_lora
from ..core.targets import parameter_target
from ..core.variant import AdapterVariant, require

__all__ = ["CombineMethod", "CombineReport", "combine_adapters"]

CombineMethod = Literal["cat", "svd", "ties", "dare", "magnitude_prune"]
_METHODS = ("cat", "svd", "ties", "dare", "magnitude_prune")
_PRUNING = ("ties", "dare", "magnitude_prune")


@dataclass
class CombineReport:
    """What ``combine_adapters`` built.

    Attributes:
        adapter: Name of the new adapter.
        method: The method used.
        ranks: Rank of the new adapter per tensor path.
        relative_error: Per tensor path, ``‖ΔW − ΔW_r‖_F / ‖ΔW‖_F`` where ``ΔW`` is the
            method's full-rank result and ``ΔW_r`` the adapter built (0 for ``"cat"``).
    """

    adapter: str
    method: str
    ranks: dict[str, int] = field(default_factory=dict)
    relative_error: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest relative error over the layers."""
        return max(self.relative_error.values(), default=0.0)

    def __str__(self) -> str:
        lines = [
            f"adapter {self.adapter!r} ({self.method}): max relative error {self.max_error:.3g}"
        ]
        lines += [
            f"  {path}: rank {self.ranks[path]}, relative error {err:.3g}"
            for path, err in self.relative_error.items()
        ]
        return "\n".join(lines)


def _check_args(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: str,
    rank: int | None,
    density: float | None,
) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise LoRAError(
            f"weights must be a non-empty mapping {{adapter: weight}}, got {weights!r}."
        )
    for adapter, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w != w:
            raise LoRAError(f"the weight of adapter {adapter!r} must be a number, got {w!r}.")
    check_adapters_exist(model, list(weights))
    check_adapter_name(name)
    if name in list_adapters(model):
        raise LoRAError(f"adapter {name!r} already exists; pass another name=.")
    if method not in _METHODS:
        raise LoRAError(f"method must be one of {list(_METHODS)}, got {method!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise LoRAError(f"rank must be a positive integer or None, got {rank!r}.")
    if method == "cat" and rank is not None:
        raise LoRAError("method='cat' has rank = the sum of the ranks; leave rank=None.")
    if method in _PRUNING:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise LoRAError(f"method={method!r} needs density= in (0, 1], got {density!r}.")
        if not 0 < density <= 1:
            raise LoRAError(f"density must be in (0, 1], got {density!r}.")
    elif density is not None:
        raise LoRAError(f"density= applies to {list(_PRUNING)} only, not to {method!r}.")


Source = tuple[float, AdapterVariant, "Tensor | None"]


def _sources(
    model: nn.Module, weights: Mapping[str, float], method: str
) -> dict[str, tuple[nn.Module, str, list[Source]]]:
    """Per tensor path of the union of targets: the module, the tensor, ``(weight, entry,
    base weight)`` (the base only for updates that depend on it)."""
    layers: dict[str, tuple[nn.Module, str, list[Source]]] = {}
    for path, module, tensor, p in iter_lora(model):
        if p.adapter not in weights:
            continue
        require(p, "combine", "combine_adapters", path)
        if method == "cat" and not p.lowrank_exact:
            raise LoRAError(
                f"combine_adapters(method='cat') concatenates exact low-rank factors, which a "
                f"{p.variant} adapter does not have ({p.adapter!r} on '{path}'); use "
                "method='svd' (its update, weighted and summed, truncated to a rank)."
            )
        base = None
        if not p.additive:
            plist = entry_list(module, tensor)
            assert plist is not None
            base = plist.base_value().detach()
        layers.setdefault(path, (module, tensor, []))[2].append(
            (float(weights[p.adapter]), p, base)
        )
    return layers


def _compute_dtype(entries: list[Source]) -> torch.dtype:
    return torch.float64 if entries[0][1].anchor().dtype == torch.float64 else torch.float32


def _stacked(entries: list[Source], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(Σr x fan_in, fan_out x Σr)`` factors whose product is exactly ``Σ wᵢ ΔWᵢ``."""
    factors = [(w, p.lowrank()) for w, p, _ in entries]
    a = torch.cat([f[0].detach().to(dtype) for _, f in factors if f is not None])
    b = torch.cat([f[1].detach().to(dtype) * w for w, f in factors if f is not None], 1)
    return a, b


def _matrix(p: AdapterVariant, delta: Tensor) -> Tensor:
    """An update in the entry's matrix view ``(fan_out, fan_in)``."""
    if p.fan_in_fan_out:
        return delta.reshape(p.fan_in, p.fan_out).t()
    return delta.reshape(p.fan_out, p.fan_in)


def _deltas(entries: list[Source], dtype: torch.dtype) -> list[Tensor]:
    """Each source's weighted update ``wᵢ ΔWᵢ`` in the matrix view."""
    out = []
    for w, p, base in entries:
        delta = p.delta(None if base is None else base.to(dtype)).to(dtype)
        out.append(_matrix(p, delta) * w)
    return out


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, int, float]:
    """Truncate ``U diag(s) Vh`` to ``rank``; return A, B, the rank and the relative error."""
    k = max(1, min(rank, s.numel()))
    total = s.square().sum()
    err = float((s[k:].square().sum() / total).sqrt()) if total > 0 else 0.0
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root, k, err


def _svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ``b @ a`` from the factors alone."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.t())
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)
    return qb @ u, s, vh @ qa.t()


def _prune(t: Tensor, density: float) -> Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude."""
    keep = round(density * t.numel())
    if keep >= t.numel():
        return t
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    if keep > 0:
        mask[t.abs().flatten().topk(keep).indices] = True
    return t * mask.view(t.shape)


def _task_merge(
    deltas: list[Tensor], method: str, density: float, generator: torch.Generator
) -> Tensor:
    """TIES, DARE or magnitude pruning over weighted updates ``wᵢ ΔWᵢ``."""
    if method == "dare":
        out = torch.zeros_like(deltas[0])
        for d in deltas:
            keep = torch.rand(d.shape, generator=generator, device=d.device, dtype=d.dtype)
            out += torch.where(keep < density, d / density, torch.zeros_like(d))
        return out
    trimmed = torch.stack([_prune(d, density) for d in deltas])
    if method == "magnitude_prune":
        return trimmed.sum(0)
    sign = trimmed.sum(0).sign()  # TIES: elect a sign per entry, average the agreeing ones
    agree = (trimmed.sign() == sign) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    method: CombineMethod = "cat",
    *,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
) -> CombineReport:
    """Create adapter ``name`` from a weighted combination of existing adapters.

    The new adapter covers the union of the sources' layers (a layer a source does not
    target contributes nothing from it), has scale 1 (``alpha = rank``) and is added enabled
    and trainable, like ``add_lora``; use ``set_active_adapters(model, name)`` to serve it
    alone. The sources stay as they are.

    Args:
        model: A model with plain LoRA adapters.
        weights: ``{adapter: weight}``; weights may be negative or zero.
        name: Name of the new adapter.
        method: ``"cat"`` (exact), ``"svd"``, ``"ties"``, ``"dare"`` or ``"magnitude_prune"``.
        rank: Rank of the new adapter for the SVD-based methods (default: the largest source
            rank on each layer); capped per layer at the rank of the combined update.
        density: Fraction of entries kept by ``"ties"``, ``"dare"``, ``"magnitude_prune"``.
        seed: Seed of DARE's random drop.

    Returns:
        A :class:`CombineReport` with the rank and relative error of every layer.

    Raises:
        LoRAError: Unknown or non-plain adapters, a taken or invalid name, bad method, rank or
            density, a sharded (FSDP2) model (the new adapter's tensors would be parameters
            FSDP2 does not manage). Nothing is changed then.
    """
    _check_args(model, weights, name, method, rank, density)
    refuse_sharded(
        model,
        "combine_adapters",
        "Combine before fully_shard; after distributed training, save_lora on every rank, "
        "then in one process load_lora the file into the unsharded base model, combine there "
        "and save_lora the result.",
    )
    layers = _sources(model, weights, method)
    copies = _copies(model, weights)
    generator = torch.Generator().manual_seed(seed)
    report = CombineReport(name, method)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for path, (_, _, entries) in layers.items():
            dtype = _compute_dtype(entries)
            err = 0.0
            if method == "cat":
                a, b = _stacked(entries, dtype)
            else:
                target_rank = rank or max(int(getattr(p, "rank", 1)) for _, p, _ in entries)
                if method == "svd" and all(p.lowrank_exact for _, p, _ in entries):
                    u, s, vh = _svd_of_product(*reversed(_stacked(entries, dtype)))
                elif method == "svd":
                    u, s, vh = torch.linalg.svd(sum(_deltas(entries, dtype)), full_matrices=False)
                else:
                    deltas = _deltas(entries, dtype)
                    merged = _task_merge(deltas, method, float(density or 1.0), generator)
                    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
                a, b, _, err = _split(u, s, vh, target_rank)
            factors[path] = (a, b)
            report.ranks[path] = a.shape[0]
            report.relative_error[path] = err
    _register(model, name, layers, factors, copies)
    return report


def _copies(model: nn.Module, weights: Mapping[str, float]) -> dict[str, TrainableCopy]:
    """The sources' trained copies of heads and biases, carried over to the new adapter.

    Raises:
        LoRAError: Two sources train the same tensor (which value would the new adapter hold?).
    """
    found: dict[str, TrainableCopy] = {}
    for path, _, _, c in iter_copies(model):
        if c.adapter not in weights:
            continue
        if path in found:
            raise LoRAError(
                f"adapters {found[path].adapter!r} and {c.adapter!r} both train '{path}' in "
                "full (trainable= / bias=); combine_adapters cannot pick one of their values. "
                "Combine adapters that train different heads, or remove one copy first."
            )
        found[path] = c
    return found


def _register(
    model: nn.Module,
    name: str,
    layers: Mapping[str, tuple[nn.Module, str, list]],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    copies: Mapping[str, TrainableCopy],
) -> None:
    """Inject the new adapter (factored where the layer is), fill in its factors, and give it
    the sources' trained copies."""
    names = {id(m): n for n, m in model.named_modules()}
    plans: dict[Mode, list] = {"factored": [], "materialized": []}
    for path, (module, tensor, _) in layers.items():
        target = parameter_target(names[id(module)], module, tensor)
        k = factors[path][0].shape[0]
        fields = {
            "variant": "lora",
            "rank": k,
            "alpha": float(k),
            "dropout": 0.0,
            "init": "kaiming",
            "use_rslora": False,
        }
        mode: Mode = "factored" if is_installed(module) else "materialized"
        plans[mode].append((target, fields))
    copy_plans = []
    for path, c in copies.items():
        module_name, _, tensor = path.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        copy_plans.append(CopyPlan(path, module, tensor, c.role, c.owner))
    try:
        register_copies(copy_plans, name, {path: c.value.detach() for path, c in copies.items()})
        for mode, plan in plans.items():
            if plan:
                inject(model, plan, adapter=name, mode=mode)
    except BaseException:
        if name in list_adapters(model):
            remove_lora(model, name)
        raise
    with torch.no_grad():
        for path, _, _, p in iter_lora(model):
            if p.adapter == name:
                a, b = factors[path]
                p.tensors()["lora_A"].copy_(a)
                p.tensors()["lora_B"].copy_(b)
