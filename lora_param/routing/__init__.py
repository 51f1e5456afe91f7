"""Many adapters on one base: per-example adapters in one batch, hot-swapping, arithmetic."""

from .hotswap import hotswap_lora, prepare_hotswap
from .mixed import BASE, mixed_adapters

__all__ = ["BASE", "hotswap_lora", "mixed_adapters", "prepare_hotswap"]
