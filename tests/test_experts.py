"""Mixture-of-experts: per-expert LoRA on 3-D expert tensors, globs over parameter paths, PEFT.

The tiny Mixtral (transformers 5) holds its experts as ``gate_up_proj`` (4, 256, 64) and
``down_proj`` (4, 64, 128); ``_Experts`` below is a stand-in with the other layout
(``is_transposed=True``, ``(experts, in, out)``) and an explicit per-expert loop as reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import re

import pytest
import torch
from family_checks import run_lora_lifecycle
from torch import nn

from lora_param import (
    LoRAError,
    add_lora,
    disable_lora,
    enable_lora,
    export_peft,
    import_peft,
    iter_lora,
    list_adapters,
    load_lora,
    merge_lora,
    remove_lora,
    save_lora,
)
from lora_param.variants.experts import ExpertLoRAParametrization


class _Experts(nn.Module):
    """Two experts stored (experts, in, out), as gpt-oss does; token t goes to expert t % E."""

    is_transposed = True

    def __init__(self, experts: int = 3, dim: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, dim, hidden))
        self.down = nn.Parameter(torch.randn(experts, hidden, dim))
        self.scale = nn.Parameter(torch.ones(experts, dim))  # 2-D: not an expert tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = torch.arange(x.shape[0]) % self.up.shape[0]
        h = torch.bmm(x[:, None], self.up[e])[:, 0].relu()
        return torch.bmm(h[:, None], self.down[e])[:, 0] * self.scale[e]


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.experts = _Experts()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(self.proj(x))


def _randomize_b(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.1)


def _tiny_mixtral(layers: int = 1):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(
        num_local_experts=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        vocab_size=100,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    if not hasattr(model.model.layers[0].mlp.experts, "gate_up_proj"):
        pytest.skip("3-D expert tensors need transformers >= 5")
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the update


@pytest.mark.parametrize("layout", [None, "out_in"])
def test_per_expert_update_matches_a_loop(layout):
    torch.manual_seed(0)
    block = _Block()
    add_lora(block, "experts.up", rank=2, alpha=3, expert_layout=layout)
    (_, _, _, p), *_ = iter_lora(block)
    assert isinstance(p, ExpertLoRAParametrization)
    assert p.lora_A.shape == ((3, 2, 6) if layout is None else (3, 2, 10))
    _randomize_b(block)
    base = block.experts.parametrizations.up.original
    for e in range(3):
        delta = p.scale * p.lora_B[e] @ p.lora_A[e]
        want = base[e] + (delta.t() if layout is None else delta)  # is_transposed: (in, out)
        torch.testing.assert_close(block.experts.up[e], want)
    assert sum(t.numel() for t in (p.lora_A, p.lora_B)) == 3 * 2 * (6 + 10)


def test_mixtral_experts_lifecycle(tmp_path):
    """Train, toggles, merge, save/load on Mixtral's 3-D experts (run_lora_lifecycle)."""
    model = _tiny_mixtral()
    ids = _ids()
    report = run_lora_lifecycle(
        model,
        "*.experts.*_proj",
        ids,
        lambda m, x: m(x).logits,
        lambda m, x: m(x, labels=x).loss,
        tmp_path,
        rank=2,
        expect_kinds=["experts"],
    )
    assert report.adapted == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    assert report.loss_after < report.loss_before


def test_mixtral_two_adapters_cache_and_remove(tmp_path):
    model = _tiny_mixtral()
    ids = _ids()
    with torch.no_grad():
        y0 = model(ids).logits
    add_lora(model, "*.experts.gate_up_proj", adapter="a", rank=2)
    add_lora(model, "*.experts", adapter="b", rank=3)  # the module: both tensors
    _randomize_b(model)
    with torch.no_grad():
        both = model(ids).logits
        assert torch.equal(model(ids).logits, both)  # the eval cache gives the same
    disable_lora(model, "b")
    with torch.no_grad():
        only_a = model(ids).logits
    enable_lora(model, "b")
    assert not torch.allclose(both, only_a) and not torch.allclose(only_a, y0)
    save_lora(model, tmp_path / "ab.pt")
    fresh = _tiny_mixtral()
    load_lora(fresh, tmp_path / "ab.pt")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, both)
    merge_lora(fresh)
    assert set(dict(fresh.named_parameters())) == set(dict(_tiny_mixtral().named_parameters()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, both, atol=1e-5, rtol=1e-4)
    remove_lora(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, y0)


def test_no_targets_adapts_experts_and_skips_the_router():
    model = _tiny_mixtral()
    add_lora(model, rank=2)
    kinds = {path: p.kind for path, *_, p in iter_lora(model)}
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "experts"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "linear"
    assert not any(".mlp.gate." in path for path in kinds)  # the router keeps its routing
    router = _tiny_mixtral()
    add_lora(router, "*.mlp.gate.weight", rank=2)  # adapted when named: a (experts, hidden) matrix
    (_, _, _, p), *_ = iter_lora(router)
    assert (p.kind, p.lora_A.shape, p.lora_B.shape) == ("param", (2, 64), (4, 2))


def test_expert_layout_errors_and_old_files(tmp_path):
    with pytest.raises(LoRAError, match="expert_layout"):
        add_lora(_Block(), "experts.up", expert_layout="oi")
    block = _Block()
    add_lora(block, "experts.up", rank=2, expert_layout="out_in")
    save_lora(block, tmp_path / "a.pt")
    other = _Block()
    load_lora(other, tmp_path / "a.pt")  # the file's layout wins over the module's flag
    (_, _, _, p), *_ = iter_lora(other)
    assert p.fan_in_fan_out is False and p.lora_A.shape == (3, 2, 10)


# ----------------------------------------------------------------------------- globs


def test_globs_regexes_and_callables_reach_parameter_paths():
    mha = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))
    add_lora(mha, "*.self_attn.in_proj_weight", rank=2)
    assert [t for t, *_ in iter_lora(mha)] == ["0.self_attn.in_proj_weight"]

    block = _Block()
    add_lora(block, "*.u*", rank=2)  # a parameter glob; 'experts.scale' is 2-D but unmatched
    assert [t for t, *_ in iter_lora(block)] == ["experts.up"]
    block = _Block()
    add_lora(block, re.compile(r"experts\.(up|down)"), rank=2, exclude=re.compile(r".*down"))
    assert [t for t, *_ in iter_lora(block)] == ["experts.up"]
    block = _Block()
    add_lora(block, lambda name, module: name.endswith("down"), rank=2)
    assert [t for t, *_ in iter_lora(block)] == ["experts.down"]


def test_patterns_skip_position_tables_but_literal_paths_adapt_them():
    class _Vit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 5, 6))  # 3-D, not experts
            self.head = nn.Linear(6, 2)

    vit = _Vit()
    add_lora(vit, "*", rank=2)
    assert [t for t, *_ in iter_lora(vit)] == ["head.weight"]
    with pytest.raises(LoRAError, match="matches no adaptable layer"):
        add_lora(_Vit(), "po*")
    named = add_lora(_Vit(), "pos", rank=1)  # literal: per expert along dim 0 (one here)
    assert [p.kind for *_, p in iter_lora(named)] == ["experts"]


def test_module_match_decides_over_its_parameters():
    block = _Block()
    add_lora(block, "*", rank=2)  # every supported layer; the 2-D 'experts.scale' is not one
    assert sorted(t for t, *_ in iter_lora(block)) == ["experts.down", "experts.up", "proj.weight"]
    with pytest.raises(LoRAError, match="matches no adaptable layer"):
        add_lora(_Block(), "*.bias")  # only 1-D tensors: nothing to adapt
    with pytest.raises(LoRAError, match="exclude pattern"):
        add_lora(_Block(), "*", exclude="*.nothing")
    with pytest.raises(LoRAError, match="1-D"):
        add_lora(_Block(), "proj.bias")  # named literally: still an error


# ----------------------------------------------------------------------------- PEFT


def _peft_mixtral(model, folder):
    peft = pytest.importorskip("peft")
    return peft.PeftModel.from_pretrained(model, str(folder)).eval()


def test_experts_to_peft_and_back_same_outputs(tmp_path):
    pytest.importorskip("safetensors")
    model = _tiny_mixtral(layers=2)
    add_lora(model, ["*.experts.*_proj", "*.q_proj"], rank={"*down_proj": 3, "*": 2}, alpha=5)
    _randomize_b(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    export_peft(model, tmp_path / "ours")
    theirs = _peft_mixtral(_tiny_mixtral(layers=2), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-4)
    back = import_peft(_tiny_mixtral(layers=2), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-6, rtol=1e-5)


def test_peft_experts_to_lora_param_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["k_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(_tiny_mixtral(), config).eval()
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = import_peft(_tiny_mixtral(), tmp_path / "peft")
    kinds = sorted(p.kind for *_, p in iter_lora(ours))
    assert kinds == ["experts", "experts", "linear"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-5, rtol=1e-4)


def _tiny_gpt_oss():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip("gpt-oss needs transformers >= 4.55")
    cfg = transformers.GptOssConfig(
        num_local_experts=4,
        num_experts_per_tok=2,
        hidden_size=32,
        intermediate_size=48,
        head_dim=8,
        num_hidden_layers=1,
        layer_types=["full_attention"],
        vocab_size=100,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(cfg).eval()


def test_gpt_oss_transposed_experts_peft_both_ways(tmp_path):
    """gpt-oss stores experts (experts, in, out) with is_transposed=True."""
    peft = pytest.importorskip("peft")
    model = _tiny_gpt_oss()
    if not getattr(model.model.layers[0].mlp.experts, "is_transposed", False):
        pytest.skip("this transformers has no is_transposed gpt-oss experts")
    add_lora(model, "*.experts.*_proj", rank=2, alpha=3)
    assert all(p.fan_in_fan_out for *_, p in iter_lora(model))
    _randomize_b(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    export_peft(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_tiny_gpt_oss(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-4)
    theirs.save_pretrained(str(tmp_path / "peft"))
    back = import_peft(_tiny_gpt_oss(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, atol=1e-5, rtol=1e-4)


def test_transposed_experts_peft_both_ways(tmp_path):
    """The (experts, in, out) layout (is_transposed=True) through PEFT's ParamWrapper."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Block()
    state = base.state_dict()

    def fresh():
        b = _Block()
        b.load_state_dict(state)
        return b

    x = torch.randn(5, 6)
    ours = add_lora(fresh(), "experts.*", rank=2, alpha=4)
    _randomize_b(ours)
    want = ours(x)
    export_peft(ours, tmp_path / "t")
    theirs = peft.PeftModel.from_pretrained(fresh(), str(tmp_path / "t"))
    torch.testing.assert_close(theirs(x), want, atol=1e-5, rtol=1e-4)
    back = import_peft(fresh(), tmp_path / "t")
    torch.testing.assert_close(back(x), want)
    flipped = add_lora(fresh(), "experts.up", expert_layout="out_in", rank=2)
    with pytest.raises(LoRAError, match="is_transposed"):
        export_peft(flipped, tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_per_expert_refusals_name_the_tensor_kind():
    """LoRA hot-swaps and combines elsewhere: the refusal says it is the per-expert form."""
    from lora_param import combine_adapters, prepare_hotswap

    torch.manual_seed(0)
    model = _Block()
    add_lora(model, ["experts"], rank=2)
    for call in (
        lambda: prepare_hotswap(model, max_rank=4),
        lambda: combine_adapters(model, {"default": 1.0}, "sum"),
    ):
        with pytest.raises(LoRAError, match="lora adapters on 'experts' tensors"):
            call()
    assert list_adapters(model) == ["default"]
