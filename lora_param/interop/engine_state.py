"""Adapter tensors held by a training engine: DeepSpeed ZeRO-3 partitions, gathered state dicts.

FSDP2 keeps a shard of each tensor per rank as a ``DTensor``; the writers gather those
themselves (a collective, :mod:`lora_param.core.distributed`). Two other shapes reach
:class:`~lora_param.interop.transformers.LoRATrainerMixin`:

* **DeepSpeed ZeRO-3** partitions parameters in place: outside a forward pass a parameter is an
  empty tensor whose shape is in ``ds_shape``. :func:`gathered_adapters` all-gathers the adapter
  parameters alone (not the base) for the duration of a ``with`` block, on every rank.
* **A gathered state dict** (what ``Trainer`` hands ``_save``: FSDP's full state dict,
  DeepSpeed's consolidated 16-bit one): :func:`adapters_from_state_dict` lends its adapter
  tensors to the model for a ``with`` block, so that the ordinary writers read them.

Neither imports DeepSpeed unless a parameter carries its attributes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor, nn

from ..core.distributed import is_partitioned, is_sharded
from ..core.errors import LoRAError
from ..core.lookup import adapter_parameters

__all__ = [
    "adapters_from_state_dict",
    "adapters_sharded",
    "gathered_adapters",
    "is_partitioned",
]

#: Prefixes that wrappers add to state-dict keys (DDP / DeepSpeed engine, torch.compile).
_WRAPPER_PREFIXES = ("", "module.", "_orig_mod.")


def adapters_sharded(model: nn.Module) -> bool:
    """Whether the adapter tensors are FSDP2 shards (``DTensor``): saving them is a collective."""
    return any(is_sharded(t) for t in adapter_parameters(model))


@contextlib.contextmanager
def gathered_adapters(model: nn.Module, *, modifier_rank: int | None = None) -> Iterator[None]:
    """Make ZeRO-3-partitioned adapter parameters whole on every rank inside the block.

    A collective when some adapter parameter is partitioned (every rank must enter it);
    otherwise nothing happens. Only the adapters are gathered, never the base weights.

    Args:
        model: The (unwrapped) model.
        modifier_rank: None to read; a rank whose changes are kept (scattered) on exit.
    """
    params = [t for t in adapter_parameters(model) if hasattr(t, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # present: the parameters carry its attributes

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def _global_shape(tensor: Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _find(state_dict: Mapping[str, Any], name: str) -> Any:
    for prefix in _WRAPPER_PREFIXES:
        if prefix + name in state_dict:
            return state_dict[prefix + name]
    return None


@contextlib.contextmanager
def adapters_from_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> Iterator[None]:
    """Let the model's adapter parameters read the full tensors of ``state_dict`` in the block.

    Each adapter parameter is replaced, on its module, by the state dict's tensor under the
    same name (``...q_proj.parametrizations.weight.0.lora_A``), then put back unchanged on
    exit: the optimizer, FSDP and DeepSpeed keep their parameters. A tensor the state dict
    lacks (DeepSpeed's ``exclude_frozen_parameters`` leaves out disabled adapters) is read
    from the model when the model holds it whole.

    Raises:
        LoRAError: an adapter tensor is missing from the state dict while the model holds only
            a shard or partition of it, a state-dict tensor has another shape, or the state dict
            holds shards (``DTensor``) itself; nothing is changed.
    """
    wanted = {id(t) for t in adapter_parameters(model)}
    swaps: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    problems: list[str] = []
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is None or id(param) not in wanted:
                continue
            key = f"{module_name}.{name}" if module_name else name
            value = _find(state_dict, key)
            if value is None:
                if is_sharded(param) or is_partitioned(param):
                    problems.append(f"{key!r} is missing, and this rank holds only a shard of it")
                continue
            if is_sharded(value):
                problems.append(f"{key!r} is a shard (DTensor), not the full tensor")
            elif tuple(value.shape) != _global_shape(param):
                problems.append(
                    f"{key!r} has shape {tuple(value.shape)}, the model's has "
                    f"{_global_shape(param)}"
                )
            else:
                lent = nn.Parameter(value.detach(), requires_grad=False)
                swaps.append((module, name, param, lent))
    if problems:
        raise LoRAError(
            "the state dict passed to save the adapters does not hold them whole: "
            f"{'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}. Pass the full "
            "state dict of the whole model (what Trainer.save_model gathers), or none: "
            "LoRATrainer.save_model(), called on every rank, gathers the adapters itself."
        )
    try:
        for module, name, _, lent in swaps:
            module._parameters[name] = lent
        yield
    finally:
        for module, name, original, _ in swaps:
            module._parameters[name] = original
