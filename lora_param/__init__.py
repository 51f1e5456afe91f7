"""LoRA for any PyTorch model in one call, through ``torch.nn.utils.parametrize``.

Example:
    >>> model = add_lora(model, ["fc1", "fc2"], rank=4)   # base frozen, adapters trainable
    >>> with lora_disabled(model):                         # exactly the pretrained model
    ...     base_out = model(x)
    >>> save_lora(model, "adapter.pt"); merge_lora(model)
"""

from .core.copies import TrainableCopy, iter_copies
from .core.errors import LoRAError
from .core.eval_cache import eval_cache_bytes, set_eval_cache
from .core.forward import FACTORED_KINDS
from .core.hf_save import merged_state_dict
from .core.inject import add_lora, find_targets
from .core.io import load_base_state_dict, load_lora, lora_state_dict, save_lora
from .core.lookup import (
    active_adapters,
    adapter_parameters,
    clear_lora_cache,
    iter_lora,
    list_adapters,
)
from .core.merge import merge_lora, remove_lora
from .core.strength import adapter_scale, set_adapter_scale
from .core.summary import ParameterCounts, parameter_counts, trainable_summary
from .core.toggles import disable_lora, enable_lora, lora_disabled, set_active_adapters
from .interop.kohya import export_kohya, import_kohya
from .interop.peft import export_peft, import_peft
from .quant import RequantizationWarning, dequantize_base, quantize_base
from .routing import (
    CombineReport,
    combine_adapters,
    hotswap_lora,
    mixed_adapters,
    prepare_hotswap,
)
from .variants.dora import DoRAParametrization
from .variants.experts import ExpertLoRAParametrization
from .variants.lora import LoRAParametrization

__version__ = "0.2.2"

__all__ = [
    "FACTORED_KINDS",
    "CombineReport",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "LoRAError",
    "LoRAParametrization",
    "ParameterCounts",
    "RequantizationWarning",
    "TrainableCopy",
    "active_adapters",
    "adapter_parameters",
    "adapter_scale",
    "add_lora",
    "clear_lora_cache",
    "combine_adapters",
    "dequantize_base",
    "disable_lora",
    "enable_lora",
    "eval_cache_bytes",
    "export_kohya",
    "export_peft",
    "find_targets",
    "hotswap_lora",
    "import_kohya",
    "import_peft",
    "iter_copies",
    "iter_lora",
    "list_adapters",
    "load_base_state_dict",
    "load_lora",
    "lora_disabled",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "mixed_adapters",
    "parameter_counts",
    "prepare_hotswap",
    "quantize_base",
    "remove_lora",
    "save_lora",
    "set_active_adapters",
    "set_adapter_scale",
    "set_eval_cache",
    "trainable_summary",
]
