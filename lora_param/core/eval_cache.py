"""The evaluation-cache policy: when LoRA-on evaluation keeps a ``W + sBA`` copy per layer.

Under ``torch.no_grad()`` an adapted layer can either cache ``W + sBA`` (evaluation then costs
exactly what the merged model costs, at the price of one more copy of the weight) or compute
``base(x) + s*B(A x)`` without ever forming ``W + sBA`` (no extra memory: what PEFT does). Small
layers gain most from the cache and cost little memory; on big models the copies add up to a
second model. ``"auto"`` (the default) caches small weights only; ``set_eval_cache`` sets a
policy per model, optionally under a byte budget.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from torch import nn

from ..variants.lora import AUTO_EVAL_CACHE_MAX_NUMEL, LoRAParametrization
from .errors import LoRAError
from .lookup import iter_lora

__all__ = ["EvalCachePolicy", "eval_cache_bytes", "set_eval_cache"]

EvalCachePolicy = Literal["auto", "always", "never"]


def _cache_bytes(p: LoRAParametrization) -> int:
    return math.prod(p.weight_shape) * p.lora_B.element_size()


def _check_arguments(policy: str, max_numel: int, budget_bytes: int | None) -> None:
    if policy not in get_args(EvalCachePolicy):
        raise LoRAError(
            f"unknown eval-cache policy {policy!r}; use 'auto' (cache small weights only), "
            "'always' (fastest, one weight copy per layer) or 'never' (no copy)."
        )
    if max_numel < 0:
        raise LoRAError(f"max_numel must be >= 0, got {max_numel}.")
    if budget_bytes is not None and budget_bytes < 0:
        raise LoRAError(f"budget_bytes must be >= 0 or None (no budget), got {budget_bytes}.")


def set_eval_cache(
    model: nn.Module,
    policy: EvalCachePolicy = "auto",
    *,
    max_numel: int = AUTO_EVAL_CACHE_MAX_NUMEL,
    budget_bytes: int | None = None,
) -> dict[str, bool]:
    """Choose which adapted layers keep a ``W + sBA`` copy while evaluating under no_grad.

    Evaluation results are the same either way (the factored and cached paths agree to
    rounding); only speed and memory differ. Cached copies already held are dropped, so the
    new policy takes effect at the next forward. Layers adapted later start with the default
    ``"auto"`` rule (``max_numel`` = ``AUTO_EVAL_CACHE_MAX_NUMEL``, no budget).

    Args:
        model: A model with adapters.
        policy: ``"auto"``: cache weights of at most ``max_numel`` elements, smallest first
            while the copies fit in ``budget_bytes``; ``"always"``: cache every layer (the
            fastest evaluation, one extra copy of every adapted weight); ``"never"``: cache
            none (evaluation memory as without LoRA; factored layers stay factored and the
            materialized ones, such as ``nn.MultiheadAttention``'s ``in_proj_weight``, form
            ``W + sBA`` for each forward and free it).
        max_numel: Under ``"auto"``, the largest weight (in elements) that may be cached.
        budget_bytes: Under ``"auto"``, the most bytes all copies together may take (None: no
            limit beyond ``max_numel``).

    Returns:
        ``{tensor path: cached}`` for every adapted tensor (with several adapters on one
        tensor, the path is suffixed with ``[adapter]``).

    Raises:
        LoRAError: Unknown policy, negative limits, or a model without adapters.
    """
    _check_arguments(policy, max_numel, budget_bytes)
    entries = [(path, p) for path, _, _, p in iter_lora(model)]
    if not entries:
        raise LoRAError("this model has no adapters; call add_lora before set_eval_cache.")
    decisions = {id(p): policy == "always" for _, p in entries}
    if policy == "auto":
        room = math.inf if budget_bytes is None else budget_bytes
        small = [p for _, p in entries if math.prod(p.weight_shape) <= max_numel]
        for p in sorted(small, key=_cache_bytes):
            if _cache_bytes(p) > room:
                break
            decisions[id(p)] = True
            room -= _cache_bytes(p)
    counts: dict[str, int] = {}
    for path, _ in entries:
        counts[path] = counts.get(path, 0) + 1
    report: dict[str, bool] = {}
    for path, p in entries:
        p.eval_cache = decisions[id(p)]
        p.clear_cache()
        report[path if counts[path] == 1 else f"{path}[{p.adapter}]"] = p.eval_cache
    return report


def eval_cache_bytes(model: nn.Module) -> int:
    """Bytes the evaluation caches of the model's adapters hold right now."""
    held = {}
    for *_, p in iter_lora(model):
        cache = p._cache
        if cache is not None:
            held[id(cache[4])] = cache[4].numel() * cache[4].element_size()
    return sum(held.values())
