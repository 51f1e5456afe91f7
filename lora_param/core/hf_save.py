"""``save_pretrained`` on a model with LoRA writes the merged model, never a broken checkpoint.

Parametrize renames ``q_proj.weight`` to ``q_proj.parametrizations.weight.original``; saved as
is, ``from_pretrained`` would report those weights missing and initialise them at random. The
guard installed here (by ``add_lora``/``load_lora`` on any model with a ``save_pretrained``
method, e.g. a transformers ``PreTrainedModel``) hands ``save_pretrained`` a state dict with the
plain keys instead: each adapted tensor as the model computes it now (``W + sBA`` for the
enabled adapters), the adapter factors left out. The model is not changed. A
``save_pretrained`` that takes no ``state_dict`` (diffusers' models) raises ``LoRAError`` instead,
saying how to save. transformers is not imported.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .distributed import refuse_sharded
from .errors import LoRAError
from .targets import join

__all__ = ["guard_save_pretrained", "merged_state_dict"]

_ORIGINAL = "_lora_param_save_pretrained"
_GATHER_ALL = "would gather every merged weight of a sharded (FSDP2) model at once"
_SHARDED_FIX = (
    "Call lora_param.save_merged(model, folder) on every rank instead: rank 0 writes the "
    "merged weights (config.json and model.safetensors for a transformers model), gathered "
    "one layer at a time; or save the adapters alone with save_lora / export_peft."
)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every parametrized tensor under its plain name, merged.

    Args:
        model: Any model, with or without adapters.

    Returns:
        Plain keys (``fc.weight``) with the tensors the model computes with; no adapter keys.

    Raises:
        LoRAError: The model is sharded (FSDP2): every merged weight would be gathered into
            one dict; :func:`lora_param.save_merged` writes them one layer at a time.
    """
    refuse_sharded(model, "merged_state_dict", _SHARDED_FIX, _GATHER_ALL)
    state = model.state_dict()
    merged: dict[str, Tensor] = {}
    dropped: set[str] = set()
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if ".parametrizations" in f".{module_name}" or not parametrize.is_parametrized(module):
                continue
            prefix = join(module_name, "parametrizations")
            dropped.update(k for k in state if k.startswith(prefix + "."))
            for name in list(module.parametrizations.keys()):
                merged[join(module_name, name)] = getattr(module, name).detach().clone()
    out = {k: v for k, v in state.items() if k not in dropped}
    out.update(merged)
    return out


def _save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    original = self.__dict__[_ORIGINAL]
    state = kwargs.get("state_dict")
    if state is None:
        if any(parametrize.is_parametrized(m) for m in self.modules()):
            refuse_sharded(self, "save_pretrained", _SHARDED_FIX, _GATHER_ALL)
            if not _takes_state_dict(original):
                raise LoRAError(
                    f"{type(self).__name__}.save_pretrained cannot be handed merged weights (it "
                    "takes no state_dict) and would write parametrize keys that from_pretrained "
                    "loads as random weights. Save a merged copy (merged = copy.deepcopy(model); "
                    "merge_lora(merged); merged.save_pretrained(...)), or the adapters alone "
                    "with save_lora / export_peft."
                )
            kwargs["state_dict"] = merged_state_dict(self)
    elif any(".parametrizations." in k for k in state):
        raise LoRAError(
            "save_pretrained got a state_dict with parametrize keys ('...parametrizations."
            "weight.original'), which from_pretrained cannot load (the weights would be "
            "re-initialised at random). Pass lora_param.merged_state_dict(model), "
            "or no state_dict, to save the merged model; save the adapters alone with "
            "save_lora/export_peft."
        )
    return original(*args, **kwargs)


def _takes_state_dict(method: Any) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return "state_dict" in params  # a **kwargs catch-all (diffusers) would ignore it


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write plain (merged) keys while the model has LoRA.

    Installed once per model object, as an instance attribute over the class's method; a model
    without a ``save_pretrained`` method is left alone.
    """
    method = getattr(type(model), "save_pretrained", None)
    if not callable(method) or _ORIGINAL in model.__dict__:
        return
    model.__dict__[_ORIGINAL] = types.MethodType(method, model)
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
