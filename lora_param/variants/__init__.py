"""Adapter variants, one file each on the variant protocol (:mod:`lora_param.core.variant`).

Importing this package registers them: plain LoRA (and rsLoRA; per expert on 3-D expert
tensors), DoRA and OFT.
"""

from . import dora, lora, oft
from .dora import DoRAConfig, DoRAParametrization
from .experts import ExpertLoRAParametrization
from .lora import LoRAParametrization, PlainLoRAConfig
from .oft import OFTConfig, OFTParametrization

lora._register()
dora._register()
oft._register()

__all__ = [
    "DoRAConfig",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "LoRAParametrization",
    "OFTConfig",
    "OFTParametrization",
    "PlainLoRAConfig",
]
