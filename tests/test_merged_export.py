"""save_merged in one process: what it writes, how it loads, how it fails.

The sharded (FSDP2) side, memory included, is tested on 2 processes in test_distributed.py;
the transformers layout on a sharded Llama in test_distributed_trainer.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError
from lora_param.core.safetensors_stream import SafetensorsStream, TensorSpec

st = pytest.importorskip("safetensors.torch")


def _base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _trained(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in ("lora_B", "lora_magnitude", ".value")):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


SETUPS = {
    "lora": lambda m: lp.add_lora(m, rank=2),
    "dora": lambda m: lp.add_lora(m, rank=2, variant="dora"),
    "rslora": lambda m: lp.add_lora(m, rank=2, alpha=3, use_rslora=True),
    "nf4": lambda m: lp.add_lora(m, ["0", "2"], rank=2, quantize="nf4"),
    "int8_dora": lambda m: lp.add_lora(m, ["0", "2"], rank=2, quantize="int8", variant="dora"),
    "head": lambda m: lp.add_lora(m, ["0", "2"], rank=2, trainable=["4"], bias="lora_only"),
    "two": lambda m: lp.add_lora(lp.add_lora(m, rank=2), ["0"], rank=3, adapter="b"),
}


def _load(folder) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return st.load_file(folder / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(st.load_file(folder / name))
    return out


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_save_merged_equals_merge_lora_and_leaves_the_model_alone(tmp_path, setup):
    model = _trained(SETUPS[setup](_base()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 16)
    with torch.no_grad():
        want = model(x)
    lp.save_merged(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    written = _load(tmp_path)
    merged = lp.merge_lora(copy.deepcopy(model)).state_dict()
    assert written.keys() == merged.keys()
    for key, value in merged.items():  # the same formula, rounded once: bit for bit
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    plain = _base()
    plain.load_state_dict(written)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_save_merged_one_adapter(tmp_path):
    model = _trained(SETUPS["two"](_base()))
    lp.disable_lora(model, "b")
    lp.save_merged(model, tmp_path, adapter="b")  # whether enabled or not, and alone
    plain = _base()
    plain.load_state_dict(_load(tmp_path))
    x = torch.randn(3, 16)
    lp.set_active_adapters(model, "b")
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(LoRAError, match="no adapter"):
        lp.save_merged(model, tmp_path / "x", adapter="missing")


def test_save_merged_splits_as_transformers_does_and_replaces_older_files(tmp_path):
    model = _trained(SETUPS["lora"](_base()))
    lp.save_merged(model, tmp_path, max_shard_size=2100)  # 32x32 float32 = 4096 B: alone
    names = sorted(p.name for p in tmp_path.iterdir())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert names == sorted([*shards, "model.safetensors.index.json"])
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors" and len(shards) >= 4
    tensors = _load(tmp_path)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) == set(_base().state_dict())
    for shard in shards:
        sizes = [t.numel() * 4 for t in st.load_file(tmp_path / shard).values()]
        assert len(sizes) == 1 or sum(sizes) <= 2100
    lp.save_merged(model, tmp_path, max_shard_size="1MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    for key, value in _load(tmp_path).items():
        assert torch.equal(value, tensors[key])


@pytest.mark.parametrize("size", [0, -1, "big", "5XB", 1.5, True])
def test_save_merged_bad_shard_size(tmp_path, size):
    with pytest.raises(LoRAError, match="max_shard_size"):
        lp.save_merged(SETUPS["lora"](_base()), tmp_path, max_shard_size=size)


def test_save_merged_into_a_file_writes_nothing(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    with pytest.raises(LoRAError, match="it is a file, not a folder"):
        lp.save_merged(SETUPS["lora"](_base()), target)
    assert target.read_text() == "x"


def test_save_merged_refuses_deepspeed_partitions(tmp_path):
    model = SETUPS["lora"](_base())
    model[0].bias.ds_numel = 999  # what ZeRO-3 leaves outside a forward: an empty stand-in
    with pytest.raises(LoRAError, match="ZeRO-3 partitions.*'0.bias'"):
        lp.save_merged(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_save_merged_failing_midway_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = _trained(SETUPS["lora"](_base()))
    lp.save_merged(model, tmp_path)
    old = (tmp_path / "model.safetensors").read_bytes()
    calls = []

    def write(self, key, value):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, key, value)

    original = SafetensorsStream.write
    monkeypatch.setattr(SafetensorsStream, "write", write)
    lp.set_adapter_scale(model, "default", 2.0)
    with pytest.raises(LoRAError, match="disk full"):
        lp.save_merged(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp file
    assert (tmp_path / "model.safetensors").read_bytes() == old


def test_merged_inplace_forms_the_update_in_the_given_tensor():
    """LoRA and DoRA need no second weight-sized tensor; the values are merged()'s."""
    for variant in ("lora", "dora"):
        model = _trained(lp.add_lora(_base(), ["2"], rank=2, variant=variant))
        (entry,) = [p for *_, p in lp.iter_lora(model)]
        weight = model[2].parametrizations.weight.original.detach().clone()
        want = entry.merged(weight)
        assert entry.merged_inplace(weight) is weight
        assert torch.equal(weight, want)
        strided = torch.randn(32, 64)[:, ::2]  # not contiguous: the out-of-place path
        assert torch.equal(entry.merged_inplace(strided), entry.merged(strided))


def test_safetensors_stream_round_trips_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(2, 2).half(),
        "f64": torch.randn(1, dtype=torch.float64),
        "i64": torch.arange(7),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with (tmp_path / "a.safetensors").open("wb") as f:
        stream = SafetensorsStream(f, specs, {"format": "pt"})
        for key, value in tensors.items():
            stream.write(key, value)
        stream.close()
    back = st.load_file(tmp_path / "a.safetensors")
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    with (tmp_path / "b.safetensors").open("wb") as f:
        stream = SafetensorsStream(f, specs[:2])
        with pytest.raises(LoRAError, match="header says"):
            stream.write("f32", torch.randn(4, 3))
        with pytest.raises(LoRAError, match="never written"):
            stream.close()


def test_save_merged_of_a_transformers_model_is_save_pretrained_layout(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    _trained(lp.add_lora(model, ["*.q_proj", "*.v_proj"], rank=2, variant="dora"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    lp.save_merged(model, tmp_path / "merged")
    model.save_pretrained(tmp_path / "hf")  # lora_param's guard: transformers' own, merged
    names = ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == names
    ours, theirs = _load(tmp_path / "merged"), _load(tmp_path / "hf")
    assert ours.keys() == theirs.keys()  # the tied lm_head written once, as transformers does
    assert "lm_head.weight" not in ours
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_save_merged_looks_through_a_compile_wrapper(tmp_path):
    model = _trained(SETUPS["lora"](_base()))
    lp.save_merged(torch.compile(model), tmp_path)  # keys without "_orig_mod."
    assert set(_load(tmp_path)) == set(_base().state_dict())
