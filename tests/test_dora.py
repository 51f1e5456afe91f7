"""DoRA: starts unchanged, factored == materialized == merged, save/load, PEFT both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_param import (
    DoRAParametrization,
    LoRAError,
    adapter_parameters,
    add_lora,
    export_peft,
    import_peft,
    iter_lora,
    load_lora,
    lora_disabled,
    merge_lora,
    save_lora,
)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout: weight (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(
            (*x.shape[:-1], self.nf)
        )


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)
        self.c1 = Conv1D(12, 12)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, ids, img):
        return self.c1(self.lin(self.emb(ids))), self.conv(img)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (2, 5), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def perturb(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.3)
            p.lora_magnitude.mul_(1 + torch.rand(p.lora_magnitude.shape, generator=g))


def close(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def hand_dora(w, p):
    """W' = m * V / ||V||, V = W + sBA, norms per output (per embedding column)."""
    update = p.lora_B @ p.lora_A
    if p.kind == "conv1d_hf":  # stored (in, out): outputs are columns
        v = w + p.scale * update.t()
        return v * (p.lora_magnitude / v.norm(dim=0))
    v = w + p.scale * update.view(w.shape)
    if p.kind == "embedding":  # PEFT: one norm per embedding dimension, over the vocabulary
        return v * (p.lora_magnitude / v.norm(dim=0))
    norms = v.flatten(1).norm(dim=1)
    return v * (p.lora_magnitude / norms).view(-1, *([1] * (w.dim() - 1)))


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_dora_starts_unchanged_matches_hand_and_merges(net, batch, mode):
    base = net(*batch)
    model = add_lora(copy.deepcopy(net), rank=2, use_dora=True, mode=mode)
    close(model(*batch), base)
    perturb(model)
    out = model(*batch)
    for path, module, _, p in iter_lora(model):
        assert isinstance(p, DoRAParametrization)
        w = dict(net.named_modules())[path.rpartition(".")[0]].weight
        with torch.no_grad():
            torch.testing.assert_close(module.weight, hand_dora(w, p), rtol=0, atol=1e-5)
    with torch.no_grad():
        close(model(*batch), out)  # the eval cache
    with lora_disabled(model):
        assert all(torch.equal(a, b) for a, b in zip(model(*batch), base, strict=True))
    loss = sum(o.square().sum() for o in out)
    loss.backward()
    params = adapter_parameters(model)
    assert len(params) == 12 and all(t.grad is not None for t in params)
    close(merge_lora(copy.deepcopy(model))(*batch), out)


def test_factored_equals_materialized_in_training(net, batch, tmp_path):
    fact = add_lora(copy.deepcopy(net), rank=3, use_dora=True)
    perturb(fact)
    save_lora(fact, tmp_path / "a.pt")
    mat = load_lora(copy.deepcopy(net), tmp_path / "a.pt", mode="materialized")
    out_f, out_m = fact(*batch), mat(*batch)
    close(out_f, out_m)
    sum(o.square().sum() for o in out_f).backward()
    sum(o.square().sum() for o in out_m).backward()
    grads = [t.grad for t in adapter_parameters(fact)]
    for g, t in zip(grads, adapter_parameters(mat), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


def test_norm_is_detached_and_cached_once_in_eval(net, batch):
    model = add_lora(copy.deepcopy(net), ["lin"], rank=2, use_dora=True)
    perturb(model)
    p = next(p for *_, p in iter_lora(model))
    w = net.lin.weight.detach()
    norm = p.weight_norm(w)
    assert not norm.requires_grad
    v = w + p.scale * p.lora_B.detach() @ p.lora_A.detach()
    torch.testing.assert_close(norm, v.norm(dim=1), rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        first = model.lin.weight
        assert model.lin.weight is first  # computed once, reused
        with torch.no_grad():
            p.lora_magnitude.mul_(2)
        assert model.lin.weight is not first  # an update to m is noticed


def test_save_load_and_config(net, batch, tmp_path):
    model = add_lora(copy.deepcopy(net), rank=2, use_dora=True)
    perturb(model)
    save_lora(model, tmp_path / "d.pt")
    again = load_lora(copy.deepcopy(net), tmp_path / "d.pt")
    close(again(*batch), model(*batch))
    plain = add_lora(copy.deepcopy(net), rank=2)
    with pytest.raises(LoRAError, match="is a lora adapter in the model but a dora adapter"):
        load_lora(plain, tmp_path / "d.pt")
    with pytest.raises(LoRAError, match="use_dora"):
        add_lora(copy.deepcopy(net), rank=2, use_dora="yes")


def test_peft_interchange_both_ways(net, batch, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    model = add_lora(copy.deepcopy(net), ["emb", "lin", "conv"], rank=2, alpha=4, use_dora=True)
    perturb(model)
    expected = model(*batch)
    export_peft(model, tmp_path / "out")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(net), str(tmp_path / "out"))
    peft_model.eval()
    with torch.no_grad():
        close(peft_model(*batch), expected)
    # PEFT-trained DoRA (random factors) into lora_param
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["emb", "lin", "conv"], use_dora=True)
    trained = peft.get_peft_model(copy.deepcopy(net), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, t in trained.named_parameters():
            if "lora_" in name:
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    trained.eval()
    with torch.no_grad():
        want = trained(*batch)
    trained.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(copy.deepcopy(net), tmp_path / "peft")
    close(ours(*batch), want)


def test_factored_input_gradients_equal_materialized():
    """Factored DoRA on Linear layers (with and without bias): outputs and the gradients of the
    input (3-D, as in a transformer) and of every adapter tensor equal the materialized DoRA's
    (the magnitude's gradient goes through _RescaleShift's output-only backward)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8, bias=False))
    fact = add_lora(copy.deepcopy(net), rank=4, use_dora=True)
    perturb(fact)
    mat = add_lora(copy.deepcopy(net), rank=4, use_dora=True, mode="materialized")
    mat.load_state_dict(fact.state_dict())
    x1 = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    out_f, out_m = fact(x1), mat(x2)
    close(out_f, out_m)
    out_f.square().sum().backward()
    out_m.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
    for g, t in zip(adapter_parameters(fact), adapter_parameters(mat), strict=True):
        torch.testing.assert_close(g.grad, t.grad, rtol=1e-4, atol=1e-6)
