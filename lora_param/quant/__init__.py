"""Packed frozen bases under adapters (QLoRA): NF4 or int8 weights as a base store.

``quantize_base(model)`` stores matching weights packed and dequantizes them on use;
``add_lora(model, ..., quantize="nf4")`` does both in one call; ``dequantize_base(model)``
gives plain weights back. Pure PyTorch (CPU and CUDA); NF4 codes and scales are laid out as
bitsandbytes lays them out. Layers bitsandbytes quantized itself (``Linear4bit``,
``Linear8bitLt``) take adapters through :mod:`.bnb`. Importing this package registers its
quantization methods (:class:`NF4Config`, :class:`Int8Config`) and the bitsandbytes layers
with the core.
"""

from ..core.config import register_quantization
from ..core.inject import register_target_preparer
from ..core.targets import register_target_provider
from .api import (
    QUANTIZABLE_KINDS,
    Int8Config,
    NF4Config,
    dequantize_base,
    pack_with,
    quantize_base,
    quantize_targets,
)
from .bnb import BnbWeight, bnb_targets, prepare_bnb_targets
from .packed import iter_quantized, packed_head
from .weight import METHODS, QuantizedWeight

register_quantization(NF4Config, pack_with)
register_quantization(Int8Config, pack_with)
register_target_provider(bnb_targets)
register_target_preparer(prepare_bnb_targets)

__all__ = [
    "METHODS",
    "QUANTIZABLE_KINDS",
    "BnbWeight",
    "Int8Config",
    "NF4Config",
    "QuantizedWeight",
    "dequantize_base",
    "iter_quantized",
    "packed_head",
    "quantize_base",
    "quantize_targets",
]
