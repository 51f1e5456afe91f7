"""State dicts of packed weights: checking packed tensors before a load, packing plain ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from ..core.errors import LoRAError
from ..core.targets import join
from .packed import packed_head, parametrization_list
from .weight import QuantizedWeight

__all__ = ["check_packed_state", "install_load_checks"]

_HOOKED = "_lora_param_packed_load_check"


def _packed_lists(root: nn.Module) -> list[tuple[str, ParametrizationList]]:
    """``(prefix, ParametrizationList)`` of every packed weight under ``root``."""
    found: list[tuple[str, ParametrizationList]] = []
    for name, module in root.named_modules():
        if packed_head(module) is not None:
            found.append((join(name, "parametrizations.weight"), parametrization_list(module)))
    return found


def check_packed_state(root: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Raise LoRAError if a state dict holds packed tensors that do not fit ``root``'s.

    Shapes and dtypes identify the method and settings (NF4 codes are uint8 ``(n/2, 1)``,
    int8 codes int8 ``(rows, cols)``, the absmax count follows the block size, double
    quantization adds two tensors), so a mismatch of any of them is caught here, before
    ``load_state_dict`` copies anything.
    """
    originals = [k for k in state_dict if isinstance(k, str) and ".weight.original" in k]
    for name, plist in _packed_lists(root):
        base = prefix + (f"{name}." if name else "")
        head = cast(QuantizedWeight, plist[0])
        layout = head.storage_layout()
        _check_complete(state_dict, base, head, len(layout))
        for i, (shape, dtype) in enumerate(layout):
            key = f"{base}original{i}"
            value = state_dict.get(key)
            if value is None:
                continue
            if isinstance(value, Tensor) and value.dim() == 0 and shape == (1,):
                # 0.2 stored NF4's double-quantization offset 0-d: read it as (1,).
                value = state_dict[key] = value.reshape(1)  # type: ignore[index]
            if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
                got = (
                    f"{value.dtype} {tuple(value.shape)}"
                    if isinstance(value, Tensor)
                    else type(value).__name__
                )
                raise LoRAError(
                    f"state dict tensor {key!r} is {got}, but this model stores that weight as "
                    f"{head.extra_repr()} ({dtype} {shape}): the checkpoint was packed with "
                    "another method, block size or double_quant setting, or for another shape. "
                    "Quantize the model with the checkpoint's settings, or load a plain "
                    "checkpoint with load_base_state_dict."
                )
        known = {f"{base}original{i}" for i in range(len(layout))}
        stray = sorted(k for k in originals if k.startswith(f"{base}original") and k not in known)
        if stray:
            raise LoRAError(
                f"state dict has {stray[0]!r}, which this model's packed weight {base!r} does not "
                f"have ({head.extra_repr()}): it was saved with other quantization settings."
            )


def _check_complete(
    state_dict: Mapping[str, Any], base: str, head: QuantizedWeight, count: int
) -> None:
    """Refuse a plain weight for a packed layer, or only some of a weight's packed tensors.

    ``load_state_dict`` would otherwise copy the tensors it has (mixing two checkpoints' codes
    and scales in one weight) before reporting the missing or unexpected ones.
    """
    plain = base[: -len("parametrizations.weight.")] + "weight"
    if plain in state_dict:
        raise LoRAError(
            f"state dict has the plain weight {plain!r}, but this model stores it packed "
            f"({head.extra_repr()}): load a plain checkpoint with load_base_state_dict, which "
            "quantizes it."
        )
    keys = [f"{base}original{i}" for i in range(count)]
    present = [k for k in keys if k in state_dict]
    if present and len(present) != count:
        missing = sorted(set(keys) - set(present))
        raise LoRAError(
            f"state dict has only some packed tensors of {base[:-1]!r}: {missing} are missing. "
            "A packed weight loads whole; the checkpoint is incomplete or damaged."
        )


def _pre_hook(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    check_packed_state(module, state_dict, prefix)


def install_load_checks(module: nn.Module) -> None:
    """Make ``module.load_state_dict`` check packed tensors first (once per module)."""
    if module.__dict__.get(_HOOKED):
        return
    module.register_load_state_dict_pre_hook(_pre_hook)
    module.__dict__[_HOOKED] = True
