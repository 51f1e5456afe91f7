"""combine_adapters: exact cat, SVD truncation, TIES/DARE/magnitude pruning on the true ΔW."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_param import LoRAError, add_lora, iter_lora, list_adapters
from lora_param.routing import combine_adapters
from lora_param.routing.arithmetic import _task_merge


class Conv1D(nn.Module):
    """Hugging Face's Conv1D: weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(
            *x.shape[:-1], self.nf
        )


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.hf = Conv1D(7, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 5)


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    model = Zoo()
    add_lora(model, ["emb", "conv", "hf", "fc"], rank=2, alpha=3, adapter="a")
    add_lora(model, ["conv", "attn", "fc"], rank=3, alpha=5, use_rslora=True, adapter="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_A.copy_(torch.randn(p.lora_A.shape, generator=g))
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g))
    return model


def _deltas(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {path: p.delta() for path, _, _, p in iter_lora(model) if p.adapter == adapter}


def _weighted(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for adapter, w in weights.items():
        for path, d in _deltas(model, adapter).items():
            out[path] = out.get(path, torch.zeros_like(d)) + w * d
    return out


def _assert_deltas(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path, d in want.items():
        torch.testing.assert_close(got[path], d, rtol=1e-4, atol=1e-4, msg=path)


def test_cat_is_the_exact_weighted_sum_over_the_union_of_layers():
    model = _zoo()
    weights = {"a": 0.7, "b": -0.3}
    report = combine_adapters(model, weights, name="ab", method="cat")
    want = _weighted(model, weights)
    assert set(want) == {"emb.weight", "conv.weight", "hf.weight", "attn.in_proj_weight",
                         "fc.weight"}  # fmt: skip
    _assert_deltas(_deltas(model, "ab"), want)
    assert report.ranks["fc.weight"] == 5 and report.ranks["emb.weight"] == 2
    assert report.max_error == 0.0
    assert set(list_adapters(model)) == {"a", "b", "ab"}


def test_svd_at_full_rank_equals_cat_and_truncation_reports_its_error():
    model = _zoo()
    weights = {"a": 0.7, "b": -0.3}
    full = combine_adapters(model, weights, name="full", method="svd", rank=5)
    want = _weighted(model, weights)
    _assert_deltas(_deltas(model, "full"), want)
    assert full.max_error < 1e-5
    low = combine_adapters(model, weights, name="low", method="svd", rank=1)
    got = _deltas(model, "low")
    for path, d in want.items():
        direct = float((d - got[path]).norm() / d.norm())
        assert low.relative_error[path] == pytest.approx(direct, rel=1e-3, abs=1e-6), path
    assert low.relative_error["fc.weight"] > 0.05
    assert "max relative error" in str(low)


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "dare", "magnitude_prune"])
def test_weights_one_and_zero_give_back_the_first_adapter(method):
    model = _zoo()
    density = 1.0 if method in ("ties", "dare", "magnitude_prune") else None
    rank = None if method == "cat" else 2
    combine_adapters(model, {"a": 1.0, "b": 0.0}, name="x", method=method, rank=rank,
                     density=density)  # fmt: skip
    want = _weighted(model, {"a": 1.0, "b": 0.0})
    _assert_deltas(_deltas(model, "x"), want)


def test_dare_is_seeded_and_pruning_methods_keep_density():
    model = _zoo()
    weights = {"a": 0.5, "b": 0.5}
    for name, seed in [("d0", 0), ("d0again", 0), ("d1", 1)]:
        combine_adapters(model, weights, name=name, method="dare", density=0.5, rank=6, seed=seed)
    d0, again, d1 = (_deltas(model, n)["fc.weight"] for n in ("d0", "d0again", "d1"))
    assert torch.equal(d0, again)
    assert not torch.allclose(d0, d1)


def test_task_merges_on_small_updates():
    x = torch.tensor([[4.0, -1.0], [2.0, 0.5]])
    y = torch.tensor([[-1.0, -3.0], [1.0, 0.25]])
    g = torch.Generator().manual_seed(0)
    mp = _task_merge([x, y], "magnitude_prune", 0.5, g)
    torch.testing.assert_close(mp, torch.tensor([[4.0, -3.0], [3.0, 0.0]]))
    ties = _task_merge([x, y], "ties", 0.5, g)
    # kept: x -> 4, 2; y -> -3, 1; elected signs +, -, +, 0; means of agreeing entries
    torch.testing.assert_close(ties, torch.tensor([[4.0, -3.0], [1.5, 0.0]]))


def test_bad_arguments_change_nothing():
    model = _zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        ({"weights": {"a": 1.0, "zz": 1.0}, "name": "n"}, "no adapter named 'zz'"),
        ({"weights": {"a": 1.0}, "name": "b"}, "already exists"),
        ({"weights": {"a": 1.0}, "name": "n", "method": "ties"}, "needs density"),
        ({"weights": {"a": 1.0}, "name": "n", "method": "cat", "rank": 3}, "sum of the ranks"),
        ({"weights": {"a": 1.0}, "name": "n", "method": "svd", "density": 0.5}, "density= applies"),
        ({"weights": {"a": 1.0}, "name": "n", "method": "mean"}, "method must be"),
        ({"weights": {}, "name": "n"}, "non-empty"),
        ({"weights": {"a": True}, "name": "n"}, "must be a number"),
    ]
    for kwargs, message in cases:
        with pytest.raises(LoRAError, match=message):
            combine_adapters(model, **kwargs)
    assert list_adapters(model) == ["a", "b"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
