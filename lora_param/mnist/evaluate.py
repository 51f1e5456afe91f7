"""Evaluation: accuracy and wrong answers per digit, with large batches, tagged with the split.

A result records which split it was computed on; the functions that make a choice from results
(`worst_digit`, `report.gain_stops_at`) refuse test-set results, so the test set is never tuned on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from lora_param.core.errors import LoRAError


@dataclass
class EvalResult:
    """Accuracy and the number of wrong answers for each true digit on one split.

    Attributes:
        split: "test", "validation", "train" or None (not said); choices refuse "test".
    """

    accuracy: float
    wrong_per_digit: list[int]
    total: int
    seconds: float = 0.0
    logits: Tensor | None = field(default=None, repr=False)
    split: str | None = None

    @property
    def wrong(self) -> int:
        """Total number of wrong answers."""
        return sum(self.wrong_per_digit)

    def to_dict(self) -> dict[str, object]:
        """Plain dict for report.json (no logits)."""
        return {
            "accuracy": self.accuracy,
            "wrong_per_digit": list(self.wrong_per_digit),
            "wrong": self.wrong,
            "total": self.total,
            "seconds": self.seconds,
            "split": self.split,
        }


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 2000,
    desc: str = "evaluate",
    progress: bool = True,
) -> Tensor:
    """Logits for every image, in eval mode and under ``parametrize.cached()``.

    Inside ``cached()`` each parametrised weight (base + LoRA delta) is computed once for the whole
    evaluation instead of once per batch.
    """
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with parametrize.cached():
            for start in tqdm(
                range(0, images.shape[0], batch_size),
                desc=desc,
                disable=not progress,
                unit="batch",
                leave=False,
            ):
                chunks.append(model(images[start : start + batch_size]))
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def score(
    logits: Tensor,
    labels: Tensor,
    seconds: float = 0.0,
    keep_logits: bool = True,
    split: str | None = None,
) -> EvalResult:
    """Accuracy and wrong answers per digit from logits (ties go to the lowest class, as argmax)."""
    pred = logits.argmax(dim=1)
    wrong_mask = pred != labels
    wrong = torch.bincount(labels[wrong_mask].cpu(), minlength=10)
    total = int(labels.numel())
    accuracy = 1.0 - int(wrong.sum()) / total
    return EvalResult(
        accuracy=accuracy,
        wrong_per_digit=[int(v) for v in wrong.tolist()],
        total=total,
        seconds=seconds,
        logits=logits.detach().cpu() if keep_logits else None,
        split=split,
    )


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 2000,
    desc: str = "evaluate",
    progress: bool = True,
    split: str | None = None,
) -> EvalResult:
    """Evaluate `model` on (images, labels): accuracy, wrong answers per digit, logits kept.

    `split` names the images ("validation", "test", ...) so that choices can refuse the test set.
    """
    start = time.perf_counter()
    logits = predict_logits(model, images, batch_size=batch_size, desc=desc, progress=progress)
    return score(logits, labels, seconds=time.perf_counter() - start, split=split)


def refuse_test_split(split: str | None, choice: str) -> None:
    """Raise when a choice would be made on test-set numbers.

    Raises:
        LoRAError: `split` is "test".
    """
    if split == "test":
        raise LoRAError(
            f"{choice} must be chosen on validation (or training) numbers, not on the test set: "
            "evaluate on data.selection() instead"
        )


def worst_digit(result: EvalResult) -> int:
    """The digit with the most wrong answers (the lowest such digit on ties).

    Raises:
        LoRAError: `result` was computed on the test set.
    """
    refuse_test_split(result.split, "the worst digit")
    counts = result.wrong_per_digit
    return max(range(len(counts)), key=lambda d: (counts[d], -d))
