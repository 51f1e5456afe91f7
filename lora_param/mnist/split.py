"""The validation split: a seeded, stratified hold-out from the 60,000 training images.

MNIST ships a training set and a test set only. Every choice the demo makes (the worst digit,
the balanced recipe's settings, the rank where gains stop) is made on images held out of the
training set here, so the test set is only ever evaluated, never tuned on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from lora_param.core.errors import LoRAError

from .data import MNISTTensors

#: Images held out of the training set by default (one sixth, as many as the test set).
VALIDATION_SIZE = 10_000
#: The split's default seed: fixed, so runs with different `--seed` share one validation set.
SPLIT_SEED = 0


@dataclass(frozen=True)
class SplitInfo:
    """How the training images were divided (what report.json records).

    Attributes:
        validation: Whether a validation split was held out (False: the tutorial's 60,000).
        seed: Seed of the split's permutation.
        train_size: Images left for training.
        validation_size: Images held out for choices.
        test_size: Test images (evaluated once per model, at the end).
        stratified: Each digit is held out in proportion to its count.
    """

    validation: bool
    seed: int | None
    train_size: int
    validation_size: int
    test_size: int
    stratified: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return asdict(self)


def stratified_split(labels: Tensor, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split example indices into (train, validation), each class held out in proportion.

    Class c gets ``size * count_c / n`` validation examples, rounded by largest remainder so that
    the sizes add up to exactly `size`; which examples is decided by a seeded permutation.

    Args:
        labels: (N,) integer class labels.
        size: Number of validation examples, 0 < size < N.
        seed: Seed of the permutation (same seed and labels, same split).

    Returns:
        (train_idx, val_idx): disjoint sorted int64 index tensors covering range(N).

    Raises:
        LoRAError: `size` leaves no room for training, or a class would lose all its examples.
    """
    labels = labels.cpu()
    n = int(labels.numel())
    if not 0 < size < n:
        raise LoRAError(f"validation size must be in (0, {n}), got {size}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    short = size - int(quota.sum())
    if short:
        order = torch.argsort(exact - quota.double(), descending=True, stable=True)
        quota[order[:short]] += 1
    if bool((quota >= counts).any()):
        raise LoRAError(f"validation size {size} would leave a class without training examples")
    gen = torch.Generator().manual_seed(seed)
    held = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == cls).nonzero().squeeze(1)
        held.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    val_idx = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[val_idx] = False
    return mask.nonzero().squeeze(1), val_idx


def hold_out_validation(
    data: MNISTTensors, size: int = VALIDATION_SIZE, seed: int = SPLIT_SEED
) -> MNISTTensors:
    """Move a stratified `size`-image validation split out of `data`'s training images.

    Args:
        data: Unsplit tensors (as `load_mnist` returns them).
        size: Validation images; 0 keeps the tutorial's data (all training images train).
        seed: Seed of the split.

    Returns:
        New tensors: training images without the held-out ones, ``val_images``/``val_labels`` set,
        ``split`` describing the division. The test tensors are shared, not copied.

    Raises:
        LoRAError: `data` was already split, or `size` is out of range.
    """
    if data.val_images is not None:
        raise LoRAError("these tensors already hold a validation split; pass load_mnist()'s")
    n_test = int(data.test_labels.numel())
    if size == 0:
        info = SplitInfo(False, None, int(data.train_labels.numel()), 0, n_test)
        return MNISTTensors(
            data.train_images, data.train_labels, data.test_images, data.test_labels, split=info
        )
    train_idx, val_idx = stratified_split(data.train_labels, size, seed)
    device = data.train_labels.device
    train_idx, val_idx = train_idx.to(device), val_idx.to(device)
    info = SplitInfo(True, seed, int(train_idx.numel()), int(val_idx.numel()), n_test)
    return MNISTTensors(
        data.train_images[train_idx],
        data.train_labels[train_idx],
        data.test_images,
        data.test_labels,
        val_images=data.train_images[val_idx],
        val_labels=data.train_labels[val_idx],
        split=info,
    )
