"""Per-adapter strength at inference: scale one adapter's effect, as diffusers' ``set_adapters``.

The strength multiplies the adapter's scale (``alpha / rank``), so the update becomes
``strength * alpha / rank * B @ A``: exact, and as cheap as any other scale. It is a transient
setting, like ``enabled``: files written by ``save_lora``, ``export_peft`` and ``export_kohya``
keep the adapter's own ``alpha``, so a saved adapter loads at strength 1.
"""

from __future__ import annotations

import math

from torch import nn

from .errors import LoRAError
from .lookup import check_adapters_exist, iter_lora
from .variant import require

__all__ = ["adapter_scale", "set_adapter_scale"]


def set_adapter_scale(model: nn.Module, adapter: str, strength: float) -> None:
    """Set how strongly an adapter acts: ``0`` removes its effect, ``1`` is as trained.

    Mixing two style LoRAs at 0.6 and 0.3 is two calls. Negative strengths subtract the
    adapter. The setting is not saved with the adapter (see the module docstring).

    Args:
        model: A model with adapters.
        adapter: Adapter name.
        strength: Any finite number; the adapter's scale becomes ``strength * alpha / rank``.

    Raises:
        LoRAError: Unknown adapter, a strength that is not a finite number, or an adapter whose
            variant has no scale (nothing is changed then).
    """
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
    ):
        raise LoRAError(f"strength must be a finite number, got {strength!r}.")
    check_adapters_exist(model, [adapter])
    entries = [(path, p) for path, _, _, p in iter_lora(model) if p.adapter == adapter]
    for path, p in entries:
        require(p, "strength", "set_adapter_scale", path)
    for _, p in entries:
        p.set_strength(float(strength))


def adapter_scale(model: nn.Module, adapter: str) -> float:
    """The strength set by :func:`set_adapter_scale` (1.0 when never set).

    Args:
        model: A model with adapters.
        adapter: Adapter name.

    Returns:
        The adapter's strength (its scale is ``strength * alpha / rank``).

    Raises:
        LoRAError: No adapter of that name.
    """
    check_adapters_exist(model, [adapter])
    for *_, p in iter_lora(model):
        if p.adapter == adapter:
            return float(getattr(p, "strength", 1.0))
    return 1.0
