"""Readers and writers say what is wrong, in our words, before anything changes.

Paths (a folder where a file is expected and the reverse, a file in the parent chain, a place
that cannot be written) for ``save_lora`` / ``load_lora`` / ``export_peft`` / ``import_peft``,
and every kind of damage the issue found in PEFT folders (safetensors errors, undecodable or
invalid JSON, config fields of the wrong type, factors of the wrong shape).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from lora_param import LoRAError, add_lora, iter_lora, load_lora, save_lora


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


# ------------------------------------------------------------------------------- save / load


def test_save_lora_to_an_existing_folder(tmp_path):
    model = add_lora(_model(), rank=2)
    with pytest.raises(LoRAError, match=r"it is an existing folder; pass a file path such as"):
        save_lora(model, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_save_lora_under_a_file(tmp_path):
    model = add_lora(_model(), rank=2)
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(LoRAError, match=r"plain' is a file, not a folder"):
        save_lora(model, tmp_path / "plain" / "sub" / "adapter.pt")
    assert (tmp_path / "plain").read_text() == "a file"


def test_save_lora_creates_missing_parents(tmp_path):
    model = add_lora(_model(), rank=2)
    path = save_lora(model, tmp_path / "a" / "b" / "adapter.pt")
    assert path.is_file()
    load_lora(_model(), path)


def test_save_lora_to_a_place_that_is_not_writable(tmp_path, monkeypatch):
    model = add_lora(_model(), rank=2)
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode)
    )
    with pytest.raises(LoRAError, match=r"is not writable"):
        save_lora(model, tmp_path / "new" / "adapter.pt")
    assert list(tmp_path.iterdir()) == []


def test_load_lora_paths(tmp_path):
    model = _model()
    before = _state(model)
    with pytest.raises(LoRAError, match=r"is a folder, not a file.*import_peft"):
        load_lora(model, tmp_path)
    with pytest.raises(LoRAError, match=r"does not exist"):
        load_lora(model, tmp_path / "missing" / "adapter.pt")
    assert _unchanged(model, before) and not list(iter_lora(model))


# ------------------------------------------------------------------------------- PEFT folders


def _st():
    return pytest.importorskip("safetensors.torch")


def _good_folder(tmp_path):
    _st()
    from lora_param.interop.peft import export_peft

    model = add_lora(_model(), rank=2)
    return export_peft(model, tmp_path / "peft")


def _import_refused(folder, match):
    from lora_param.interop.peft import import_peft

    model = _model()
    before = _state(model)
    with pytest.raises(LoRAError, match=match):
        import_peft(model, folder)
    assert _unchanged(model, before) and not list(iter_lora(model))


def test_export_peft_paths(tmp_path):
    _st()
    from lora_param.interop.peft import export_peft

    model = add_lora(_model(), rank=2)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoRAError, match=r"it is a file, not a folder"):
        export_peft(model, tmp_path / "file")
    with pytest.raises(LoRAError, match=r"file' is a file, not a folder"):
        export_peft(model, tmp_path / "file" / "peft")
    (tmp_path / "odd" / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(LoRAError, match=r"adapter_config.json': it is a folder"):
        export_peft(model, tmp_path / "odd")
    assert sorted(p.name for p in (tmp_path / "odd").iterdir()) == ["adapter_config.json"]


def test_import_peft_on_a_file(tmp_path):
    _st()
    (tmp_path / "f").write_text("x")
    _import_refused(tmp_path / "f", r"'.*f' is a file, not a folder")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda b: b[:20], r"adapter_model.safetensors' is damaged or truncated.*SafetensorError"),
        (lambda b: b[:5], r"adapter_model.safetensors' is damaged or truncated"),
        (lambda b: b"\xff" * 8 + b[8:], r"adapter_model.safetensors' is damaged or truncated"),
    ],
    ids=["truncated", "no-header", "header-length"],
)
def test_import_peft_damaged_weights(tmp_path, damage, match):
    folder = _good_folder(tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _import_refused(folder, match)


def test_import_peft_config_not_utf8(tmp_path):
    folder = _good_folder(tmp_path)
    config = folder / "adapter_config.json"
    config.write_bytes(b"\x80" + config.read_bytes())
    _import_refused(folder, r"adapter_config.json' is damaged: not valid UTF-8 JSON.*Unicode")


def test_import_peft_config_not_json(tmp_path):
    folder = _good_folder(tmp_path)
    config = folder / "adapter_config.json"
    config.write_text(config.read_text()[:-10])
    _import_refused(folder, r"adapter_config.json' is damaged: not valid UTF-8 JSON")


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("target_parameters", 1.5, "a list of strings or null"),
        ("target_parameters", [1], "a list of strings or null"),
        ("r", {"a": 1}, "a positive integer"),
        ("r", 2.0, "a positive integer"),
        ("r", True, "a positive integer"),
        ("lora_alpha", "8", "a positive finite number"),
        ("lora_alpha", float("nan"), "a positive finite number"),
        ("lora_alpha", float("inf"), "a positive finite number"),
        ("rank_pattern", {"0": {"r": 2}}, "an object of positive integers"),
        ("rank_pattern", ["0"], "an object of positive integers"),
        ("alpha_pattern", {"0": "x"}, "an object of positive numbers"),
        ("lora_dropout", 1.5, r"a number in \[0, 1\)"),
        ("use_rslora", "yes", "true, false or null"),
        ("peft_type", ["LORA"], "a string"),
        ("bias", 0, "a string or null"),
    ],
)
def test_import_peft_config_field_of_the_wrong_type(tmp_path, field, value, expected):
    folder = _good_folder(tmp_path)
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config[field] = value
    config_file.write_text(json.dumps(config))
    _import_refused(folder, rf"adapter_config.json' is damaged: {field}=.* must be {expected}")


@pytest.mark.parametrize(
    "shape_a, match",
    [
        ((2,), r"LoRA factors are matrices of rank >= 1"),
        ((0, 4), r"LoRA factors are matrices of rank >= 1"),
        ((2, 4, 1), r"factors have shapes \(2, 4, 1\) and \(5, 2\), expected \(2, 4\)"),
        ((3, 4), r"factors have shapes \(3, 4\) and \(5, 2\)"),
    ],
)
def test_import_peft_factors_that_do_not_fit(tmp_path, shape_a, match):
    folder = _good_folder(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = _st().load_file(str(weights))
    tensors["base_model.model.0.lora_A.weight"] = torch.zeros(shape_a)
    _st().save_file(tensors, str(weights))
    _import_refused(folder, match)


def test_import_peft_integer_tensors(tmp_path):
    folder = _good_folder(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = _st().load_file(str(weights))
    tensors["base_model.model.0.lora_A.weight"] = torch.zeros(2, 4, dtype=torch.int32)
    _st().save_file(tensors, str(weights))
    _import_refused(folder, r"must map names to floating-point tensors")


def test_import_peft_damaged_legacy_bin(tmp_path):
    folder = _good_folder(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    _import_refused(folder, r"adapter_model.bin' is damaged, truncated or not a weights-only")


def test_import_peft_rank_larger_than_the_matrix(tmp_path):
    """PEFT allows r > min(fan_in, fan_out); lora_param refuses it, naming the file."""
    folder = _good_folder(tmp_path)
    weights = folder / "adapter_model.safetensors"
    tensors = _st().load_file(str(weights))
    tensors["base_model.model.2.lora_A.weight"] = torch.zeros(4, 5)
    tensors["base_model.model.2.lora_B.weight"] = torch.zeros(3, 4)
    _st().save_file(tensors, str(weights))
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["rank_pattern"] = {"2": 4}
    config_file.write_text(json.dumps(config))
    _import_refused(folder, r"'2' has rank 4, more than its 3x5 matrix can hold")
