"""Adapter variants, one file each on the variant protocol (:mod:`lora_param.core.variant`).

Importing this package registers them: plain LoRA (and rsLoRA; per expert on 3-D expert
tensors) and DoRA.
"""

from . import dora, lora
from .dora import DoRAConfig, DoRAParametrization
from .experts import ExpertLoRAParametrization
from .lora import LoRAParametrization, PlainLoRAConfig

lora._register()
dora._register()

__all__ = [
    "DoRAConfig",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "LoRAParametrization",
    "PlainLoRAConfig",
]
