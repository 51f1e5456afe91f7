"""The behaviour matrix: every tiny model of the zoo through every behaviour, in both modes.

Modelled on PEFT's ``tests/test_custom_models.py``: one list of models (``conftest.CASES``),
one test per behaviour, each parametrized over ``case`` x ``mode``.
"""

from __future__ import annotations

import copy
import io
import math
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lora_param import (
    LoRAParametrization,
    active_adapters,
    add_lora,
    adapter_parameters,
    disable_lora,
    enable_lora,
    iter_copies,
    iter_lora,
    list_adapters,
    load_lora,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    set_active_adapters,
)

TIGHT = dict(rtol=1e-4, atol=1e-5)


def _lora_model(case, mode, h, *, seed=0, randomize=True, **kw):
    base = case.model(seed)
    ref = h.frozen_copy(base)
    kw.setdefault("rank", case.rank)
    model = add_lora(base, case.targets, mode=mode, **kw)
    if randomize:
        h.randomize(model)
    return model, ref


def _all_states(model, x, h):
    """Outputs in (train, eval) x (grad, no_grad), leaving the model in eval."""
    outs = {}
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            outs[(training, grad)] = h.run(model, x, grad=grad).detach()
    model.eval()
    return outs


# --------------------------------------------------------------------------- injection


def test_adapts_expected_tensors(case, mode, h):
    model, _ = _lora_model(case, mode, h, randomize=False)
    paths = [path for path, *_ in iter_lora(model)]
    assert sorted(paths) == sorted(case.paths)
    for path, module, name, p in iter_lora(model):
        original = module.parametrizations[name].original
        assert p.lora_A.shape == (p.rank, p.fan_in)
        assert p.lora_B.shape == (p.fan_out, p.rank)
        assert p.fan_out * p.fan_in == original.numel()
        assert p.lora_A.dtype == original.dtype and p.lora_B.dtype == original.dtype
        assert isinstance(module, parametrize.type_before_parametrizations(module))


def test_b_zero_at_start_is_bit_identical(case, mode, h):
    base = case.model()
    # The references have the requires_grad flags the LoRA model's weights have: frozen,
    # except, with grad on, the adapted weights (they depend on trainable A and B).
    # nn.MultiheadAttention picks its kernels from these flags (even under no_grad), so any
    # other reference differs by float rounding.
    refs = {False: h.frozen_copy(base), True: h.frozen_copy(base)}
    for path in case.paths:
        refs[True].get_parameter(path).requires_grad_(True)
    x = case.inputs()
    model = add_lora(base, case.targets, rank=case.rank, mode=mode)
    for p in h.loras(model):
        assert torch.count_nonzero(p.lora_B) == 0
        assert torch.count_nonzero(p.lora_A) > 0
    for training in (True, False):
        model.train(training)
        for grad in (True, False):
            ref = refs[grad].train(training)
            assert torch.equal(h.run(model, x, grad=grad), h.run(ref, x, grad=grad)), (
                f"training={training} grad={grad}"
            )


# --------------------------------------------------------------------------- toggling


def test_disabled_is_bit_identical_to_base(case, mode, h):
    model, ref = _lora_model(case, mode, h)
    x = case.inputs()
    base_outs = _all_states(ref, x, h)
    enabled = _all_states(model, x, h)
    for key, out in enabled.items():
        assert not torch.allclose(out, base_outs[key], atol=1e-4), f"LoRA has no effect in {key}"

    disable_lora(model)
    assert active_adapters(model) == []
    for key, out in _all_states(model, x, h).items():
        assert torch.equal(out, base_outs[key]), f"disable_lora differs from base in {key}"

    enable_lora(model)
    for key, out in _all_states(model, x, h).items():
        assert torch.allclose(out, enabled[key], **TIGHT)

    with lora_disabled(model):
        for key, out in _all_states(model, x, h).items():
            assert torch.equal(out, base_outs[key]), f"lora_disabled differs from base in {key}"
    for key, out in _all_states(model, x, h).items():
        assert torch.allclose(out, enabled[key], **TIGHT)


def test_lora_disabled_restores_prior_state(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    add_lora(model, case.targets, rank=case.rank, mode=mode, adapter="second")
    h.randomize(model, seed=3)
    paths = sorted({path for path, *_ in iter_lora(model)})
    # A mixed state: one layer of "default" off, everything else on.
    off_path = paths[0]
    for path, _, _, p in iter_lora(model):
        if path == off_path and p.adapter == "default":
            p.enabled = False

    def state():
        return [
            (path, p.adapter, p.enabled, p.lora_A.requires_grad)
            for path, _, _, p in iter_lora(model)
        ]

    before = state()
    with lora_disabled(model):
        assert all(not p.enabled for p in h.loras(model))
        with lora_disabled(model, "second"):
            assert all(not p.enabled for p in h.loras(model))
        assert all(not p.enabled for p in h.loras(model))
    assert state() == before

    with lora_disabled(model, "second"):
        for path, _, _, p in iter_lora(model):
            if p.adapter == "second":
                assert not p.enabled
        with lora_disabled(model, ["default"]):
            assert all(not p.enabled for p in h.loras(model))
        after_inner = [(path, p.adapter, p.enabled) for path, _, _, p in iter_lora(model)]
        assert after_inner == [
            (path, a, e if a == "default" else False) for path, a, e, _ in before
        ]
    assert state() == before

    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(model):
            with lora_disabled(model, "default"):
                raise RuntimeError("boom")
    assert state() == before


def test_train_eval_do_not_change_enabled_state(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    disable_lora(model, "default")
    model.train()
    model.eval()
    assert active_adapters(model) == []
    enable_lora(model)
    model.eval()
    model.train()
    assert all(p.enabled for p in h.loras(model))
    assert active_adapters(model) == ["default"]


# --------------------------------------------------------------------------- merge / remove


def test_merge_lora(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()
    enabled = h.run(model, x, grad=False)
    pre_ids = {
        path: id(module.parametrizations[name].original)
        for path, module, name, _ in iter_lora(model)
    }
    pre_objs = {
        path: module.parametrizations[name].original for path, module, name, _ in iter_lora(model)
    }
    pre_vals = {path: t.detach().clone() for path, t in pre_objs.items()}
    out = merge_lora(model)
    assert out is model
    assert list(iter_lora(model)) == []
    assert not any(isinstance(m, LoRAParametrization) for m in model.modules())
    assert all("parametrizations" not in k for k in model.state_dict())
    for _, m in model.named_modules():
        assert not parametrize.is_parametrized(m)
        assert type(m) is parametrize.type_before_parametrizations(m)
        assert not type(m).__name__.startswith("Parametrized")
    assert torch.allclose(h.run(model, x, grad=False), enabled, **TIGHT)
    assert torch.allclose(h.run(model, x, grad=True), enabled, **TIGHT)
    model.train()
    assert torch.allclose(h.run(model, x, grad=True), enabled, **TIGHT)
    # The merged weight is a new parameter; the pretrained tensor was not touched in place.
    for path, old_id in pre_ids.items():
        module_name, _, name = path.rpartition(".")
        new = getattr(model.get_submodule(module_name), name)
        assert id(new) != old_id
        assert not torch.equal(new, pre_vals[path])
        assert torch.equal(pre_objs[path], pre_vals[path])
    # A plain model again: its state_dict loads into a fresh base model with strict=True.
    fresh = case.model(seed=5)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    assert torch.allclose(h.run(fresh, x, grad=False), enabled, **TIGHT)


def test_merge_lora_ignores_disabled_adapters(case, mode, h):
    model, ref = _lora_model(case, mode, h)
    x = case.inputs()
    disable_lora(model)
    merge_lora(model)
    model.eval()
    ref.eval()
    assert torch.allclose(h.run(model, x, grad=False), h.run(ref, x, grad=False), **TIGHT)


def test_remove_lora_restores_exactly(case, mode, h):
    base = case.model()
    ref = h.frozen_copy(base)
    x = case.inputs()
    params_before = dict(base.named_parameters())
    classes_before = {n: type(m) for n, m in base.named_modules()}
    keys_before = list(base.state_dict())
    model = add_lora(base, case.targets, rank=case.rank, mode=mode)
    h.randomize(model)
    assert remove_lora(model) is model
    assert list(iter_lora(model)) == []
    assert list(model.state_dict()) == keys_before
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    for name, p in params_before.items():
        assert params_after[name] is p, f"{name} is not the original object"
    for n, m in model.named_modules():
        assert type(m) is classes_before[n], n
    for training in (True, False):
        model.train(training)
        ref.train(training)
        for grad in (True, False):
            assert torch.equal(h.run(model, x, grad=grad), h.run(ref, x, grad=grad))


def test_remove_one_adapter_keeps_the_other(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    add_lora(model, case.targets, rank=case.rank, mode=mode, adapter="other")
    h.randomize(model, seed=11)
    x = case.inputs()
    model.eval()
    with lora_disabled(model, "other"):
        only_default = h.run(model, x, grad=False)
    remove_lora(model, "other")
    assert list_adapters(model) == ["default"]
    assert torch.allclose(h.run(model, x, grad=False), only_default, **TIGHT)
    assert torch.allclose(h.run(model, x, grad=True), only_default, **TIGHT)


def test_remove_lora_keeps_parameter_order(zoo, mode, h):
    model = zoo["mlp"].model()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    add_lora(model, rank=2, mode=mode)
    remove_lora(model)
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys


def test_delta_has_weight_shape(zoo, mode, h):
    model = add_lora(zoo["conv2d"].model(), rank=2, mode=mode)
    for path, module, name, p in iter_lora(model):
        assert p.delta().shape == module.parametrizations[name].original.shape, path


# --------------------------------------------------------------------------- files


def test_save_load_round_trip(case, mode, h, tmp_path):
    pristine = case.model()
    model = add_lora(copy.deepcopy(pristine), case.targets, rank=case.rank, mode=mode)
    h.randomize(model)
    x = case.inputs()
    model.eval()
    expected = h.run(model, x, grad=False)

    sd = lora_state_dict(model)
    assert sorted(sd) == sorted(
        f"default.{p}.{t}" for p in case.paths for t in ("lora_A", "lora_B")
    )

    path = save_lora(model, tmp_path / "adapter.pt")
    payload = torch.load(path, weights_only=True)
    assert isinstance(payload, dict)

    fresh = copy.deepcopy(pristine)
    assert load_lora(fresh, path, mode=mode) is fresh
    assert list_adapters(fresh) == ["default"]
    assert sorted(p for p, *_ in iter_lora(fresh)) == sorted(case.paths)
    fresh.eval()
    assert torch.allclose(h.run(fresh, x, grad=False), expected, **TIGHT)
    assert torch.allclose(h.run(fresh, x, grad=True), expected, **TIGHT)
    for k, v in lora_state_dict(fresh).items():
        assert torch.equal(v, sd[k])
    # Loaded like add_lora: base frozen, adapters trainable.
    lora_ids = {id(t) for t in adapter_parameters(fresh)}
    for n, p in fresh.named_parameters():
        assert p.requires_grad == (id(p) in lora_ids), n


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_training_changes_only_adapters(case, mode, h, optim):
    model, _ = _lora_model(case, mode, h, randomize=False)
    model.train()
    lora_ids = {id(t) for t in adapter_parameters(model)}
    for n, p in model.named_parameters():
        assert p.requires_grad == (id(p) in lora_ids), n
    lora_keys = {k for k, v in model.named_parameters(remove_duplicate=False) if id(v) in lora_ids}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())  # all of them, as users do: frozen ones get no grad
    opt = (
        torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
        if optim == "sgd"
        else torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    )
    x = case.inputs()
    for _ in range(3):
        opt.zero_grad()
        h.loss(model(*x)).backward()
        for n, p in model.named_parameters():
            if id(p) not in lora_ids:
                assert p.grad is None, f"frozen {n} got a gradient"
        opt.step()
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k in lora_keys:
            assert not torch.equal(after[k], v), f"adapter tensor {k} did not train"
        else:
            assert torch.equal(after[k], v), f"base tensor {k} changed"


# --------------------------------------------------------------------------- modes agree


def test_factored_matches_materialized(case, h):
    _check_modes_agree(case, h, case.inputs())


def test_factored_matches_materialized_embedding_without_padding_tokens(zoo, h):
    idx = torch.randint(1, 10, (3, 5), generator=torch.Generator().manual_seed(4))
    _check_modes_agree(zoo["embedding"], h, (idx,))


def _check_modes_agree(case, h, x):
    models = {}
    for mode in ("factored", "materialized"):
        m = case.model()
        add_lora(m, case.targets, rank=case.rank, mode=mode, adapter="a")
        add_lora(m, case.targets, rank=1, mode=mode, adapter="b", alpha=3.0)
        models[mode] = m
    h.randomize(models["factored"])
    h.copy_adapters(models["factored"], models["materialized"])
    for training in (True, False):
        outs, grads = {}, {}
        for mode, m in models.items():
            m.train(training)
            m.zero_grad(set_to_none=True)
            out = m(*x)
            h.loss(out).backward()
            outs[mode] = out.detach()
            grads[mode] = {
                (path, p.adapter, t): getattr(p, t).grad.clone()
                for path, _, _, p in iter_lora(m)
                for t in ("lora_A", "lora_B")
            }
            with torch.no_grad():
                assert torch.allclose(m(*x), out, **TIGHT)
        assert torch.allclose(outs["factored"], outs["materialized"], **TIGHT)
        assert grads["factored"].keys() == grads["materialized"].keys()
        for key, g in grads["factored"].items():
            # Both sum the same float32 products in another order (conv: another algorithm):
            # the rounding error scales with the gradient's largest entries, not with each one.
            atol = 1e-5 * max(1.0, float(g.abs().max()))
            assert torch.allclose(g, grads["materialized"][key], rtol=1e-4, atol=atol), key


# --------------------------------------------------------------------------- eval cache


def test_no_grad_cache_is_never_stale(case, mode, h, tmp_path):
    model, ref = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()

    def check(tag):
        fresh = h.run(model, x, grad=True).detach()
        a = h.run(model, x, grad=False)
        b = h.run(model, x, grad=False)
        assert torch.equal(a, b), tag
        assert a.dtype == fresh.dtype, tag
        assert torch.allclose(a, fresh, **TIGHT), f"stale no_grad output after {tag}"
        return a

    first = check("start")

    # an optimizer step
    opt = torch.optim.SGD(adapter_parameters(model), lr=0.5)
    h.loss(model(*x)).backward()
    opt.step()
    after_step = check("optimizer step")
    assert not torch.allclose(after_step, first, **TIGHT)

    # toggling
    disable_lora(model)
    assert torch.equal(h.run(model, x, grad=False), h.run(ref.eval(), x, grad=False))
    enable_lora(model)
    assert torch.allclose(check("enable_lora"), after_step, **TIGHT)
    with lora_disabled(model):
        assert torch.equal(h.run(model, x, grad=False), h.run(ref, x, grad=False))
    check("lora_disabled")

    # load_lora of other values
    other = copy.deepcopy(model)
    h.randomize(other, seed=99)
    save_lora(other, tmp_path / "other.pt")
    expected = h.run(other, x, grad=False)
    load_lora(model, tmp_path / "other.pt")
    assert torch.allclose(check("load_lora"), expected, **TIGHT)

    # in-place edits of the adapter and of the base weight
    with torch.no_grad():
        for p in h.loras(model):
            p.lora_B.mul_(2)
    check("in-place lora_B edit")
    with torch.no_grad():
        for _, module, name, _ in iter_lora(model):
            module.parametrizations[name].original.mul_(1.5)
    check("in-place base weight edit")

    # dtype change
    model.to(torch.float64)
    x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
    fresh = model(*x64).detach()
    with torch.no_grad():
        out = model(*x64)
    assert out.dtype == torch.float64
    assert torch.allclose(out, fresh, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- several adapters


def test_several_adapters(case, mode, h):
    model, ref = _lora_model(case, mode, h, randomize=False)
    add_lora(model, case.targets, rank=1, mode=mode, adapter="second", alpha=2.0)
    h.randomize(model)
    x = case.inputs()
    model.eval()
    assert list_adapters(model) == ["default", "second"]
    assert active_adapters(model) == ["default", "second"]

    # Each adapted tensor reads W0 + sum of the enabled deltas.
    def check_weights():
        for path, module, name, _ in iter_lora(model):
            plist = module.parametrizations[name]
            expect = plist.original.detach().clone()
            for p in plist:
                if p.enabled:
                    expect = expect + p.delta().detach()
            assert torch.allclose(getattr(module, name).detach(), expect, **TIGHT), path

    check_weights()
    both = h.run(model, x, grad=False)

    alone = {}
    for name in ("default", "second"):
        solo = copy.deepcopy(model)
        remove_lora(solo, "second" if name == "default" else "default")
        assert list_adapters(solo) == [name]
        alone[name] = h.run(solo, x, grad=False)

    for name, other in (("default", "second"), ("second", "default")):
        set_active_adapters(model, name)
        assert active_adapters(model) == [name]
        check_weights()
        assert torch.allclose(h.run(model, x, grad=False), alone[name], **TIGHT)
        assert torch.allclose(h.run(model, x, grad=True), alone[name], **TIGHT)
        for p in h.loras(model):
            assert p.lora_A.requires_grad == (p.adapter == name)
            assert p.lora_B.requires_grad == (p.adapter == name)
    assert not torch.allclose(alone["default"], alone["second"], atol=1e-4)

    # Training with "second" active leaves "default" (inactive, frozen) unchanged.
    model.train()
    frozen = {k: v.clone() for k, v in lora_state_dict(model, "default").items()}
    trained = {k: v.clone() for k, v in lora_state_dict(model, "second").items()}
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        h.loss(model(*x)).backward()
        opt.step()
    for k, v in lora_state_dict(model, "default").items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, trained[k]) for k, v in lora_state_dict(model, "second").items())

    set_active_adapters(model, ["default", "second"])
    assert active_adapters(model) == ["default", "second"]
    set_active_adapters(model, [])
    assert active_adapters(model) == []
    model.eval()
    ref.eval()
    assert torch.equal(h.run(model, x, grad=False), h.run(ref, x, grad=False))
    set_active_adapters(model, "default")
    model.eval()
    assert torch.allclose(h.run(model, x, grad=False), alone["default"], **TIGHT)
    del both


# --------------------------------------------------------------------------- heads and biases


def _last_leaf_with_parameters(model):
    return [
        n for n, m in model.named_modules() if n and next(m.parameters(False), None) is not None
    ][-1]


def test_heads_and_biases_per_adapter(case, mode, h, tmp_path):
    """Each adapter trains its own copy of a head and of biases; toggles switch them exactly."""
    base = case.model()
    ref = h.frozen_copy(base)
    head = _last_leaf_with_parameters(base)  # often also carries LoRA: copy and update stack
    model = add_lora(base, case.targets, rank=case.rank, mode=mode, trainable=head, bias="all")
    add_lora(model, case.targets, rank=1, mode=mode, adapter="b", bias="lora_only")
    h.randomize(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for *_, c in iter_copies(model):
            c.value.add_(torch.randn(c.value.shape, generator=g) * 0.3)
    assert {c.adapter for *_, c in iter_copies(model)} == {"default", "b"} or not any(
        "bias" in n for n, _ in ref.named_parameters()
    )
    x = case.inputs()
    base_outs = _all_states(ref, x, h)
    with lora_disabled(model):
        for key, out in _all_states(model, x, h).items():
            assert torch.equal(out, base_outs[key]), f"lora_disabled differs from base in {key}"
    outs = {}
    for name in ("default", "b"):
        set_active_adapters(model, name)
        outs[name] = h.run(model, x, grad=False)
        assert all(c.enabled == (c.adapter == name) for *_, c in iter_copies(model))
    assert not torch.allclose(outs["default"], outs["b"], atol=1e-4)
    set_active_adapters(model, [])
    assert torch.equal(h.run(model, x, grad=False), base_outs[(False, False)])

    set_active_adapters(model, "b")
    loaded = load_lora(case.model(), save_lora(model, tmp_path / "a.pt"), mode=mode).eval()
    set_active_adapters(loaded, "default")
    assert torch.allclose(h.run(loaded, x, grad=False), outs["default"], **TIGHT)

    merged = merge_lora(copy.deepcopy(model), adapter="default")
    assert list_adapters(merged) == ["b"]
    with lora_disabled(merged):
        assert torch.allclose(h.run(merged, x, grad=False), outs["default"], **TIGHT)

    remove_lora(model)
    after = model.state_dict()
    assert after.keys() == ref.state_dict().keys()
    assert all(torch.equal(after[k], v) for k, v in ref.state_dict().items())


# --------------------------------------------------------------------------- copies, dtypes


@pytest.mark.parametrize("op", ["merge", "remove"])
def test_deepcopy_then_merge_leaves_original_working(case, mode, h, op):
    model, ref = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()
    enabled = h.run(model, x, grad=False)
    enabled_grad = h.run(model, x, grad=True).detach()

    copied = copy.deepcopy(model)
    (merge_lora if op == "merge" else remove_lora)(copied)
    # The original is fully working: same outputs, toggles, training, merge.
    assert torch.equal(h.run(model, x, grad=False), enabled)
    assert torch.equal(h.run(model, x, grad=True).detach(), enabled_grad)
    with lora_disabled(model):
        assert torch.equal(h.run(model, x, grad=False), h.run(ref.eval(), x, grad=False))
    h.loss(model(*x)).backward()
    assert all(p.lora_B.grad is not None for p in h.loras(model))

    # ...and vice versa: merging/removing on the original leaves the copy working.
    other = copy.deepcopy(model)
    other_out = h.run(other, x, grad=True).detach()
    (merge_lora if op == "merge" else remove_lora)(model)
    assert torch.equal(h.run(other, x, grad=True).detach(), other_out)
    merge_lora(other)
    assert torch.allclose(h.run(other, x, grad=False), enabled, **TIGHT)


def test_deepcopy_and_torch_save(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()
    out = h.run(model, x, grad=True)
    copied = copy.deepcopy(model)
    assert torch.equal(h.run(copied, x, grad=True), out)
    # The deep copy is independent.
    h.randomize(copied, seed=5)
    assert torch.equal(h.run(model, x, grad=True), out)
    # Whole-model pickling is refused by parametrize: save adapters with save_lora instead.
    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(model, io.BytesIO())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the state_dict route works


def test_to_dtype_after_add_lora(case, mode, h):
    model, _ = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()
    out32 = h.run(model, x, grad=False)
    model.to(torch.float64)
    for p in h.loras(model):
        assert p.lora_A.dtype == torch.float64 and p.lora_B.dtype == torch.float64
    x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
    for grad in (True, False):
        out = h.run(model, x64, grad=grad)
        assert out.dtype == torch.float64
        assert torch.allclose(out.float(), out32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(zoo, mode, h, dtype):
    for name in ("mlp", "custom_param", "embedding", "hf_conv1d"):
        case = zoo[name]
        base = case.model().to(dtype)
        ref = h.frozen_copy(base)
        model = add_lora(base, case.targets, rank=case.rank, mode=mode)
        for path, module, tname, p in iter_lora(model):
            assert p.lora_A.dtype == dtype and p.lora_B.dtype == dtype, path
        x = tuple(t.to(dtype) if t.is_floating_point() else t for t in case.inputs())
        assert torch.equal(model(*x), ref(*x))
        h.randomize(model)
        out = model(*x)
        assert out.dtype == dtype
        h.loss(out).backward()
        for p in h.loras(model):
            assert p.lora_B.grad is not None and p.lora_B.grad.dtype == dtype
        with lora_disabled(model):
            assert torch.equal(model(*x), ref(*x))


# --------------------------------------------------------------------------- bugs seen in the matrix


def test_merge_in_train_mode_with_dropout(zoo, mode, h):
    case = zoo["mlp"]
    model, _ = _lora_model(case, mode, h, dropout=0.5)
    x = case.inputs()
    model.eval()
    expected = h.run(model, x, grad=False)
    model.train()  # e.g. merging right after the training loop
    merge_lora(model)
    model.eval()
    assert torch.allclose(h.run(model, x, grad=False), expected, **TIGHT)


class _ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward (as timm's Conv2dSame, quantized layers...)."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_linear_subclass_forward_is_kept(mode, h, request):
    model = nn.Sequential(_ScaledLinear(6, 4))
    ref = h.frozen_copy(model)
    x = torch.randn(3, 6)
    add_lora(model, rank=2, mode=mode)
    assert torch.equal(model(x), ref(x))


# --------------------------------------------------------------------------- freezing options


def test_trainable_and_bias_options_mlp(mode, h):
    def flags(model):
        return {n: p.requires_grad for n, p in model.named_parameters()}

    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode)
    f = flags(m)
    assert f["fc1.bias"] is False and f["fc2.weight"] is False and f["fc2.bias"] is False
    assert f["fc1.parametrizations.weight.original"] is False
    assert f["fc1.parametrizations.weight.0.lora_A"] and f["fc1.parametrizations.weight.0.lora_B"]

    # A head and biases are trained as the adapter's own copies; the originals stay frozen.
    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode, trainable="fc2")
    f = flags(m)
    assert f["fc2.parametrizations.weight.0.value"] and f["fc2.parametrizations.bias.0.value"]
    assert not f["fc2.parametrizations.weight.original"] and not f["fc1.bias"]
    assert not f["fc1.parametrizations.weight.original"]

    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode, bias="lora_only")
    f = flags(m)
    assert f["fc1.parametrizations.bias.0.value"] and not f["fc2.bias"] and not f["fc2.weight"]
    assert not f["fc1.parametrizations.bias.original"]

    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode, bias="all")
    f = flags(m)
    assert f["fc1.parametrizations.bias.0.value"] and f["fc2.parametrizations.bias.0.value"]
    assert not f["fc2.weight"]

    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode, freeze=False)
    assert all(flags(m).values())

    # Training moves exactly what is trainable: the adapter's factors and copies.
    m = add_lora(h.MLP(), "fc1", rank=2, mode=mode, trainable=["fc2"], bias="lora_only")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(5, 6)
    for _ in range(2):
        opt.zero_grad()
        h.loss(m(x)).backward()
        opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        "fc1.parametrizations.bias.0.value",
        "fc1.parametrizations.weight.0.lora_A",
        "fc1.parametrizations.weight.0.lora_B",
        "fc2.parametrizations.weight.0.value",
        "fc2.parametrizations.bias.0.value",
    }


def test_bias_options_transformer(mode, h):
    m = add_lora(h.TransformerNet(), rank=2, mode=mode, bias="all")
    for n, p in m.named_parameters():
        if n.endswith("bias.0.value"):
            assert p.requires_grad, n
        elif "lora_" not in n:
            assert not p.requires_grad, n
    m = add_lora(h.TransformerNet(), "*linear1", rank=2, mode=mode, bias="lora_only")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {
        "encoder.layers.0.linear1.parametrizations.bias.0.value",
        "encoder.layers.1.linear1.parametrizations.bias.0.value",
    }


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_include_mha_in_proj_bias(h, bias):
    m = add_lora(h.TransformerNet(), rank=2, bias=bias)
    assert m.encoder.layers[0].self_attn.in_proj_bias.requires_grad


# --------------------------------------------------------------------------- other parametrizations


class _Scale(nn.Module):
    """A user's own parametrization, without right_inverse."""

    def forward(self, w):
        return w * 1.5


class _Shift(nn.Module):
    """A user's own parametrization with right_inverse."""

    def forward(self, w):
        return w + 0.25

    def right_inverse(self, w):
        return w - 0.25


def _weight_norm_model(mode, h):
    from torch.nn.utils.parametrizations import weight_norm

    base = h.MLP()
    weight_norm(base.fc1)
    ref = copy.deepcopy(base)
    model = add_lora(base, rank=2, mode=mode)
    parametrize.register_parametrization(model.fc1, "weight", _Scale())
    parametrize.register_parametrization(ref.fc1, "weight", _Scale())
    ref.requires_grad_(False)
    h.randomize(model)
    return model, ref


def _kinds(module):
    return [type(p).__name__ for p in module.parametrizations["weight"]]


def test_merge_keeps_other_parametrizations(mode, h):
    model, ref = _weight_norm_model(mode, h)
    assert _kinds(model.fc1) == ["_WeightNorm", "LoRAParametrization", "_Scale"]
    x = (torch.randn(4, 6),)
    model.eval()
    enabled = h.run(model, x, grad=False)
    merge_lora(model)
    assert _kinds(model.fc1) == ["_WeightNorm", "_Scale"]
    assert list(iter_lora(model)) == []
    assert not parametrize.is_parametrized(model.fc2)
    assert type(model.fc2) is nn.Linear
    assert torch.allclose(h.run(model, x, grad=False), enabled, **TIGHT)
    assert torch.allclose(h.run(model, x, grad=True), enabled, **TIGHT)
    assert sorted(model.state_dict()) == sorted(ref.state_dict())


def test_remove_keeps_other_parametrizations_exactly(mode, h):
    model, ref = _weight_norm_model(mode, h)
    x = (torch.randn(4, 6),)
    remove_lora(model)
    assert _kinds(model.fc1) == ["_WeightNorm", "_Scale"]
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k in ref_sd:
        assert torch.equal(sd[k], ref_sd[k]), k
    for training in (True, False):
        model.train(training)
        ref.train(training)
        for grad in (True, False):
            assert torch.equal(h.run(model, x, grad=grad), h.run(ref, x, grad=grad))


def test_merge_through_user_right_inverse(mode, h):
    model = h.MLP()
    parametrize.register_parametrization(model.fc1, "weight", _Shift())
    add_lora(model, rank=2, mode=mode)
    h.randomize(model)
    x = (torch.randn(4, 6),)
    enabled = h.run(model, x, grad=False)
    merge_lora(model)
    assert _kinds(model.fc1) == ["_Shift"]
    assert torch.allclose(h.run(model, x, grad=False), enabled, **TIGHT)


def test_merge_after_user_parametrization_without_inverse_refuses(mode, h):
    from lora_param import LoRAError

    model = h.MLP()
    parametrize.register_parametrization(model.fc1, "weight", _Scale())
    add_lora(model, rank=2, mode=mode)
    h.randomize(model)
    snap = h.snapshot(model)
    x = (torch.randn(4, 6),)
    out = h.run(model, x, grad=False)
    with pytest.raises(LoRAError, match="right_inverse"):
        merge_lora(model)
    h.assert_unchanged(model, snap)
    assert torch.equal(h.run(model, x, grad=False), out)
    remove_lora(model)  # the documented way out
    assert _kinds(model.fc1) == ["_Scale"]


def _merge_or_refuse(model, x, h):
    from lora_param import LoRAError

    out = h.run(model, x, grad=False)
    snap = h.snapshot(model)
    try:
        merge_lora(model)
    except LoRAError:
        h.assert_unchanged(model, snap)
        if not model.training:  # a training-mode spectral_norm forward changes its own state
            assert torch.equal(h.run(model, x, grad=False), out)
    else:
        assert list(iter_lora(model)) == []
        assert torch.allclose(h.run(model, x, grad=False), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"orthogonal_map": "householder"},
        {"use_trivialization": False},
        {"orthogonal_map": "householder", "use_trivialization": False},
    ],
    ids=[
        "matrix_exp",
        "householder",
        "matrix_exp-no-trivialization",
        "householder-no-trivialization",
    ],
)
def test_orthogonal_merge_works_or_refuses_cleanly(mode, h, kwargs):
    from torch.nn.utils.parametrizations import orthogonal

    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    orthogonal(model[0], **kwargs)
    add_lora(model, "0", rank=2, mode=mode)
    h.randomize(model, std_b=0.2)
    model.eval()
    _merge_or_refuse(model, (torch.randn(4, 6),), h)


@pytest.mark.parametrize("training", [False, True])
def test_spectral_norm_merge_works_or_refuses_cleanly(mode, h, training):
    from torch.nn.utils.parametrizations import spectral_norm

    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    spectral_norm(model[0])
    add_lora(model, "0", rank=2, mode=mode)
    h.randomize(model, std_b=0.2)
    model.train(training)
    _merge_or_refuse(model, (torch.randn(4, 6),), h)


# --------------------------------------------------------------------------- targets


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.fc1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(1, 2, 3)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        x = self.norm(self.fc1(self.enc(x)))
        return self.fc2(x) + self.conv(x.unsqueeze(1)).mean()


def _adapted(model):
    return sorted(path for path, *_ in iter_lora(model))


ALL_TOWER = ["conv.weight", "enc.0.weight", "enc.2.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        (None, None, ALL_TOWER),
        ("fc*", None, ["fc1.weight", "fc2.weight"]),
        ("fc1", None, ["fc1.weight"]),
        (["fc1", "enc.*"], None, ["enc.0.weight", "enc.2.weight", "fc1.weight"]),
        (re.compile(r"enc\.\d"), None, ["enc.0.weight", "enc.2.weight"]),
        (
            lambda n, m: isinstance(m, nn.Linear) and m.out_features == 8,
            None,
            ["enc.0.weight", "enc.2.weight", "fc1.weight"],
        ),
        ("enc.2.weight", None, ["enc.2.weight"]),
        (["enc.0.weight", "fc2"], None, ["enc.0.weight", "fc2.weight"]),
        (None, "enc.*", ["conv.weight", "fc1.weight", "fc2.weight"]),
        (None, ["enc.0", "conv"], ["enc.2.weight", "fc1.weight", "fc2.weight"]),
        (None, re.compile("fc.|conv"), ["enc.0.weight", "enc.2.weight"]),
        (None, lambda n, m: n.startswith("enc"), ["conv.weight", "fc1.weight", "fc2.weight"]),
        (None, "fc1.weight", ["conv.weight", "enc.0.weight", "enc.2.weight", "fc2.weight"]),
        ("*", "*.2", ["conv.weight", "enc.0.weight", "fc1.weight", "fc2.weight"]),
    ],
)
def test_target_forms(targets, exclude, expected, mode):
    from lora_param import find_targets

    model = _Tower()
    assert sorted(t.path for t in find_targets(model, targets, exclude=exclude)) == expected
    add_lora(model, targets, exclude=exclude, rank=2, mode=mode)
    assert _adapted(model) == expected
    model(torch.randn(2, 6)).sum().backward()


def test_layer_types(mode):
    model = add_lora(_Tower(), layer_types=nn.Conv1d, rank=1, mode=mode)
    assert _adapted(model) == ["conv.weight"]
    model = add_lora(_Tower(), "enc.*", layer_types=[nn.Linear], rank=2, mode=mode)
    assert _adapted(model) == ["enc.0.weight", "enc.2.weight"]


def test_rank_and_alpha_dicts(mode, h):
    model = add_lora(
        _Tower(),
        ["fc1", "fc2", "enc.0"],
        rank={"fc1": 8, "*": 2},
        alpha={"enc.*": 16, "*": 1.0},
        mode=mode,
    )
    got = {path: (p.rank, p.alpha, p.scale) for path, _, _, p in iter_lora(model)}
    assert got == {
        "enc.0.weight": (2, 16.0, 8.0),
        "fc1.weight": (8, 1.0, 1 / 8),
        "fc2.weight": (2, 1.0, 0.5),
    }
    # The first matching key wins, keys may be tensor paths.
    model = add_lora(_Tower(), "fc*", rank={"fc2.weight": 3, "fc*": 5}, mode=mode)
    assert {path: p.rank for path, _, _, p in iter_lora(model)} == {
        "fc1.weight": 5,
        "fc2.weight": 3,
    }


def test_alpha_defaults_and_rslora(mode):
    model = add_lora(_Tower(), "fc1", rank=4, mode=mode)
    p = next(iter_lora(model))[3]
    assert (p.alpha, p.scale) == (4.0, 1.0)
    model = add_lora(_Tower(), "fc1", rank=4, alpha=8, use_rslora=True, mode=mode)
    p = next(iter_lora(model))[3]
    assert p.scale == pytest.approx(8 / math.sqrt(4))
    model = add_lora(_Tower(), "fc1", rank=4, alpha=8, mode=mode)
    assert next(iter_lora(model))[3].scale == pytest.approx(2.0)


def test_scale_enters_the_weight(mode, h):
    model = add_lora(_Tower(), "fc1", rank=2, alpha=6, mode=mode)
    h.randomize(model)
    p = next(iter_lora(model))[3]
    w0 = model.fc1.parametrizations.weight.original
    expect = w0 + 3.0 * p.lora_B @ p.lora_A
    assert torch.allclose(model.fc1.weight, expect, **TIGHT)
    x = torch.randn(3, 8)
    assert torch.allclose(model.fc1(x), x @ expect.T + model.fc1.bias, **TIGHT)


def test_init_options(mode):
    model = nn.Sequential(nn.Linear(256, 128))
    add_lora(model, rank=16, init="gaussian", mode=mode)
    p = next(iter_lora(model))[3]
    assert abs(p.lora_A.std().item() - 1.0) < 0.05
    assert abs(p.lora_A.mean().item()) < 0.05
    assert torch.count_nonzero(p.lora_B) == 0
    model = nn.Sequential(nn.Linear(256, 128))
    add_lora(model, rank=16, mode=mode)  # kaiming uniform, a=sqrt(5): bound 1/sqrt(fan_in)
    p = next(iter_lora(model))[3]
    assert p.lora_A.abs().max().item() <= 1 / math.sqrt(256) + 1e-6
    assert p.lora_A.std().item() > 0.5 / math.sqrt(3 * 256)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapter_shapes_and_dtypes(zoo, mode, dtype):
    for name in ("conv2d", "hf_conv1d", "mha_kdim", "embedding"):
        case = zoo[name]
        model = case.model().to(dtype)
        add_lora(model, case.targets, rank=case.rank, mode=mode)
        for path, module, tname, p in iter_lora(model):
            w = module.parametrizations[tname].original
            if p.fan_in_fan_out:
                fan_in, fan_out = w.shape[0], w.shape[1]
            else:
                fan_out, fan_in = w.shape[0], w[0].numel()
            assert (p.fan_in, p.fan_out) == (fan_in, fan_out), path
            assert p.lora_A.shape == (case.rank, fan_in), path
            assert p.lora_B.shape == (fan_out, case.rank), path
            assert p.lora_A.dtype == dtype and p.lora_B.dtype == dtype
            assert p.lora_A.device == w.device


# --------------------------------------------------------------------------- summary


def test_trainable_summary_mnist(h):
    from lora_param import parameter_counts, trainable_summary

    model = h.MNISTNet()
    assert sum(p.numel() for p in model.parameters()) == 2_807_010
    add_lora(model, rank=1, init="gaussian")
    c = parameter_counts(model)
    assert (c.base, c.lora, c.total, c.trainable) == (2_807_010, 6_794, 2_813_804, 6_794)
    text = trainable_summary(model)
    assert "2,807,010" in text and "6,794" in text and "0.242%" in text
    assert "trainable params: 6,794" in text

    table = trainable_summary(model, per_layer=True).splitlines()
    rows = table[3:]  # summary line, header, rule
    assert len(rows) == 3
    assert [r.split()[0] for r in rows] == ["linear1.weight", "linear2.weight", "linear3.weight"]
    assert rows[0].split()[-2:] == ["1,784", "yes"]

    add_lora(model, "linear3", rank=1, adapter="extra")
    disable_lora(model, "default")
    c = parameter_counts(model)
    assert c.lora == 6_794 + 2_010 and c.trainable == 2_010
    rows = trainable_summary(model, per_layer=True).splitlines()[3:]
    assert len(rows) == 4
    assert sum(r.endswith("no") for r in rows) == 3


# --------------------------------------------------------------------------- stale cache, more ways


def _data_inplace(model, h):
    for p in h.loras(model):
        p.lora_B.data.mul_(3)


def _data_assign(model, h):
    for p in h.loras(model):
        p.lora_B.data = p.lora_B.detach() * 3


def _original_data(model, h):
    for _, module, name, _ in iter_lora(model):
        module.parametrizations[name].original.data.mul_(2)


def _vector_to_parameters(model, h):
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    params = list(model.parameters())
    vector_to_parameters(parameters_to_vector(params) * 1.5, params)


def _assign_load_twice(model, h):
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    model.load_state_dict({k: v * 2 for k, v in sd.items()}, strict=False, assign=True)
    with torch.no_grad():
        model(*model._test_inputs)
    model.load_state_dict({k: v * 3 for k, v in sd.items()}, strict=False, assign=True)


@pytest.mark.parametrize(
    "edit, needs_clear",
    [
        (_data_inplace, True),
        (_data_assign, False),
        (_original_data, True),
        (_vector_to_parameters, False),
        (_assign_load_twice, False),
    ],
    ids=[
        "lora_B.data.mul_",
        "lora_B.data=",
        "original.data.mul_",
        "vector_to_parameters",
        "load_state_dict-assign-twice",
    ],
)
def test_no_grad_cache_sees_untracked_edits(zoo, mode, h, edit, needs_clear):
    """Edits are seen, except in-place edits through ``.data`` (no version counter moves):
    those are documented to need ``clear_lora_cache`` (or ``model.eval()``)."""
    from lora_param import clear_lora_cache

    case = zoo["mlp"]
    model, _ = _lora_model(case, mode, h)
    model.eval()
    x = case.inputs()
    model._test_inputs = x
    before = h.run(model, x, grad=False)
    edit(model, h)
    if needs_clear:
        assert torch.equal(h.run(model, x, grad=False), before), "cache not in use"
        clear_lora_cache(model)
    no_grad_out = h.run(model, x, grad=False)
    fresh = model(*x).detach()  # grad mode never uses the cache
    assert not torch.allclose(fresh, before, **TIGHT), "the edit did not change the output"
    assert torch.allclose(no_grad_out, fresh, **TIGHT), "stale no_grad output"


def test_factored_embedding_scale_grad_by_freq(h):
    grads = {}
    for mode in ("factored", "materialized"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True))
        add_lora(m, rank=2, mode=mode)
        h.randomize(m)
        h.loss(m(torch.tensor([[1, 2, 2, 3, 3, 3]]))).backward()
        grads[mode] = [t.grad for p in h.loras(m) for t in (p.lora_A, p.lora_B)]
    for gf, gm in zip(grads["factored"], grads["materialized"]):
        assert torch.allclose(gf, gm, **TIGHT)


def test_lora_disabled_keeps_user_requires_grad(mode, h):
    model = add_lora(h.MLP(), rank=2, mode=mode)
    for p in h.loras(model):
        p.lora_A.requires_grad_(False)  # train B only
    with lora_disabled(model):
        pass
    assert not any(p.lora_A.requires_grad for p in h.loras(model))


def test_inference_mode(case, mode, h):
    model, ref = _lora_model(case, mode, h)
    x = case.inputs()
    model.eval()
    ref.eval()
    expected = h.run(model, x, grad=False)
    with torch.inference_mode():
        assert torch.equal(model(*x), expected)
        assert torch.equal(model(*x), expected)
        with lora_disabled(model):
            assert torch.equal(model(*x), ref(*x))
    assert torch.equal(h.run(model, x, grad=False), expected)
    assert torch.allclose(model(*x), expected, **TIGHT)
    h.loss(model(*x)).backward()  # the cache made in inference mode does not leak into autograd
