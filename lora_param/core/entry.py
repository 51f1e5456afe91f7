"""What an adapter owns on one tensor: the common part of LoRA-like updates and trained copies.

A tensor's parametrization list can hold three kinds of things lora_param puts there: a base
store (:mod:`.store`, a packed frozen weight), adapters' updates (:mod:`.variant`) and
adapters' own trained copies of the tensor (:mod:`.copies`, a head from ``trainable=``, a bias
from ``bias=``). The last two belong to an adapter: they switch on and off with it, train with
it and are saved with it. :class:`AdapterEntry` is what they share.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["AdapterEntry"]


class AdapterEntry(nn.Module):
    """One adapter's entry on one tensor (an update or a trained copy).

    Args:
        adapter: Name of the adapter the entry belongs to.
    """

    def __init__(self, adapter: str = "default") -> None:
        super().__init__()
        self.adapter = adapter
        self._enabled = True
        self._grad_when_enabled: dict[str, bool] = {}

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """The tensors the adapter trains here, by name."""
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        """Whether the entry applies.

        A disabled entry is also frozen (no gradient, nothing unused for DDP); enabling it
        again restores the ``requires_grad`` flags its tensors had (a frozen one stays frozen).
        """
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        value = bool(value)
        if value == self._enabled:
            return
        trainable = self.trainable_tensors()
        if value:
            for name, t in trainable.items():
                t.requires_grad_(self._grad_when_enabled.get(name, True))
        else:
            self._grad_when_enabled = {n: t.requires_grad for n, t in trainable.items()}
            for t in trainable.values():
                t.requires_grad_(False)
        self._enabled = value
        self.clear_cache()

    def active(self, select: str | None) -> bool:
        """Whether the entry applies: enabled, or (``select`` given) belonging to ``select``."""
        return self._enabled if select is None else self.adapter == select

    def cache_key(self) -> tuple:
        """Hashable state besides tensors that changes the entry's output (eval cache)."""
        return (self._enabled,)

    def cache_tensors(self) -> list[Tensor]:
        """Every tensor the entry's output depends on besides its input (eval cache)."""
        return [*self.parameters(), *self.buffers()]

    def clear_cache(self) -> None:
        """Drop any value the entry keeps across calls (entries with caches extend this)."""
