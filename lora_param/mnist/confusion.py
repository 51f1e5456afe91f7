"""Where the errors went: confusion matrices, their change, and a diverging heat map of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

DIGITS = 10


def confusion_matrix(logits: Tensor, labels: Tensor, classes: int = DIGITS) -> list[list[int]]:
    """Counts of (true digit, predicted digit): rows are the true digit, columns the prediction."""
    pred = logits.argmax(dim=1).cpu()
    true = labels.cpu().to(torch.int64)
    flat = torch.bincount(true * classes + pred, minlength=classes * classes)
    return flat.reshape(classes, classes).tolist()


def confusion_change(
    before: Sequence[Sequence[int]], after: Sequence[Sequence[int]]
) -> list[list[int]]:
    """``after - before`` cell by cell (positive: more images of that true digit land there)."""
    return [
        [a - b for a, b in zip(row_a, row_b, strict=True)]
        for row_a, row_b in zip(after, before, strict=True)
    ]


def confusion_block(
    before_logits: Tensor, after_logits: Tensor, labels: Tensor, split: str
) -> dict[str, Any]:
    """The report.json block: both matrices and their change, with what rows and columns mean."""
    before = confusion_matrix(before_logits, labels)
    after = confusion_matrix(after_logits, labels)
    return {
        "split": split,
        "rows": "true digit",
        "columns": "predicted digit",
        "pretrained": before,
        "lora_on": after,
        "change": confusion_change(before, after),
    }


def plot_confusion_change(
    change: Sequence[Sequence[int]],
    path: str | os.PathLike[str] | None = None,
    *,
    target: int | None = None,
    title: str = "Change in the confusion matrix (LoRA on - pretrained)",
) -> Any:
    """Diverging heat map of a confusion-matrix change; saved to `path` when given.

    Red cells gained images, blue cells lost them, white is no change; the colour scale is
    symmetric around zero and every non-zero cell is labelled with its count. Off the diagonal a
    red cell at (4, 9) reads "more 4s are now called 9s"; on the diagonal red means more correct.

    Returns:
        The matplotlib Figure, or None without matplotlib (install ``lora_param[plot]``).
    """
    try:
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        return None
    n = len(change)
    limit = max(1, max(abs(v) for row in change for v in row))
    fig = Figure(figsize=(6.4, 5.4), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(change, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=0, vmin=-limit, vmax=limit))
    for i, row in enumerate(change):
        for j, value in enumerate(row):
            if value:
                strong = abs(value) > 0.6 * limit
                ax.text(
                    j,
                    i,
                    f"{value:+d}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if strong else "black",
                )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    if target is not None:
        for tick in (ax.get_xticklabels()[target], ax.get_yticklabels()[target]):
            tick.set_color("#c0392b")
            tick.set_fontweight("bold")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="images (LoRA on - pretrained)")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig
