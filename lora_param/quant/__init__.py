"""A packed frozen base under LoRA (QLoRA): NF4 or int8 weights as a parametrization.

``quantize_base(model)`` stores matching weights packed and dequantizes them on use;
``add_lora(model, ..., quantize="nf4")`` does both in one call; ``dequantize_base(model)``
gives plain weights back. Pure PyTorch (CPU and CUDA); NF4 codes and scales are laid out as
bitsandbytes lays them out.
"""

from .api import QUANTIZABLE_KINDS, dequantize_base, quantize_base, quantize_targets
from .merge import RequantizationWarning
from .packed import iter_quantized, packed_head
from .weight import METHODS, QuantizedWeight

__all__ = [
    "METHODS",
    "QUANTIZABLE_KINDS",
    "QuantizedWeight",
    "RequantizationWarning",
    "dequantize_base",
    "iter_quantized",
    "packed_head",
    "quantize_base",
    "quantize_targets",
]
