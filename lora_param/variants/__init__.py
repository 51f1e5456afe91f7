"""Adapter variants, one file each on the variant protocol (:mod:`lora_param.core.variant`).

Importing this package registers them: plain LoRA (and rsLoRA; per expert on 3-D expert
tensors), DoRA, LoRA / DoRA started from the weight (PiSSA, OLoRA: ``init="pissa"``) and OFT.
"""

from . import dora, lora, oft, pissa
from .dora import DoRAConfig, DoRAParametrization
from .experts import ExpertLoRAParametrization
from .lora import LoRAParametrization, PlainLoRAConfig
from .oft import OFTConfig, OFTParametrization
from .pissa import (
    PiSSAConfig,
    PiSSADoRAConfig,
    PiSSADoRAParametrization,
    PiSSAParametrization,
)

lora._register()
dora._register()
pissa._register()
oft._register()

__all__ = [
    "DoRAConfig",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "LoRAParametrization",
    "OFTConfig",
    "OFTParametrization",
    "PiSSAConfig",
    "PiSSADoRAConfig",
    "PiSSADoRAParametrization",
    "PiSSAParametrization",
    "PlainLoRAConfig",
]
