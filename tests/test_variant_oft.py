"""OFT, both operators, exact against their references and through every operation.

* ``side="input"`` against PEFT 0.21's ``tuners/oft`` (same ``oft_R`` values loaded into
  PEFT's modules): forward and merge, Cayley–Neumann (same number of terms: the series is
  approximate by design, in both) and exact Cayley, COFT (including its in-place projection
  over training steps), block sharing, Linear / 1×1 Conv2d / Embedding; PEFT folders both ways.
* ``side="output"`` against LyCORIS 4.1's ``DiagOFTModule`` (same ``oft_blocks``): constraint,
  rescale, Linear and convolutions; kohya / LyCORIS files both ways on a tiny diffusers UNet
  and CLIP text encoder, against LyCORIS's own network built from the same file.

Tolerances: the references run the same float32 operations on the same values, in a different
order in places (PEFT merges with ``mm``, LyCORIS forms ``W' - W``): differences are rounding,
``atol=1e-5`` on outputs of magnitude ~1 (measured maxima: 2.4e-7 against PEFT, 9.5e-7
against LyCORIS).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_param as lp
from lora_param import LoRAError, OFTConfig
from lora_param.interop.kohya import read_kohya_file

ATOL = 1e-5
RNG = torch.Generator


def _oft(model: nn.Module, path: str, adapter: str = "default") -> lp.OFTParametrization:
    return next(
        p for t, _, _, p in lp.iter_lora(model) if t == f"{path}.weight" and p.adapter == adapter
    )  # type: ignore[return-value]


def _randomize(model: nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    g = RNG().manual_seed(seed)
    with torch.no_grad():
        for *_, p in lp.iter_lora(model):
            for t in p.trainable_tensors().values():
                t.copy_(
                    torch.randn(t.shape, generator=g) * scale + (t.mean() if t.dim() == 1 else 0)
                )


class Net(nn.Module):
    """Embedding, Linear layers, a 1×1 and a 3×3 convolution (factored and materialized OFT)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 6)
        self.pw = nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)
        c = self.conv(torch.relu(self.pw(img))).mean((2, 3))
        return h + c


@pytest.fixture
def batch():
    g = RNG().manual_seed(3)
    return torch.randint(0, 10, (3, 5), generator=g), torch.randn(3, 4, 5, 5, generator=g)


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


# --------------------------------------------------------------------------- against PEFT


peft = pytest.importorskip("peft")


def _peft_pair(base, targets, block, **options):
    """PEFT's OFT and ours on copies of ``base``, with the same random ``oft_R`` values."""
    peft_options = {
        "use_cayley_neumann": options.get("cayley_neumann", True),
        "num_cayley_neumann_terms": options.get("neumann_terms", 5),
        "coft": options.get("coft", False),
        "eps": options.get("eps", 6e-5),
        "block_share": options.get("block_share", False),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.OFTConfig(oft_block_size=block, target_modules=targets, **peft_options),
        )
    ours = lp.add_lora(copy.deepcopy(base), targets, rank=block, variant=OFTConfig(**options))
    g = RNG().manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "oft_R" in name or "oft_embedding_R" in name:
                value = torch.randn(param.shape, generator=g) * 0.3
                param.copy_(value)
                path = name.split(".")[2]
                _oft(ours, path).oft_R.copy_(value)
    return theirs, ours


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cayley_neumann": False},
        {"block_share": True},
        {"coft": True, "eps": 1e-2},
        {"cayley_neumann": False, "coft": True, "eps": 1e-2, "block_share": True},
        {"neumann_terms": 1},
        {"neumann_terms": 2},
        {"neumann_terms": 3},
        {"neumann_terms": 7},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_input_side_matches_peft_forward_and_merge(options, batch):
    base = _net()
    theirs, ours = _peft_pair(base, ["emb", "fc1", "fc2", "pw"], 4, **options)
    with torch.no_grad():
        want = theirs(*batch)
    got = ours(*batch)  # with gradients: the factored path
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(*batch), want, atol=ATOL, rtol=0)  # eval cache: W'
        merged = lp.merge_lora(copy.deepcopy(ours))
        torch.testing.assert_close(
            merged(*batch), theirs.merge_and_unload()(*batch), atol=ATOL, rtol=0
        )
    if options.get("neumann_terms", 5) > 1:  # one term: R = I, nothing to train
        got.sum().backward()
        assert all(p.grad is not None for p in lp.adapter_parameters(ours))


def test_input_side_kxk_conv_is_pefts_merged_operator(batch):
    """PEFT 0.21's unmerged OFT forward on a 3×3 convolution is not its merge (it folds
    overlapping patches back): ours is the merged ``W Rᵀ`` over the flattened ``in * k * k``."""
    base = _net()
    theirs, ours = _peft_pair(base, ["conv"], 8)
    with torch.no_grad():
        unmerged = theirs(*batch)
        want = theirs.merge_and_unload()(*batch)
    assert (unmerged - want).abs().max() > 1e-2  # PEFT disagrees with itself here
    torch.testing.assert_close(ours(*batch), want, atol=ATOL, rtol=0)


def test_importing_a_pefts_kxk_conv_warns_and_gives_its_merge(tmp_path, batch):
    pytest.importorskip("safetensors")
    base = _net()
    theirs, _ = _peft_pair(base, ["conv", "fc1"], 4)
    theirs.save_pretrained(tmp_path / "f")
    with pytest.warns(UserWarning, match=r"k×k convolutions \['conv'\]"):
        ours = lp.import_peft(copy.deepcopy(base), tmp_path / "f")
    with torch.no_grad():
        torch.testing.assert_close(
            ours(*batch), theirs.merge_and_unload()(*batch), atol=ATOL, rtol=0
        )


def test_coft_projects_in_place_like_peft_over_training(batch):
    base = _net()
    theirs, ours = _peft_pair(base, ["fc1", "fc2"], 4, coft=True, eps=0.05)
    opts = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for m in (theirs, ours)
    ]
    for _ in range(3):
        for model, opt in zip((theirs, ours), opts, strict=True):
            opt.zero_grad()
            model(*batch).pow(2).mean().backward()
            opt.step()
    for path in ("fc1", "fc2"):
        want = theirs.base_model.model.get_submodule(path).oft_R["default"].weight
        torch.testing.assert_close(_oft(ours, path).oft_R, want, atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(*batch), theirs(*batch), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- against LyCORIS


lycoris_oft = pytest.importorskip("lycoris.modules.diag_oft")


@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize(
    "layer",
    [nn.Linear(12, 16), nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(4, 16, 1, groups=2)],
    ids=["linear", "conv3x3", "grouped1x1"],
)
def test_output_side_matches_lycoris(layer, constraint, rescale):
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 4, 5, 5)
    theirs_layer = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = lycoris_oft.DiagOFTModule(
            "x", theirs_layer, 1.0, lora_dim=4, constraint=constraint, rescaled=rescale
        )
    module.apply_to()
    ours = lp.add_lora(
        nn.Sequential(copy.deepcopy(layer)),
        rank=4,
        variant=OFTConfig(side="output", constraint=constraint, rescale=rescale),
    )
    p = ours[0].parametrizations.weight[0]
    g = RNG().manual_seed(2)
    with torch.no_grad():
        blocks = torch.randn(module.oft_blocks.shape, generator=g) * 0.2
        module.oft_blocks.copy_(blocks)
        p.oft_blocks.copy_(blocks)
        if rescale:
            s = 1 + 0.1 * torch.randn(16, generator=g)
            module.rescale.copy_(s.view(module.rescale.shape))
            p.rescale.copy_(s)
    want = theirs_layer(x)
    torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=0)  # factored: R · base(x) + b
    with torch.no_grad():
        weight, _ = module.get_merged_weight(1.0, layer.weight.shape)
        merged = lp.merge_lora(copy.deepcopy(ours))
        torch.testing.assert_close(merged[0].weight, weight, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged(x), want, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- operations


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("mode", ["factored", "materialized"])
def test_starts_unchanged_toggles_merge_remove(side, mode, batch):
    base = _net()
    targets = (
        ["emb", "fc1", "fc2", "pw", "conv"] if side == "input" else ["fc1", "fc2", "pw", "conv"]
    )
    model = lp.add_lora(
        copy.deepcopy(base), targets, rank=2, mode=mode, variant=OFTConfig(side=side)
    )
    with torch.no_grad():
        ref = base(*batch)
        torch.testing.assert_close(model(*batch), ref, atol=ATOL, rtol=0)  # R = I
    _randomize(model)
    on = model(*batch)
    assert (on - ref).abs().max() > 1e-3
    with lp.lora_disabled(model), torch.no_grad():
        assert torch.equal(model(*batch), ref)  # off: the base bit for bit
    with torch.no_grad():
        torch.testing.assert_close(model(*batch), on, atol=ATOL, rtol=0)
        merged = lp.merge_lora(copy.deepcopy(model))
        assert not lp.list_adapters(merged)
        torch.testing.assert_close(merged(*batch), on, atol=ATOL, rtol=0)
        removed = lp.remove_lora(copy.deepcopy(model))
        assert torch.equal(removed(*batch), ref)


def test_factored_equals_materialized_with_gradients(batch):
    base = _net()
    grads = {}
    for mode in ("factored", "materialized"):
        for side, targets in (("input", ["emb", "fc1", "pw"]), ("output", ["fc2", "conv"])):
            model = lp.add_lora(
                copy.deepcopy(base),
                targets,
                rank=2,
                mode=mode,
                adapter=side,
                variant=OFTConfig(side=side),
            )
            _randomize(model, seed=5)
            out = model(*batch)
            out.pow(2).sum().backward()
            grads[mode, side] = (
                out.detach(),
                [p.grad.clone() for p in lp.adapter_parameters(model)],
            )
    for side in ("input", "output"):
        (y1, g1), (y2, g2) = grads["factored", side], grads["materialized", side]
        torch.testing.assert_close(y1, y2, atol=ATOL, rtol=0)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout: weight (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.view((*x.shape[:-1], self.nf))


@pytest.mark.parametrize("side", ["input", "output"])
def test_conv1d_hf_and_named_matrices_equal_the_same_linear(side):
    """The same OFT on HF Conv1D (weight stored (in, out)) and on a parameter adapted by name
    (always materialized) as on the equivalent nn.Linear."""
    torch.manual_seed(0)
    conv1d, linear = Conv1D(12, 8), nn.Linear(8, 12)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    x = torch.randn(3, 8)
    option = OFTConfig(side=side)
    models = [lp.add_lora(nn.Sequential(m), rank=4, variant=option) for m in (conv1d, linear)]
    for m in models:
        _randomize(m, seed=9)
    torch.testing.assert_close(models[0](x), models[1](x), atol=ATOL, rtol=0)
    named = lp.add_lora(nn.Sequential(mha), ["0.in_proj_weight"], rank=4, variant=option)
    as_linear = nn.Sequential(nn.Linear(8, 24, bias=False))
    with torch.no_grad():
        as_linear[0].weight.copy_(mha.in_proj_weight)
    lp.add_lora(as_linear, rank=4, variant=option)
    _randomize(named, seed=9)
    _randomize(as_linear, seed=9)
    torch.testing.assert_close(named[0].in_proj_weight, as_linear[0].weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("conv", "side", "factored"),
    [
        (nn.Conv2d(8, 8, 1, groups=2, padding=1, padding_mode="reflect", stride=2), "input", True),
        (nn.Conv2d(8, 8, 1, groups=2, padding=1, padding_mode="reflect", stride=2), "output", True),
        (nn.Conv2d(8, 8, 3, groups=2, padding=1), "output", True),
        (nn.Conv2d(8, 6, 1, groups=2), "output", False),  # a block spans two groups
        (nn.Conv2d(8, 6, 3, padding=1), "input", False),  # R mixes kernel positions
    ],
    ids=["1x1-input", "1x1-output", "3x3-output", "straddling-output", "3x3-input"],
)
def test_conv_factored_equals_materialized(conv, side, factored, monkeypatch):
    """Where the factored forward applies it never forms ``W'``; elsewhere ``W'`` is used."""
    x = torch.randn(2, 8, 5, 5)
    outs = []
    for mode in ("materialized", "factored"):
        model = lp.add_lora(
            nn.Sequential(copy.deepcopy(conv)), rank=2, mode=mode, variant=OFTConfig(side=side)
        )
        _randomize(model, seed=4)
        if mode == "factored" and factored:
            monkeypatch.setattr(lp.OFTParametrization, "adapt", None)  # W' never formed
        outs.append(model(x))
        monkeypatch.undo()
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)


def test_merge_one_adapter_where_it_commutes(batch):
    base = _net()
    model = lp.add_lora(copy.deepcopy(base), ["fc1"], rank=4, adapter="o", variant="oft")
    lp.add_lora(model, ["fc1"], rank=2, adapter="l")
    _randomize(model)
    with torch.no_grad():
        want = model(*batch)
    with pytest.raises(LoRAError, match=r"adapter 'o' \(oft\) comes before it"):
        lp.merge_lora(copy.deepcopy(model), adapter="l")
    merged = lp.merge_lora(model, adapter="o")  # first on the tensor: exact
    assert lp.list_adapters(merged) == ["l"]
    with torch.no_grad():
        torch.testing.assert_close(merged(*batch), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_packed_base_forward_and_merge(method, side):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(4, 64)
    model = lp.add_lora(copy.deepcopy(base), rank=8, quantize=method, variant=OFTConfig(side=side))
    with torch.no_grad():
        packed_base = model(x)
        packing_error = (packed_base - base(x)).abs().max()
    _randomize(model, scale=0.05)
    on = model(x)
    on.sum().backward()
    with torch.no_grad():
        with lp.lora_disabled(model):
            assert torch.equal(model(x), packed_base)
        merged = lp.merge_lora(copy.deepcopy(model))
        torch.testing.assert_close(merged(x), on, atol=1e-4, rtol=0)
        with pytest.warns(lp.RequantizationWarning):
            requantized = lp.merge_lora(copy.deepcopy(model), requantize=True)
        assert requantized[0].parametrizations.weight.original0.dtype in (torch.uint8, torch.int8)
        assert (requantized(x) - on).abs().max() < 3 * packing_error  # one more rounding


@pytest.mark.parametrize("side", ["input", "output"])
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bitsandbytes_base_forward_and_merge(kind, side):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    if kind == "4bit":
        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False)
        layer.bias = nn.Parameter(dense.bias.data.clone())
    else:
        layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
        layer.load_state_dict(dense.state_dict())
    model = nn.Sequential(layer.to("cpu"))
    x = torch.randn(4, 64)
    with torch.no_grad():
        before = model(x)
    lp.add_lora(model, rank=8, variant=OFTConfig(side=side))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=ATOL, rtol=0)
    _randomize(model, scale=0.05)
    on = model(x)
    on.sum().backward()
    with torch.no_grad():
        merged = lp.merge_lora(model)
        assert type(merged[0]) is nn.Linear  # a plain weight in the compute dtype
        torch.testing.assert_close(merged(x), on, atol=ATOL, rtol=0)


def test_save_load_state_dict_deepcopy_dtype_compile(tmp_path, batch):
    base = _net()
    model = lp.add_lora(copy.deepcopy(base), ["fc1", "pw"], rank=4, adapter="a")
    lp.add_lora(
        model,
        ["fc2", "conv"],
        rank=2,
        adapter="b",
        variant=OFTConfig(side="output", rescale=True, constraint=0.5),
    )
    _randomize(model)
    with torch.no_grad():
        want = model(*batch)
    lp.save_lora(model, tmp_path / "oft.pt")
    loaded = lp.load_lora(copy.deepcopy(base), tmp_path / "oft.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*batch), want, atol=0, rtol=0)
        again = copy.deepcopy(base)
        lp.add_lora(again, ["fc1", "pw"], rank=4, adapter="a")
        lp.add_lora(
            again,
            ["fc2", "conv"],
            rank=2,
            adapter="b",
            variant=OFTConfig(side="output", rescale=True, constraint=0.5),
        )
        again.load_state_dict(model.state_dict())
        torch.testing.assert_close(again(*batch), want, atol=0, rtol=0)
        torch.testing.assert_close(copy.deepcopy(model)(*batch), want, atol=0, rtol=0)
        wide = copy.deepcopy(model).double()
        torch.testing.assert_close(
            wide(batch[0], batch[1].double()).float(), want, atol=ATOL, rtol=0
        )
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(*batch), want, atol=ATOL, rtol=0)


def test_eval_cache_and_mixed_batches(batch):
    base = _net()
    model = lp.add_lora(
        copy.deepcopy(base), ["fc1", "fc2", "pw"], rank=2, adapter="a", variant="oft"
    )
    lp.add_lora(model, ["fc2", "conv"], rank=2, adapter="b", variant=OFTConfig(side="output"))
    _randomize(model)
    model.eval()
    with torch.no_grad():
        model(*batch)
        assert lp.eval_cache_bytes(model) > 0
        lp.set_eval_cache(model, "never")
        model(*batch)
        assert lp.eval_cache_bytes(model) == 0
        alone = {}
        for name in ("a", "b"):
            lp.set_active_adapters(model, name)
            alone[name] = model(*batch)
        lp.set_active_adapters(model, ["a", "b"])
        with lp.lora_disabled(model):
            alone["__base__"] = model(*batch)
        names = ["a", "__base__", "b"]
        with lp.mixed_adapters(model, names):
            mixed = model(*batch)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone[name][i], atol=ATOL, rtol=0)


def test_capabilities_combine_and_refusals(batch):
    base = _net()
    model = lp.add_lora(copy.deepcopy(base), ["fc1", "fc2"], rank=4, adapter="a", variant="oft")
    _randomize(model)
    with pytest.raises(LoRAError, match="set_adapter_scale does not support oft adapters"):
        lp.set_adapter_scale(model, "a", 0.5)
    with pytest.raises(LoRAError, match="hot-swapping does not support oft adapters"):
        lp.prepare_hotswap(model, 8)
    with pytest.raises(LoRAError, match=r"exact low-rank factors.*oft adapter"):
        lp.combine_adapters(model, {"a": 1.0}, "c", method="cat")
    with torch.no_grad():
        want = model(*batch)
    report = lp.combine_adapters(model, {"a": 1.0}, "c", method="svd", rank=12)
    assert report.max_error < 1e-5  # full rank: W Rᵀ - W exactly, as a LoRA
    lp.set_active_adapters(model, "c")
    with torch.no_grad():
        torch.testing.assert_close(model(*batch), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 5}, r"block size \(rank\) 5 for 'fc1.weight' must divide its fan_in=8"),
        ({"rank": 4, "alpha": 8}, "OFT has no alpha scale"),
        ({"rank": 4, "dropout": 0.1}, "OFT has no dropout"),
        ({"rank": 4, "use_rslora": True}, "no scale for use_rslora"),
        ({"rank": 4, "init": "gaussian"}, "identity rotation"),
        ({"variant": OFTConfig(n_blocks=3)}, "n_blocks=3 for 'fc1.weight'"),
        ({"variant": OFTConfig(side="sideways")}, "must be 'input' or 'output'"),
        ({"variant": OFTConfig(rescale=True)}, r"side='input' has no \['rescale'\]"),
        ({"variant": OFTConfig(side="output", coft=True)}, r"side='output' has no \['coft'\]"),
        ({"variant": OFTConfig(side="output"), "targets": ["emb"]}, "vocabulary rows"),
        ({"variant": OFTConfig(neumann_terms=0)}, "neumann_terms"),
    ],
)
def test_wrong_options_are_refused_before_any_change(kwargs, match):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"variant": "oft", "targets": ["fc1"], **kwargs}
    with pytest.raises(LoRAError, match=match):
        lp.add_lora(model, **kwargs)
    assert not lp.list_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_n_blocks_sets_the_count_per_layer():
    model = lp.add_lora(_net(), ["fc1", "fc2"], variant=OFTConfig(side="output", n_blocks=2))
    assert _oft(model, "fc1").oft_blocks.shape == (2, 6, 6)
    assert _oft(model, "fc2").oft_blocks.shape == (2, 3, 3)
    p = _oft(lp.add_lora(_net(), ["fc2"], rank=3), "fc2")
    assert isinstance(p, lp.LoRAParametrization)


# --------------------------------------------------------------------------- PEFT folders


def test_peft_folder_both_ways(tmp_path, batch):
    pytest.importorskip("safetensors")
    base = _net()
    model = lp.add_lora(
        copy.deepcopy(base), ["emb", "fc1", "fc2", "pw"], rank=4, variant="oft", bias="lora_only"
    )
    _randomize(model)
    with torch.no_grad():
        for c in lp.iter_copies(model):
            c[3].value.add_(0.1)
        want = model(*batch)
    lp.export_peft(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert theirs.peft_config["default"].peft_type == peft.PeftType.OFT
    with torch.no_grad():
        torch.testing.assert_close(theirs(*batch), want, atol=ATOL, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    again = lp.import_peft(copy.deepcopy(base), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(*batch), want, atol=ATOL, rtol=0)
    assert _oft(again, "fc1").fields() == _oft(model, "fc1").fields()


def test_peft_folder_block_count_and_options(tmp_path, batch):
    pytest.importorskip("safetensors")
    base = _net()
    theirs, _ = _peft_pair(base, ["fc1", "fc2"], 4, cayley_neumann=False, block_share=True)
    theirs.save_pretrained(tmp_path / "share")
    ours = lp.import_peft(copy.deepcopy(base), tmp_path / "share")
    with torch.no_grad():
        torch.testing.assert_close(ours(*batch), theirs(*batch), atol=ATOL, rtol=0)
    model = lp.add_lora(copy.deepcopy(base), ["fc1", "fc2"], variant=OFTConfig(n_blocks=2))
    _randomize(model)
    lp.export_peft(model, tmp_path / "count")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "count")
    assert (loaded.peft_config["default"].r, loaded.peft_config["default"].oft_block_size) == (2, 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*batch), model(*batch), atol=ATOL, rtol=0)


def test_peft_folder_refusals(tmp_path):
    pytest.importorskip("safetensors")
    base = _net()
    out = lp.add_lora(copy.deepcopy(base), ["fc1"], rank=4, variant=OFTConfig(side="output"))
    with pytest.raises(LoRAError, match=r"output-side OFT.*PEFT's OFT rotates the input side"):
        lp.export_peft(out, tmp_path / "a")
    wide = lp.add_lora(copy.deepcopy(base), ["conv"], rank=8, variant="oft")
    with pytest.raises(LoRAError, match=r"kernel \(3, 3\).*does not\s+compute its own merged"):
        lp.export_peft(wide, tmp_path / "b")
    mixed = lp.add_lora(
        copy.deepcopy(base), ["fc1", "fc2"], rank={"fc1": 4, "fc2": 2}, variant="oft"
    )
    with pytest.raises(LoRAError, match="neither one block size nor one block count"):
        lp.export_peft(mixed, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    boft = tmp_path / "boft"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(
            nn.Sequential(nn.Linear(8, 8)), peft.BOFTConfig(boft_block_size=4, target_modules=["0"])
        ).save_pretrained(boft)
    with pytest.raises(LoRAError, match="PEFT BOFT"):
        lp.import_peft(nn.Sequential(nn.Linear(8, 8)), boft)


# --------------------------------------------------------------------------- kohya / LyCORIS files


diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd_parts():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        sample_size=8,
        attention_head_dim=8,
    ).eval()
    config = transformers.CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
    )
    te = transformers.CLIPTextModel(config).eval()
    g = RNG().manual_seed(1)
    inputs = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([10]),
        torch.randn(1, 5, 32, generator=g),
    )
    return unet, te, inputs, torch.randint(0, 100, (1, 6), generator=g)


ATTN = "down_blocks.1.attentions.0.transformer_blocks.0."
UNET_LAYERS = [
    ATTN + "attn1.to_q",
    ATTN + "ff.net.2",
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.1.attentions.0.proj_in",
]
TE_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.mlp.fc1"]


def _lycoris_file(unet, te, *, rescale: bool) -> dict[str, torch.Tensor]:
    """A LyCORIS diag-OFT file: per layer b <= blocks (LyCORIS's own loader needs that)."""
    g = RNG().manual_seed(7)
    sd = {}
    # Text encoder keys in the spelling of real files (older transformers' ``text_model.``).
    for prefix, model, paths in (
        ("lora_unet", unet, UNET_LAYERS),
        ("lora_te_text_model", te, TE_LAYERS),
    ):
        for path in paths:
            w = model.get_submodule(path).weight
            stem = f"{prefix}_{path.replace('.', '_')}"
            sd[f"{stem}.oft_blocks"] = torch.randn(w.shape[0] // 4, 4, 4, generator=g) * 0.2
            sd[f"{stem}.alpha"] = torch.tensor(0.01)
            if rescale:
                ones = [1] * (w.dim() - 1)
                sd[f"{stem}.rescale"] = (1 + 0.1 * torch.randn(w.shape[0], generator=g)).view(
                    -1, *ones
                )
    return sd


def _lycoris_outputs(unet, te, sd, inputs, ids):
    """LyCORIS's modules made from the file by its own loader's steps (``lycoris.kohya.
    create_network_from_weights`` without the network object, whose constructor trips over
    this tiny UNet): key detection (``get_module``), construction (``make_module``), apply."""
    from lycoris.modules import get_module, make_module

    unet, te = copy.deepcopy(unet), copy.deepcopy(te)
    holder = nn.Module()  # real files name the text encoder's modules ``text_model.*``,
    holder.text_model = te  # a level transformers 5's CLIPTextModel no longer has
    made = 0
    for prefix, model in (("lora_unet", unet), ("lora_te", holder)):
        for name, module in model.named_modules():
            lora_name = f"{prefix}_{name}".replace(".", "_")
            if f"{lora_name}.oft_blocks" in sd:
                kind, params = get_module(sd, lora_name)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    make_module(kind, params, lora_name, module).apply_to()
                made += 1
    assert made == len(UNET_LAYERS) + len(TE_LAYERS)
    with torch.no_grad():
        return unet(*inputs).sample, te(ids).last_hidden_state


@pytest.mark.parametrize("rescale", [False, True])
def test_lycoris_files_both_ways(sd_parts, tmp_path, rescale):
    unet, te, inputs, ids = sd_parts
    sd = _lycoris_file(unet, te, rescale=rescale)
    want_unet, want_te = _lycoris_outputs(unet, te, sd, inputs, ids)
    ours_unet = lp.import_kohya(copy.deepcopy(unet), sd, adapter="s")
    ours_te = lp.import_kohya(copy.deepcopy(te), sd, prefix="lora_te", adapter="s")
    with torch.no_grad():
        torch.testing.assert_close(ours_unet(*inputs).sample, want_unet, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours_te(ids).last_hidden_state, want_te, atol=ATOL, rtol=0)
    lp.export_kohya(ours_unet, tmp_path / "u.safetensors")
    lp.export_kohya(ours_te, tmp_path / "t.safetensors", prefix="lora_te")
    written = {
        **read_kohya_file(tmp_path / "u.safetensors"),
        **read_kohya_file(tmp_path / "t.safetensors"),
    }
    assert set(written) == set(sd)
    back_unet, back_te = _lycoris_outputs(unet, te, written, inputs, ids)
    torch.testing.assert_close(back_unet, want_unet, atol=ATOL, rtol=0)
    torch.testing.assert_close(back_te, want_te, atol=ATOL, rtol=0)


def test_kohya_oft_prefix_and_refusals(sd_parts, tmp_path):
    unet, te, *_ = sd_parts
    path = ATTN + "attn1.to_k"
    stem = f"oft_unet_{path.replace('.', '_')}"
    g = RNG().manual_seed(4)
    blocks = torch.randn(2, 32, 32, generator=g) * 0.1  # kohya: dim=2 blocks of 32 (b > blocks)
    sd = {f"{stem}.oft_blocks": blocks, f"{stem}.alpha": torch.tensor(1e-3)}
    model = lp.import_kohya(copy.deepcopy(unet), sd, prefix="oft_unet")
    p = _oft(model, path)
    assert (p.side, p.block_size, p.n_blocks, p.constraint) == (
        "output",
        32,
        2,
        pytest.approx(1e-3),
    )
    # kohya's rule, by hand: Q = B - Bᵀ scaled to norm <= alpha * out, W' = Rᵀ W per block
    q = blocks - blocks.transpose(1, 2)
    q = q * min(1.0, 1e-3 * 64 / float(q.norm()))
    eye = torch.eye(32)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    w = unet.get_submodule(path).weight.detach()
    want = torch.einsum("knm,kni->kmi", r, w.view(2, 32, -1)).reshape(w.shape)
    torch.testing.assert_close(
        lp.merge_lora(model).get_submodule(path).weight, want, atol=ATOL, rtol=0
    )
    inputs_side = lp.add_lora(copy.deepcopy(te), TE_LAYERS, rank=4, variant="oft")
    with pytest.raises(
        LoRAError, match=r"input-side OFT adapter.*kohya and LyCORIS files hold output-side"
    ):
        lp.export_kohya(inputs_side, tmp_path / "x.safetensors", prefix="lora_te")
    assert not (tmp_path / "x.safetensors").exists()
    boft = {
        f"lora_unet_{path.replace('.', '_')}.oft_blocks": torch.zeros(2, 16, 4, 4),
        f"lora_unet_{path.replace('.', '_')}.alpha": torch.tensor(0.0),
    }
    fresh = copy.deepcopy(unet)
    with pytest.raises(LoRAError, match="BOFT"):
        lp.import_kohya(fresh, boft)
    assert not lp.list_adapters(fresh)
