"""The 0.3 protocols from the outside: files written by 0.2, configuration as data, capability
refusals, the one evaluation cache, the old module paths, and the dependency direction."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAConfig, LoRAError

DATA = Path(__file__).parent / "data" / "v02"
ROOT = Path(__file__).resolve().parents[1]


def _load_maker():
    spec = importlib.util.spec_from_file_location("v02_make_files", DATA / "make_files.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- 0.2's files


def test_adapter_file_written_by_0_2_loads_with_the_same_outputs():
    maker = _load_maker()
    ref = torch.load(DATA / "adapters_ref.pt", weights_only=True)
    model = maker.Net()
    model.load_state_dict(ref["base"])
    lp.load_lora(model, DATA / "adapters.pt")
    assert {p.variant for *_, p in lp.iter_lora(model)} == {"lora", "dora"}
    assert lp.list_adapters(model) == ["a", "d", "e"]
    with torch.no_grad():
        for name, expected in ref["outputs"].items():
            lp.set_active_adapters(model, [name])
            torch.testing.assert_close(model(ref["ids"]), expected, rtol=1e-5, atol=1e-6)


def test_file_written_again_is_format_2_and_reads_back(tmp_path):
    maker = _load_maker()
    ref = torch.load(DATA / "adapters_ref.pt", weights_only=True)
    model = maker.Net()
    model.load_state_dict(ref["base"])
    lp.load_lora(model, DATA / "adapters.pt")
    path = lp.save_lora(model, tmp_path / "again.pt")
    assert torch.load(path, weights_only=True)["format"] == "lora_param.adapter/2"
    fresh = maker.Net()
    fresh.load_state_dict(ref["base"])
    lp.load_lora(fresh, path)
    with torch.no_grad():
        lp.set_active_adapters(fresh, ["d"])
        torch.testing.assert_close(fresh(ref["ids"]), ref["outputs"]["d"], rtol=1e-5, atol=1e-6)


def test_nf4_state_dict_of_0_2_with_a_0d_offset_loads():
    saved = torch.load(DATA / "nf4_state.pt", weights_only=True)
    assert saved["state"]["0.parametrizations.weight.original3"].dim() == 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 4))
    lp.add_lora(model, rank=2, quantize="nf4")
    assert model[0].parametrizations.weight.original3.shape == (1,)  # 1-D now: FSDP2 shards it
    model.load_state_dict(saved["state"])
    with torch.no_grad():
        torch.testing.assert_close(model(saved["x"]), saved["y"], rtol=1e-5, atol=1e-6)


def test_a_newer_format_is_refused_with_the_fix(tmp_path):
    torch.save({"format": "lora_param.adapter/9", "config": "{}"}, tmp_path / "new.pt")
    with pytest.raises(LoRAError, match="newer lora_param.*upgrade"):
        lp.load_lora(nn.Sequential(nn.Linear(2, 2)), tmp_path / "new.pt")


# --------------------------------------------------------------------------- configuration


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_config_object_and_keywords_build_the_same_adapter():
    config = LoRAConfig(targets=["0"], rank=3, alpha=6, variant="dora", bias="lora_only")
    a = lp.add_lora(_net(), config=config)
    b = lp.add_lora(_net(), ["0"], rank=3, alpha=6, use_dora=True, bias="lora_only")
    from lora_param.core.io import adapter_config

    assert adapter_config(a) == adapter_config(b)
    with pytest.raises(LoRAError, match="either config= or keywords"):
        lp.add_lora(_net(), config=config, rank=5)
    with pytest.raises(LoRAError, match="use_dora=True and variant"):
        lp.add_lora(_net(), use_dora=True, variant="lora_x")


def test_unknown_variant_and_kind_refusals_change_nothing():
    model = _net()
    with pytest.raises(LoRAError, match="unknown variant 'nope'.*registered variants"):
        lp.add_lora(model, variant="nope")
    experts = nn.Module()
    experts.w = nn.Parameter(torch.randn(2, 4, 4))
    holder = nn.Sequential()
    holder.add_module("Experts", experts)
    with pytest.raises(LoRAError, match="dora variant does not adapt 'experts' tensors"):
        lp.add_lora(holder, "Experts.w", rank=1, variant="dora")
    assert not lp.list_adapters(model) and not lp.list_adapters(holder)


def test_every_quantization_option_is_reachable_from_add_lora():
    model = lp.add_lora(
        _net(),
        rank=2,
        quantize=lp.NF4Config(block_size=32, double_quant=False, compute_dtype=torch.float64),
    )
    store = model[0].parametrizations.weight[0]
    assert (store.method, store.block_size, store.double_quant) == ("nf4", 32, False)
    assert model[0].weight.dtype == torch.float64
    model = lp.add_lora(_net(), rank=2, quantize=lp.Int8Config())
    assert model[2].parametrizations.weight[0].method == "int8"
    same = lp.quantize_base(_net(), method=lp.NF4Config(block_size=128))
    assert same[0].parametrizations.weight[0].block_size == 128
    with pytest.raises(LoRAError, match="quantization method must be one of"):
        lp.add_lora(_net(), quantize="nf3")


def test_lora_config_maps_to_and_from_peft():
    peft = pytest.importorskip("peft")
    config = LoRAConfig(targets=["q", "v"], rank=8, alpha=16, dropout=0.1, variant="dora")
    fields = config.to_peft()
    assert (fields["r"], fields["lora_alpha"], fields["use_dora"]) == (8, 16, True)
    peft_config = peft.LoraConfig(**{k: v for k, v in fields.items() if k != "peft_type"})
    back = LoRAConfig.from_peft(peft_config)
    assert (back.rank, back.alpha, back.dropout, back.variant) == (8, 16.0, 0.1, "dora")
    model = nn.ModuleDict({"q": nn.Linear(4, 4), "k": nn.Linear(4, 4), "v": nn.Linear(4, 4)})
    lp.add_lora(model, config=back)
    assert sorted(path for path, *_ in lp.iter_lora(model)) == ["q.weight", "v.weight"]
    with pytest.raises(LoRAError, match="no exact PEFT LoraConfig form"):
        LoRAConfig(targets="*.q").to_peft()
    with pytest.raises(LoRAError, match="rank_pattern"):
        LoRAConfig.from_peft({"peft_type": "LORA", "r": 4, "rank_pattern": {"q": 2}})


# --------------------------------------------------------------------------- capabilities


def test_operations_a_variant_lacks_are_refused_by_name_before_any_change(tmp_path):
    model = lp.add_lora(_net(), rank=2, use_dora=True, adapter="d")
    with pytest.raises(LoRAError, match="hot-swapping does not support dora adapters"):
        lp.prepare_hotswap(model, 4)
    assert all(isinstance(p.scale, float) for *_, p in lp.iter_lora(model))
    with pytest.raises(LoRAError, match="method='cat'.*dora adapter"):
        lp.combine_adapters(model, {"d": 1.0}, "c")
    report = lp.combine_adapters(model, {"d": 1.0}, "c", method="svd", rank=4)
    assert report.max_error < 1e-4  # the full update has rank <= 4 here


def test_one_adapter_merges_alone_only_where_it_commutes():
    model = lp.add_lora(_net(), ["0"], rank=2, use_dora=True, adapter="d")
    lp.add_lora(model, ["0"], rank=2, adapter="l")
    with torch.no_grad():
        for p in lp.adapter_parameters(model):
            p.add_(0.1)
    with pytest.raises(LoRAError, match="'d' \\(dora\\) comes before it.*do not commute"):
        lp.merge_lora(model, "l")
    x = torch.randn(3, 8)
    with torch.no_grad():
        on = model(x)
        lp.merge_lora(model, "d")  # d comes first: exact, l stays on top
        torch.testing.assert_close(model(x), on, rtol=1e-5, atol=1e-6)
    assert lp.list_adapters(model) == ["l"]


# --------------------------------------------------------------------------- the eval cache


def test_every_variant_and_store_shares_the_one_cache():
    model = lp.add_lora(_net(), ["0"], rank=2, use_dora=True, adapter="d")
    lp.add_lora(model, ["2"], rank=2, adapter="l", quantize="int8")
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert lp.eval_cache_bytes(model) == 16 * 8 * 4  # DoRA's layer; the packed one: never
    lp.set_eval_cache(model, "never")
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert lp.eval_cache_bytes(model) == 0


# --------------------------------------------------------------------------- layout


def test_old_module_paths_warn_and_still_work():
    from lora_param.core import parametrization as old  # type: ignore[attr-defined]

    with pytest.warns(DeprecationWarning, match="moved to lora_param.variants.lora"):
        assert old.LoRAParametrization is lp.LoRAParametrization
    with pytest.warns(DeprecationWarning, match="lora_param.core.eval_cache"):
        assert old.AUTO_EVAL_CACHE_MAX_NUMEL == 3 << 20
    from lora_param.core import dora  # type: ignore[attr-defined]

    with pytest.warns(DeprecationWarning):
        assert dora.is_dora(next(lp.iter_lora(lp.add_lora(_net(), rank=1, use_dora=True)))[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from lora_param.variants.lora import LoRAParametrization  # the new path: no warning

        assert LoRAParametrization is lp.LoRAParametrization


def test_core_imports_no_plug_in():
    """The dependency arrows run one way: core knows only protocols."""
    pattern = re.compile(
        r"^\s*(from|import) +(\.\.|lora_param\.)(quant|variants|routing|interop|mnist)"
    )
    offenders = [
        f"{path.name}:{n}"
        for path in (ROOT / "lora_param" / "core").glob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.match(line)
    ]
    assert not offenders, offenders
    checks = re.compile(r"is_dora|type\(p\) is")
    allowed = ("variants", "interop")
    found = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "lora_param").rglob("*.py")
        if checks.search(path.read_text()) and path.parent.name not in allowed
    ]
    assert not found, found
