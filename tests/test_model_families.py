"""Real model families, one add_lora call each (random weights: nothing is downloaded).

Each model goes through tests/family_checks.run_lora_lifecycle: add_lora with a natural target
pattern, a few training steps, the toggles, merge and a save/load round trip, checking that LoRA
off is bit-identical to the base and merged ~= enabled.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this file

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from family_checks import run_lora_lifecycle
from lora_param import (
    LoRAError,
    add_lora,
    iter_lora,
    lora_disabled,
    merge_lora,
    remove_lora,
)

torchvision = pytest.importorskip("torchvision")


def _images(n=2, size=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _classify(model, batch):
    return model(batch[0])


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


# ----------------------------------------------------------------------------- torchvision


def test_resnet18_conv_and_linear(tmp_path):
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10)
    report = run_lora_lifecycle(
        base,
        ["layer*.*.conv*", "fc"],
        _images(),
        _classify,
        _ce,
        tmp_path,
        rank=4,
        expect_kinds=["conv", "linear"],
    )
    assert "fc.weight" in report.adapted and "layer4.1.conv2.weight" in report.adapted
    assert len(report.adapted) == 16 + 1  # 8 BasicBlocks x 2 convs + fc


def test_vit_multihead_attention(tmp_path):
    """MultiheadAttention reads in_proj_weight and out_proj.weight directly: both are adapted."""
    torch.manual_seed(0)
    from torchvision.models.vision_transformer import VisionTransformer

    base = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=48,
        mlp_dim=96,
        num_classes=10,
    )
    # torchvision zero-initialises the classifier, which would hide the encoder from the output
    nn.init.normal_(base.heads.head.weight, std=0.2)
    report = run_lora_lifecycle(
        base,
        ["*.self_attention", "*.self_attention.out_proj"],
        _images(),
        _classify,
        _ce,
        tmp_path,
        rank=4,
        expect_kinds=["param", "linear"],
    )
    assert sorted(report.adapted) == sorted(
        f"encoder.layers.encoder_layer_{i}.self_attention.{t}"
        for i in range(2)
        for t in ("in_proj_weight", "out_proj.weight")
    )
    # the in-projection update alone reaches the output (PEFT/loralib-style forward wrapping
    # would miss it: MultiheadAttention never calls out_proj.forward)
    model = report.model
    x = _images()[0]
    with torch.no_grad():
        with lora_disabled(model):
            off = model(x)
        out_proj = [p for path, _, _, p in iter_lora(model) if path.endswith("out_proj.weight")]
        for p in out_proj:
            p.enabled = False
        in_only = model(x)
        for p in out_proj:
            p.enabled = True
    assert not torch.allclose(in_only, off)


def test_mobilenet_v3_small_grouped_convs(tmp_path):
    """Depthwise/grouped convolutions are adapted (one shared A per group), not skipped."""
    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v3_small(num_classes=10)
    report = run_lora_lifecycle(base, None, _images(), _classify, _ce, tmp_path, rank=2)
    grouped = [
        path for path, module, _, _ in iter_lora(report.model) if getattr(module, "groups", 1) > 1
    ]
    assert len(grouped) == 11, grouped  # every depthwise conv of the network


def test_grouped_conv_rank_too_large_has_a_clear_message():
    # a depthwise 3x3 conv is (C, 1, 3, 3): a (C, 9) matrix, so its rank is at most 9
    conv = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16))
    with pytest.raises(LoRAError, match="exceeds"):
        add_lora(conv, "0", rank=12)  # named literally: an error; found by a pattern: rank 9
    assert not list(iter_lora(conv))


# ----------------------------------------------------------------------------- Hugging Face


def _lm_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab, (2, 8), generator=g)}


def _logits(model, batch):
    return model(**batch).logits


def _lm_loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _quiet(transformers):
    transformers.logging.set_verbosity_error()


def test_gpt2_conv1d(tmp_path):
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=2,
        n_positions=32,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.GPT2LMHeadModel(cfg)
    report = run_lora_lifecycle(
        base,
        "*.attn.c_attn",
        _lm_batch(128),
        _logits,
        _lm_loss,
        tmp_path,
        rank=4,
        expect_kinds=["conv1d_hf"],
    )
    assert report.adapted == [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
    for _, module, _, p in iter_lora(report.model):
        # Conv1D stores its weight (in, out): the update is transposed to match
        assert (
            p.fan_in_fan_out and module.weight.shape == (64, 192) and p.delta().shape == (64, 192)
        )


def test_llama_q_v_proj(tmp_path):
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.LlamaForCausalLM(cfg)
    report = run_lora_lifecycle(
        base,
        ["*q_proj", "*v_proj"],
        _lm_batch(128),
        _logits,
        _lm_loss,
        tmp_path,
        rank=4,
        expect_kinds=["linear"],
    )
    assert len(report.adapted) == 4


def test_bert_query_value(tmp_path):
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    base = transformers.BertForSequenceClassification(cfg)  # classifier head: randomly initialised
    batch = {"input_ids": torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))}
    labels = torch.tensor([0, 1, 0, 1])
    report = run_lora_lifecycle(
        base,
        ["*.attention.self.query", "*.attention.self.value"],
        batch,
        _logits,
        lambda m, b: m(**b, labels=labels).loss,
        tmp_path,
        rank=4,
        expect_kinds=["linear"],
    )
    assert len(report.adapted) == 4


# ----------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    """An embedding shared with the output head (weight tying), as in GPT-2 or T5."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _random_update(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g))


def test_tied_weights_adapting_one_side_leaves_the_other_on_the_base():
    torch.manual_seed(0)
    base = TiedLM().eval()
    model = add_lora(copy.deepcopy(base), ["emb"], rank=2)
    _random_update(model)
    shared = model.emb.parametrizations.weight.original
    # one frozen tensor is still shared; only the embedding lookup sees W + BA
    assert model.head.weight is shared and not shared.requires_grad
    ids = torch.randint(0, 20, (3, 4))
    with torch.no_grad():
        h = torch.tanh(model.mix(model.emb(ids)))
        torch.testing.assert_close(model(ids), F.linear(h, shared), rtol=0, atol=0)
        assert not torch.allclose(model.emb.weight, shared)
        on = model(ids)
        with lora_disabled(model):
            assert torch.equal(model(ids), base(ids))

    # merge: the adapted side gets its own merged weight, the head keeps the base one (untied)
    merged = merge_lora(copy.deepcopy(model))
    assert merged.head.weight is not merged.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), on, rtol=1e-5, atol=1e-5)
    # remove: the very same shared Parameter comes back, so the tie is restored
    removed = remove_lora(copy.deepcopy(model))
    assert removed.head.weight is removed.emb.weight
    with torch.no_grad():
        assert torch.equal(removed(ids), base(ids))


def test_tied_weights_both_sides_get_independent_factors():
    torch.manual_seed(0)
    base = TiedLM().eval()
    model = add_lora(copy.deepcopy(base), ["emb", "head"], rank=2)
    _random_update(model)
    by_path = {path: p for path, _, _, p in iter_lora(model)}
    assert set(by_path) == {"emb.weight", "head.weight"}
    # the same frozen base tensor under both, two separate adapters over it
    assert model.emb.parametrizations.weight.original is model.head.parametrizations.weight.original
    assert by_path["emb.weight"].lora_A is not by_path["head.weight"].lora_A
    ids = torch.randint(0, 20, (3, 4))
    with torch.no_grad():
        on = model(ids)
        with lora_disabled(model):
            assert torch.equal(model(ids), base(ids))
    merged = merge_lora(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), on, rtol=1e-5, atol=1e-5)


def test_gpt2_tied_lm_head(tmp_path):
    """GPT-2 ties lm_head to wte: adapting wte leaves lm_head on the base weight; merged saves fine."""
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=16,
        vocab_size=50,
        bos_token_id=0,
        eos_token_id=0,
    )
    base = transformers.GPT2LMHeadModel(cfg).eval()
    assert base.lm_head.weight is base.transformer.wte.weight
    model = add_lora(copy.deepcopy(base), ["transformer.wte"], rank=2)
    _random_update(model)
    assert model.lm_head.weight is model.transformer.wte.parametrizations.weight.original
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        on = model(ids).logits
        with lora_disabled(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
    merged = merge_lora(copy.deepcopy(model))
    merged.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, on, rtol=1e-5, atol=1e-5)
