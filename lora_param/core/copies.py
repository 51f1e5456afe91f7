"""Per-adapter trained copies of whole tensors: heads named in ``trainable=``, ``bias=`` biases.

What an adapter trains belongs to that adapter (PEFT's ``modules_to_save`` semantics): the
pretrained tensor is never changed; each adapter registers a :class:`TrainableCopy` on it, a
parametrization holding the adapter's own trainable copy. While the adapter is enabled the tensor
reads that copy; while it is disabled the entry passes its input through, so the pretrained value
comes back bit for bit.

Copies sit first in a tensor's parametrization list, before any LoRA entry: a copy replaces the
pretrained value and the low-rank updates of enabled adapters add on top of it. When several
enabled adapters hold a copy of the same tensor, the one registered last is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .entries import drop_entries, register_entry
from .entry import AdapterEntry
from .errors import LoRAError
from .store import BaseStore
from .targets import base_tensor, join, parametrization_list, tensor_names

__all__ = [
    "CopyPlan",
    "CopyRole",
    "TrainableCopy",
    "drop_copies",
    "iter_copies",
    "parametrization_list",
    "plan_copies",
    "register_copies",
]

CopyRole = Literal["module", "bias"]


class TrainableCopy(AdapterEntry):
    """One adapter's trainable replacement of a tensor (a head's weight, a bias).

    Args:
        tensor: The pretrained tensor; the copy starts equal to it (the model starts unchanged).
        adapter: The adapter the copy belongs to.
        role: ``"module"`` (part of a module named in ``trainable=``, PEFT's
            ``modules_to_save``) or ``"bias"`` (chosen by ``bias=``).
        owner: For ``"module"``, the module named in ``trainable=`` that holds the tensor.
    """

    def __init__(self, tensor: Tensor, adapter: str, role: CopyRole, owner: str = "") -> None:
        super().__init__(adapter)
        self.role: CopyRole = role
        self.owner: str = owner
        self.value = nn.Parameter(tensor.detach().clone())

    def trainable_tensors(self) -> dict[str, nn.Parameter]:
        """The copy itself."""
        return {"value": self.value}

    def cache_tensors(self) -> list[Tensor]:
        """The copy."""
        return [self.value]

    def forward(self, tensor: Tensor) -> Tensor:
        """The adapter's copy when enabled, else the input unchanged."""
        return self.value if self._enabled else tensor

    def extra_repr(self) -> str:
        return (
            f"adapter={self.adapter!r}, role={self.role}, shape={tuple(self.value.shape)}, "
            f"enabled={self._enabled}"
        )


@dataclass(frozen=True)
class CopyPlan:
    """One tensor that an adapter will hold a copy of."""

    path: str
    module: nn.Module
    tensor_name: str
    role: CopyRole
    owner: str


def iter_copies(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, TrainableCopy]]:
    """Yield ``(tensor path, module, tensor name, copy)`` for every trained copy in the model.

    A trained copy is an adapter's own replacement of a whole tensor: a head named in
    ``add_lora(trainable=...)`` or a bias chosen by ``bias=`` (PEFT's ``modules_to_save``).

    Args:
        model: Any module, with or without adapters.

    Yields:
        One tuple per copy, in module order then registration order.
    """
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in cast(nn.ModuleDict, module.parametrizations):
            for entry in parametrization_list(module, tensor_name):
                if isinstance(entry, TrainableCopy):
                    yield join(module_name, tensor_name), module, tensor_name, entry


def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules of the user's model, without those parametrize and the adapters add."""
    for name, module in model.named_modules():
        if ".parametrizations" in f".{name}":
            continue
        if isinstance(module, AdapterEntry):
            continue
        yield name, module


def check_copyable(path: str, module: nn.Module, tensor_name: str) -> None:
    """Raise unless an adapter can hold its own copy of this tensor."""
    if parametrize.is_parametrized(module, tensor_name):
        plist = parametrization_list(module, tensor_name)
        foreign = [type(p).__name__ for p in plist if not isinstance(p, AdapterEntry)]
        if foreign or not plist.is_tensor:
            raise LoRAError(
                f"'{path}' carries the parametrizations {foreign}; an adapter cannot hold its own "
                "trained copy under them. Leave it out of trainable=/bias=, or remove them first."
            )
    tensor = base_tensor(module, tensor_name)
    if not isinstance(tensor, nn.Parameter) or not tensor.is_floating_point():
        raise LoRAError(f"'{path}' is not a floating-point parameter; it cannot be trained.")


def _bias_names(module: nn.Module) -> list[str]:
    return [n for n in tensor_names(module) if "bias" in n]


def plan_copies(
    model: nn.Module,
    keep: Sequence[nn.Module],
    bias: str,
    lora_modules: Sequence[nn.Module],
) -> list[CopyPlan]:
    """Which tensors a new adapter copies: every parameter of ``keep``, and the chosen biases.

    Args:
        model: The model.
        keep: Modules named in ``trainable=`` (a classifier head).
        bias: ``"none"``, ``"all"`` (every bias) or ``"lora_only"`` (biases of ``lora_modules``);
            a bias is a parameter with "bias" in its name (``in_proj_bias`` too).
        lora_modules: The modules the adapter puts LoRA on.

    Raises:
        LoRAError: A chosen tensor cannot be copied; nothing was changed.
    """
    names = {id(m): n for n, m in _user_modules(model)}
    plans: dict[str, CopyPlan] = {}
    for owner_module in keep:
        owner = names[id(owner_module)]
        for sub_name, sub in _user_modules(owner_module):
            module_name = join(owner, sub_name) if sub_name else owner
            for tensor_name in tensor_names(sub):
                path = join(module_name, tensor_name)
                if path not in plans:
                    plans[path] = CopyPlan(path, sub, tensor_name, "module", owner)
    if bias == "all":
        bias_modules = [m for _, m in _user_modules(model)]
    elif bias == "lora_only":
        bias_modules = list({id(m): m for m in lora_modules}.values())
    else:
        bias_modules = []
    for module in bias_modules:
        for tensor_name in _bias_names(module):
            path = join(names[id(module)], tensor_name)
            if path not in plans:
                plans[path] = CopyPlan(path, module, tensor_name, "bias", "")
    for plan in plans.values():
        check_copyable(plan.path, plan.module, plan.tensor_name)
    return list(plans.values())


def register_copies(
    plans: Sequence[CopyPlan], adapter: str, values: dict[str, Tensor] | None = None
) -> list[TrainableCopy]:
    """Register one :class:`TrainableCopy` per plan for ``adapter``; undo everything on failure.

    Args:
        plans: From :func:`plan_copies` (or built by a loader).
        adapter: The adapter the copies belong to.
        values: Trained values by tensor path; a tensor without one starts as the pretrained value.

    Returns:
        The registered copies, in plan order.
    """
    done: list[CopyPlan] = []
    copies: list[TrainableCopy] = []
    try:
        for plan in plans:
            module, name = plan.module, plan.tensor_name
            copy = TrainableCopy(base_tensor(module, name), adapter, plan.role, plan.owner)
            if values is not None and plan.path in values:
                with torch.no_grad():
                    copy.value.copy_(values[plan.path])
            position = None
            if parametrize.is_parametrized(module, name):
                plist = parametrization_list(module, name)
                position = sum(1 for p in plist if isinstance(p, (TrainableCopy, BaseStore)))
            register_entry(module, name, copy, position)
            done.append(plan)
            copies.append(copy)
    except BaseException:
        for plan in reversed(done):
            drop_copies(plan.module, plan.tensor_name, lambda c: c.adapter == adapter)
        raise
    return copies


def drop_copies(
    module: nn.Module, tensor_name: str, doomed: Callable[[TrainableCopy], bool]
) -> None:
    """Remove the copies ``doomed`` selects from one tensor; the pretrained tensor comes back."""
    drop_entries(module, tensor_name, lambda p: isinstance(p, TrainableCopy) and doomed(p))
