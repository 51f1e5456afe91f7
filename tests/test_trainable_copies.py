"""Heads and biases an adapter trains belong to that adapter (issue 8).

``add_lora(trainable=..., bias=...)`` gives each adapter its own trainable copy of those tensors
(PEFT's ``modules_to_save`` semantics); the pretrained tensors never change. These tests pin the
bugs of the in-place design and the new ``load_lora`` / ``merge_lora`` options.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    TrainableCopy,
    active_adapters,
    adapter_parameters,
    add_lora,
    disable_lora,
    iter_copies,
    iter_lora,
    list_adapters,
    load_lora,
    lora_disabled,
    merge_lora,
    remove_lora,
    save_lora,
    set_active_adapters,
)


class Classifier(nn.Module):
    """Backbone (two Linear layers) and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _base() -> Classifier:
    torch.manual_seed(0)
    return Classifier().requires_grad_(False)


def _x() -> torch.Tensor:
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(1))


def _train(model: nn.Module, adapter: str | None = None, steps: int = 3, seed: int = 0) -> None:
    """A few SGD steps on what trains: one adapter's parameters, or every trainable one."""
    torch.manual_seed(seed)
    pool = model.parameters() if adapter is None else adapter_parameters(model, adapter)
    params = [p for p in pool if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        out = model(torch.randn(7, 6))
        (out**2).mean().add(out.sum() * 0.3).backward()
        opt.step()


# ------------------------------------------------------------------------- bug 3: in-place heads


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_lora_disabled_is_the_pretrained_model_after_training_head_and_biases(mode):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head", bias="all", mode=mode)
    _train(model)
    x = _x()
    assert not torch.allclose(model(x), base(x), atol=1e-3)
    with lora_disabled(model):
        assert torch.equal(model(x), base(x))
        with torch.no_grad():
            assert torch.equal(model(x), base(x))
    disable_lora(model)
    assert torch.equal(model(x), base(x))
    # The pretrained tensors themselves never moved.
    for name, tensor in base.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        original = model.get_submodule(module_name).parametrizations[leaf].original
        assert torch.equal(original, tensor), name
    remove_lora(model)
    assert torch.equal(model(x), base(x))
    assert list(iter_copies(model)) == [] and sorted(dict(model.named_parameters())) == sorted(
        dict(base.named_parameters())
    )


def test_copies_are_trainable_parametrizations_and_disabled_copies_freeze():
    model = add_lora(_base(), "fc1", rank=2, trainable="head", bias="lora_only")
    copies = {path: c for path, _, _, c in iter_copies(model)}
    assert sorted(copies) == ["fc1.bias", "head.bias", "head.weight"]
    assert {c.role for c in copies.values()} == {"module", "bias"}
    assert all(isinstance(c, TrainableCopy) and c.value.requires_grad for c in copies.values())
    assert model.head.weight.requires_grad  # the layer reads the adapter's copy
    disable_lora(model)
    assert not any(c.value.requires_grad for c in copies.values())
    assert not model.head.weight.requires_grad


# ------------------------------------------------------------------------- bug 4: second adapter


def test_second_adapter_keeps_the_first_ones_head_and_switches_heads():
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc1", rank=2, trainable="head")
    _train(model, "default", seed=1)
    x = _x()
    first = model(x).detach()
    add_lora(model, "fc2", rank=2, adapter="other", trainable="head")
    # The first adapter's head is still its own and still trainable.
    mine = [c for *_, c in iter_copies(model) if c.adapter == "default"]
    assert len(mine) == 2 and all(c.value.requires_grad for c in mine)
    set_active_adapters(model, "other")
    _train(model, "other", seed=2)
    second = model(x).detach()
    set_active_adapters(model, "default")
    assert torch.equal(model(x), first)
    set_active_adapters(model, "other")
    assert torch.equal(model(x), second)
    with lora_disabled(model):
        assert torch.equal(model(x), base(x))


def test_save_one_adapter_keeps_its_head(tmp_path):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc1", rank=2, trainable="head")
    _train(model, seed=1)
    add_lora(model, "fc2", rank=2, adapter="other")  # used to re-freeze the head
    set_active_adapters(model, "default")
    x = _x()
    expected = model(x).detach()
    path = save_lora(model, tmp_path / "default.pt", adapter="default")
    fresh = load_lora(copy.deepcopy(base), path)
    assert list_adapters(fresh) == ["default"]
    assert torch.equal(fresh(x), expected)


# ------------------------------------------------------------------------- bug 5: transient state


def test_save_inside_lora_disabled_does_not_store_disabled(tmp_path):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head", bias="all")
    _train(model)
    x = _x()
    expected = model(x).detach()
    with lora_disabled(model):
        path = save_lora(model, tmp_path / "a.pt")
    assert path == tmp_path / "a.pt" and [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    fresh = load_lora(copy.deepcopy(base), path)
    assert active_adapters(fresh) == ["default"]
    assert torch.equal(fresh(x), expected)


def test_load_enables_what_it_loads_into_a_model_that_has_it(tmp_path):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head")
    _train(model)
    x = _x()
    expected = model(x).detach()
    path = save_lora(model, tmp_path / "a.pt")
    disable_lora(model)
    load_lora(model, path)
    assert torch.equal(model(x), expected)


# ------------------------------------------------------------------------- bug 6: embedding init


def test_embedding_adapter_starts_as_peft_normal_a_zero_b():
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Embedding(200, 64), nn.Linear(64, 64)), rank=8)
    emb, lin = (p for *_, p in iter_lora(model))
    assert torch.count_nonzero(emb.lora_B) == 0
    assert abs(emb.lora_A.std().item() - 1.0) < 0.05  # N(0, 1); kaiming-uniform is ~0.07
    assert lin.lora_A.abs().max() <= 1 / 64**0.5 + 1e-6  # Linear keeps kaiming-uniform


# ------------------------------------------------------------------------- load options


def test_load_as_another_adapter_name(tmp_path):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head", bias="lora_only")
    _train(model)
    x = _x()
    expected = model(x).detach()
    path = save_lora(model, tmp_path / "a.pt")
    # Next to the same adapter under its own name: two independent adapters with two heads.
    load_lora(model, path, as_adapter="copy2")
    assert list_adapters(model) == ["default", "copy2"]
    set_active_adapters(model, "copy2")
    assert torch.equal(model(x), expected)
    assert {c.adapter for *_, c in iter_copies(model)} == {"default", "copy2"}
    with pytest.raises(LoRAError, match="as_adapter"):
        load_lora(copy.deepcopy(base), path, as_adapter="bad.name")


def test_load_as_adapter_needs_one_adapter(tmp_path):
    model = add_lora(_base(), "fc1", rank=2)
    add_lora(model, "fc2", rank=2, adapter="b")
    path = save_lora(model, tmp_path / "two.pt")
    fresh = _base()
    with pytest.raises(LoRAError, match="choose"):
        load_lora(fresh, path, as_adapter="x")
    assert list_adapters(fresh) == []
    load_lora(fresh, path, adapter="b", as_adapter="x")
    assert list_adapters(fresh) == ["x"]


def test_load_frozen_for_inference(tmp_path):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head")
    _train(model)
    x = _x()
    expected = model(x).detach()
    path = save_lora(model, tmp_path / "a.pt")
    fresh = load_lora(copy.deepcopy(base), path, trainable=False)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert torch.equal(fresh(x), expected)
    disable_lora(fresh)
    set_active_adapters(fresh, "default")  # toggling keeps them frozen
    assert not any(p.requires_grad for p in fresh.parameters())


def test_load_reads_legacy_trainable_field(tmp_path):
    """Files from before per-adapter copies stored heads under "trainable", by plain path."""
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc1", rank=2, trainable="head")
    _train(model)
    x = _x()
    expected = model(x).detach()
    path = save_lora(model, tmp_path / "a.pt")
    payload = torch.load(path, weights_only=True)
    config = json.loads(payload["config"])
    config["adapters"]["default"].pop("copies")
    payload["config"] = json.dumps(config)
    payload["trainable"] = {k.split(".", 1)[1]: v for k, v in payload.pop("copies").items()}
    torch.save(payload, tmp_path / "old.pt")
    fresh = load_lora(copy.deepcopy(base), tmp_path / "old.pt")
    assert torch.equal(fresh(x), expected)
    with lora_disabled(fresh):
        assert torch.equal(fresh(x), base(x))


def test_failed_load_leaves_the_model_unchanged(tmp_path):
    model = add_lora(_base(), "fc1", rank=2, trainable="head")
    path = save_lora(model, tmp_path / "a.pt")

    class Other(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 4)

    wrong = Other()
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(LoRAError, match=r"trainable tensor 'head\.weight'"):
        load_lora(wrong, path)
    assert list_adapters(wrong) == []
    after = wrong.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------------- merge options


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_merge_one_adapter_keeps_the_others(mode):
    base = _base()
    model = add_lora(copy.deepcopy(base), "fc*", rank=2, trainable="head", mode=mode)
    _train(model, "default", seed=1)
    add_lora(model, ["fc1", "head"], rank=2, adapter="b", bias="all", mode=mode)
    _train(model, "b", seed=2)
    x = _x()
    with torch.no_grad():
        both = model(x)
        set_active_adapters(model, "default")
        only_default = model(x)
    set_active_adapters(model, "b")
    merge_lora(model, adapter="default")
    assert list_adapters(model) == ["b"]
    assert {c.adapter for *_, c in iter_copies(model)} == {"b"}
    with torch.no_grad():
        assert torch.allclose(model(x), both, atol=1e-5)
        with lora_disabled(model):
            assert torch.allclose(model(x), only_default, atol=1e-5)
    merge_lora(model)
    assert list_adapters(model) == []
    assert torch.allclose(model(x), both, atol=1e-5)
    assert sorted(dict(model.named_parameters())) == sorted(dict(base.named_parameters()))


def test_merge_one_adapter_refuses_when_another_copy_would_hide_it():
    model = add_lora(_base(), "head", rank=2)
    add_lora(model, "fc1", rank=2, adapter="b", trainable="head")
    with pytest.raises(LoRAError, match="hide the merged change"):
        merge_lora(model, adapter="default")
    assert sorted(list_adapters(model)) == ["b", "default"]


def test_merge_safe_refuses_non_finite_before_changing_anything():
    model = add_lora(_base(), "fc*", rank=2, trainable="head")
    p = next(p for path, *_, p in iter_lora(model) if path == "fc2.weight")
    with torch.no_grad():
        p.lora_B.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"'fc2\.weight'.*NaN or inf"):
        merge_lora(model, safe=True)
    assert list_adapters(model) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.allclose(after[k], v, equal_nan=True), k
    merge_lora(model)  # unsafe merges anyway
    assert torch.isnan(model.fc2.weight).all()
