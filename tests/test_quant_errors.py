"""Bad input to the quantized base: a clear LoRAError, and the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], list[bool]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return repr(model), state, [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    text, state, grads = snapshot
    assert repr(model) == text
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "nf3"}, "method must be one of"),
        ({"block_size": 48}, "block_size 48"),
        ({"block_size": 0}, "block_size 0"),
        ({"compute_dtype": torch.int8}, "compute_dtype"),
        ({"targets": "0.bias"}, "at least 2 dimensions"),
        ({"targets": "nothing*"}, "matches no adaptable layer"),
        ({"targets": ["0", "1"]}, "not support"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = _model()
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match=match):
        lp.quantize_base(model, **kwargs)
    _assert_unchanged(model, snapshot)


def test_non_floating_weight():
    model = _model()
    model[2].weight = nn.Parameter(torch.zeros(4, 16, dtype=torch.int32), requires_grad=False)
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match="floating-point"):
        lp.quantize_base(model)
    _assert_unchanged(model, snapshot)


def test_quantizing_twice_or_under_lora():
    model = _model()
    lp.quantize_base(model, "0")
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match="already quantized"):
        lp.quantize_base(model)  # layer 2 would be fine: nothing is done to it either
    _assert_unchanged(model, snapshot)
    with pytest.raises(LoRAError, match="already quantized"):
        lp.add_lora(model, rank=2, quantize="nf4")
    _assert_unchanged(model, snapshot)
    other = lp.add_lora(_model(), rank=2)
    snapshot = _snapshot(other)
    with pytest.raises(LoRAError, match="quantize the base before add_lora"):
        lp.quantize_base(other)
    _assert_unchanged(other, snapshot)


def test_training_a_packed_base_is_refused():
    model = lp.quantize_base(_model(), method="int8")
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match="stored packed"):
        lp.add_lora(model, "2", rank=2, trainable="0")
    _assert_unchanged(model, snapshot)
    fresh = _model()
    snapshot = _snapshot(fresh)
    with pytest.raises(LoRAError, match="cannot train"):
        lp.add_lora(fresh, rank=2, quantize="nf4", trainable="2")
    _assert_unchanged(fresh, snapshot)
    with pytest.raises(LoRAError, match="method must be one of"):
        lp.add_lora(fresh, rank=2, quantize="fp4")
    _assert_unchanged(fresh, snapshot)


@pytest.mark.parametrize(
    "settings",
    [{"method": "int8"}, {"block_size": 128}, {"double_quant": False}],
)
def test_packed_state_dict_that_does_not_fit(settings):
    source = lp.quantize_base(_model(), **settings)
    model = lp.quantize_base(_model())
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match="state dict"):
        model.load_state_dict(source.state_dict(), strict=False)
    _assert_unchanged(model, snapshot)
    with pytest.raises(LoRAError, match="state dict"):
        model[0].load_state_dict(source[0].state_dict(), strict=False)
    _assert_unchanged(model, snapshot)


def test_plain_checkpoint_of_wrong_shape():
    model = lp.quantize_base(_model())
    snapshot = _snapshot(model)
    state = copy.deepcopy(_model().state_dict())
    state["0.weight"] = torch.zeros(16, 9)
    with pytest.raises(LoRAError, match="shape"):
        lp.load_base_state_dict(model, state)
    _assert_unchanged(model, snapshot)


def test_load_base_state_dict_names_a_packed_checkpoint_weight():
    """A packed tensor where the plain checkpoint weight goes: the message says what to pass."""
    torch.manual_seed(0)
    model = lp.add_lora(_model(), rank=2, quantize="nf4")
    state = dict(_model().state_dict())
    state["0.weight"] = state["0.weight"].to(torch.int8)
    snapshot = _snapshot(model)
    with pytest.raises(LoRAError, match=r"'0\.weight' is torch\.int8, not a plain floating-point"):
        lp.load_base_state_dict(model, state)
    _assert_unchanged(model, snapshot)
