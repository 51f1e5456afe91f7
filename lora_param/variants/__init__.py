"""Adapter variants, one file each on the variant protocol (:mod:`lora_param.core.variant`).

Importing this package registers them: plain LoRA (and rsLoRA; per expert on 3-D expert
tensors), DoRA, LoRA / DoRA started from the weight (PiSSA, OLoRA: ``init="pissa"``), OFT,
LoHa and LoKr.
"""

from . import dora, loha, lokr, lora, oft, pissa
from .dora import DoRAConfig, DoRAParametrization
from .experts import ExpertLoRAParametrization
from .loha import LoHaConfig, LoHaParametrization
from .lokr import LoKrConfig, LoKrParametrization
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
loha._register()
lokr._register()

__all__ = [
    "DoRAConfig",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "LoHaConfig",
    "LoHaParametrization",
    "LoKrConfig",
    "LoKrParametrization",
    "LoRAParametrization",
    "OFTConfig",
    "OFTParametrization",
    "PiSSAConfig",
    "PiSSADoRAConfig",
    "PiSSADoRAParametrization",
    "PiSSAParametrization",
    "PlainLoRAConfig",
]
