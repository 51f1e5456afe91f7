"""The evaluation cache: one implementation, its policy, its bytes.

Under ``torch.no_grad()`` an adapted tensor can either keep its adapted value ``W'`` (LoRA-on
evaluation then costs exactly what the merged model costs, at the price of one more copy of the
weight) or compute it again for each forward (the factored layers never form it at all: no
extra memory, what PEFT does). Small weights gain most from the cache and cost little memory;
on big models the copies add up to a second model. ``"auto"`` (the default) caches weights of
at most :data:`AUTO_EVAL_CACHE_MAX_NUMEL` elements; ``set_eval_cache`` sets a policy per model,
optionally under a byte budget.

There is one cache per adapted tensor (not per adapter): it holds the tensor's value with every
enabled adapter applied, whatever the variants are. A packed (quantized) base is never cached:
a full-precision copy is what packing exists to avoid. :class:`VersionedCache` is the one
mechanism behind every cache of the library (this one, DoRA's weight norms, the stacked
factors of mixed batches): a value kept until any tensor it was computed from changes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Literal, get_args

from torch import Tensor, nn

from .errors import LoRAError

__all__ = [
    "AUTO_EVAL_CACHE_MAX_NUMEL",
    "EvalCachePolicy",
    "VersionedCache",
    "eval_cache_bytes",
    "set_eval_cache",
]

#: The default ("auto") rule keeps ``W'`` only for weights of at most this many elements (3 Mi):
#: there the cache makes evaluation as fast as the merged model (the factored
#: ``base(x) + s*B(A x)`` measured 1.09x / 1.11x merged on 1536-wide and 512x512x3x3 layers of
#: 2.36 M elements), while an LLM's projections (2048 x 2048 = 4 Mi and up) stay factored: a
#: cached copy would add a whole weight's memory per layer.
AUTO_EVAL_CACHE_MAX_NUMEL = 3 << 20

EvalCachePolicy = Literal["auto", "always", "never"]


class VersionedCache:
    """A tensor computed from other tensors, kept until one of them changes.

    A stored value is returned while every input is the very same tensor object with the same
    version counter (in-place updates: optimizer steps, ``copy_``) and the same data pointer
    (``.data =``, ``.to()``), and the extra key (scales, flags) is equal. In-place edits through
    ``.data`` bump no counter: :meth:`clear` then.
    """

    __slots__ = ("_inputs", "_stamp", "value")

    def __init__(self) -> None:
        self._inputs: tuple[Tensor, ...] = ()
        self._stamp: tuple = ()
        self.value: Tensor | tuple[Tensor, ...] | None = None

    @staticmethod
    def _stamp_of(inputs: Sequence[Tensor], extra: Hashable) -> tuple:
        # Identity by id(): the cache holds the input tensors themselves (``_inputs``), so no
        # other object can take one of their ids while the stamp is compared against them.
        return (*[(id(t), t._version, t.data_ptr()) for t in inputs], extra)

    def get(self, inputs: Sequence[Tensor], extra: Hashable = None) -> Tensor | tuple | None:
        """The stored value if it was computed from exactly these inputs, else None."""
        if self.value is None:
            return None
        return self.value if self._stamp_of(inputs, extra) == self._stamp else None

    def put(
        self, inputs: Sequence[Tensor], extra: Hashable, value: Tensor | tuple[Tensor, ...]
    ) -> None:
        """Keep ``value`` as computed from ``inputs`` and ``extra``."""
        self._inputs = tuple(inputs)
        self._stamp = self._stamp_of(inputs, extra)
        self.value = value

    def clear(self) -> None:
        """Forget the stored value."""
        self._inputs, self._stamp, self.value = (), (), None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored value (0 when empty)."""
        value = self.value
        if value is None:
            return 0
        tensors = value if isinstance(value, tuple) else (value,)
        return sum(t.numel() * t.element_size() for t in tensors)


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
    """Choose which adapted tensors keep their adapted value while evaluating under no_grad.

    Evaluation results are the same either way (the factored and cached paths agree to
    rounding); only speed and memory differ. Cached values already held are dropped, so the
    new policy takes effect at the next forward. Tensors adapted later start with the default
    ``"auto"`` rule (``max_numel`` = ``AUTO_EVAL_CACHE_MAX_NUMEL``, no budget). A packed
    (quantized) base is never cached, whatever the policy.

    Args:
        model: A model with adapters.
        policy: ``"auto"``: cache weights of at most ``max_numel`` elements, smallest first
            while the copies fit in ``budget_bytes``; ``"always"``: cache every tensor (the
            fastest evaluation, one extra copy of every adapted weight); ``"never"``: cache
            none (evaluation memory as without LoRA; factored layers stay factored and the
            materialized ones, such as ``nn.MultiheadAttention``'s ``in_proj_weight``, form
            the adapted weight for each forward and free it).
        max_numel: Under ``"auto"``, the largest weight (in elements) that may be cached.
        budget_bytes: Under ``"auto"``, the most bytes all copies together may take (None: no
            limit beyond ``max_numel``).

    Returns:
        ``{tensor path: cached}`` for every adapted tensor.

    Raises:
        LoRAError: Unknown policy, negative limits, or a model without adapters.
    """
    from .entries import adapter_lists  # entries imports this module

    _check_arguments(policy, max_numel, budget_bytes)
    lists = adapter_lists(model, with_adapters=True)
    if not lists:
        raise LoRAError("this model has no adapters; call add_lora before set_eval_cache.")
    decisions = {path: policy == "always" for path, _ in lists}
    if policy == "auto":
        room = math.inf if budget_bytes is None else budget_bytes
        small = [(path, plist) for path, plist in lists if plist.weight_numel() <= max_numel]
        for path, plist in sorted(small, key=lambda item: item[1].cache_cost()):
            if plist.cache_cost() > room:
                break
            decisions[path] = True
            room -= plist.cache_cost()
    report: dict[str, bool] = {}
    for path, plist in lists:
        plist.eval_cache = decisions[path] and plist.cacheable()
        plist.clear_cache()
        report[path] = plist.eval_cache
    return report


def eval_cache_bytes(model: nn.Module) -> int:
    """Bytes the evaluation caches of the model's adapted tensors hold right now.

    A cache is filled by a forward under ``torch.no_grad()`` (see :func:`set_eval_cache`) and
    freed by the next forward with gradients, ``model.train()``/``eval()`` or ``.to()``.

    Args:
        model: Any module.

    Returns:
        The bytes of the cached adapted weights (0 when none is held).
    """
    from .entries import adapter_lists  # entries imports this module

    return sum(plist.cache_nbytes() for _, plist in adapter_lists(model))
