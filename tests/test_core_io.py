"""Adapter files and state dicts: save_lora/load_lora, lora_state_dict, load_base_state_dict."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_param
from lora_param import (
    LoRAError,
    active_adapters,
    add_lora,
    disable_lora,
    enable_lora,
    iter_lora,
    list_adapters,
    load_base_state_dict,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
)

TIGHT = dict(rtol=1e-4, atol=1e-5)


def _two_adapters(zoo, h, mode="factored"):
    case = zoo["custom_param"]
    model = add_lora(case.model(), case.targets, rank=2, alpha=4, mode=mode)
    add_lora(
        model, "head", rank=1, adapter="b", use_rslora=True, init="gaussian", dropout=0.1, mode=mode
    )
    h.randomize(model)
    return case, model


def test_lora_state_dict_keys_and_storage(zoo, h):
    case, model = _two_adapters(zoo, h)
    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(
        [
            "default.block.0.my_param.lora_A",
            "default.block.0.my_param.lora_B",
            "default.head.weight.lora_A",
            "default.head.weight.lora_B",
            "b.head.weight.lora_A",
            "b.head.weight.lora_B",
        ]
    )
    params = {(path, p.adapter): p for path, _, _, p in iter_lora(model)}
    a = params[("head.weight", "b")].lora_A
    assert sd["b.head.weight.lora_A"].data_ptr() == a.data_ptr()  # shares storage, as state_dict
    assert not sd["b.head.weight.lora_A"].requires_grad
    assert sorted(lora_state_dict(model, "b")) == ["b.head.weight.lora_A", "b.head.weight.lora_B"]
    assert sd["default.head.weight.lora_A"].shape == (2, 7)
    assert sd["default.head.weight.lora_B"].shape == (3, 2)
    assert sd["default.block.0.my_param.lora_A"].shape == (2, 7)
    assert sd["default.block.0.my_param.lora_B"].shape == (5, 2)


def test_file_format(zoo, h, tmp_path):
    _, model = _two_adapters(zoo, h)
    path = save_lora(model, tmp_path / "deep" / "er" / "a.pt")
    assert path == tmp_path / "deep" / "er" / "a.pt" and path.is_file()
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == lora_param.core.io.FORMAT
    config = json.loads(payload["config"])["adapters"]
    assert list(config) == ["default", "b"]
    layer = config["b"]["layers"]["head.weight"]
    assert layer["rank"] == 1 and layer["use_rslora"] is True and layer["init"] == "gaussian"
    assert layer["dropout"] == pytest.approx(0.1) and layer["shape"] == [3, 7]
    assert sorted(payload["tensors"]) == sorted(lora_state_dict(model))
    for k, v in payload["tensors"].items():
        assert v.is_contiguous() and v.device.type == "cpu"
        assert torch.equal(v, lora_state_dict(model)[k])
    # Only tensors, strings and numbers: a plain pickle of the payload works too.
    pickle.dumps(payload)


@pytest.mark.parametrize("load_mode", ["factored", "materialized"])
def test_round_trip_keeps_options_not_enabled_state(zoo, h, tmp_path, mode, load_mode):
    case, model = _two_adapters(zoo, h, mode)
    x = case.inputs()
    model.eval()
    expected = model(*x).detach()
    disable_lora(model, "b")  # the model's state, not the adapter's: the file ignores it
    path = save_lora(model, tmp_path / "a.pt")
    enable_lora(model, "b")

    fresh = load_lora(case.model(), path, mode=load_mode)
    fresh.eval()
    assert list_adapters(fresh) == ["default", "b"]
    assert active_adapters(fresh) == ["default", "b"]
    got = {(path_, p.adapter): p for path_, _, _, p in iter_lora(fresh)}
    want = {(path_, p.adapter): p for path_, _, _, p in iter_lora(model)}
    assert got.keys() == want.keys()
    for key, p in want.items():
        q = got[key]
        for attr in (
            "rank",
            "alpha",
            "scale",
            "use_rslora",
            "dropout_p",
            "init",
            "kind",
            "fan_in",
            "fan_out",
            "fan_in_fan_out",
            "weight_shape",
            "enabled",
        ):
            assert getattr(q, attr) == getattr(p, attr), (key, attr)
        assert torch.equal(q.lora_A, p.lora_A) and torch.equal(q.lora_B, p.lora_B)
        assert q.lora_A.requires_grad == p.enabled
    assert torch.allclose(fresh(*x), expected, **TIGHT)
    with torch.no_grad():
        assert torch.allclose(fresh(*x), expected, **TIGHT)


def test_save_and_load_one_adapter(zoo, h, tmp_path):
    case, model = _two_adapters(zoo, h)
    only_b = save_lora(model, tmp_path / "b.pt", adapter="b")
    assert sorted(torch.load(only_b, weights_only=True)["tensors"]) == [
        "b.head.weight.lora_A",
        "b.head.weight.lora_B",
    ]
    both = save_lora(model, tmp_path / "both.pt")
    fresh = load_lora(case.model(), both, adapter="b")
    assert list_adapters(fresh) == ["b"]
    assert [p for p, *_ in iter_lora(fresh)] == ["head.weight"]
    fresh2 = load_lora(case.model(), only_b)
    for k, v in lora_state_dict(fresh2).items():
        assert torch.equal(v, lora_state_dict(fresh)[k])


def test_load_into_model_that_has_the_adapter(zoo, h, tmp_path, mode):
    case = zoo["transformer"]
    model = add_lora(case.model(), rank=2, mode=mode)
    h.randomize(model, seed=1)
    path = save_lora(model, tmp_path / "a.pt")
    x = case.inputs()
    model.eval()
    expected = model(*x).detach()

    target = add_lora(case.model(), rank=2, mode=mode)  # same adapter, other values
    ids = {k: id(v) for k, v in target.named_parameters()}
    target.eval()
    with torch.no_grad():
        target(*x)  # fill the eval cache
    load_lora(target, path)
    assert {k: id(v) for k, v in target.named_parameters()} == ids  # loaded in place
    assert list_adapters(target) == ["default"]
    with torch.no_grad():
        assert torch.allclose(target(*x), expected, **TIGHT)
    assert torch.allclose(target(*x), expected, **TIGHT)


def test_load_converts_dtype(zoo, h, tmp_path):
    case = zoo["mlp"]
    model = add_lora(case.model(), rank=2)
    h.randomize(model)
    path = save_lora(model, tmp_path / "a.pt")
    x = case.inputs()
    expected = model(*x).detach()
    target = case.model().to(torch.float64)
    load_lora(target, path)
    for p in h.loras(target):
        assert p.lora_A.dtype == torch.float64
    assert torch.allclose(target(x[0].double()).float(), expected, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_round_trip(zoo, h, tmp_path, dtype):
    case = zoo["mlp"]
    model = add_lora(case.model().to(dtype), rank=2)
    h.randomize(model)
    path = save_lora(model, tmp_path / "a.pt")
    for v in torch.load(path, weights_only=True)["tensors"].values():
        assert v.dtype == dtype
    target = load_lora(case.model().to(dtype), path)
    x = (case.inputs()[0].to(dtype),)
    assert torch.equal(target(*x), model(*x))


def test_load_freeze_option(zoo, h, tmp_path):
    case = zoo["mlp"]
    model = add_lora(case.model(), rank=2)
    path = save_lora(model, tmp_path / "a.pt")
    unfrozen = load_lora(case.model(), path, freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())
    frozen = load_lora(case.model(), path)
    lora_ids = {id(t) for p in h.loras(frozen) for t in (p.lora_A, p.lora_B)}
    for n, p in frozen.named_parameters():
        assert p.requires_grad == (id(p) in lora_ids), n


def test_saved_file_is_independent_of_later_training(zoo, h, tmp_path):
    case = zoo["mlp"]
    model = add_lora(case.model(), rank=2)
    h.randomize(model)
    path = save_lora(model, tmp_path / "a.pt")
    saved = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with torch.no_grad():
        for p in h.loras(model):
            p.lora_B.add_(1.0)
    for k, v in torch.load(path, weights_only=True)["tensors"].items():
        assert torch.equal(v, saved[k])


def test_merged_model_state_dict_is_plain(zoo, h, tmp_path):
    """After merge_lora, torch.save(model) and plain state_dict loading work again."""
    case = zoo["hf_conv1d"]
    model = add_lora(case.model(), rank=2)
    h.randomize(model)
    x = case.inputs()
    expected = model(*x).detach()
    merge_lora(model)
    torch.save(model, tmp_path / "whole.pt")  # no parametrization left
    fresh = case.model(seed=9)
    fresh.load_state_dict(torch.load(tmp_path / "whole.pt", weights_only=False).state_dict())
    assert torch.allclose(fresh(*x), expected, **TIGHT)


# --------------------------------------------------------------------------- base checkpoints


def test_plain_load_state_dict_fails_but_load_base_state_dict_works(zoo, h, mode):
    case = zoo["transformer"]
    model = add_lora(case.model(), rank=2, mode=mode)
    h.randomize(model)
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    pretrained = case.model(seed=42)
    ckpt = pretrained.state_dict()
    with pytest.raises(RuntimeError):
        model.load_state_dict(ckpt, strict=True)  # the parametrize trap
    assert load_base_state_dict(model, ckpt) is model
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, adapters[k])  # adapters untouched
    x = case.inputs()
    with lora_param.lora_disabled(model):
        model.eval()
        pretrained.eval().requires_grad_(False)
        with torch.no_grad():
            assert torch.equal(model(*x), pretrained(*x))
    # The same as building the LoRA model on the pretrained weights in the first place.
    rebuilt = add_lora(case.model(seed=42), rank=2, mode=mode)
    h.copy_adapters(model, rebuilt)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(model(*x), rebuilt(*x), **TIGHT)


def test_load_base_state_dict_with_other_parametrizations(h):
    from torch.nn.utils.parametrizations import weight_norm

    def build(seed):
        torch.manual_seed(seed)
        m = h.MLP()
        weight_norm(m.fc1)
        return m

    model = add_lora(build(0), rank=2)
    h.randomize(model)
    pretrained = build(1)
    load_base_state_dict(model, pretrained.state_dict())
    x = torch.randn(2, 6)
    disable_lora(model)
    assert torch.equal(model(x), pretrained.requires_grad_(False)(x))


def test_load_base_state_dict_not_strict(h):
    model = add_lora(h.MLP(), rank=2)
    pretrained = h.MLP()
    partial = {"fc2.weight": pretrained.fc2.weight.detach().clone(), "unrelated": torch.zeros(1)}
    before_fc1 = model.fc1.parametrizations.weight.original.detach().clone()
    load_base_state_dict(model, partial, strict=False)
    assert torch.equal(model.fc2.parametrizations.weight.original, pretrained.fc2.weight)
    assert torch.equal(model.fc1.parametrizations.weight.original, before_fc1)


def test_load_base_state_dict_without_adapters(h):
    model = h.MLP()
    pretrained = h.MLP()
    load_base_state_dict(model, pretrained.state_dict())
    for k, v in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_torch_save_of_lora_model_raises_and_save_lora_works(zoo, h, tmp_path):
    case = zoo["mha"]
    model = add_lora(case.model(), rank=2)
    h.randomize(model)
    with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
        torch.save(model, tmp_path / "model.pt")
    path = save_lora(model, tmp_path / "adapter.pt")
    fresh = load_lora(case.model(), path)
    x = case.inputs()
    assert torch.allclose(fresh(*x), model(*x), **TIGHT)
    assert not parametrize.is_parametrized(case.model().attn)


def test_save_lora_keeps_trainable_head_and_biases(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    fresh = copy.deepcopy(base)
    model = add_lora(copy.deepcopy(base), "0", rank=2, trainable="2", bias="lora_only")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = save_lora(model, tmp_path / "a.pt")
    load_lora(fresh, path)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))
    assert fresh[2].weight.requires_grad and fresh[0].bias.requires_grad
    assert not fresh[0].parametrizations.weight.original.requires_grad
    # Without the extras, only the adapters travel.
    lean = save_lora(model, tmp_path / "b.pt", include_trainable=False)
    other = load_lora(copy.deepcopy(base), lean)
    assert torch.equal(other[2].weight, base[2].weight)


def test_load_refuses_trainable_tensor_that_does_not_fit(tmp_path):
    model = add_lora(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)), "0", rank=2, trainable="1")
    path = save_lora(model, tmp_path / "a.pt")
    wrong = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 4))
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(LoRAError, match="trainable tensor '1.weight'"):
        load_lora(wrong, path)
    assert list(iter_lora(wrong)) == []
    assert all(torch.equal(v, before[k]) for k, v in wrong.state_dict().items())


def test_written_files_get_the_usual_permissions(tmp_path):
    """Files behind an atomic write are created 0600 by mkstemp; they must end up as a plain
    ``open(path, "w")`` would make them (0666 less the umask), like every other tool's output."""
    import os
    import stat

    from lora_param.core.atomic import atomic_write

    umask = os.umask(0o022)
    try:
        model = lora_param.add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
        path = lora_param.save_lora(model, tmp_path / "adapter.pt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o027)
        other = atomic_write(tmp_path / "report.json", lambda f: f.write(b"{}"))
        assert stat.S_IMODE(other.stat().st_mode) == 0o640
    finally:
        os.umask(umask)
