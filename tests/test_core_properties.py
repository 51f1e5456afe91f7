"""Property-based tests: random Linear and Conv2d shapes, ranks and batches.

For every drawn layer: disabled == base bit-for-bit, merged ~= enabled, factored ~=
materialized (outputs and gradients), remove_lora restores the very parameters and outputs.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lora_param import (
    add_lora,
    iter_lora,
    lora_disabled,
    merge_lora,
    remove_lora,
)

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # deterministic: same examples on every run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOL = dict(rtol=1e-4, atol=1e-4)


@st.composite
def linear_specs(draw):
    fan_in = draw(st.integers(1, 24))
    fan_out = draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(fan_in, fan_out)))
    batch = draw(st.integers(1, 5))
    bias = draw(st.booleans())
    alpha = draw(st.sampled_from([None, 0.5, 3.0]))
    rslora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(
        fan_in=fan_in,
        fan_out=fan_out,
        rank=rank,
        batch=batch,
        bias=bias,
        alpha=alpha,
        rslora=rslora,
        seed=seed,
    )


@st.composite
def conv_specs(draw):
    groups = draw(st.integers(1, 3))
    in_per_group = draw(st.integers(1, 3))
    out_per_group = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    size = draw(st.integers(k + 1, 6))
    padding = draw(st.integers(0, min(1, k - 1) if k > 1 else 0))
    padding_mode = draw(st.sampled_from(["zeros", "reflect"])) if padding else "zeros"
    stride = draw(st.integers(1, 2))
    fan_in = in_per_group * k * k
    fan_out = out_per_group * groups
    rank = draw(st.integers(1, min(fan_in, fan_out)))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return dict(
        groups=groups,
        cin=in_per_group * groups,
        cout=fan_out,
        k=k,
        size=size,
        padding=padding,
        padding_mode=padding_mode,
        stride=stride,
        rank=rank,
        batch=batch,
        seed=seed,
    )


def _linear(spec):
    torch.manual_seed(spec["seed"])
    layer = nn.Sequential(nn.Linear(spec["fan_in"], spec["fan_out"], bias=spec["bias"]))
    x = torch.randn(spec["batch"], spec["fan_in"])
    kwargs = dict(rank=spec["rank"], alpha=spec["alpha"], use_rslora=spec["rslora"])
    return layer, x, kwargs


def _conv(spec):
    torch.manual_seed(spec["seed"])
    layer = nn.Sequential(
        nn.Conv2d(
            spec["cin"],
            spec["cout"],
            spec["k"],
            stride=spec["stride"],
            padding=spec["padding"],
            padding_mode=spec["padding_mode"],
            groups=spec["groups"],
        )
    )
    x = torch.randn(spec["batch"], spec["cin"], spec["size"], spec["size"])
    return layer, x, dict(rank=spec["rank"])


def _check(build, spec, h):
    base, x, kwargs = build(spec)
    ref = h.frozen_copy(base)
    originals = dict(base.named_parameters())

    models = {}
    for mode in ("factored", "materialized"):
        m = add_lora(copy.deepcopy(base), mode=mode, **kwargs)
        models[mode] = m
    h.randomize(models["factored"], seed=spec["seed"])
    h.copy_adapters(models["factored"], models["materialized"])

    base_out = ref(x)
    outs, grads = {}, {}
    for mode, m in models.items():
        # disabled == base, bit for bit, with and without grad
        with lora_disabled(m):
            assert torch.equal(m(x), base_out)
            with torch.no_grad():
                assert torch.equal(m(x), base_out)
        out = m(x)
        h.loss(out).backward()
        outs[mode] = out.detach()
        grads[mode] = [t.grad for p in h.loras(m) for t in (p.lora_A, p.lora_B)]
    # factored ~= materialized, outputs and gradients
    assert torch.allclose(outs["factored"], outs["materialized"], **TOL)
    for gf, gm in zip(grads["factored"], grads["materialized"]):
        assert torch.allclose(gf, gm, **TOL)

    # merged ~= enabled
    merged = merge_lora(copy.deepcopy(models["materialized"]))
    assert list(iter_lora(merged)) == []
    with torch.no_grad():
        assert torch.allclose(merged(x), outs["materialized"], **TOL)

    # remove restores the very objects and the outputs exactly
    model = add_lora(base, mode="factored", **kwargs)
    h.randomize(model, seed=spec["seed"] + 1)
    remove_lora(model)
    after = dict(model.named_parameters())
    assert after.keys() == originals.keys()
    assert all(after[n] is p for n, p in originals.items())
    assert type(model[0]) is type(ref[0])
    assert torch.equal(model(x), base_out)


@SETTINGS
@given(spec=linear_specs())
def test_linear_properties(spec, h):
    _check(_linear, spec, h)


@SETTINGS
@given(spec=conv_specs())
def test_conv2d_properties(spec, h):
    _check(_conv, spec, h)
