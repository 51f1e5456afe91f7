"""Pretrained checkpoints and what earlier runs recorded: base weights, splits, reports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_param import (
    LoRAError,
)

from .config import REPORT_FILE
from .split import SplitInfo

__all__ = [
    "base_state",
    "check_checkpoint_split",
    "checkpoint_split_file",
    "load_checkpoint",
    "recorded_split",
    "report_beside",
    "same_tensors",
]


_PARAM_ENTRY = re.compile(r"\.parametrizations\.[^.]+\.\d+\.")
_ORIGINAL = re.compile(r"\.parametrizations\.([^.]+)\.original$")


def base_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's non-LoRA tensors under their plain names (``linear1.weight``), cloned.

    A parametrized weight is stored as ``<m>.parametrizations.weight.original``; the LoRA factors
    (``<m>.parametrizations.weight.<i>.lora_A``) are left out.
    """
    out = {}
    for key, value in model.state_dict().items():
        if _PARAM_ENTRY.search(key):
            continue
        out[_ORIGINAL.sub(r".\1", key)] = value.detach().clone()
    return out


def same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Same keys and bit-for-bit equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a plain pretrained state dict (saved by this pipeline) into `model`."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)


def checkpoint_split_file(checkpoint: str | os.PathLike[str]) -> Path:
    """Where the split a cached pretrained model was trained under is recorded."""
    return Path(os.fspath(checkpoint) + ".split.json")


def check_checkpoint_split(checkpoint: str | os.PathLike[str], split: SplitInfo) -> None:
    """Refuse a cached pretrained model trained under another split.

    A model pretrained on all 60,000 images (or under another split seed) has seen this run's
    validation images, which would make every choice look better than it is. Checkpoints
    without a record (older files, other tools) are loaded as they are.

    Raises:
        LoRAError: The recorded split differs from `split`.
    """
    path = checkpoint_split_file(checkpoint)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if (recorded.get("validation_size"), recorded.get("seed")) != (
        split.validation_size,
        split.seed,
    ):
        raise LoRAError(
            f"{checkpoint} was pretrained with {recorded.get('validation_size')} validation images "
            f"held out (split seed {recorded.get('seed')}), this run holds out "
            f"{split.validation_size} (seed {split.seed}): its choices would see images the model "
            "was trained on. Use another --checkpoint, or the same split settings"
        )


def report_beside(adapter: str) -> dict[str, Any]:
    """The report.json beside an adapter, written by an earlier run ({} if absent or unreadable)."""
    try:
        report = json.loads(Path(adapter).with_name(REPORT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def recorded_split(adapter: str) -> int | None:
    """The validation size recorded in the report.json beside `adapter` (None if not recorded)."""
    split = report_beside(adapter).get("split")
    if isinstance(split, dict) and isinstance(split.get("validation_size"), int):
        return int(split["validation_size"])
    return None
