"""PEFT interchange: export_peft / import_peft against the real peft package.

The tests that count load an adapter written by lora_param with ``peft.PeftModel.from_pretrained``
on a fresh copy of the base model (and the reverse: a PEFT-saved adapter into lora_param) and
compare outputs.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from torch import nn

from lora_param import (
    LoRAError,
    add_lora,
    iter_lora,
    list_adapters,
    lora_disabled,
    merge_lora,
    set_active_adapters,
)
from lora_param.interop.peft import export_peft, import_peft

safetensors_torch = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    """Embedding, Linear, Conv2d and a nested Linear, all used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.fc = nn.Linear(8, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 5))
        self.conv = nn.Conv2d(3, 4, 3, padding=1, stride=2)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block(self.fc(self.emb(ids))), self.conv(img)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 12, (3, 5), generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _randomize_B(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter a non-zero update (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.5)


def _close(a, b, atol=1e-5) -> None:
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _close(x, y, atol)
        return
    torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def _peft_load(base: nn.Module, folder) -> nn.Module:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        # a missing or misplaced key makes PEFT warn: fail loudly instead
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


# ----------------------------------------------------------------------------- layout


def test_export_writes_peft_layout(tmp_path):
    torch.manual_seed(0)
    model = add_lora(
        Net(),
        ["emb", "fc", "block.*", "conv"],
        rank={"fc": 3, "*": 2},
        alpha={"block.2": 5, "*": 4},
    )
    out = export_peft(model, tmp_path / "ad")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert cfg["rank_pattern"] == {"fc": 3} and cfg["alpha_pattern"] == {"block.2": 5}
    assert sorted(cfg["target_modules"]) == ["block.0", "block.2", "conv", "emb", "fc"]
    assert cfg["fan_in_fan_out"] is False and cfg["use_rslora"] is False and cfg["bias"] == "none"
    sd = safetensors_torch.load_file(str(out / "adapter_model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "base_model.model.emb.lora_embedding_A": (2, 12),  # (r, num_embeddings)
        "base_model.model.emb.lora_embedding_B": (8, 2),  # (embedding_dim, r)
        "base_model.model.fc.lora_A.weight": (3, 8),
        "base_model.model.fc.lora_B.weight": (6, 3),
        "base_model.model.block.0.lora_A.weight": (2, 6),
        "base_model.model.block.0.lora_B.weight": (6, 2),
        "base_model.model.block.2.lora_A.weight": (2, 6),
        "base_model.model.block.2.lora_B.weight": (5, 2),
        "base_model.model.conv.lora_A.weight": (2, 3, 3, 3),  # a conv (r, in, kh, kw)
        "base_model.model.conv.lora_B.weight": (4, 2, 1, 1),  # a 1x1 conv (out, r, 1, 1)
    }
    # no temporary files left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_export_matches_peft_own_save(tmp_path):
    """Same keys and shapes as PEFT's save_pretrained for the same targets."""
    peft = pytest.importorskip("peft")
    base = Net()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc", "block.0", "conv"])
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(tmp_path / "peft"))
    ours = add_lora(copy.deepcopy(base), ["emb", "fc", "block.0", "conv"], rank=2, alpha=4)
    export_peft(ours, tmp_path / "ours")
    a = safetensors_torch.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


# ----------------------------------------------------------------------------- lora_param -> PEFT


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_param_to_peft_same_outputs(tmp_path, use_rslora):
    torch.manual_seed(0)
    base = Net().eval()
    model = add_lora(
        copy.deepcopy(base),
        ["emb", "fc", "block.*", "conv"],
        rank={"fc": 3, "*": 2},
        alpha={"block.2": 5, "*": 4},
        use_rslora=use_rslora,
    ).eval()
    _randomize_B(model)
    ids, img = _inputs()
    with torch.no_grad():
        expected = model(ids, img)
        base_out = base(ids, img)
    assert not torch.allclose(expected[0], base_out[0])
    export_peft(model, tmp_path)
    peft_model = _peft_load(base, tmp_path)
    with torch.no_grad():
        _close(peft_model(ids, img), expected)
        with peft_model.disable_adapter():
            _close(peft_model(ids, img), base_out, atol=0)


def test_ambiguous_names_use_an_exact_regex(tmp_path):
    """target_modules=['fc'] would also adapt 'inner.fc' in PEFT: the export must not allow that."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.inner = nn.Module()
            self.inner.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner.fc(self.fc(x))

    torch.manual_seed(0)
    base = Two().eval()
    model = add_lora(copy.deepcopy(base), ["fc"], rank=2).eval()
    _randomize_B(model)
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)
    peft_model = _peft_load(base, tmp_path)
    names = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert names == ["base_model.model.fc.lora_A"]
    x = torch.randn(3, 4)
    with torch.no_grad():
        _close(peft_model(x), model(x))


def test_mha_in_proj_weight_via_target_parameters(tmp_path):
    peft = pytest.importorskip("peft")
    if "target_parameters" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this PEFT has no target_parameters")

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    base = Attn().eval()
    model = add_lora(copy.deepcopy(base), ["attn.in_proj_weight"], rank=2).eval()
    _randomize_B(model)
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["attn.in_proj_weight"] and cfg["target_modules"] == []
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = model(x)
    peft_model = _peft_load(base, tmp_path)
    with torch.no_grad():
        _close(peft_model(x), expected)
    # and back
    again = import_peft(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        _close(again(x), expected, atol=1e-6)


# ----------------------------------------------------------------------------- PEFT -> lora_param


def test_peft_to_lora_param_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net().eval()
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["emb", "fc", "block.0", "block.2", "conv"],
        rank_pattern={"fc": 3},
        alpha_pattern={"block.2": 7},
        init_lora_weights=False,  # random A and B: a non-zero update
        use_rslora=True,
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    peft_model.save_pretrained(str(tmp_path))
    ids, img = _inputs()
    with torch.no_grad():
        expected = peft_model(ids, img)
    model = import_peft(copy.deepcopy(base), tmp_path, adapter="from_peft").eval()
    ranks = {path: p.rank for path, _, _, p in iter_lora(model)}
    assert ranks["fc.weight"] == 3 and ranks["block.0.weight"] == 2
    with torch.no_grad():
        _close(model(ids, img), expected)
        with lora_disabled(model):
            _close(model(ids, img), base(ids, img), atol=0)
    # trainable like any lora_param adapter, base frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # round trip: export again, same tensors as PEFT wrote
    export_peft(model, tmp_path / "again")
    a = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # merging what was imported gives the same function
    merged = merge_lora(copy.deepcopy(model))
    with torch.no_grad():
        _close(merged(ids, img), expected)


# ----------------------------------------------------------------------------- Hugging Face Conv1D


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=50,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_both_directions(tmp_path):
    peft = pytest.importorskip("peft")
    base = _tiny_gpt2()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    model = add_lora(copy.deepcopy(base), ["*.attn.c_attn", "*.mlp.c_fc"], rank=4, alpha=8).eval()
    assert {p.kind for *_, p in iter_lora(model)} == {"conv1d_hf"}
    _randomize_B(model)
    with torch.no_grad():
        expected = exported_logits = model(ids).logits
    export_peft(model, tmp_path / "ours", task_type="CAUSAL_LM")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["task_type"] == "CAUSAL_LM"
    peft_model = _peft_load(base, tmp_path / "ours")
    with torch.no_grad():
        _close(peft_model(input_ids=ids).logits, expected, atol=1e-4)

    # PEFT -> lora_param
    pcfg = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    trained = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    trained.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    ours = import_peft(copy.deepcopy(base), tmp_path / "peft").eval()
    assert {p.kind for *_, p in iter_lora(ours)} == {"conv1d_hf"}
    with torch.no_grad():
        _close(ours(ids).logits, expected, atol=1e-4)

    # a second adapter imported next to the first (layers already parametrized)
    import_peft(ours, tmp_path / "ours", adapter="second")
    assert list_adapters(ours) == ["default", "second"]
    set_active_adapters(ours, ["second"])
    with torch.no_grad():
        _close(ours(ids).logits, exported_logits, atol=1e-4)


# ----------------------------------------------------------------------------- refusals


def test_export_refuses_grouped_conv_before_writing(tmp_path):
    model = add_lora(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1)), rank=2)
    with pytest.raises(LoRAError, match="grouped"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_refuses_mha_out_proj(tmp_path):
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    add_lora(model, ["0.out_proj"], rank=2)
    with pytest.raises(LoRAError, match="out_proj"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_needs_adapter_choice_when_several(tmp_path):
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
    add_lora(model, rank=2, adapter="two")
    with pytest.raises(LoRAError, match="several adapters"):
        export_peft(model, tmp_path / "x")
    export_peft(model, tmp_path / "x", adapter="two")
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["0"]


def test_export_without_adapter_is_an_error(tmp_path):
    with pytest.raises(LoRAError, match="no LoRA adapter"):
        export_peft(nn.Sequential(nn.Linear(2, 2)), tmp_path)


def test_export_overwrites_atomically(tmp_path):
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
    export_peft(model, tmp_path)
    _randomize_B(model)
    export_peft(model, tmp_path)
    sd = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    torch.testing.assert_close(
        sd["base_model.model.0.lora_B.weight"], model[0].parametrizations.weight[0].lora_B.detach()
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_export_looks_through_compile_wrapper(tmp_path):
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), rank=2)
    export_peft(torch.compile(model), tmp_path)  # nothing is compiled until called
    sd = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(sd) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight"}


def _write_peft_folder(folder, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    base_cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["0"]}
    base_cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(base_cfg))
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "config, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "some"}, "bias"),
        ({"modules_to_save": ["9"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "LORA"),
    ],
)
def test_import_refuses_unsupported_configs(tmp_path, config, match):
    model = nn.Sequential(nn.Linear(4, 3))
    before = _state(model)
    tensors = {
        "base_model.model.0.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.0.lora_B.weight": torch.zeros(3, 2),
    }
    _write_peft_folder(tmp_path, config, tensors)
    with pytest.raises(LoRAError, match=match):
        import_peft(model, tmp_path)
    assert not list(iter_lora(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_import_refuses_wrong_base_model(tmp_path):
    tensors = {
        "base_model.model.0.lora_A.weight": torch.zeros(2, 5),
        "base_model.model.0.lora_B.weight": torch.zeros(3, 2),
    }
    _write_peft_folder(tmp_path, {}, tensors)
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(LoRAError, match="shapes"):
        import_peft(model, tmp_path)
    assert not list(iter_lora(model))
    tensors = {
        "base_model.model.9.lora_A.weight": torch.zeros(2, 4),
        "base_model.model.9.lora_B.weight": torch.zeros(3, 2),
    }
    _write_peft_folder(tmp_path, {}, tensors)
    with pytest.raises(LoRAError, match="does not have"):
        import_peft(model, tmp_path)
    assert not list(iter_lora(model))


def test_import_refuses_unknown_tensors_and_missing_folder(tmp_path):
    tensors = {"base_model.model.0.hada_w1_a": torch.zeros(3)}
    _write_peft_folder(tmp_path / "a", {}, tensors)
    with pytest.raises(LoRAError, match="not LoRA factors"):
        import_peft(nn.Sequential(nn.Linear(4, 3)), tmp_path / "a")
    with pytest.raises(LoRAError, match="does not exist"):
        import_peft(nn.Sequential(nn.Linear(4, 3)), tmp_path / "missing")


def test_import_reads_legacy_bin(tmp_path):
    tensors = {
        "base_model.model.0.lora_A.weight": torch.randn(2, 4),
        "base_model.model.0.lora_B.weight": torch.randn(3, 2),
    }
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4})
    )
    torch.save(tensors, tmp_path / "adapter_model.bin")
    base = nn.Sequential(nn.Linear(4, 3))
    model = import_peft(copy.deepcopy(base), tmp_path)
    x = torch.randn(5, 4)
    delta = (
        2.0
        * tensors["base_model.model.0.lora_B.weight"]
        @ tensors["base_model.model.0.lora_A.weight"]
    )
    with torch.no_grad():
        _close(model(x), base(x) + x @ delta.T)


# ----------------------------------------------------------------------------- optional dependencies


def test_peft_package_not_needed(tmp_path, monkeypatch):
    """export/import work with peft absent (only safetensors is needed)."""
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    base = nn.Sequential(nn.Linear(4, 3))
    model = add_lora(copy.deepcopy(base), rank=2)
    _randomize_B(model)
    export_peft(model, tmp_path)
    again = import_peft(copy.deepcopy(base), tmp_path)
    x = torch.randn(2, 4)
    with torch.no_grad():
        _close(again(x), model(x), atol=0)


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    model = add_lora(nn.Sequential(nn.Linear(4, 3)), rank=2)
    with pytest.raises(ImportError, match=r"lora_param\[peft\]"):
        export_peft(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
