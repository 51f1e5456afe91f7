"""MNIST loading: real IDX files written here, read back through torchvision; the offline error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from lora_param.mnist.cli import main
from lora_param.mnist.data import (
    IDX_FILES,
    MEAN,
    STD,
    MNISTNotFoundError,
    digit_subset,
    load_mnist,
    load_split,
    normalize,
)


def write_idx(path: Path, data: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file: magic (0, 0, 0x08 = ubyte, ndim), big-endian sizes, bytes."""
    assert data.dtype == torch.uint8
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(
        f">{data.dim()}I", *data.shape
    )
    path.write_bytes(header + data.contiguous().numpy().tobytes())


def write_mnist(
    root: Path, n_train: int = 30, n_test: int = 20, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A tiny MNIST in <root>/MNIST/raw/: random images, labels cycling 0-9."""
    g = torch.Generator().manual_seed(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = (torch.arange(n) % 10).to(torch.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out


def test_loads_idx_files_through_torchvision(tmp_path: Path) -> None:
    raw = write_mnist(tmp_path)
    data = load_mnist(tmp_path, download=False)
    assert data.train_images.shape == (30, 784) and data.train_images.dtype == torch.float32
    assert data.test_images.shape == (20, 784)
    assert data.train_labels.dtype == torch.int64
    assert torch.equal(data.train_labels, raw["train_labels"].long())
    assert torch.equal(data.test_labels, raw["t10k_labels"].long())
    expected = (raw["train_images"].float().view(30, -1) / 255 - MEAN) / STD
    torch.testing.assert_close(data.train_images, expected, rtol=0, atol=1e-6)


def test_matches_the_per_image_pil_transform(tmp_path: Path) -> None:
    """Normalising the whole tensor once equals ToTensor + Normalize image by image (the tutorial's path)."""
    from torchvision import transforms

    write_mnist(tmp_path)
    images, labels = load_split(tmp_path, train=True, download=False)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))])
    slow = torchvision.datasets.MNIST(str(tmp_path), train=True, download=False, transform=tf)
    for i in range(len(slow)):
        x, y = slow[i]
        torch.testing.assert_close(images[i], x.view(-1), rtol=0, atol=1e-6)
        assert int(labels[i]) == y


def test_normalize_and_digit_subset() -> None:
    imgs = torch.tensor([[[0, 255]], [[255, 0]]], dtype=torch.uint8)
    x = normalize(imgs)
    assert x.shape == (2, 2)
    torch.testing.assert_close(x[0], torch.tensor([-MEAN / STD, (1 - MEAN) / STD]))
    sub_x, sub_y = digit_subset(torch.arange(6.0).view(6, 1), torch.tensor([1, 9, 9, 2, 9, 0]), 9)
    assert sub_x.view(-1).tolist() == [1.0, 2.0, 4.0] and sub_y.tolist() == [9, 9, 9]


def _no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def fail(self) -> None:  # what torchvision raises when every mirror fails
        calls.append(self.root)
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n"
            "<urlopen error [Errno -2] Name or service not known>"
        )

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail)
    return calls


def test_offline_error_says_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _no_network(monkeypatch)
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(tmp_path / "nowhere")
    assert calls, "the download was attempted"
    message = str(info.value)
    raw = (tmp_path / "nowhere" / "MNIST" / "raw").resolve()
    assert str(raw) in message
    for name in IDX_FILES:
        assert str(raw / name) in message
    assert "Name or service not known" in message
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.missing == list(IDX_FILES)


def test_no_download_gives_the_same_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MNISTNotFoundError, match="download disabled"):
        load_mnist(tmp_path, download=False)


def test_partial_files_are_listed(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(tmp_path, download=False)
    assert info.value.missing == ["t10k-labels-idx1-ubyte"]


def test_damaged_files_keep_their_own_error(tmp_path: Path) -> None:
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x0d\x01" + b"\x00" * 8
    )
    with pytest.raises(Exception) as info:
        load_mnist(tmp_path, download=False)
    assert not isinstance(info.value, MNISTNotFoundError)


def test_cli_offline_error_is_one_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_network(monkeypatch)
    code = main(["--data-dir", str(tmp_path / "empty"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    assert str((tmp_path / "empty" / "MNIST" / "raw").resolve()) in captured.err
    assert captured.err.startswith("lora-param-mnist: error: MNIST not found")
