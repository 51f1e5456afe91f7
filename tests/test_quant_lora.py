"""A packed (NF4 / int8) frozen base under LoRA: exactness, memory-lean backward, merge,
state dicts, copies, compile."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_param as lp
from lora_param import RequantizationWarning
from lora_param.quant import QuantizedWeight, packed_head


class Net(nn.Module):
    """One layer of each packable kind; odd element counts exercise the short last block."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 10, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(10, 9)
        self.head = nn.Linear(9 + 4 * 9, 5)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(tokens).transpose(1, 2)).relu().mean(2)
        g = self.conv2(image).relu().flatten(1)[:, : 4 * 9]
        return self.head(torch.cat([self.fc(h), g], dim=1))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 11, (3, 7)), torch.randn(3, 2, 3, 3)


def _randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for *_, p in lp.iter_lora(model):
            p.lora_B.normal_(0, 0.1)


def _dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with plain weights holding exactly the dequantized values."""
    plain = copy.deepcopy(model)
    lp.dequantize_base(plain)
    return plain


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_off_equals_dequantized_base_bit_for_bit(method, dtype):
    model = Net().to(dtype)
    lp.add_lora(model, rank=2, quantize=method)
    _randomize_lora(model)
    assert all(packed_head(m) is not None for m in (model.emb, model.conv, model.fc))
    plain = _dequantized_copy(model)
    assert all(packed_head(m) is None for m in plain.modules())
    tokens, image = _inputs()
    image = image.to(dtype)
    with lp.lora_disabled(model), lp.lora_disabled(plain):
        assert torch.equal(model(tokens, image), plain(tokens, image))
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, image), plain(tokens, image), **tol)


def test_gradients_match_plain_weights_for_every_kind():
    model = Net()
    lp.add_lora(model, rank=2, quantize="nf4", bias="all")
    _randomize_lora(model)
    plain = _dequantized_copy(model)
    tokens, image = _inputs()
    image.requires_grad_()
    model(tokens, image).square().sum().backward()
    grad, image.grad = image.grad, None
    plain(tokens, image).square().sum().backward()
    torch.testing.assert_close(grad, image.grad)

    def grads(m: nn.Module) -> dict[str, torch.Tensor]:
        # Keyed without positions in the parametrization lists (dequantizing reorders them).
        key = re.compile(r"parametrizations\.(\w+)\.\d+\.")
        return {key.sub(r"\1.", n): t.grad for n, t in m.named_parameters() if t.requires_grad}

    ours, theirs = grads(model), grads(plain)
    assert ours.keys() == theirs.keys() and len(ours) == 5 * 2 + 4  # A, B of 5 layers, 4 biases
    for name, g in ours.items():
        torch.testing.assert_close(g, theirs[name])


def test_hf_conv1d_packed():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(conv1d(12, 7), nn.ReLU(), conv1d(5, 12))
    lp.add_lora(model, rank=2, quantize="nf4")
    _randomize_lora(model)
    plain = _dequantized_copy(model)
    x = torch.randn(2, 3, 7, requires_grad=True)
    with lp.lora_disabled(model), lp.lora_disabled(plain):
        assert torch.equal(model(x), plain(x))
    model(x).square().sum().backward()
    grad, x.grad = x.grad, None
    plain(x).square().sum().backward()
    torch.testing.assert_close(grad, x.grad)


def test_training_step_matches_plain_and_saves_no_weight():
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    lp.add_lora(model, rank=4, quantize="nf4", bias="all")
    _randomize_lora(model)
    plain = _dequantized_copy(model)
    x = torch.randn(5, 32, requires_grad=True)
    saved: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().sum()
    assert (48, 32) not in saved and (16, 48) not in saved  # no dequantized weight kept
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    for (_, _, _, ours), (_, _, _, theirs) in zip(
        lp.iter_lora(model), lp.iter_lora(plain), strict=True
    ):
        torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A.grad)
        torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B.grad)
    for layer in (0, 2):
        torch.testing.assert_close(model[layer].bias.grad, plain[layer].bias.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_gives_plain_weights_summed_in_fp32(dtype):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 6)).to(dtype)
    lp.add_lora(model, rank=3, quantize="nf4")
    _randomize_lora(model)
    x = torch.randn(4, 20, dtype=dtype)
    with torch.no_grad():
        lora_on = model(x)
        expected = []
        for layer in (model[0], model[2]):
            p = layer.parametrizations.weight[1]
            base = layer.parametrizations.weight[0](
                *(getattr(layer.parametrizations.weight, f"original{i}") for i in range(4))
            )
            delta = p.scale * (p.lora_B.float() @ p.lora_A.float())
            expected.append((base.float() + delta).to(dtype))
    lp.merge_lora(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert model[0].weight.dtype == dtype and not model[0].weight.requires_grad
    assert torch.equal(model[0].weight, expected[0]) and torch.equal(model[2].weight, expected[1])
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    with torch.no_grad():
        torch.testing.assert_close(model(x), lora_on, **tol)


def test_merge_requantize_keeps_packed_and_reports_error():
    model = nn.Sequential(nn.Linear(64, 64))
    lp.add_lora(model, rank=4, quantize="nf4")
    _randomize_lora(model)
    with pytest.warns(RequantizationWarning, match="relative error up to"):
        lp.merge_lora(model, requantize=True)
    assert lp.list_adapters(model) == []
    assert isinstance(model[0].parametrizations.weight[0], QuantizedWeight)
    assert len(model[0].parametrizations.weight) == 1
    assert model[0].parametrizations.weight.original0.dtype == torch.uint8


def test_remove_lora_leaves_packed_base_untouched():
    model = nn.Sequential(nn.Linear(16, 8))
    lp.quantize_base(model, method="int8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    objects = [p for n, p in model.named_parameters()]
    lp.add_lora(model, rank=2)
    _randomize_lora(model)
    lp.remove_lora(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert [p for n, p in model.named_parameters()] == objects


def test_state_dict_round_trip_and_plain_checkpoint():
    torch.manual_seed(3)
    pretrained = Net()
    plain_state = copy.deepcopy(pretrained.state_dict())
    model = copy.deepcopy(pretrained)
    lp.add_lora(model, rank=2, quantize="nf4")
    _randomize_lora(model)
    state = model.state_dict()
    assert state["fc.parametrizations.weight.original0"].dtype == torch.uint8
    fresh = Net()  # other random weights
    lp.add_lora(fresh, rank=2, quantize="nf4")
    fresh.load_state_dict(state)
    tokens, image = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(tokens, image), model(tokens, image))
    other = Net()
    lp.add_lora(other, rank=2, quantize="nf4")
    lp.load_base_state_dict(other, plain_state)
    base_keys = [k for k in state if "lora_" not in k]
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in base_keys)


def test_deepcopy_dtype_cast_and_device_move():
    model = nn.Sequential(nn.Linear(24, 12), nn.Tanh(), nn.Linear(12, 4))
    lp.add_lora(model, rank=2, quantize="nf4")
    _randomize_lora(model)
    x = torch.randn(3, 24)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        twin[0].parametrizations.weight.original0.zero_()
        assert not torch.equal(twin(x), model(x))  # the copy owns its packed tensors
    moved = copy.deepcopy(model).to("cpu")
    half = copy.deepcopy(model).to(torch.bfloat16)
    scales = model[0].parametrizations.weight.original2
    assert torch.equal(half[0].parametrizations.weight.original2, scales)  # not rounded
    with lp.lora_disabled(half), lp.lora_disabled(model):
        assert half[0].weight.dtype == torch.bfloat16
        assert torch.equal(half[0].weight, model[0].weight.to(torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(moved(x), model(x))


def test_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    lp.add_lora(model, rank=2, quantize="nf4")
    _randomize_lora(model)
    x = torch.randn(2, 16)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    assert model[0].parametrizations.weight[1].lora_B.grad is not None


def test_dequantize_base_keeps_lora_on_top():
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    lp.add_lora(model, rank=2, quantize="nf4")
    _randomize_lora(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = model(x)
        weight = model[0].weight.clone()
    lp.dequantize_base(model)
    assert packed_head(model[0]) is None and lp.list_adapters(model) == ["default"]
    assert list(model[0].state_dict()) == [
        "parametrizations.weight.original",
        "parametrizations.weight.0.lora_A",
        "parametrizations.weight.0.lora_B",
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
        assert torch.equal(model[0].weight, weight)
    lp.remove_lora(model)
    assert type(model[0]) is nn.Linear and isinstance(model[0].weight, nn.Parameter)


def test_add_lora_failure_undoes_quantization(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    weights = [model[0].weight, model[1].weight]
    before = copy.deepcopy(model.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("lora_param.core.inject.inject", broken)
    with pytest.raises(RuntimeError, match="boom"):
        lp.add_lora(model, rank=2, quantize="nf4")
    assert [model[0].weight, model[1].weight] == weights
    assert all(w.requires_grad for w in weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_adapter_files_and_parameter_counts(tmp_path):
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = lp.add_lora(copy.deepcopy(base), rank=2, quantize="nf4")
    _randomize_lora(model)
    lp.save_lora(model, tmp_path / "adapter.pt")
    fresh = lp.quantize_base(copy.deepcopy(base))
    lp.load_lora(fresh, tmp_path / "adapter.pt")
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    counts = lp.parameter_counts(model)
    assert counts.base == sum(p.numel() for p in base.parameters())  # weights, not bytes
    assert counts.lora == counts.trainable == 2 * (16 + 32) + 2 * (32 + 4)
