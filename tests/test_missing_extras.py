"""Every optional feature says which extra to install when its dependency is missing.

The dependency is hidden from this process (``sys.modules[name] = None`` makes ``import name``
fail); .ci/wheel_smoke.py checks the same messages in a bare environment where it is really
absent.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import lora_param as lp


def _hide(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, name, None)


def test_lora_trainer_without_transformers(monkeypatch):
    import lora_param.interop.transformers as hf

    monkeypatch.delitem(hf.__dict__, "LoRATrainer", raising=False)  # built on first use
    _hide(monkeypatch, "transformers")
    with pytest.raises(ImportError, match=r'pip install "lora_param\[hf\]"'):
        hf.LoRATrainer  # noqa: B018


def test_peft_and_kohya_files_without_safetensors(monkeypatch, tmp_path):
    model = lp.add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
    _hide(monkeypatch, "safetensors")
    with pytest.raises(ImportError, match=r'pip install "lora_param\[peft\]"'):
        lp.export_peft(model, tmp_path / "peft")
    assert not (tmp_path / "peft" / "adapter_model.safetensors").exists()
    with pytest.raises(lp.LoRAError, match=r'pip install "lora_param\[peft\]"'):
        lp.export_kohya(model, tmp_path / "lora.safetensors")


def test_bitsandbytes_kernel_without_bitsandbytes(monkeypatch):
    layer = nn.Sequential(nn.Linear(64, 64))
    before = layer[0].weight.detach().clone()
    _hide(monkeypatch, "bitsandbytes")
    with pytest.raises(lp.LoRAError, match=r"pip install 'lora_param\[quant\]'"):
        lp.quantize_base(layer, kernel="bitsandbytes")
    assert torch.equal(layer[0].weight, before)  # nothing changed


def test_mnist_command_without_torchvision(monkeypatch, tmp_path, capsys):
    from lora_param.mnist.cli import main

    _hide(monkeypatch, "torchvision")
    assert main(["--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert 'pip install "lora_param[mnist]"' in capsys.readouterr().err


def test_plots_without_matplotlib(monkeypatch):
    from lora_param.mnist.confusion import plot_confusion_change
    from lora_param.mnist.report import plot_errors

    _hide(monkeypatch, "matplotlib")
    assert plot_errors([1] * 10, [0] * 10) is None
    assert plot_confusion_change([[0] * 10 for _ in range(10)]) is None
