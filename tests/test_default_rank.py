"""``add_lora(model)`` with the default rank on any classifier: small layers get a smaller rank.

A layer found by a pattern (``targets=None``, a glob, a callable) whose matrix is smaller than
the rank gets the largest rank it can hold, with one warning; a layer named literally keeps the
error. Real classifiers (torchvision, a tiny Hugging Face BERT) then train in one call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_param import LoRAError, adapter_parameters, add_lora, iter_lora


def _ranks(model: nn.Module) -> dict[str, int]:
    return {path: p.rank for path, _, _, p in iter_lora(model)}


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 16, 3, groups=16, padding=1),  # depthwise: a (16, 9) matrix
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 3),  # a 3-class head
    )


def test_default_targets_lower_the_rank_of_small_layers_with_one_warning():
    model = _small_net()
    with pytest.warns(UserWarning, match="smaller than the rank") as record:
        add_lora(model, rank=16)
    assert len(record) == 1
    assert "1.weight (9)" in str(record[0].message) and "3.weight (3)" in str(record[0].message)
    assert _ranks(model) == {"0.weight": 16, "1.weight": 9, "3.weight": 3}
    for _, _, _, p in iter_lora(model):
        assert p.scale == 1.0  # alpha=None means alpha = the rank each layer got


@pytest.mark.parametrize(
    "targets", ["*", ["0", "[13]"], lambda name, module: name != "0"], ids=["glob", "list", "callable"]
)
def test_patterns_lower_the_rank_too(targets):
    model = _small_net()
    with pytest.warns(UserWarning, match="3.weight"):
        add_lora(model, targets, rank=12)
    assert _ranks(model)["3.weight"] == 3


def test_no_warning_when_every_layer_holds_the_rank():
    model = _small_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_lora(model, rank=3)
    assert set(_ranks(model).values()) == {3}


@pytest.mark.parametrize("targets", ["3", ["0", "3"], "3.weight"])
def test_a_layer_named_literally_keeps_the_error(targets):
    model = _small_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"rank 4 for '3.weight' exceeds min\(fan_in=256"):
        add_lora(model, targets, rank=4)
    assert not list(iter_lora(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _train_step(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    grads = [p.grad for p in adapter_parameters(model)]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_classifier_in_one_call(name):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, num_classes=3)
    with pytest.warns(UserWarning, match="smaller than the rank"):
        add_lora(model)
    head = [path for path in _ranks(model) if path.startswith(("fc.", "classifier."))][-1]
    assert _ranks(model)[head] == 3
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _train_step(model, F.cross_entropy(model(x), torch.tensor([0, 2])))


def test_hf_sequence_classifier_in_one_call():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with pytest.warns(UserWarning, match="classifier.weight \\(2\\)"):
        add_lora(model)
    ranks = _ranks(model)
    assert ranks["classifier.weight"] == 2
    assert ranks["bert.embeddings.token_type_embeddings.weight"] == 2
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    _train_step(model, out.loss)
