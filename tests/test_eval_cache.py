"""The evaluation-cache policy: which layers keep ``W + sBA`` under no_grad, and exactness."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    LoRAParametrization,
    add_lora,
    eval_cache_bytes,
    iter_lora,
    merge_lora,
    set_eval_cache,
)
from lora_param.core.entries import adapter_lists
from lora_param.core.eval_cache import AUTO_EVAL_CACHE_MAX_NUMEL


def _policies(model: nn.Module) -> dict[str, bool]:
    """Whether each adapted tensor's evaluation cache is on (one cache per tensor)."""
    return {path: plist.eval_cache for path, plist in adapter_lists(model)}


class Zoo(nn.Module):
    """One layer of each path: factored Linear / Conv2d / Embedding, materialized MHA in_proj."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 8)
        self.small = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (b, 4, 16)
        h, _ = self.attn(h, h, h, need_weights=False)
        h = self.conv(h.unsqueeze(1)).mean(-1)  # (b, 4, 4)
        return self.small(torch.relu(self.fc(h.flatten(1).repeat(1, 4))))


TARGETS = ["emb", "attn.in_proj_weight", "attn.out_proj", "conv", "fc", "small"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = add_lora(Zoo(), TARGETS, rank=2)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.normal_(0, 0.5)
    return model.eval()


IDS = torch.randint(0, 20, (3, 4), generator=torch.Generator().manual_seed(1))


def test_default_rule_caches_small_weights_only():
    model = nn.ModuleDict(
        {
            "small": nn.Linear(64, 64, device="meta"),
            "edge": nn.Linear(1536, 2048, device="meta"),  # exactly the limit
            "big": nn.Linear(1537, 2048, device="meta"),
            "llm": nn.Linear(2048, 2048, device="meta"),  # a 2048-wide LLM projection
        }
    )
    add_lora(model, rank=1)
    assert AUTO_EVAL_CACHE_MAX_NUMEL == 2048 * 1536
    assert _policies(model) == {
        "small.weight": True,
        "edge.weight": True,
        "big.weight": False,
        "llm.weight": False,
    }


def test_policies_decide_per_layer_and_report():
    model = _model()
    assert all(set_eval_cache(model, "always").values())
    assert not any(set_eval_cache(model, "never").values())
    report = set_eval_cache(model, "auto", max_numel=16 * 16)
    assert report == {
        "emb.weight": False,  # 20 x 16 = 320 elements
        "attn.in_proj_weight": False,  # 48 x 16
        "attn.out_proj.weight": True,  # 16 x 16
        "conv.weight": True,
        "fc.weight": False,  # 8 x 64 = 512
        "small.weight": True,
    }
    assert _policies(model) == report


def test_budget_caches_smallest_first():
    model = _model()
    # sizes in fp32 bytes: conv 144, small 96, out_proj 1024, emb 1280, fc 2048, in_proj 3072
    report = set_eval_cache(model, "auto", budget_bytes=96 + 144 + 1024)
    assert [k for k, v in report.items() if v] == [
        "attn.out_proj.weight",
        "conv.weight",
        "small.weight",
    ]
    set_eval_cache(model, "auto", budget_bytes=96 + 144 + 1024 - 1)
    with torch.no_grad():
        model(IDS)
    assert eval_cache_bytes(model) == 96 + 144


def test_several_adapters_on_one_tensor_share_one_cache():
    """One cache per tensor: two enabled adapters keep one adapted copy, not one each."""
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=1)
    add_lora(model, ["0"], rank=1, adapter="other")
    assert set_eval_cache(model, "always") == {"0.weight": True}
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.normal_()
        out = model(torch.ones(1, 4))
    assert eval_cache_bytes(model) == 4 * 4 * 4
    merged = merge_lora(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(out, merged(torch.ones(1, 4)))


@pytest.mark.parametrize("policy", ["auto", "always", "never"])
def test_every_policy_computes_what_the_merged_model_computes(policy):
    model = _model()
    merged = merge_lora(copy.deepcopy(model)).eval()
    set_eval_cache(model, policy, max_numel=16 * 16)
    with torch.no_grad():
        expected = merged(IDS)
        first, second = model(IDS), model(IDS)  # the second call reads the caches, if any
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_never_keeps_no_copy_and_factored_layers_form_no_weight(monkeypatch):
    model = _model()
    with torch.no_grad():
        model(IDS)
    assert eval_cache_bytes(model) > 0  # the small default-cached layers
    set_eval_cache(model, "never")
    assert eval_cache_bytes(model) == 0  # switching drops what was held
    formed: list[tuple[int, ...]] = []
    original = LoRAParametrization.adapt

    def counting(self, weight, dropout=False):
        formed.append(tuple(weight.shape))
        return original(self, weight, dropout)

    monkeypatch.setattr(LoRAParametrization, "adapt", counting)
    with torch.no_grad():
        model(IDS)
    assert eval_cache_bytes(model) == 0
    # only what MHA reads directly (in_proj, out_proj.weight; several times a forward), not kept
    assert set(formed) == {(48, 16), (16, 16)}


def test_large_weight_is_evaluated_factored_by_default():
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Linear(1537, 2048), nn.Linear(4, 4)), ["0", "1"], rank=1)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.normal_()
        x = torch.randn(2, 1537)
        out = model[0](x)
        model[1](torch.randn(2, 4))
    plist = model[0].parametrizations.weight
    expected = x @ (plist.original + plist[0].delta()).T
    assert eval_cache_bytes(model) == 4 * 4 * 4  # only the small layer
    torch.testing.assert_close(out, expected + model[0].bias, rtol=1e-4, atol=1e-4)


def test_always_caches_and_training_frees_the_copy():
    model = _model()
    set_eval_cache(model, "always")
    with torch.no_grad():
        model(IDS)
    held = eval_cache_bytes(model)
    assert held == sum(p.lora_B.element_size() * p.delta().numel() for *_, p in iter_lora(model))
    model.train()
    assert eval_cache_bytes(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "sometimes"}, "unknown eval-cache policy"),
        ({"max_numel": -1}, "max_numel"),
        ({"budget_bytes": -5}, "budget_bytes"),
    ],
)
def test_bad_arguments_change_nothing(kwargs, message):
    model = _model()
    before = _policies(model)
    with pytest.raises(LoRAError, match=message):
        set_eval_cache(model, **kwargs)
    assert _policies(model) == before


def test_model_without_adapters_is_an_error():
    with pytest.raises(LoRAError, match="add_lora"):
        set_eval_cache(nn.Linear(2, 2))
