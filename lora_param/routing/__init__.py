"""Many adapters on one base: per-example adapters in one batch, hot-swapping, arithmetic."""

from .arithmetic import CombineReport, combine_adapters
from .hotswap import hotswap_lora, prepare_hotswap
from .mixed import BASE, mixed_adapters

__all__ = [
    "BASE",
    "CombineReport",
    "combine_adapters",
    "hotswap_lora",
    "mixed_adapters",
    "prepare_hotswap",
]
