"""kohya / A1111 LoRA files on a tiny diffusers UNet and CLIP text encoder, against diffusers."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from lora_param import (
    LoRAError,
    adapter_scale,
    disable_lora,
    enable_lora,
    export_kohya,
    import_kohya,
    list_adapters,
    lora_disabled,
    merge_lora,
    set_adapter_scale,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")
pytest.importorskip("peft")  # diffusers' own LoRA loader needs it
transformers = pytest.importorskip("transformers")

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0."


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        sample_size=8,
        attention_head_dim=8,
    )
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([10]),
        torch.randn(1, 5, 32, generator=g),
    )


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def add_entry(sd, model, path, rank, alpha, *, prefix="lora_unet", linear_keys=False, seed=0):
    """A kohya entry with random factors; convs get LoCon (kernel-shaped) down weights."""
    g = torch.Generator().manual_seed(seed)
    w = dict(model.named_modules())[path].weight
    stem = f"{prefix}_{path.replace('.', '_')}"
    if w.dim() == 4:
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.1
        if linear_keys:  # Linear-shaped keys onto a 1x1 conv
            down, up = down.flatten(1), up.flatten(1)
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, generator=g) * 0.1
    sd[f"{stem}.lora_down.weight"] = down
    sd[f"{stem}.lora_up.weight"] = up
    if alpha is not None:
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha))
    return stem


def reference(model, sd, prefix="lora_unet", paths=None):
    """Hand-computed merge with kohya's rule: W += alpha / r * up @ down (alpha absent: r)."""
    ref = copy.deepcopy(model)
    modules = {n.replace(".", "_"): m for n, m in ref.named_modules()}
    if paths:
        modules.update({k: dict(ref.named_modules())[v] for k, v in paths.items()})
    with torch.no_grad():
        for key in sd:
            if not key.startswith(prefix + "_") or not key.endswith(".lora_down.weight"):
                continue
            stem = key.split(".")[0]
            down, up = sd[key], sd[f"{stem}.lora_up.weight"]
            r = down.shape[0]
            alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else r
            layer = modules[stem[len(prefix) + 1 :]]
            delta = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
            layer.weight += alpha / r * delta.reshape(layer.weight.shape)
    return ref


def mixed_file(unet):
    """Attention, feed-forward, LoCon 3x3, 1x1 (both key shapes) entries; mixed ranks/alphas."""
    sd = {}
    add_entry(sd, unet, ATTN + "attn1.to_q", 4, 2, seed=1)
    add_entry(sd, unet, ATTN + "attn1.to_k", 4, 2, seed=2)
    add_entry(sd, unet, ATTN + "attn2.to_v", 2, 2, seed=3)
    add_entry(sd, unet, ATTN + "attn1.to_out.0", 4, 2, seed=4)
    add_entry(sd, unet, ATTN + "ff.net.0.proj", 3, 2, seed=5)
    add_entry(sd, unet, ATTN + "ff.net.2", 8, 6, seed=6)  # an FF alpha of its own
    add_entry(sd, unet, "down_blocks.1.attentions.0.proj_in", 2, 2, seed=7)
    add_entry(sd, unet, "down_blocks.1.attentions.0.proj_out", 2, 2, seed=8)
    add_entry(sd, unet, "down_blocks.0.resnets.0.conv1", 2, 4, seed=9)  # LoCon 3x3
    add_entry(sd, unet, "down_blocks.0.resnets.0.time_emb_proj", 2, 2, seed=10)
    add_entry(sd, unet, "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 4, 2, seed=11)
    return sd


def diffusers_unet(unet, sd):
    model = copy.deepcopy(unet)
    pipe = diffusers.StableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, alphas = pipe.lora_state_dict(dict(sd))[:2]
        pipe.load_lora_into_unet(state, alphas, unet=model)
    return model


def test_mixed_file_matches_diffusers_and_hand_merge(unet, inputs):
    sd = mixed_file(unet)
    ours = import_kohya(copy.deepcopy(unet), sd)
    base, out = run(unet, inputs), run(ours, inputs)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, run(diffusers_unet(unet, sd), inputs), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, run(reference(unet, sd), inputs), rtol=0, atol=1e-5)
    # Linear-shaped keys onto the 1x1 proj_out conv give the same model
    flat = dict(sd)
    stem = "lora_unet_down_blocks_1_attentions_0_proj_out"
    for part in ("down", "up"):
        flat[f"{stem}.lora_{part}.weight"] = sd[f"{stem}.lora_{part}.weight"].flatten(1)
    # and 1x1-conv-shaped keys onto a Linear layer
    ff = f"lora_unet_{(ATTN + 'ff.net.2').replace('.', '_')}"
    for part in ("down", "up"):
        flat[f"{ff}.lora_{part}.weight"] = sd[f"{ff}.lora_{part}.weight"][..., None, None]
    torch.testing.assert_close(run(import_kohya(copy.deepcopy(unet), flat), inputs), out)


@pytest.mark.parametrize("case", ["attention_alpha", "missing_alpha"])
def test_kohya_alpha_rule_where_diffusers_differs(unet, inputs, case):
    sd = mixed_file(unet)
    stem = f"lora_unet_{(ATTN + 'attn1.to_q').replace('.', '_')}"
    if case == "attention_alpha":
        sd[f"{stem}.alpha"] = torch.tensor(1.0)  # differs from the file's most common alpha
    else:
        del sd[f"{stem}.alpha"]  # kohya: alpha = rank (4), not the common 2
    out = run(import_kohya(copy.deepcopy(unet), sd), inputs)
    torch.testing.assert_close(out, run(reference(unet, sd), inputs), rtol=0, atol=1e-5)
    assert (out - run(diffusers_unet(unet, sd), inputs)).abs().max() > 1e-4  # diffusers 0.42


def test_export_loads_in_diffusers(unet, inputs, tmp_path):
    ours = import_kohya(copy.deepcopy(unet), mixed_file(unet), adapter="style")
    path = export_kohya(ours, tmp_path / "out.safetensors")
    from safetensors.torch import load_file

    back = load_file(str(path))
    assert back[f"lora_unet_{(ATTN + 'ff.net.2').replace('.', '_')}.alpha"].item() == 6
    expected = run(ours, inputs)
    torch.testing.assert_close(run(diffusers_unet(unet, back), inputs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(run(import_kohya(copy.deepcopy(unet), path), inputs), expected)


def test_sdxl_original_block_names(unet, inputs):
    """input_blocks / middle_block / output_blocks names land on diffusers' modules."""
    names = {
        "input_blocks_0_0": "conv_in",
        "time_embed_0": "time_embedding.linear_1",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
        "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q": ATTN + "attn1.to_q",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_1_1_transformer_blocks_0_ff_net_2": (
            "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"
        ),
        "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_3_0_out_layers_3": "up_blocks.1.resnets.1.conv2",
        "out_2": "conv_out",
    }
    sgm, plain = {}, {}
    for i, (old, new) in enumerate(names.items()):
        add_entry(plain, unet, new, 2, 1, seed=i)
        stem = "lora_unet_" + new.replace(".", "_")
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            sgm[f"lora_unet_{old}.{suffix}"] = plain[f"{stem}.{suffix}"]
    out = run(import_kohya(copy.deepcopy(unet), sgm), inputs)
    torch.testing.assert_close(out, run(reference(unet, plain), inputs), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=100,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval()


def encode(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(2, 10).view(1, 8)).last_hidden_state


def test_text_encoder_names_and_a_file_with_both_parts(unet, text_encoder, inputs, tmp_path):
    paths = [n for n, _ in text_encoder.named_modules() if n.endswith(("q_proj", "fc1"))]
    sd = {}
    for i, path in enumerate(paths):
        add_entry(sd, text_encoder, path, 2, 1, prefix="lora_te", seed=i)
    # real files spell the old `text_model` wrapper; keep one entry in the installed spelling
    wrapped = {}
    for key, value in sd.items():
        wrapped[
            key if "layers_1_mlp" in key else key.replace("lora_te_", "lora_te_text_model_")
        ] = value
    add_entry(wrapped, unet, ATTN + "attn1.to_q", 4, 2)
    te = import_kohya(copy.deepcopy(text_encoder), wrapped, prefix="lora_te")
    expected = encode(reference(text_encoder, sd, prefix="lora_te"))
    torch.testing.assert_close(encode(te), expected, rtol=0, atol=1e-5)
    u = import_kohya(copy.deepcopy(unet), wrapped)  # the lora_te_ keys are ignored here
    assert len([k for k in wrapped if k.startswith("lora_unet")]) == 3
    assert (run(u, inputs) - run(unet, inputs)).abs().max() > 0
    path = export_kohya(te, tmp_path / "te.safetensors", prefix="lora_te")
    from safetensors.torch import load_file

    assert all(k.startswith("lora_te_text_model_encoder_") for k in load_file(str(path)))
    again = import_kohya(copy.deepcopy(text_encoder), path, prefix="lora_te")
    torch.testing.assert_close(encode(again), encode(te))


def test_foreign_keys_refused_then_skipped(unet, inputs, tmp_path):
    sd = mixed_file(unet)
    sd["lora_unet_down_blocks_0_resnets_0_conv2.hada_w1_a"] = torch.zeros(2, 2)
    sd["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    model = copy.deepcopy(unet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match="hada_w1_a") as err:
        import_kohya(model, sd)
    assert "no_such_layer" in str(err.value)
    assert list_adapters(model) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="no_such_layer"):
        import_kohya(model, sd, strict=False)
    torch.testing.assert_close(
        run(model, inputs), run(import_kohya(copy.deepcopy(unet), mixed_file(unet)), inputs)
    )
    bad = dict(mixed_file(unet))
    bad[f"lora_unet_{(ATTN + 'attn1.to_q').replace('.', '_')}.lora_down.weight"] = torch.zeros(4, 7)
    with pytest.raises(LoRAError, match="shape"):
        import_kohya(copy.deepcopy(unet), bad)
    with pytest.raises(LoRAError, match="prefix"):
        import_kohya(copy.deepcopy(unet), mixed_file(unet), prefix="lora_te")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files_give_lora_error(unet, tmp_path, damage):
    good = tmp_path / "good.safetensors"
    export_kohya(import_kohya(copy.deepcopy(unet), mixed_file(unet)), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage]
    )
    model = copy.deepcopy(unet)
    with pytest.raises(LoRAError, match="corrupt"):
        import_kohya(model, bad)
    assert list_adapters(model) == []
    with pytest.raises(LoRAError, match="does not exist"):
        import_kohya(model, tmp_path / "missing.safetensors")


def test_two_styles_strengths_toggles_merge(unet, inputs):
    a, b = mixed_file(unet), {}
    for i, path in enumerate([ATTN + "attn1.to_q", ATTN + "ff.net.2", "conv_in"]):
        add_entry(b, unet, path, 2, 1, seed=40 + i)
    model = copy.deepcopy(unet)
    import_kohya(model, a, adapter="style_a")
    import_kohya(model, b, adapter="style_b")
    set_adapter_scale(model, "style_a", 0.6)
    set_adapter_scale(model, "style_b", 0.3)
    assert adapter_scale(model, "style_a") == 0.6
    scaled = {k: v * 0.6 if k.endswith("up.weight") else v for k, v in a.items()}
    scaled_b = {k: v * 0.3 if k.endswith("up.weight") else v for k, v in b.items()}
    expected = run(reference(reference(unet, scaled), scaled_b), inputs)
    out = run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with lora_disabled(model):
        assert torch.equal(run(model, inputs), run(unet, inputs))
    disable_lora(model, "style_b")
    torch.testing.assert_close(
        run(model, inputs), run(reference(unet, scaled), inputs), atol=1e-5, rtol=0
    )
    enable_lora(model, "style_b")
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(run(merged, inputs), out, rtol=0, atol=1e-5)
    with pytest.raises(LoRAError, match="finite"):
        set_adapter_scale(model, "style_a", math.inf)


def test_dora_scale_round_trip(unet, inputs, tmp_path):
    sd = mixed_file(unet)
    for key in list(sd):
        if key.endswith(".lora_down.weight") and "attn1_to" in key:
            stem = key.split(".")[0]
            out_features = sd[f"{stem}.lora_up.weight"].shape[0]
            g = torch.Generator().manual_seed(len(stem))
            sd[f"{stem}.dora_scale"] = 1 + torch.rand(out_features, 1, generator=g)
    model = import_kohya(copy.deepcopy(unet), sd)
    # hand computation for one layer: W' = m * (W + sBA) / ||W + sBA|| per output row
    stem = f"lora_unet_{(ATTN + 'attn1.to_q').replace('.', '_')}"
    layer = dict(model.named_modules())[ATTN + "attn1.to_q"]
    w0 = dict(unet.named_modules())[ATTN + "attn1.to_q"].weight
    v = w0 + 0.5 * sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]
    expected = sd[f"{stem}.dora_scale"] * v / v.norm(dim=1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    path = export_kohya(model, tmp_path / "dora.safetensors")
    again = import_kohya(copy.deepcopy(unet), path)
    torch.testing.assert_close(run(again, inputs), run(model, inputs))
    bad = dict(sd)
    bad[f"{stem}.dora_scale"] = torch.ones(1, 64)
    with pytest.raises(LoRAError, match="dora_scale"):
        import_kohya(copy.deepcopy(unet), bad)
