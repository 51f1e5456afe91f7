"""Property-based fuzzing of every reader: damaged files give a LoRAError or a valid load.

Files written by ``save_lora`` and ``export_peft`` are damaged (truncated, flipped or inserted
bytes; JSON fields replaced by values of the wrong type, deleted, or added) and read back into a
fresh model and into one that already has adapters. After a ``LoRAError`` the model must be
bit-identical; any other exception fails. The mutators live in ``tests/fuzzing.py`` for the
readers that come later.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lora_param import add_lora, load_lora, save_lora

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzzing.py, next to this file
from fuzzing import (
    FUZZ,
    byte_damage,
    check_reader_contract,
    damage_json_text,
    damage_safetensors_header,
    json_damage,
)


class FuzzNet(nn.Module):
    """An embedding, a linear layer, a conv and a plain head: every reader's layer kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 6)
        self.conv = nn.Conv1d(6, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc(self.emb(idx))).transpose(1, 2)
        return self.head(self.conv(x).mean(-1))


INPUTS = (torch.arange(10).reshape(2, 5),)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return FuzzNet()


def _trained() -> nn.Module:
    model = add_lora(_base(), ["emb", "fc", "conv"], rank=2, alpha=3, trainable="head")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _target(with_adapter: bool) -> nn.Module:
    return add_lora(_base(), ["emb", "fc", "conv"], rank=2) if with_adapter else _base()


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory) -> Path:
    """A good file written by save_lora (its path: hypothesis prints arguments on failure)."""
    return save_lora(_trained(), tmp_path_factory.mktemp("good") / "adapter.pt")


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory) -> Path:
    pytest.importorskip("safetensors")
    from lora_param.interop.peft import export_peft

    model = add_lora(_base(), ["emb", "fc", "conv"], rank=2, alpha=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    return export_peft(model, tmp_path_factory.mktemp("good") / "peft")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# ------------------------------------------------------------------------------- save_lora


@FUZZ
@given(damage=byte_damage(), with_adapter=st.booleans())
def test_load_lora_damaged_bytes(adapter_file, tmp_path, damage, with_adapter):
    path = tmp_path / "adapter.pt"
    path.write_bytes(damage(adapter_file.read_bytes()))
    model = _target(with_adapter)
    check_reader_contract(model, lambda: load_lora(model, path), INPUTS)


@FUZZ
@given(damage=json_damage(), with_adapter=st.booleans())
def test_load_lora_damaged_config(adapter_file, tmp_path, damage, with_adapter):
    path = tmp_path / "adapter.pt"
    payload = torch.load(adapter_file, weights_only=True)
    payload["config"] = damage_json_text(payload["config"], damage)
    torch.save(payload, path)
    model = _target(with_adapter)
    check_reader_contract(model, lambda: load_lora(model, path), INPUTS)


@FUZZ
@given(
    key=st.integers(0, 100),
    change=st.sampled_from(["shape", "dtype", "drop", "not-a-tensor", "rename"]),
    part=st.sampled_from(["tensors", "copies"]),
)
def test_load_lora_damaged_tensors(adapter_file, tmp_path, key, change, part):
    payload = torch.load(adapter_file, weights_only=True)
    tensors = payload[part]
    name = sorted(tensors)[key % len(tensors)]
    if change == "shape":
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
    elif change == "dtype":
        tensors[name] = tensors[name].to(torch.int64)
    elif change == "drop":
        del tensors[name]
    elif change == "not-a-tensor":
        tensors[name] = [1.0, 2.0]
    else:
        tensors[name + "x"] = tensors.pop(name)
    torch.save(payload, tmp_path / "adapter.pt")
    model = _base()
    result = check_reader_contract(model, lambda: load_lora(model, tmp_path / "adapter.pt"), INPUTS)
    assert result == "refused" or change == "dtype"  # the config describes every copy


# ------------------------------------------------------------------------------- PEFT folders


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _import(folder: Path, with_adapter: bool = False) -> None:
    from lora_param.interop.peft import import_peft

    model = _target(with_adapter)
    check_reader_contract(model, lambda: import_peft(model, folder, adapter="imported"), INPUTS)


@FUZZ
@given(damage=byte_damage(), with_adapter=st.booleans())
def test_import_peft_damaged_weights(peft_folder, tmp_path, damage, with_adapter):
    files = _files(peft_folder)
    files["adapter_model.safetensors"] = damage(files["adapter_model.safetensors"])
    _write_folder(tmp_path / "peft", files)
    _import(tmp_path / "peft", with_adapter)


@FUZZ
@given(damage=byte_damage())
def test_import_peft_damaged_config_bytes(peft_folder, tmp_path, damage):
    files = _files(peft_folder)
    files["adapter_config.json"] = damage(files["adapter_config.json"])
    _write_folder(tmp_path / "peft", files)
    _import(tmp_path / "peft")


@FUZZ
@given(damage=json_damage(), with_adapter=st.booleans())
def test_import_peft_damaged_config_values(peft_folder, tmp_path, damage, with_adapter):
    files = _files(peft_folder)
    text = files["adapter_config.json"].decode()
    files["adapter_config.json"] = damage_json_text(text, damage).encode()
    _write_folder(tmp_path / "peft", files)
    _import(tmp_path / "peft", with_adapter)


@FUZZ
@given(damage=json_damage())
def test_import_peft_damaged_safetensors_header(peft_folder, tmp_path, damage):
    files = _files(peft_folder)
    files["adapter_model.safetensors"] = damage_safetensors_header(
        files["adapter_model.safetensors"], damage
    )
    _write_folder(tmp_path / "peft", files)
    _import(tmp_path / "peft")


@FUZZ
@given(damage=byte_damage(), json_change=json_damage())
def test_fuzz_helpers_damage_what_they_say(damage, json_change):
    """The mutators change their input (a fuzz test whose damage is a no-op could never fail)."""
    data = bytes(range(200))
    assert damage(data) != data or damage.__name__.startswith(("flip", "overwrite"))
    config = {"r": 2, "alpha_pattern": {"fc": 3}, "target_modules": ["fc", "conv"]}
    changed = json_change(config)
    assert changed != config or json_change.__name__.startswith("replace")
    assert config == {"r": 2, "alpha_pattern": {"fc": 3}, "target_modules": ["fc", "conv"]}
