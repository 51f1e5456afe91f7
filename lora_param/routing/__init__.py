"""Many adapters on one base: per-example adapters in one batch, hot-swapping, arithmetic."""

from .mixed import BASE, mixed_adapters

__all__ = ["BASE", "mixed_adapters"]
