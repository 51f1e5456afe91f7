"""LoHa: exact against PEFT's LoHa and LyCORIS's LohaModule, every operation, files both ways."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from variant_checks import (
    F32,
    TEXT_TARGETS,
    UNET_TARGETS,
    close,
    factor_grads,
    inputs,
    lycoris_twin,
    net,
    peft_twin,
    randomize,
    run,
    text_out,
    tiny_text_encoder,
    tiny_unet,
    unet_out,
    walk_adapters,
    walk_hf_conv1d,
    walk_operations,
    walk_packed,
)

import lora_param as lp

TARGETS = ["fc", "conv", "conv1"]


@pytest.mark.parametrize("tucker", [False, True])
def test_operations(tucker):
    walk_operations(lp.LoHaConfig(use_tucker=tucker), TARGETS, rank=2, alpha=3)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_packed_base_merges(method):
    walk_packed("loha", method, rank=2)


def test_hugging_face_conv1d(tmp_path):
    walk_hf_conv1d("loha", tmp_path, rank=2, alpha=3)


def test_adapters_mix_combine_and_refuse_hotswap():
    model = walk_adapters("loha", TARGETS, rank=2)
    lp.combine_adapters(model, {"a": 0.5, "b": -1.0}, "cat", method="cat")  # exact factors
    lp.set_active_adapters(model, ["a", "b"])
    lp.set_adapter_scale(model, "a", 0.5)
    lp.set_adapter_scale(model, "b", -1.0)
    both = run(model)
    lp.set_active_adapters(model, "cat")
    close(run(model), both)


def test_lowrank_is_exact_rank_r_squared_and_branch_rule():
    model = randomize(lp.add_lora(net(), TARGETS, rank=3, variant="loha"))
    for _, _, _, p in lp.iter_lora(model):
        a, b = p.lowrank()
        assert a.shape == (9, p.fan_in) and b.shape == (p.fan_out, 9)
        torch.testing.assert_close(p.delta(), p.stored(b @ a).float(), **F32)
        assert p.has_branch() == (9 * (p.fan_in + p.fan_out) <= p.fan_in * p.fan_out)
    small = lp.add_lora(net(), TARGETS, rank=1, variant="loha")
    assert all(p.has_branch() for *_, p in lp.iter_lora(small))
    assert not any(p.has_branch() for *_, p in lp.iter_lora(model))


@pytest.mark.parametrize("init", ["kaiming", "lycoris"])
def test_inits_start_unchanged_and_check_fields(init):
    base = net()
    model = lp.add_lora(copy.deepcopy(base), TARGETS, rank=2, variant="loha", init=init)
    close(run(model), run(base), rtol=0, atol=0)
    p = next(p for *_, p in lp.iter_lora(model))
    zero = "hada_w2_b" if init == "kaiming" else "hada_w2_a"
    assert all((t.abs().sum() == 0) == (n == zero) for n, t in p.tensors().items())
    with pytest.raises(lp.LoRAError, match="init='gaussian' is not an initialization of the loha"):
        lp.add_lora(copy.deepcopy(base), TARGETS, variant="loha", init="gaussian")
    with pytest.raises(lp.LoRAError, match="does not adapt 'embedding'"):
        lp.add_lora(nn.Sequential(nn.Embedding(5, 4)), variant="loha")


@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_matches_peft_forward_and_gradients(mode):
    peft = pytest.importorskip("peft")
    base = net()
    ours = randomize(
        lp.add_lora(copy.deepcopy(base), TARGETS, rank=3, alpha=5, variant="loha", mode=mode)
    )
    config = peft.LoHaConfig(r=3, alpha=5, target_modules=TARGETS)
    theirs = peft_twin(base, config, ours)
    xs = inputs()
    a, b = run(ours, xs, grad=True), run(theirs, xs, grad=True)
    close(a, b)
    sum(o.square().sum() for o in a).backward()
    sum(o.square().sum() for o in b).backward()
    mine = factor_grads(ours)
    for name, t in theirs.named_parameters():
        if "hada" in name:
            key = name.removeprefix("base_model.model.").replace(".default", "")
            torch.testing.assert_close(mine[key], t.grad, rtol=1e-4, atol=1e-4)


def test_tucker_matches_lycoris_forward_and_gradients():
    """The tucker form against LyCORIS's LohaModule (PEFT 0.21's tucker backward is wrong for
    ``hada_w1_a`` / ``hada_w2_a``, which LyCORIS fixed; its forward agrees and is checked in
    the PEFT folder test)."""
    pytest.importorskip("lycoris")
    from lycoris.modules.loha import LohaModule

    for conv in (nn.Conv2d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3)):
        base = nn.Sequential(conv)
        x = torch.randn(2, 4, 5, 5) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 7)
        ours = randomize(
            lp.add_lora(
                copy.deepcopy(base), rank=2, alpha=3, variant=lp.LoHaConfig(use_tucker=True)
            )
        )
        twin = copy.deepcopy(base)
        ly = LohaModule("t", twin[0], 1.0, lora_dim=2, alpha=3, use_tucker=True)
        p = next(p for *_, p in lp.iter_lora(ours))
        with torch.no_grad():
            for name, t in p.tensors().items():
                getattr(ly, name).copy_(t)
        ly.apply_to()
        y, z = ours(x), twin(x)
        torch.testing.assert_close(y, z, **F32)
        y.square().sum().backward()
        z.square().sum().backward()
        for name, t in p.tensors().items():
            torch.testing.assert_close(t.grad, getattr(ly, name).grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tucker", [False, True])
def test_peft_folder_both_ways(tmp_path, tucker):
    peft = pytest.importorskip("peft")
    base = net()
    ours = lp.add_lora(
        copy.deepcopy(base),
        TARGETS,
        rank={"fc": 3, "*": 2},
        alpha=5,
        variant=lp.LoHaConfig(use_tucker=tucker),
        use_rslora=tucker,
        trainable=["head"],
    )
    randomize(ours)
    with torch.no_grad():
        ours.head.weight.add_(1.0)
    lp.export_peft(ours, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOHA" and config["use_effective_conv2d"] is tucker
    assert config["modules_to_save"] == ["head"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    close(run(loaded), run(ours))
    close(run(lp.import_peft(copy.deepcopy(base), tmp_path / "out")), run(ours))
    # a folder PEFT wrote
    made = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoHaConfig(
            r=3,
            alpha=2,
            target_modules=TARGETS,
            init_weights=False,
            use_effective_conv2d=tucker,
            rank_pattern={"conv1": 2},
            alpha_pattern={"fc": 7},
        ),
    )
    made.save_pretrained(tmp_path / "theirs")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    close(run(lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")), run(theirs))


def test_peft_refusals(tmp_path):
    pytest.importorskip("safetensors")
    model = lp.add_lora(net(), ["fc", "head"], rank=2, variant="loha", bias="all")
    with pytest.raises(lp.LoRAError, match="no bias option"):
        lp.export_peft(model, tmp_path / "bias")
    conv3 = nn.Sequential(nn.Conv3d(2, 4, 3))
    lp.add_lora(conv3, variant="loha")
    with pytest.raises(lp.LoRAError, match=r"nn.Linear, nn.Conv1d and nn.Conv2d"):
        lp.export_peft(conv3, tmp_path / "conv3")
    assert not (tmp_path / "bias").exists() and not (tmp_path / "conv3").exists()
    mixed = lp.add_lora(net(), "fc", variant="loha")
    lp.add_lora(mixed, "conv", adapter="other")
    with pytest.raises(lp.LoRAError, match="several adapters"):
        lp.export_peft(mixed, tmp_path / "two")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


@pytest.mark.parametrize("tucker", [False, True])
def test_kohya_both_ways_against_lycoris(unet, text_encoder, tmp_path, tucker):
    pytest.importorskip("lycoris")
    from safetensors.torch import load_file

    variant = lp.LoHaConfig(use_tucker=tucker)
    u = randomize(
        lp.add_lora(copy.deepcopy(unet), UNET_TARGETS, rank=2, alpha=3, variant=variant), 0.2
    )
    t = randomize(
        lp.add_lora(copy.deepcopy(text_encoder), TEXT_TARGETS, rank=2, alpha=3, variant=variant),
        0.2,
    )
    lp.export_kohya(u, tmp_path / "u.safetensors")
    lp.export_kohya(t, tmp_path / "t.safetensors", prefix="lora_te")
    sd = {**load_file(tmp_path / "u.safetensors"), **load_file(tmp_path / "t.safetensors")}
    assert any(k.endswith(".hada_t1") for k in sd) is tucker
    assert (unet_out(u) - unet_out(unet)).abs().max() > 1e-3
    torch.testing.assert_close(unet_out(lycoris_twin(unet, sd, "lora_unet")), unet_out(u), **F32)
    torch.testing.assert_close(
        text_out(lycoris_twin(text_encoder, sd, "lora_te")), text_out(t), **F32
    )
    again = lp.import_kohya(copy.deepcopy(unet), sd)
    torch.testing.assert_close(unet_out(again), unet_out(u), rtol=0, atol=0)
    te = lp.import_kohya(copy.deepcopy(text_encoder), sd, prefix="lora_te")
    torch.testing.assert_close(text_out(te), text_out(t), rtol=0, atol=0)


def test_kohya_community_file_and_refusals(unet):
    """A file as LyCORIS writes it (its modules' own state dicts, random tensors) loads with
    LyCORIS's outputs; an absent alpha means alpha = rank; dora_scale and half entries are
    refused, and nothing changes then."""
    pytest.importorskip("lycoris")
    from lycoris.modules.loha import LohaModule

    sd = {}
    g = torch.Generator().manual_seed(5)
    for path in ["conv_in", "down_blocks.1.attentions.0.proj_in"]:
        ly = LohaModule("x", unet.get_submodule(path), 1.0, lora_dim=2, alpha=1.5, use_tucker=True)
        stem = "lora_unet_" + path.replace(".", "_")
        for name, value in ly.custom_state_dict().items():
            random = torch.randn(value.shape, generator=g) * 0.2
            sd[f"{stem}.{name}"] = value if name == "alpha" else random
    ours = lp.import_kohya(copy.deepcopy(unet), sd)
    assert sorted(p.tucker for *_, p in lp.iter_lora(ours)) == [False, True]  # proj_in is 1x1
    torch.testing.assert_close(unet_out(ours), unet_out(lycoris_twin(unet, sd, "lora_unet")), **F32)
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    at_rank = {**no_alpha, **{k: torch.tensor(2.0) for k in sd if k.endswith(".alpha")}}
    torch.testing.assert_close(
        unet_out(lp.import_kohya(copy.deepcopy(unet), no_alpha)),
        unet_out(lp.import_kohya(copy.deepcopy(unet), at_rank)),
        rtol=0,
        atol=0,
    )
    model = copy.deepcopy(unet)
    for bad, match in [
        ({**sd, "lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1)}, "dora_scale"),
        ({k: v for k, v in sd.items() if not k.endswith("conv_in.hada_t2")}, "only one of hada_t1"),
        ({**sd, "lora_unet_conv_in.hada_w1_a": torch.zeros(2, 31)}, "shape"),
    ]:
        with pytest.raises(lp.LoRAError, match=match):
            lp.import_kohya(model, bad)
    assert lp.list_adapters(model) == []


def test_rslora_scale_in_files(unet, tmp_path):
    u = randomize(
        lp.add_lora(
            copy.deepcopy(unet), "conv_in", rank=4, alpha=2, variant="loha", use_rslora=True
        )
    )
    lp.export_kohya(u, tmp_path / "a.safetensors")
    from safetensors.torch import load_file

    assert float(load_file(tmp_path / "a.safetensors")["lora_unet_conv_in.alpha"]) == pytest.approx(
        2 * math.sqrt(4)
    )
    back = lp.import_kohya(copy.deepcopy(unet), tmp_path / "a.safetensors")
    torch.testing.assert_close(unet_out(back), unet_out(u), **F32)
