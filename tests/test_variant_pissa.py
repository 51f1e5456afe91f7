"""LoRA and DoRA started from the weight (PiSSA, OLoRA), with the weight untouched.

Every operation of the cross-product list (issue 18) on every layer kind, in both modes, checked
against ``W + s (B A - B0 A0)`` computed here; exactness against PEFT 0.21's ``pissa_init`` /
``olora_init`` and its own loading of what we export; the residual-quantized base (QPiSSA).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_param as lp
from lora_param import LoRAError

TOL = {"rtol": 1e-5, "atol": 1e-5}
# (init, use_dora): the variants under test (pissa_niter_K shares every code path but the start)
VARIANTS = [("pissa", False), ("olora", False), ("pissa", True)]
IDS = ["pissa", "olora", "pissa_dora"]
TARGETS = ["emb", "fc", "conv", "hf", "block.proj"]


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` layout (weight stored ``(in, out)``), without transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class Net(nn.Module):
    """Every layer kind the variant adapts: embedding, Linear, Conv, HF Conv1D, a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.fc = nn.Linear(8, 10)
        self.conv = nn.Conv1d(10, 8, 3, padding=1)
        self.hf = Conv1D(8, 8)
        self.block = nn.Module()
        self.block.proj = nn.Parameter(torch.randn(6, 8) * 0.3)

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc(self.emb(i)))
        h = torch.tanh(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return F.linear(torch.tanh(self.hf(h)), self.block.proj)


def _base() -> Net:
    torch.manual_seed(0)
    return Net()


def _inputs() -> torch.Tensor:
    return torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(1))


def _adapted(
    init: str,
    dora: bool,
    mode: str = "factored",
    adapter: str = "default",
    model=None,
    targets=TARGETS,
):
    model = _base() if model is None else model
    return lp.add_lora(
        model, targets, rank=3, alpha=5, init=init, use_dora=dora, mode=mode, adapter=adapter
    )


def _train(model: nn.Module, seed: int = 1, adapter: str | None = None) -> None:
    """Move the adapters away from their start (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lp.adapter_parameters(model, adapter):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _reference(base: Net, model: nn.Module, adapter: str = "default") -> Net:
    """The base with each adapted weight replaced by ``W + s (B A - B0 A0)`` (DoRA: rescaled),
    computed here from the entry's tensors, independently of the library's math."""
    ref = copy.deepcopy(base)
    for path, _, _, p in lp.iter_lora(model):
        if p.adapter != adapter:
            continue
        t = {k: v.detach().double() for k, v in p.tensors().items()}
        w = ref.get_parameter(path).detach().double()
        transposed = p.kind == "conv1d_hf"
        m = w.t() if transposed else w.reshape(p.fan_out, p.fan_in)
        m = m + float(p.scale) * (t["lora_B"] @ t["lora_A"] - t["lora_B0"] @ t["lora_A0"])
        if p.variant == "pissa_dora":
            dim = 0 if p.kind == "embedding" else 1  # PEFT: per embedding dimension
            norm = m.norm(dim=dim, keepdim=True)
            magnitude = t["lora_magnitude"].view(norm.shape)
            m = m * magnitude / norm
        new = m.t() if transposed else m.reshape(w.shape)
        with torch.no_grad():
            ref.get_parameter(path).copy_(new.float())
    return ref


# ----------------------------------------------------------------------------- the start


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_starts_unchanged_and_off_is_the_pretrained_model(init, dora, mode):
    base, x = _base(), _inputs()
    expected = base(x)
    model = _adapted(init, dora, mode)
    kinds = {p.kind for *_, p in lp.iter_lora(model)}
    assert kinds == {"embedding", "linear", "conv", "conv1d_hf", "param"}
    assert {p.variant for *_, p in lp.iter_lora(model)} == {"pissa_dora" if dora else "pissa"}
    for *_, p in lp.iter_lora(model):
        assert torch.count_nonzero(p.lora_B) > 0  # started from the weight, not from zero
        assert not p.lora_A0.requires_grad and p.lora_A.requires_grad
    assert torch.equal(model(x), expected)  # the update is exactly zero at the start
    _train(model)
    assert not torch.allclose(model(x), expected, atol=1e-3)
    with lp.lora_disabled(model):
        assert torch.equal(model(x), expected)
    if not dora:  # strength 0: no update (DoRA's trained magnitude still rescales)
        lp.set_adapter_scale(model, "default", 0.0)
        assert torch.equal(model(x), expected)


# ------------------------------------------------------------------- forward, merge, remove


@pytest.mark.parametrize("mode", ["factored", "materialized"])
@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_forward_merge_and_remove(init, dora, mode):
    base, x = _base(), _inputs()
    model = _adapted(init, dora, mode)
    _train(model)
    on = model(x)
    torch.testing.assert_close(on, _reference(base, model)(x), **TOL)
    with torch.no_grad():  # the evaluation cache gives the same and frees nothing it shouldn't
        model.eval()
        assert torch.equal(model(x), model(x))
        torch.testing.assert_close(model(x), on, **TOL)
        assert lp.eval_cache_bytes(model) > 0
        lp.set_eval_cache(model, "never")
        torch.testing.assert_close(model(x), on, **TOL)
        assert lp.eval_cache_bytes(model) == 0
    model.train()
    torch.testing.assert_close(lp.merge_lora(copy.deepcopy(model))(x), on, **TOL)
    assert torch.equal(lp.remove_lora(copy.deepcopy(model))(x), base(x))

    # a second adapter: merge only this one, the other stays switchable on top
    _adapted("kaiming", False, mode, adapter="other", model=model)
    _train(model, seed=2, adapter="other")
    with lp.lora_disabled(model, "other"):
        alone = model(x)
    merged = lp.merge_lora(copy.deepcopy(model), adapter="default")
    assert lp.list_adapters(merged) == ["other"]
    with lp.lora_disabled(merged):
        torch.testing.assert_close(merged(x), alone, **TOL)
    torch.testing.assert_close(merged(x), model(x), **TOL)


# ------------------------------------------------------------------------------ files, copies


@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_save_load_state_dict_deepcopy_and_dtype(init, dora, tmp_path, monkeypatch):
    x = _inputs()
    model = _adapted(init, dora)
    _train(model)
    on = model(x)
    lp.save_lora(model, tmp_path / "a.pt")

    from lora_param.variants import pissa

    def no_svd(*args, **kwargs):
        raise AssertionError("load_lora computed the start again")

    monkeypatch.setattr(pissa, "start_factors", no_svd)
    loaded = lp.load_lora(_base(), tmp_path / "a.pt")
    assert torch.equal(loaded(x), on)
    keys = {k.rsplit(".", 1)[-1] for k in lp.lora_state_dict(loaded)}
    assert {"lora_A0", "lora_B0"} <= keys
    monkeypatch.undo()

    again = _adapted(init, dora)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), on)
    assert torch.equal(copy.deepcopy(model)(x), on)
    wide = copy.deepcopy(model).double()
    torch.testing.assert_close(wide(x).float(), on, **TOL)
    assert all(t.dtype == torch.float64 for *_, p in lp.iter_lora(wide) for t in p.tensors().values())


def test_compiled_forward_matches():
    x = _inputs()
    model = _adapted("pissa", False)
    _train(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), **TOL)


# --------------------------------------------------------------------------- routing, arithmetic


@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_mixed_batch_rows_equal_each_adapter_alone(init, dora):
    x = _inputs()
    layers = TARGETS[:-1]  # a parameter read by custom code cannot be routed (refused)
    model = _adapted(init, dora, adapter="a", targets=layers)
    _adapted("olora", False, adapter="b", model=model, targets=layers)
    _train(model)
    expected = {}
    for name in ("a", "b"):
        lp.set_active_adapters(model, name)
        expected[name] = model(x)
    with lp.lora_disabled(model):
        expected["__base__"] = model(x)
    names = ["a", "__base__", "b"]
    with lp.mixed_adapters(model, names):
        out = model(x)
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row], expected[name][row], **TOL)


def test_combine_cat_is_the_sum_and_dora_is_refused():
    x = _inputs()
    model = _adapted("pissa", False, adapter="a")
    _adapted("olora", False, adapter="b", model=model)
    _train(model)
    weights = {"a": 0.5, "b": -1.0}
    lp.combine_adapters(model, weights, "c", method="cat")
    assert {p.variant for *_, p in lp.iter_lora(model) if p.adapter == "c"} == {"lora"}
    summed = _base()  # W + 0.5 * delta_a - delta_b, each delta from the formula
    for name, weight in weights.items():
        ref = _reference(_base(), model, name)
        with torch.no_grad():
            for (key, value), old in zip(ref.state_dict().items(), _base().state_dict().values()):
                summed.state_dict()[key].add_(weight * (value - old))
    lp.set_active_adapters(model, "c")
    torch.testing.assert_close(model(x), summed(x), **TOL)

    dora = _adapted("pissa", True, adapter="d")
    _adapted("pissa", True, adapter="e", model=dora)
    with pytest.raises(LoRAError, match="pissa_dora"):
        lp.combine_adapters(dora, {"d": 1.0, "e": 1.0}, "f", method="cat")
    assert lp.list_adapters(dora) == ["d", "e"]


@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_hotswap_is_refused_by_name(init, dora):
    model = _adapted(init, dora)
    variant = "pissa_dora" if dora else "pissa"
    with pytest.raises(LoRAError, match=f"hot-swapping does not support {variant} adapters"):
        lp.prepare_hotswap(model, max_rank=8)


# ------------------------------------------------------------------------------- refusals


def test_bad_inits_and_kinds_are_refused_before_any_change():
    base = _base()
    before = copy.deepcopy(base.state_dict())
    for init in ("pissa_niter_", "pissa_niter_x", "svd"):
        with pytest.raises(LoRAError, match="init="):
            lp.add_lora(base, TARGETS, rank=2, init=init)
    with pytest.raises(LoRAError, match="init='kaiming' is not an initialization of the pissa"):
        lp.add_lora(base, TARGETS, rank=2, variant="pissa")
    assert not lp.list_adapters(base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 4, 4))

    holder = nn.Sequential(Experts())
    with pytest.raises(LoRAError, match="pissa variant does not adapt 'experts'"):
        lp.add_lora(holder, "0.w", rank=1, init="pissa")


def test_lora_config_maps_pissa_to_and_from_peft():
    config = lp.LoRAConfig(targets=["fc"], rank=4, init="pissa_niter_4")
    peft_fields = config.to_peft()
    assert peft_fields["init_lora_weights"] == "pissa_niter_4"
    back = lp.LoRAConfig.from_peft(peft_fields)
    assert back.init == "pissa_niter_4"
    model = lp.add_lora(_base(), config=back.replace(targets=["fc"]))
    assert [p.init for *_, p in lp.iter_lora(model)] == ["pissa_niter_4"]


# ------------------------------------------------------------------------- against PEFT 0.21


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _structured_pair() -> _Pair:
    """Weights with a decaying spectrum (a randomized SVD is accurate on those, as on LLMs)."""
    torch.manual_seed(0)
    model = _Pair()
    with torch.no_grad():
        for layer in (model.a, model.b):
            u, _, vh = torch.linalg.svd(layer.weight, full_matrices=False)
            s = 3.0 * torch.arange(1, len(u[0]) + 1, dtype=torch.float32) ** -1.5
            layer.weight.copy_(u * s @ vh)
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_start_equals_peft_init(init, use_rslora):
    peft = pytest.importorskip("peft")
    base = _structured_pair()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=init, use_rslora=use_rslora
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lp.add_lora(
        copy.deepcopy(base), ["a", "b"], rank=4, alpha=8, init=init, use_rslora=use_rslora
    )
    for name in ("a", "b"):
        layer = getattr(theirs.base_model.model, name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        p = getattr(ours, name).parametrizations.weight[0]
        w = base.get_submodule(name).weight
        w = w.detach()
        u, sv, vh = torch.linalg.svd(w)
        optimal = torch.linalg.matrix_norm(w - u[:, :4] * sv[:4] @ vh[:4])  # Eckart-Young
        if init == "pissa_niter_4":  # random: both within 1% of the best rank-4 error
            for start in (s * b @ a, p.scale * p.lora_B0 @ p.lora_A0):
                assert torch.linalg.matrix_norm(w - start) <= 1.01 * optimal
            continue
        # PEFT rewrites the base to W - s B0 A0 and starts B A there; our start is the same
        torch.testing.assert_close(p.scale * p.lora_B @ p.lora_A, s * b @ a, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            w - p.scale * p.lora_B0 @ p.lora_A0, layer.base_layer.weight, rtol=0, atol=1e-6
        )
        sign = torch.sign((a * p.lora_A).sum(1))  # singular vectors are defined up to sign
        torch.testing.assert_close(p.lora_A * sign[:, None], a, rtol=0, atol=1e-6)
        torch.testing.assert_close(p.lora_B * sign[None, :], b, rtol=0, atol=1e-6)
        if init == "pissa":  # PiSSA's start is the best rank-4 part
            err = float(torch.linalg.matrix_norm(w - s * b.detach() @ a.detach()))
            assert err == pytest.approx(float(optimal), rel=1e-5)


@pytest.mark.parametrize(("init", "dora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_peft_trains_the_same_model(init, dora):
    """Same trained factors in PEFT's PiSSA (residual base) and ours (W untouched): same outputs."""
    peft = pytest.importorskip("peft")
    base = _structured_pair()
    x = torch.randn(4, 16)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=init, use_dora=dora
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    ours = lp.add_lora(copy.deepcopy(base), ["a", "b"], rank=4, alpha=8, init=init, use_dora=dora)
    _train(ours)
    with torch.no_grad():
        for name in ("a", "b"):
            layer = getattr(theirs.base_model.model, name)
            p = getattr(ours, name).parametrizations.weight[0]
            layer.lora_A["default"].weight.copy_(p.lora_A)
            layer.lora_B["default"].weight.copy_(p.lora_B)
            if dora:
                layer.lora_magnitude_vector["default"].weight.copy_(p.lora_magnitude)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)


@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_export_loads_in_stock_peft_and_imports_back(init, dora, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    base = _structured_pair()
    x = torch.randn(4, 16)
    ours = lp.add_lora(
        copy.deepcopy(base), ["a", "b"], rank=4, alpha=8, init=init, use_dora=dora,
        use_rslora=dora,
    )  # fmt: skip
    _train(ours)
    on = ours(x)
    lp.export_peft(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].r == 8  # PEFT's conversion target: rank 2r
    torch.testing.assert_close(loaded(x), on, **TOL)
    back = lp.import_peft(copy.deepcopy(base), tmp_path)
    assert {p.variant for *_, p in lp.iter_lora(back)} == {"dora" if dora else "lora"}
    torch.testing.assert_close(back(x), on, **TOL)

    model = _adapted(init, dora)  # every layer kind, also through our own reader
    if dora:
        with pytest.raises(LoRAError, match="PEFT has no DoRA for parameters given by name"):
            lp.export_peft(model, tmp_path / "refused")
        model = _adapted(init, dora, targets=TARGETS[:-1])
    _train(model)
    folder = tmp_path / "all"
    lp.export_peft(model, folder)
    torch.testing.assert_close(lp.import_peft(_base(), folder)(_inputs()), model(_inputs()), **TOL)


@pytest.mark.parametrize(("init", "dora"), VARIANTS, ids=IDS)
def test_import_of_peft_unconverted_folder(init, dora, tmp_path):
    """PEFT saves a PiSSA / OLoRA adapter trained on its residual base; on the pretrained model
    import_peft computes the start again (as PEFT's own loading does): PEFT's outputs."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("safetensors")
    base = _structured_pair()
    x = torch.randn(4, 16)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["a", "b"], init_lora_weights=init, use_dora=dora
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _train(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lp.import_peft(copy.deepcopy(base), tmp_path)
    assert {p.variant for *_, p in lp.iter_lora(ours)} == {"pissa_dora" if dora else "pissa"}
    torch.testing.assert_close(ours(x), theirs(x), **TOL)

    config.init_lora_weights = "pissa_niter_2"
    random_start = peft.get_peft_model(copy.deepcopy(base), config)
    random_start.save_pretrained(tmp_path / "niter")
    with pytest.raises(LoRAError, match="path_initial_model_for_weight_conversion"):
        lp.import_peft(copy.deepcopy(base), tmp_path / "niter")
    folder = tmp_path / "corda"  # other inits that rewrite the base: refused, not misread
    random_start.save_pretrained(folder)
    edited = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**edited, "init_lora_weights": "corda"}))
    with pytest.raises(LoRAError, match="init_lora_weights='corda'.*rewrites the base"):
        lp.import_peft(copy.deepcopy(base), folder)


@pytest.mark.parametrize("dora", [False, True])
def test_kohya_files_hold_the_equivalent_lora(dora, tmp_path):
    pytest.importorskip("safetensors")
    base = _structured_pair()
    x = torch.randn(4, 16)
    model = lp.add_lora(copy.deepcopy(base), ["a", "b"], rank=3, init="olora", use_dora=dora)
    _train(model)
    lp.export_kohya(model, tmp_path / "k.safetensors", prefix="lora_unet")
    back = lp.import_kohya(copy.deepcopy(base), tmp_path / "k.safetensors", prefix="lora_unet")
    assert {p.variant for *_, p in lp.iter_lora(back)} == {"dora" if dora else "lora"}
    torch.testing.assert_close(back(x), model(x), **TOL)


# ------------------------------------------------------------------------------ QPiSSA


def _outlier_weight(rows: int = 128, cols: int = 128) -> torch.Tensor:
    """A random weight with a few outlier input channels (as LLM weights have)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    w[:, torch.randperm(cols, generator=g)[:4]] *= 12
    return w


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_residual_quantization_reduces_the_error(method):
    from lora_param.quant import QuantizedWeight

    w = _outlier_weight()
    errors = {}
    for rank in (0, 8):
        store = QuantizedWeight(tuple(w.shape), method=method, residual_rank=rank)
        errors[rank] = float(torch.linalg.matrix_norm(store(*store.right_inverse(w)) - w))
    assert errors[8] < 0.6 * errors[0], errors


@pytest.mark.parametrize("method", [lp.NF4Config, lp.Int8Config])
def test_qpissa_base_off_start_merge_and_checkpoints(method, tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        base[0].weight.copy_(_outlier_weight(64, 64))
    x = torch.randn(5, 64)
    plain = lp.add_lora(copy.deepcopy(base), rank=4, init="pissa", quantize=method())
    model = lp.add_lora(
        copy.deepcopy(base), rank=4, init="pissa", quantize=method(residual_rank=8)
    )
    with lp.lora_disabled(plain):
        plain_off = plain(x)
    with lp.lora_disabled(model):
        off = model(x)
    assert torch.equal(model(x), off)  # starts as its (residual-quantized) base
    assert (off - base(x)).norm() < 0.7 * (plain_off - base(x)).norm()
    _train(model)
    on = model(x)
    again = lp.add_lora(copy.deepcopy(base), rank=4, init="pissa", quantize=method(residual_rank=8))
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), on)
    with pytest.raises(LoRAError, match="residual_rank|quantization settings"):
        plain.load_state_dict(model.state_dict())
    fresh = lp.add_lora(copy.deepcopy(base), rank=4, init="pissa", quantize=method(residual_rank=8))
    lp.load_base_state_dict(fresh, base.state_dict())
    with lp.lora_disabled(fresh):
        assert torch.equal(fresh(x), off)
    torch.testing.assert_close(lp.merge_lora(copy.deepcopy(model))(x), on, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        requantized = lp.merge_lora(copy.deepcopy(model), requantize=True)
    assert (requantized(x) - on).norm() < 0.2 * on.norm()
    with pytest.raises(LoRAError, match="residual_rank=65 exceeds"):
        lp.add_lora(copy.deepcopy(base), rank=4, quantize=method(residual_rank=65))
