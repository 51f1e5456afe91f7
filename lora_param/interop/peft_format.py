"""PEFT's LoRA adapter folder: file names, key layout and helpers shared by export and import.

A PEFT LoRA adapter is a folder with two files:

* ``adapter_config.json``: ``peft_type: "LORA"``, the default rank ``r`` and ``lora_alpha``,
  ``target_modules``, per-layer ``rank_pattern`` / ``alpha_pattern``, ``use_rslora``,
  ``fan_in_fan_out`` ... (a subset of ``peft.LoraConfig``'s fields);
* ``adapter_model.safetensors``: one pair of tensors per adapted layer, keyed
  ``base_model.model.<module path>.lora_A.weight`` / ``...lora_B.weight`` (the adapter name is
  not part of the key).

The layouts per layer type, as PEFT stores them (``r`` is the rank, ``s`` the scale):

=====================  ===============================  ================================
layer                  ``lora_A``                       ``lora_B``
=====================  ===============================  ================================
``nn.Linear``          ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
HF ``Conv1D``          ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
``nn.Conv{1,2,3}d``    ``.lora_A.weight`` (r, in, *k)   ``.lora_B.weight`` (out, r, 1..)
``nn.Embedding``       ``.lora_embedding_A`` (r, num)   ``.lora_embedding_B`` (dim, r)
2-D ``nn.Parameter``   ``.lora_A.weight`` (r, in)       ``.lora_B.weight`` (out, r)
=====================  ===============================  ================================

(HF ``Conv1D`` stores its weight ``(in, out)``; PEFT marks it with ``fan_in_fan_out`` and keeps
``A``/``B`` in the ``nn.Linear`` orientation, which is also lora_param's. A 2-D parameter, such as
``nn.MultiheadAttention.in_proj_weight``, goes through PEFT's ``target_parameters``; the key is
the owning module's path.) ``lora_param`` keeps the same ``A``/``B`` for every type except the
embedding, whose factors PEFT stores transposed and swapped.

Neither direction needs ``peft`` itself; both need ``safetensors`` (``pip install
"lora_param[peft]"``), which is imported only when called.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..core.wrappers import unwrap_model

__all__ = [
    "BIN_NAME",
    "CONFIG_NAME",
    "EXTRA_HINT",
    "PREFIX",
    "SAFETENSORS_NAME",
    "module_names",
    "peft_pattern_key",
    "safetensors_module",
    "unwrap_model",
]


CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EXTRA_HINT = 'pip install "lora_param[peft]"'


def safetensors_module():
    """``safetensors.torch``, or an ImportError that says which extra to install."""
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "PEFT interchange needs the 'safetensors' package; install it with "
            f"`{EXTRA_HINT}` (or `pip install safetensors`)."
        ) from exc
    return st


def module_names(model: nn.Module) -> list[str]:
    """Module names as a fresh copy of the base model has them (no parametrization modules)."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if "parametrizations" in parts:
            continue
        names.append(name)
    return names


def peft_pattern_key(patterns: Mapping[str, Any], key: str) -> str | None:
    """Which rank_pattern / alpha_pattern entry PEFT picks for a module.

    Mirrors ``peft.utils.other.get_pattern_key``.
    """
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return pattern
        except re.error:
            continue
    return None
