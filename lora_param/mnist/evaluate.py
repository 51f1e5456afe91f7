"""Evaluation on the test set: accuracy and wrong answers per digit, with large batches."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm


@dataclass
class EvalResult:
    """Accuracy on the test set and the number of wrong answers for each true digit."""

    accuracy: float
    wrong_per_digit: list[int]
    total: int
    seconds: float = 0.0
    logits: Tensor | None = field(default=None, repr=False)

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
    logits: Tensor, labels: Tensor, seconds: float = 0.0, keep_logits: bool = True
) -> EvalResult:
    """Accuracy and wrong answers per digit from logits (ties go to the lowest class, like argmax)."""
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
    )


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 2000,
    desc: str = "evaluate",
    progress: bool = True,
) -> EvalResult:
    """Evaluate `model` on (images, labels): accuracy, wrong answers per digit, logits kept for checks."""
    start = time.perf_counter()
    logits = predict_logits(model, images, batch_size=batch_size, desc=desc, progress=progress)
    return score(logits, labels, seconds=time.perf_counter() - start)


def worst_digit(result: EvalResult) -> int:
    """The digit with the most wrong answers (the lowest such digit on ties)."""
    counts = result.wrong_per_digit
    return max(range(len(counts)), key=lambda d: (counts[d], -d))
