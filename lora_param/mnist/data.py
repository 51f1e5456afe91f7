"""MNIST loading: torchvision's IDX reader, tensors normalised once, a clear offline error."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .split import SplitInfo

MEAN = 0.1307
STD = 0.3081
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class MNISTNotFoundError(FileNotFoundError):
    """MNIST is not under the data root and could not be downloaded."""

    def __init__(self, root: str | os.PathLike[str], reason: str = "") -> None:
        raw = Path(root).expanduser().resolve() / "MNIST" / "raw"
        missing = [name for name in IDX_FILES if not (raw / name).is_file()]
        which = "all four" if len(missing) == len(IDX_FILES) else ", ".join(missing)
        message = (
            f"MNIST not found under {raw}, and it could not be downloaded"
            + (f" ({reason})" if reason else "")
            + f".\nPut the four uncompressed IDX files there (missing: {which}):\n"
            + "".join(f"  {raw / name}\n" for name in IDX_FILES)
            + "or run once with network access (torchvision downloads them), "
            "or point --data-dir at the folder that holds MNIST/raw/."
        )
        super().__init__(message)
        self.root = Path(root)
        self.raw_folder = raw
        self.missing = missing


@dataclass
class MNISTTensors:
    """MNIST as in-memory tensors: images (N, 784) float32 normalised, labels (N,) int64.

    ``val_images``/``val_labels`` hold the validation split once `split.hold_out_validation` has
    moved it out of the training images; ``split`` then says how (None: not divided yet).
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    split: SplitInfo | None = None

    def to(self, device: torch.device | str) -> MNISTTensors:
        """Return a copy with every tensor on `device`."""
        return MNISTTensors(
            self.train_images.to(device),
            self.train_labels.to(device),
            self.test_images.to(device),
            self.test_labels.to(device),
            val_images=None if self.val_images is None else self.val_images.to(device),
            val_labels=None if self.val_labels is None else self.val_labels.to(device),
            split=self.split,
        )

    def selection(self) -> tuple[Tensor, Tensor, str]:
        """The images choices are made on: (images, labels, split name), never the test set.

        The validation split when there is one; with the tutorial's data (no split), the
        training images themselves.
        """
        if self.val_images is not None and self.val_labels is not None:
            return self.val_images, self.val_labels, "validation"
        return self.train_images, self.train_labels, "train"


def normalize(images: Tensor) -> Tensor:
    """Turn uint8 images (N, 28, 28) into float32 (N, 784): ToTensor + Normalize(0.1307, 0.3081)."""
    x = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
    return x.sub_(MEAN).div_(STD)


def load_split(
    root: str | os.PathLike[str], train: bool, download: bool = True
) -> tuple[Tensor, Tensor]:
    """Load one split through torchvision.datasets.MNIST, without per-image PIL conversion.

    Args:
        root: Data root; the IDX files live in ``<root>/MNIST/raw/``.
        train: Training split (60,000 images) or test split (10,000).
        download: Let torchvision download missing files.

    Returns:
        (images, labels): float32 (N, 784) normalised, int64 (N,).

    Raises:
        MNISTNotFoundError: The files are absent and could not be downloaded.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            'the MNIST pipeline needs torchvision: pip install "lora_param[mnist]"'
        ) from exc
    try:
        dataset = MNIST(os.fspath(root), train=train, download=download)
    except (RuntimeError, OSError) as exc:
        raw = Path(root) / "MNIST" / "raw"
        if all((raw / name).is_file() for name in IDX_FILES):
            raise  # the files are there: a different problem, keep its own message
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [
            type(exc).__name__
        ]
        reason = (
            "download disabled" if not download else " ".join(dict.fromkeys([lines[0], lines[-1]]))
        )
        raise MNISTNotFoundError(root, reason) from exc
    return normalize(dataset.data), dataset.targets.to(torch.int64)


def load_mnist(root: str | os.PathLike[str] = "./data", download: bool = True) -> MNISTTensors:
    """Load both MNIST splits as normalised tensors (see `load_split`)."""
    train_x, train_y = load_split(root, train=True, download=download)
    test_x, test_y = load_split(root, train=False, download=download)
    return MNISTTensors(train_x, train_y, test_x, test_y)


def digit_subset(images: Tensor, labels: Tensor, digit: int) -> tuple[Tensor, Tensor]:
    """Keep only the examples of one digit."""
    mask = labels == digit
    return images[mask], labels[mask]
