"""LoRA+ (Hayou et al., 2024): ``B`` learns ``ratio`` times faster than ``A``.

:func:`lora_plus_param_groups` returns torch optimizer parameter groups, the groups PEFT's
``create_loraplus_optimizer`` builds, for any torch optimizer:
``torch.optim.AdamW(lora_plus_param_groups(model, lr=1e-4), lr=1e-4)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.copies import iter_copies
from ..core.errors import LoRAError
from ..core.lookup import check_adapters_exist, iter_lora, list_adapters

__all__ = ["lora_plus_param_groups"]

#: PEFT's default learning rate for adapters on embedding layers (``loraplus_lr_embedding``).
LR_EMBEDDING = 1e-6


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise LoRAError(f"{what} must be a positive number, got {value!r}.")
    return float(value)


def lora_plus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    *,
    lr_embedding: float = LR_EMBEDDING,
    weight_decay: float = 0.0,
    adapter: str | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+: ``B`` at ``ratio * lr``, ``A`` at ``lr``.

    The same groups as PEFT 0.21's ``create_loraplus_optimizer`` (``loraplus_lr_ratio=ratio``,
    ``loraplus_lr_embedding=lr_embedding``, ``loraplus_weight_decay=weight_decay``):

    * ``lr``, ``weight_decay``: ``A`` factors and every other matrix the adapters train (heads
      named in ``trainable=``, ...);
    * ``lr_embedding``, ``weight_decay``: the factors of adapters on ``nn.Embedding`` layers;
    * ``ratio * lr``, ``weight_decay``: ``B`` factors and trained vectors (DoRA's magnitude);
    * ``ratio * lr``, no weight decay: trained biases and LayerNorm parameters.

    A variant's tensor named ``lora_B``, or any 1-D one, counts as ``B`` (PEFT's rule).
    Empty groups are left out. Build the optimizer after ``add_lora`` (and ``load_lora``).

    Args:
        model: A model with adapters.
        lr: Learning rate of ``A`` (the optimizer's base rate).
        ratio: ``B``'s learning rate over ``A``'s (16 in the LoRA+ paper; at least 1).
        lr_embedding: Learning rate of adapters on embedding layers (PEFT's default, 1e-6).
        weight_decay: Weight decay of every group but biases and norms.
        adapter: One adapter's parameters (its updates and its trained copies, as
            :func:`~lora_param.adapter_parameters` gives them); None: every parameter that
            requires grad, as PEFT takes them.

    Returns:
        Dicts with ``params``, ``lr`` and ``weight_decay``, for ``torch.optim`` optimizers.

    Raises:
        LoRAError: Not a positive ``lr`` / ``ratio`` / ``lr_embedding``, an unknown adapter, or
            nothing to train.
    """
    lr = _positive(lr, "lr")
    ratio = _positive(ratio, "ratio")
    lr_embedding = _positive(lr_embedding, "lr_embedding")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise LoRAError(f"weight_decay must be a number, got {weight_decay!r}.")
    if not list_adapters(model):
        raise LoRAError("this model has no adapters; call add_lora first.")
    if adapter is not None:
        check_adapters_exist(model, [adapter])

    # What each adapter-owned tensor is: (group, counts as a bias or norm for weight decay).
    owned: dict[int, tuple[str, bool]] = {}
    for path, _, _, p in iter_lora(model):
        if adapter is not None and p.adapter != adapter:
            continue
        for name, t in p.trainable_tensors().items():
            if p.kind == "embedding" and t.dim() > 1:
                owned[id(t)] = ("embedding", False)
            else:
                fast = name == "lora_B" or t.dim() == 1
                owned[id(t)] = ("B" if fast else "A", "bias" in f"{path}.{name}")
    for path, module, _, c in iter_copies(model):
        if adapter is None or c.adapter == adapter:
            no_decay = "bias" in path or isinstance(module, nn.LayerNorm)
            owned[id(c.value)] = ("B" if c.value.dim() == 1 else "A", no_decay)

    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    for name, t, module in _named_parameters(model):
        if id(t) in seen:
            continue
        if adapter is None and not t.requires_grad:
            continue
        if adapter is not None and id(t) not in owned:
            continue
        seen.add(id(t))
        group, no_decay = owned.get(id(t)) or _by_name(name, t, module)
        groups["B_no_decay" if group == "B" and no_decay else group].append(t)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    out = [
        {"params": params, "lr": settings[key][0], "weight_decay": float(settings[key][1])}
        for key, params in groups.items()
        if params
    ]
    if not out:
        raise LoRAError("nothing in this model trains (no parameter requires grad).")
    return out


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module]]:
    """``(name, parameter, owning module)`` of every parameter, shared ones under each name."""
    return [
        (f"{module_name}.{name}" if module_name else name, t, module)
        for module_name, module in model.named_modules()
        for name, t in module.named_parameters(recurse=False)
    ]


def _by_name(name: str, t: nn.Parameter, module: nn.Module) -> tuple[str, bool]:
    """PEFT's rule for a trained parameter no adapter owns (the user unfroze it)."""
    fast = "lora_B" in name or t.dim() == 1
    return ("B" if fast else "A", "bias" in name or isinstance(module, nn.LayerNorm))
