"""LoRA for any PyTorch model in one call, through ``torch.nn.utils.parametrize``.

Example:
    >>> model = add_lora(model, ["fc1", "fc2"], rank=4)   # base frozen, adapters trainable
    >>> with lora_disabled(model):                         # exactly the pretrained model
    ...     base_out = model(x)
    >>> save_lora(model, "adapter.pt"); merge_lora(model)

``LoRATrainer`` (a ``transformers.Trainer``) is importable from here too; it is built on first
access, so ``import lora_param`` never imports transformers (and it is not in ``__all__``, so
``from lora_param import *`` does not import it either).
"""

from typing import TYPE_CHECKING, Any

from . import interop as _interop  # noqa: F401  (registers the format codecs)

# The core knows only protocols; the plug-ins register themselves when imported here.
from . import quant as _quant  # noqa: F401  (registers NF4/int8 and bitsandbytes layers)
from . import variants as _variants  # noqa: F401  (registers LoRA, DoRA, per-expert LoRA)
from ._compat import install as _install_compat
from .core.config import LoRAConfig, QuantizationConfig
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
    iter_entries,
    iter_lora,
    list_adapters,
)
from .core.merge import RequantizationWarning, merge_lora, remove_lora
from .core.merged_export import save_merged
from .core.store import BaseStore
from .core.strength import adapter_scale, set_adapter_scale
from .core.summary import ParameterCounts, parameter_counts, trainable_summary
from .core.targets import LayerSpec
from .core.toggles import disable_lora, enable_lora, lora_disabled, set_active_adapters
from .core.variant import (
    AdapterVariant,
    VariantConfig,
    register_init,
    register_variant,
    variant_names,
)
from .interop.kohya import export_kohya, import_kohya
from .interop.peft import export_peft, import_peft
from .interop.transformers import LoRATrainerMixin
from .quant import Int8Config, NF4Config, dequantize_base, quantize_base
from .routing import (
    CombineReport,
    combine_adapters,
    hotswap_lora,
    mixed_adapters,
    prepare_hotswap,
)
from .training import lora_plus_param_groups
from .variants import (
    DoRAConfig,
    DoRAParametrization,
    ExpertLoRAParametrization,
    LoHaConfig,
    LoHaParametrization,
    LoKrConfig,
    LoKrParametrization,
    LoRAParametrization,
    OFTConfig,
    OFTParametrization,
    PiSSAConfig,
    PiSSADoRAConfig,
    PiSSADoRAParametrization,
    PiSSAParametrization,
    PlainLoRAConfig,
)

if TYPE_CHECKING:  # at run time, __getattr__ below imports it on first access
    from .interop.transformers import LoRATrainer as LoRATrainer

_install_compat()

__version__ = "0.3.0"

__all__ = [
    "FACTORED_KINDS",
    "AdapterVariant",
    "BaseStore",
    "CombineReport",
    "DoRAConfig",
    "DoRAParametrization",
    "ExpertLoRAParametrization",
    "Int8Config",
    "LayerSpec",
    "LoHaConfig",
    "LoHaParametrization",
    "LoKrConfig",
    "LoKrParametrization",
    "LoRAConfig",
    "LoRAError",
    "LoRAParametrization",
    "LoRATrainerMixin",
    "NF4Config",
    "OFTConfig",
    "OFTParametrization",
    "ParameterCounts",
    "PiSSAConfig",
    "PiSSADoRAConfig",
    "PiSSADoRAParametrization",
    "PiSSAParametrization",
    "PlainLoRAConfig",
    "QuantizationConfig",
    "RequantizationWarning",
    "TrainableCopy",
    "VariantConfig",
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
    "iter_entries",
    "iter_lora",
    "list_adapters",
    "load_base_state_dict",
    "load_lora",
    "lora_disabled",
    "lora_plus_param_groups",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "mixed_adapters",
    "parameter_counts",
    "prepare_hotswap",
    "quantize_base",
    "register_init",
    "register_variant",
    "remove_lora",
    "save_lora",
    "save_merged",
    "set_active_adapters",
    "set_adapter_scale",
    "set_eval_cache",
    "trainable_summary",
    "variant_names",
]


def __getattr__(name: str) -> Any:
    """``lora_param.LoRATrainer``: imports transformers on first access only."""
    if name == "LoRATrainer":
        from .interop.transformers import LoRATrainer

        globals()["LoRATrainer"] = LoRATrainer
        return LoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, ``LoRATrainer`` included before its first access."""
    return sorted({*globals(), "LoRATrainer"})
