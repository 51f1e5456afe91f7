"""PEFT interchange of what an adapter trains besides A and B (issue 8), against real PEFT.

Heads trained with ``trainable=`` travel as PEFT's ``modules_to_save``, biases trained with
``bias=`` in PEFT's bias layout; a ``target_parameters`` tensor named ``weight`` on a custom
module travels both ways. Each direction compares outputs with the other library's.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    adapter_parameters,
    add_lora,
    iter_copies,
    iter_lora,
    lora_disabled,
)
from lora_param.core.copies import drop_copies
from lora_param.interop.peft import export_peft, import_peft

pytest.importorskip("safetensors.torch")
peft = pytest.importorskip("peft")


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Lin(nn.Module):
    """A custom module whose matrix is called ``weight`` (not an nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 20))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def _base(cls: type[nn.Module] = Classifier) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def _shake(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_load(base: nn.Module, folder) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(folder))


def _peft_model(base: nn.Module, **config) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(**config))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_head_and_biases_to_peft(tmp_path, bias):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc1", rank=2, trainable="head", bias=bias)
    _shake(adapter_parameters(model))
    x = torch.randn(5, 4)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["bias"] == bias
    assert torch.allclose(_peft_load(copy.deepcopy(base), tmp_path)(x), model(x), atol=1e-6)
    back = import_peft(copy.deepcopy(base), tmp_path)
    assert torch.equal(back(x), model(x))
    with lora_disabled(back):
        assert torch.equal(back(x), base(x))


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_head_and_biases_from_peft(tmp_path, bias):
    base = _base()
    trained = _peft_model(
        copy.deepcopy(base), target_modules=["fc1"], modules_to_save=["head"], bias=bias, r=2
    )
    _shake([p for p in trained.parameters() if p.requires_grad], seed=1)
    trained.save_pretrained(str(tmp_path))
    x = torch.randn(5, 4)
    model = import_peft(copy.deepcopy(base), tmp_path)
    assert torch.allclose(model(x), trained(x), atol=1e-6)
    roles = {path: c.role for path, _, _, c in iter_copies(model)}
    assert roles["head.weight"] == roles["head.bias"] == "module"
    assert roles["fc1.bias"] == "bias" and ("fc2.bias" in roles) == (bias == "all")
    with lora_disabled(model):
        assert torch.equal(model(x), base(x))


def test_export_refuses_a_part_of_a_module(tmp_path):
    model = add_lora(_base(), "fc1", rank=2, trainable="head")
    # Drop the head's bias copy: PEFT's modules_to_save holds whole modules.
    drop_copies(model.head, "bias", lambda c: True)
    with pytest.raises(LoRAError, match="only part of 'head'"):
        export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_modules_to_save_suffix_clash(tmp_path):
    class Two(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.big_head = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.big_head(super().forward(x))

    model = add_lora(_base(Two), "fc1", rank=2, trainable="head")
    with pytest.raises(LoRAError, match="suffix"):
        export_peft(model, tmp_path / "out")


def test_custom_module_weight_target_parameters_both_ways(tmp_path):
    base = nn.Sequential(_base(Lin))
    x = torch.randn(3, 10)
    model = add_lora(copy.deepcopy(base), "0.weight", rank=4)
    _shake([p.lora_B for *_, p in iter_lora(model)])
    export_peft(model, tmp_path / "ours")
    back = import_peft(copy.deepcopy(base), tmp_path / "ours")
    assert torch.equal(back(x), model(x))
    theirs = _peft_load(copy.deepcopy(base), tmp_path / "ours")
    assert torch.allclose(theirs(x), model(x), atol=1e-5)

    trained = _peft_model(
        copy.deepcopy(base), target_modules=[], target_parameters=["0.weight"], r=4
    )
    _shake([p for n, p in trained.named_parameters() if "lora_B" in n], seed=2)
    trained.save_pretrained(str(tmp_path / "theirs"))
    mine = import_peft(copy.deepcopy(base), tmp_path / "theirs")
    assert torch.allclose(mine(x), trained(x), atol=1e-5)
