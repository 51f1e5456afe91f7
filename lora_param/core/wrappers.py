"""The model under the wrappers that training adds: ``torch.compile``, DDP, DataParallel."""

from __future__ import annotations

from typing import cast

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
            "DataParallel",
            "DistributedDataParallel",
        ):
            model = cast(nn.Module, model.module)
            continue
        return model
