"""prepare_hotswap / hotswap_lora: new adapter weights in a compiled model, no recompilation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    add_lora,
    iter_lora,
    load_lora,
    lora_state_dict,
    save_lora,
)
from lora_param.routing import hotswap_lora, mixed_adapters, prepare_hotswap

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounter  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.fc2(torch.relu(self.fc1(h))).mean(1)


def _base() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_A.copy_(torch.randn(p.lora_A.shape, generator=g) * 0.5)
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.5)


def _adapter_file(tmp_path, name: str, targets, seed: int, **options) -> tuple:
    """A file saved from a model with one adapter, and that model (the reference)."""
    model = add_lora(_base(), targets, **options)
    _randomize(model, seed)
    path = save_lora(model, tmp_path / f"{name}.pt")
    return path, model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def test_swaps_under_compile_without_recompiling(tmp_path):
    first, first_ref = _adapter_file(tmp_path, "first", None, 1, rank=2)
    second, second_ref = _adapter_file(
        tmp_path, "second", ["conv", "fc1", "fc2"], 2, rank={"fc2": 3, "*": 6}, alpha=5
    )
    third, third_ref = _adapter_file(tmp_path, "third", None, 3, rank=4, use_rslora=True, alpha=3)
    model = load_lora(_base(), first).eval()
    prepare_hotswap(model, max_rank=6)
    x = _ids()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), first_ref(x), **TOL)
        for path, ref in [(second, second_ref), (third, third_ref), (first, first_ref)]:
            hotswap_lora(model, path)
            torch.testing.assert_close(compiled(x), ref(x), **TOL)
            torch.testing.assert_close(model(x), ref(x), **TOL)  # eager, cached path
    assert counter.frame_count == 1, counter.frame_count


def test_prepared_adapters_train_save_and_mix(tmp_path):
    path, _ref = _adapter_file(tmp_path, "a", None, 1, rank=2, alpha=4, adapter="a")
    model = load_lora(_base(), path)
    add_lora(model, ["fc1"], rank=3, adapter="b")
    _randomize(model, 5)
    before = copy.deepcopy(model).eval()
    prepare_hotswap(model, max_rank=5)
    assert all(p.lora_A.shape[0] == 5 and p.rank == 5 for *_, p in iter_lora(model))
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), before(x), **TOL)
        # a file saved after preparation describes the same update
        reloaded = load_lora(_base(), save_lora(model, tmp_path / "padded.pt")).eval()
        torch.testing.assert_close(reloaded(x), before(x), **TOL)
        with mixed_adapters(model, ["a", "b", "__base__"]):
            mixed = model(x)
        with mixed_adapters(before, ["a", "b", "__base__"]):
            torch.testing.assert_close(mixed, before(x), **TOL)
    model.train()
    model(x).sum().backward()
    assert all(p.lora_B.grad is not None for *_, p in iter_lora(model))


def _snapshot(model: nn.Module) -> dict:
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    state.update({path: p.scale.clone() for path, _, _, p in iter_lora(model)})
    return state


def _assert_same(model: nn.Module, snap: dict) -> None:
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    assert all(torch.equal(now[k], v) for k, v in snap.items())


def test_swaps_that_do_not_fit_change_nothing(tmp_path):
    start, _ = _adapter_file(tmp_path, "start", ["conv", "fc1"], 1, rank=2)
    big, _ = _adapter_file(tmp_path, "big", ["conv", "fc1"], 2, rank=5)
    wider, _ = _adapter_file(tmp_path, "wider", ["conv", "fc1", "fc2"], 3, rank=2)
    model = load_lora(_base(), start)
    with pytest.raises(LoRAError, match="prepare_hotswap"):
        hotswap_lora(model, big)
    prepare_hotswap(model, max_rank=4)
    snap = _snapshot(model)
    with pytest.raises(LoRAError, match=r"'.*' of '.*' has rank 5, more than the 4"):
        hotswap_lora(model, big)
    _assert_same(model, snap)
    with pytest.raises(LoRAError, match=r"adapts \['fc2.weight'\]"):
        hotswap_lora(model, wider)
    _assert_same(model, snap)
    with pytest.raises(LoRAError, match="no adapter named 'other'"):
        hotswap_lora(model, start, adapter="other")
    with pytest.raises(LoRAError, match="smaller than the rank"):
        prepare_hotswap(model, max_rank=3)
    _assert_same(model, snap)
    with pytest.raises(LoRAError, match="positive integer"):
        prepare_hotswap(model, max_rank=0)
