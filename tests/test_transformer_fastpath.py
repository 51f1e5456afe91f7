"""LoRA is never lost where code reads ``.weight`` directly: MHA's out_proj, the fused eval path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_param import adapter_parameters, add_lora, lora_disabled, merge_lora


def _encoder() -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_lora_on_equals_merged_in_train_and_eval(mode, training, grad):
    base = _encoder().requires_grad_(False)
    model = add_lora(copy.deepcopy(base), rank=4, mode=mode)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.normal_(0, 0.2)
    merged = merge_lora(copy.deepcopy(model))
    x = torch.randn(2, 5, 32)
    for m in (model, merged, base):
        m.train(training)
    with torch.set_grad_enabled(grad):
        on, ref, plain = model(x), merged(x), base(x)
        with lora_disabled(model):
            off = model(x)
    assert torch.allclose(on, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(on, plain, atol=1e-2), "LoRA had no effect: it was dropped"
    assert torch.equal(off, plain)
