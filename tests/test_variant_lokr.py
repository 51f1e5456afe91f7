"""LoKr: exact against PEFT's LoKr and LyCORIS's LokrModule, every operation, files both ways,
and the scale rule (PEFT: ``alpha / r`` always; LyCORIS: 1 when both factors are full)."""

from __future__ import annotations

import copy
import json

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
from lora_param.interop.peft_lokr import peft_factorization
from lora_param.variants.lokr import factorization

TARGETS = ["fc", "conv", "conv1"]
LAYOUTS = {
    "default": (lp.LoKrConfig(), 2),
    "both-factored-tucker": (lp.LoKrConfig(decompose_both=True, use_tucker=True), 1),
    "factor-2": (lp.LoKrConfig(factor=2), 1),
    "full": (lp.LoKrConfig(full_matrix=True), 2),
}


def layouts(model):
    return {
        path: (p.layout.w1_factored, p.layout.w2_factored, p.layout.tucker)
        for path, _, _, p in lp.iter_lora(model)
    }


def test_factorization_is_lycoris_and_peft_s():
    lycoris = pytest.importorskip("lycoris.functional.general")
    peft_layer = pytest.importorskip("peft.tuners.lokr.layer")
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, factor) == lycoris.factorization(dim, factor)
            assert peft_factorization(dim, factor) == peft_layer.factorization(dim, factor)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_operations(name):
    options, rank = LAYOUTS[name]
    _, model, _ = walk_operations(options, TARGETS, rank=rank, alpha=3)
    got = layouts(model)
    if name == "full":
        assert set(got.values()) == {(False, False, False)}
    if name == "both-factored-tucker":
        assert got["conv.weight"] == (False, True, True) and got["fc.weight"] == (True, True, False)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_packed_base_merges(method):
    walk_packed("lokr", method, rank=2)


def test_hugging_face_conv1d(tmp_path):
    walk_hf_conv1d("lokr", tmp_path, rank=2, alpha=3)


def test_adapters_mix_combine_and_refuse_hotswap_and_cat():
    model = walk_adapters("lokr", TARGETS, rank=1)
    with pytest.raises(lp.LoRAError, match="method='svd'"):
        lp.combine_adapters(model, {"a": 1.0}, "cat", method="cat")


def test_factored_forward_and_its_rule():
    """The factored form never forms ΔW: the same outputs and gradients as the materialized
    one, on a grouped conv (which forms it) too; used where it costs less than the weight."""
    base = nn.Sequential(
        nn.Linear(12, 16),
        nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 8, 3, groups=2),
        nn.Linear(12, 7),
    )
    xs = [torch.randn(3, 12), torch.randn(4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(3, 12)]
    outs = {}
    for mode in ("factored", "materialized"):
        model = randomize(lp.add_lora(copy.deepcopy(base), rank=1, variant="lokr", mode=mode))
        ys = [m(x) for m, x in zip(model, xs, strict=True)]
        sum(y.square().sum() for y in ys).backward()
        outs[mode] = (ys, factor_grads(model))
    close(outs["factored"][0], outs["materialized"][0])
    for key, g in outs["factored"][1].items():
        torch.testing.assert_close(g, outs["materialized"][1][key], rtol=1e-4, atol=1e-5)
    pays = [p.has_branch() for *_, p in lp.iter_lora(model)]
    assert pays == [True, True, True, False]  # 7 outputs split (1, 7): w2 is the whole width


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize("name", ["default", "both-factored-tucker", "full"])
def test_matches_peft_forward_and_gradients(mode, name):
    peft = pytest.importorskip("peft")
    options, rank = LAYOUTS[name]
    base = net()
    targets = ["fc", "conv"]  # PEFT 0.21's LoKr on Conv1d: see test_peft_conv1d_refusal
    ours = randomize(
        lp.add_lora(copy.deepcopy(base), targets, rank=rank, alpha=5, variant=options, mode=mode)
    )
    # PEFT has no full_matrix: at r=2 it keeps both factors of these small layers full too
    config = peft.LoKrConfig(
        r=rank,
        alpha=5,
        target_modules=targets,
        decompose_both=options.decompose_both,
        use_effective_conv2d=options.use_tucker,
    )
    theirs = peft_twin(base, config, ours)
    xs = inputs()
    a, b = run(ours, xs, grad=True)[:2], run(theirs, xs, grad=True)[:2]
    close(a, b)
    sum(o.square().sum() for o in a).backward()
    sum(o.square().sum() for o in b).backward()
    mine = factor_grads(ours)
    for key, t in theirs.named_parameters():
        if "lokr" in key:
            key = key.removeprefix("base_model.model.").replace(".default", "")
            torch.testing.assert_close(
                mine[key], t.grad.reshape(mine[key].shape), rtol=1e-4, atol=1e-4
            )


def lycoris_module(p, module, lycoris_lokr):
    """LyCORIS's LokrModule with the entry's layout, holding its tensors (with both factors
    full, LyCORIS's scale is 1: the entry's scale goes into ``lokr_w1``, as export_kohya does)."""
    lay = p.layout
    full = not (lay.w1_factored or lay.w2_factored)
    ly = lycoris_lokr.LokrModule(
        "t",
        module,
        1.0,
        lora_dim=p.rank,
        alpha=p.alpha,
        use_tucker=lay.tucker,
        decompose_both=lay.w1_factored,
        factor=p.options["factor"],
        full_matrix=full,
    )
    with torch.no_grad():
        for name, t in p.tensors().items():
            getattr(ly, name).copy_(t * p.scale if full and name == "lokr_w1" else t)
    return ly


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matches_lycoris_module_forward_and_gradients(name):
    """Same layout, same tensors: LyCORIS's module computes the same."""
    lycoris_lokr = pytest.importorskip("lycoris.modules.lokr")
    options, rank = LAYOUTS[name]
    base = net()
    ours = randomize(lp.add_lora(copy.deepcopy(base), TARGETS, rank=rank, alpha=3, variant=options))
    twin = copy.deepcopy(base)
    made = []
    for path, _, _, p in lp.iter_lora(ours):
        made.append(lycoris_module(p, twin.get_submodule(path.rpartition(".")[0]), lycoris_lokr))
        made[-1].apply_to()
    xs = inputs()
    a, b = run(ours, xs, grad=True), run(twin, xs, grad=True)
    close(a, b)
    sum(o.square().sum() for o in a).backward()
    sum(o.square().sum() for o in b).backward()
    for (*_, p), ly in zip(lp.iter_lora(ours), made, strict=True):
        full = not (p.layout.w1_factored or p.layout.w2_factored)
        for n, t in p.tensors().items():
            want = getattr(ly, n).grad * (p.scale if full and n == "lokr_w1" else 1.0)
            torch.testing.assert_close(t.grad, want, rtol=1e-4, atol=1e-4)


def test_peft_folder_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = net()
    for name, (options, rank) in LAYOUTS.items():
        # PEFT 0.21 computes LoKr on Conv1d only with a factored w2 (test_peft_conv1d_refusal)
        targets = TARGETS if name == "factor-2" else ["fc", "conv"]
        if name == "factor-2":  # LyCORIS orders a divisor pair, PEFT does not: refused
            ours = lp.add_lora(
                copy.deepcopy(base), targets, rank=1, variant=lp.LoKrConfig(factor=8)
            )
            with pytest.raises(lp.LoRAError, match="no single PEFT decompose_factor"):
                lp.export_peft(ours, tmp_path / name)
        ours = randomize(
            lp.add_lora(
                copy.deepcopy(base),
                targets,
                rank=rank,
                alpha=3,
                variant=options,
                trainable=["head"],
            )
        )
        lp.export_peft(ours, tmp_path / name)
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LOKR"
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        close(run(loaded), run(ours))
        back = lp.import_peft(copy.deepcopy(base), tmp_path / name)
        close(run(back), run(ours))
        assert layouts(back) == layouts(ours)
    made = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoKrConfig(
            r=2,
            alpha=3,
            target_modules=["fc", "conv"],
            init_weights=False,
            decompose_both=True,
            decompose_factor=4,
            rank_pattern={"conv": 1},
            use_effective_conv2d=True,
        ),
    )
    made.save_pretrained(tmp_path / "theirs")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    close(run(lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")), run(theirs))


def test_peft_conv1d_refusal(tmp_path):
    """PEFT 0.21's LoKr on Conv1d arranges a full w2 wrongly and fails with a tucker w2."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Conv1d(4, 8, 3))
    x = torch.randn(2, 4, 7)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoKrConfig(r=4, target_modules=["0"], init_weights=False)
    )
    ours = lp.add_lora(copy.deepcopy(base), rank=4, alpha=8, variant="lokr")
    assert layouts(ours) == {"0.weight": (False, False, False)}
    with torch.no_grad():
        for name, t in next(p for *_, p in lp.iter_lora(ours)).tensors().items():
            t.copy_(getattr(theirs.base_model.model[0], name)["default"])
    assert (theirs(x) - ours(x)).abs().max() > 1e-2  # PEFT's kron of a 2-D and a 3-D tensor
    with pytest.raises(lp.LoRAError, match=r"nn\.Conv1d with a full LoKr w2"):
        lp.export_peft(ours, tmp_path / "a")
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(lp.LoRAError, match=r"nn\.Conv1d with a full LoKr w2"):
        lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def text_encoder():
    return tiny_text_encoder()


def test_kohya_both_ways_against_lycoris(unet, text_encoder, tmp_path):
    pytest.importorskip("lycoris")
    import lycoris.modules.lokr as lycoris_lokr
    from safetensors.torch import load_file

    for name, (options, rank) in LAYOUTS.items():
        u = randomize(
            lp.add_lora(copy.deepcopy(unet), UNET_TARGETS, rank=rank, alpha=3, variant=options), 0.2
        )
        t = randomize(
            lp.add_lora(
                copy.deepcopy(text_encoder), TEXT_TARGETS, rank=rank, alpha=3, variant=options
            ),
            0.2,
        )
        lp.export_kohya(u, tmp_path / f"{name}u.safetensors")
        lp.export_kohya(t, tmp_path / f"{name}t.safetensors", prefix="lora_te")
        sd = {
            **load_file(tmp_path / f"{name}u.safetensors"),
            **load_file(tmp_path / f"{name}t.safetensors"),
        }
        entries = {
            path.rpartition(".")[0].replace(".", "_"): p for path, _, _, p in lp.iter_lora(u)
        }

        def build(stem, module, _sd, entries=entries):
            # LyCORIS's make_module_from_state_dict misreads conv entries with a factored w2
            # (the kernel counted in the input size) and tucker ones (rank from lokr_w2_a's
            # columns): build those from the known layout, with the file's tensors.
            p = entries.get(stem.removeprefix("lora_unet_"))
            if p is None or p.kind != "conv" or not p.layout.w2_factored:
                return None
            ly = lycoris_module(p, module, lycoris_lokr)
            with torch.no_grad():
                for n in p.tensors():
                    getattr(ly, n).copy_(_sd[f"{stem}.{n}"])
            return ly

        assert (unet_out(u) - unet_out(unet)).abs().max() > 1e-3
        if name == "full":  # LyCORIS's rule: scale 1; ours alpha/rank = 1.5, folded into w1
            assert all(float(v) == 2.0 for k, v in sd.items() if k.endswith(".alpha"))
        torch.testing.assert_close(
            unet_out(lycoris_twin(unet, sd, "lora_unet", build)), unet_out(u), **F32
        )
        torch.testing.assert_close(
            text_out(lycoris_twin(text_encoder, sd, "lora_te")), text_out(t), **F32
        )
        again = lp.import_kohya(copy.deepcopy(unet), sd)
        torch.testing.assert_close(unet_out(again), unet_out(u), **F32)
        assert layouts(again) == layouts(u)
        te = lp.import_kohya(copy.deepcopy(text_encoder), sd, prefix="lora_te")
        torch.testing.assert_close(text_out(te), text_out(t), **F32)


def test_kohya_lycoris_file_with_full_factors_and_refusals(unet):
    """A LyCORIS file whose factors are both full has scale 1 whatever its alpha; dora_scale,
    mismatched splits and half entries are refused, and nothing changes then."""
    g = torch.Generator().manual_seed(2)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 x 64
    sd = {
        f"{stem}.lokr_w1": torch.randn(8, 8, generator=g),
        f"{stem}.lokr_w2": torch.randn(8, 8, generator=g) * 0.1,
        f"{stem}.alpha": torch.tensor(16.0),
    }
    ours = lp.import_kohya(copy.deepcopy(unet), sd)
    p = next(p for *_, p in lp.iter_lora(ours))
    assert (p.rank, p.alpha, p.scale) == (1, 1.0, 1.0)
    delta = torch.kron(sd[f"{stem}.lokr_w1"], sd[f"{stem}.lokr_w2"])
    torch.testing.assert_close(p.delta(), delta, **F32)
    model = copy.deepcopy(unet)
    for bad, match in [
        ({**sd, f"{stem}.dora_scale": torch.ones(64, 1)}, "dora_scale"),
        ({**sd, f"{stem}.lokr_w1": torch.randn(7, 8)}, "small factor is 7x8"),
        ({f"{stem}.lokr_w1": torch.randn(8, 8)}, "another method or incomplete"),
        ({**sd, f"{stem}.lokr_w2_a": torch.randn(8, 2)}, "another method or incomplete"),
    ]:
        with pytest.raises(lp.LoRAError, match=match):
            lp.import_kohya(model, bad)
    assert lp.list_adapters(model) == []
