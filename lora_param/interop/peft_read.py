"""Read a PEFT adapter folder and check its config before anything is changed.

Every damaged or unsupported file ends in a LoRAError that names the file and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import LoRAError
from ..core.paths import check_input_file, check_input_folder
from .peft_format import (
    BIN_NAME,
    CONFIG_NAME,
    SAFETENSORS_NAME,
    safetensors_module,
)

__all__ = ["check_config", "check_field_types", "read_folder"]


# LoraConfig fields that change what a LoRA adapter computes and that import_peft cannot honour
# when they are set to anything but these values.
_UNSUPPORTED_FIELDS: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}
# Initializations for which PEFT rewrites the base weight and lora_param has no variant that
# computes the same start again (PiSSA and OLoRA have one: lora_param.variants.pissa).
_BASE_REWRITING_INITS = ("corda", "loftq", "lora_ga")
_FIELD_HINT = {
    "lora_bias": "a bias on lora_B is not part of lora_param's adapters",
    "trainable_token_indices": "trainable tokens are not LoRA",
}


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_folder(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The folder's config (a JSON object) and its floating tensors (safetensors or .bin)."""
    hint = f"; a PEFT adapter is a folder with {CONFIG_NAME}"
    check_input_folder(path, "PEFT adapter folder", hint)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.exists():
        raise LoRAError(f"'{path}' has no {CONFIG_NAME}; is it a PEFT adapter folder?")
    check_input_file(cfg_file, "PEFT adapter config")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise LoRAError(
            f"'{cfg_file}' is damaged: not valid UTF-8 JSON ({_first_line(exc)})."
        ) from None
    if not isinstance(config, dict):
        raise LoRAError(f"'{cfg_file}' is damaged: it does not hold a JSON object.")
    if (path / SAFETENSORS_NAME).exists():
        weights = check_input_file(path / SAFETENSORS_NAME, "PEFT adapter weights")
        st = safetensors_module()
        try:
            tensors = st.load_file(str(weights), device="cpu")
        except Exception as exc:  # safetensors raises its own error, OSError, ValueError ...
            raise LoRAError(
                f"'{weights}' is damaged or truncated: safetensors cannot read it "
                f"({_first_line(exc)})."
            ) from None
    elif (path / BIN_NAME).exists():
        weights = check_input_file(path / BIN_NAME, "PEFT adapter weights")
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged files
            raise LoRAError(
                f"'{weights}' is damaged, truncated or not a weights-only state dict "
                f"({_first_line(exc)})."
            ) from None
    else:
        raise LoRAError(f"'{path}' has no {SAFETENSORS_NAME} (nor {BIN_NAME}).")
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) and v.is_floating_point()
        for k, v in tensors.items()
    ):
        raise LoRAError(f"'{weights}' must map names to floating-point tensors; it does not.")
    return config, tensors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    return _is_number(value) and value > 0


def _dropout(value: Any) -> bool:
    return value is None or (_is_number(value) and 0 <= value < 1)


def _optional_bool(value: Any) -> bool:
    return value is None or isinstance(value, bool)


def _pattern_of(check: Any) -> Any:
    return lambda value: (
        value is None or (isinstance(value, dict) and all(check(v) for v in value.values()))
    )


def _list_of_str(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


# Every config field import_peft reads, with what it must hold.
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_positive_int, "a positive integer"),
    "lora_alpha": (_positive_number, "a positive finite number"),
    "lora_dropout": (_dropout, "a number in [0, 1) or null"),
    "use_rslora": (_optional_bool, "true, false or null"),
    "rank_pattern": (_pattern_of(_positive_int), "an object of positive integers or null"),
    "alpha_pattern": (_pattern_of(_positive_number), "an object of positive numbers or null"),
    "target_parameters": (_list_of_str, "a list of strings or null"),
    "bias": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def check_field_types(config: dict[str, Any], cfg_file: Path) -> None:
    """Each field import_peft reads has the JSON type it needs (a damaged file fails here)."""
    for field, (ok, expected) in _FIELD_TYPES.items():
        if field in config and not ok(config[field]):
            raise LoRAError(
                f"'{cfg_file}' is damaged: {field}={config[field]!r} must be {expected}."
            )


def check_config(config: dict[str, Any], where: Path) -> None:
    """A LORA adapter that sets no field import_peft cannot honour, and a known ``bias``."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        from .peft_codecs import folder_types  # peft_codecs builds on this module's checks

        raise LoRAError(
            f"'{where}' holds a PEFT {peft_type!r} adapter; import_peft reads the folder types "
            f"{['LORA', *folder_types()]}."
        )
    for field, ok in _UNSUPPORTED_FIELDS.items():
        value = config.get(field, ok)
        if value in (ok, None, False, [], {}):
            continue
        hint = _FIELD_HINT.get(field, "lora_param does not implement it")
        raise LoRAError(
            f"'{where}' sets {field}={value!r}, which import_peft does not support ({hint})."
        )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() in _BASE_REWRITING_INITS:
        raise LoRAError(
            f"'{where}' was trained from init_lora_weights={init!r}, for which PEFT rewrites the "
            "base weights: its factors fit that rewritten base, not the pretrained model. "
            "Convert it to plain LoRA in PEFT first (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)), then import it."
        )
    bias = config.get("bias", "none")
    if bias not in ("none", None, "all", "lora_only"):
        raise LoRAError(
            f"'{where}' sets bias={bias!r}; PEFT's LoRA knows 'none', 'all', 'lora_only'."
        )
