"""Every bad input raises LoRAError with a helpful message and leaves the model exactly as it was."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import lora_param
from lora_param import (
    LoRAError,
    adapter_parameters,
    add_lora,
    disable_lora,
    enable_lora,
    iter_lora,
    list_adapters,
    load_base_state_dict,
    load_lora,
    lora_disabled,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    set_active_adapters,
)


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.my_param = nn.Parameter(torch.randn(5, 7))
        self.offset = nn.Parameter(torch.zeros(7))
        self.idx = nn.Parameter(torch.arange(9).view(3, 3), requires_grad=False)

    def forward(self, x):
        return torch.matmul(x, self.my_param) + self.offset


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 5)
        self.holder = _Holder()
        self.encoder = nn.Sequential(nn.Linear(7, 7), nn.Tanh())

    def forward(self, x):
        return self.encoder(self.holder(self.fc2(self.norm(self.fc1(x)))))


X = torch.randn(3, 6)


@pytest.fixture(params=[False, True], ids=["fresh", "with-adapter"])
def net(request, mode, h):
    """A model without adapters, or one already carrying adapter 'first' (randomized)."""
    model = Net()
    if request.param:
        add_lora(model, ["fc2", "holder.my_param"], rank=2, adapter="first", mode=mode)
        h.randomize(model)
        model.eval()
    return model


def _refuses(model, h, call, match):
    """call() raises LoRAError matching ``match``; the model is unchanged and still works."""
    snap = h.snapshot(model)
    with torch.no_grad():
        out = model(X)
    with pytest.raises(LoRAError, match=match) as info:
        call()
    h.assert_unchanged(model, snap)
    with torch.no_grad():
        assert torch.equal(model(X), out)
    return str(info.value)


# --------------------------------------------------------------------------- add_lora arguments


BAD_ADD = [
    # (id, kwargs, message regex)
    (
        "no-match-literal",
        dict(targets="fc3"),
        r"'fc3' matches no adaptable layer.*nearest names: \[('fc1', 'fc2'|'fc2', 'fc1')",
    ),
    (
        "no-match-glob",
        dict(targets="decoder.*"),
        r"matches no adaptable layer.*Adaptable layers in this model",
    ),
    ("no-match-in-list", dict(targets=["fc1", "fcX"]), r"'fcX' matches no adaptable layer"),
    ("no-match-regex", dict(targets=re.compile("nothing")), r"match no supported layer"),
    ("no-match-callable", dict(targets=lambda n, m: False), r"match no supported layer"),
    (
        "rank-zero",
        dict(targets="fc1", rank=0),
        r"rank for 'fc1.weight' must be a positive integer, got 0",
    ),
    ("rank-negative", dict(targets="fc1", rank=-2), r"positive integer, got -2"),
    ("rank-float", dict(targets="fc1", rank=2.5), r"positive integer, got 2.5"),
    ("rank-bool", dict(targets="fc1", rank=True), r"positive integer, got True"),
    ("rank-string", dict(targets="fc1", rank="4"), r"positive integer, got '4'"),
    (
        "rank-too-big",
        dict(targets="fc1", rank=7),
        r"rank 7 for 'fc1.weight' exceeds min\(fan_in=6, fan_out=8\) = 6",
    ),
    (
        "rank-too-big-param",
        dict(targets="holder.my_param", rank=6),
        r"exceeds min\(fan_in=7, fan_out=5\)",
    ),
    (
        "rank-dict-no-catch-all",
        dict(targets=["fc1", "fc2"], rank={"fc1": 2}),
        r'rank has no pattern matching \'fc2\'.*"\*"',
    ),
    (
        "alpha-zero",
        dict(targets="fc1", alpha=0),
        r"alpha for 'fc1.weight' must be a positive number, got 0",
    ),
    ("alpha-negative", dict(targets="fc1", alpha=-1.0), r"positive number, got -1.0"),
    ("alpha-string", dict(targets="fc1", alpha="8"), r"positive number"),
    (
        "alpha-dict-no-catch-all",
        dict(targets=["fc1", "fc2"], alpha={"fc2": 4}),
        r"alpha has no pattern matching 'fc1'",
    ),
    (
        "unsupported-layer",
        dict(targets="norm"),
        r"'norm' is a LayerNorm, which LoRA does not support.*supported: nn.Linear",
    ),
    ("container", dict(targets="encoder"), r"'encoder' is a Sequential.*'encoder\.\*'"),
    (
        "non-float-param",
        dict(targets="holder.idx"),
        r"'holder.idx' has dtype torch.int64; LoRA needs a floating-point",
    ),
    ("1d-param", dict(targets="fc1.bias"), r"'fc1.bias' is 1-D.*at least 2 dimensions"),
    ("1d-custom-param", dict(targets="holder.offset"), r"'holder.offset' is 1-D"),
    ("bad-dropout-neg", dict(targets="fc1", dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
    ("bad-dropout-one", dict(targets="fc1", dropout=1.0), r"dropout must be a number in \[0, 1\)"),
    ("bad-dropout-str", dict(targets="fc1", dropout="0.1"), r"dropout must be a number"),
    ("bad-dropout-bool", dict(targets="fc1", dropout=True), r"dropout must be a number"),
    (
        "bad-init",
        dict(targets="fc1", init="xavier"),
        r"init='xavier' is not an initialization of the lora variant .*'kaiming', 'gaussian'",
    ),
    (
        "bad-mode",
        dict(targets="fc1", mode="fast"),
        r"mode must be 'factored' or 'materialized', got 'fast'",
    ),
    (
        "bad-bias",
        dict(targets="fc1", bias="some"),
        r"bias must be 'none', 'all' or 'lora_only', got 'some'",
    ),
    ("bad-adapter-dot", dict(targets="fc1", adapter="a.b"), r"adapter name 'a.b' is invalid"),
    ("bad-adapter-empty", dict(targets="fc1", adapter=""), r"adapter name '' is invalid"),
    ("bad-adapter-type", dict(targets="fc1", adapter=3), r"adapter name 3 is invalid"),
    ("bad-targets-type", dict(targets=42), r"targets must be a glob string.*got int"),
    ("bad-targets-item", dict(targets=["fc1", 42]), r"targets contains 42 of type int"),
    ("bad-exclude-type", dict(targets="fc1", exclude=3.5), r"exclude must be a glob string"),
    ("bad-layer-types", dict(layer_types="Linear"), r"layer_types must be classes"),
    ("exclude-everything", dict(targets="fc1", exclude="fc*"), r"removes every layer"),
    (
        "exclude-typo",
        dict(targets="fc*", exclude="fc9"),
        r"exclude pattern 'fc9' matches no module",
    ),
    (
        "layer-types-exclude-all",
        dict(targets="fc1", layer_types=nn.Conv2d),
        r"of types \['Conv2d'\]",
    ),
    (
        "trainable-no-match",
        dict(targets="fc1", trainable="head"),
        r"trainable pattern 'head' matches no module",
    ),
]


@pytest.mark.parametrize("kwargs, match", [b[1:] for b in BAD_ADD], ids=[b[0] for b in BAD_ADD])
def test_add_lora_bad_input(net, mode, h, kwargs, match):
    kwargs = dict(kwargs)
    kwargs.setdefault("mode", mode)
    kwargs.setdefault("rank", 2)
    _refuses(net, h, lambda: add_lora(net, **kwargs), match)


def test_partial_name_hint(h, zoo):
    model = zoo["transformer"].model()
    msg = _refuses_plain(model, h, lambda: add_lora(model, "linear1"), r"matches no adaptable")
    assert "encoder.layers.0.linear1" in msg
    assert "*linear1" in msg


def _refuses_plain(model, h, call, match):
    snap = h.snapshot(model)
    with pytest.raises(LoRAError, match=match) as info:
        call()
    h.assert_unchanged(model, snap)
    return str(info.value)


def test_not_a_module():
    with pytest.raises(LoRAError, match="needs an nn.Module"):
        add_lora("model", "fc1")


def test_adapter_name_twice(mode, h):
    model = add_lora(Net(), "fc1", rank=2, mode=mode)
    h.randomize(model)
    msg = _refuses(
        model, h, lambda: add_lora(model, "fc2", rank=2, mode=mode), r"'default' already exists"
    )
    assert "adapter=" in msg
    add_lora(model, "fc2", rank=2, mode=mode, adapter="other")  # another name is fine
    assert list_adapters(model) == ["default", "other"]


def test_lora_error_is_value_error():
    assert issubclass(LoRAError, ValueError)


# --------------------------------------------------------------------------- adapters by name


def _with_adapters(mode, h):
    model = add_lora(Net(), "fc1", rank=2, mode=mode)
    add_lora(model, "fc2", rank=2, mode=mode, adapter="b")
    h.randomize(model)
    disable_lora(model, "b")
    return model


UNKNOWN = [
    ("disable", lambda m: disable_lora(m, "nope")),
    ("enable", lambda m: enable_lora(m, "nope")),
    ("enable-list", lambda m: enable_lora(m, ["default", "nope"])),
    ("set-active", lambda m: set_active_adapters(m, "nope")),
    ("set-active-list", lambda m: set_active_adapters(m, ["b", "nope"])),
    ("lora-disabled", lambda m: lora_disabled(m, "nope").__enter__()),
    ("remove", lambda m: remove_lora(m, "nope")),
    ("adapter-parameters", lambda m: adapter_parameters(m, "nope")),
    ("lora-state-dict", lambda m: lora_state_dict(m, "nope")),
    ("save", lambda m: save_lora(m, os.devnull + "/x.pt", adapter="nope")),
]


@pytest.mark.parametrize("call", [u[1] for u in UNKNOWN], ids=[u[0] for u in UNKNOWN])
def test_unknown_adapter_name(mode, h, call):
    model = _with_adapters(mode, h)
    msg = _refuses(model, h, lambda: call(model), r"no adapter named 'nope'")
    assert "['default', 'b']" in msg


@pytest.mark.parametrize(
    "call",
    [
        lambda m, p: lora_state_dict(m),
        lambda m, p: save_lora(m, p),
        lambda m, p: disable_lora(m, "default"),
        lambda m, p: set_active_adapters(m, "default"),
    ],
    ids=["lora_state_dict", "save_lora", "disable", "set_active"],
)
def test_model_without_adapters(h, tmp_path, call):
    model = Net()
    path = tmp_path / "a.pt"
    msg = _refuses(model, h, lambda: call(model, path), r"(no adapters|add_lora first)")
    assert "add_lora" in msg
    assert not path.exists()


# --------------------------------------------------------------------------- failure half-way


def _fail_on_call(monkeypatch, n, exc=RuntimeError("injected failure")):
    """Make the ``n``-th entry registration of the library raise (every caller of the one
    registration function, ``lora_param.core.entries.register_entry``, sees the flaky one)."""
    import sys

    from lora_param.core import entries

    real = entries.register_entry
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("lora_param") and getattr(module, "register_entry", None) is real:
            monkeypatch.setattr(module, "register_entry", flaky)
    return calls


@pytest.mark.parametrize("nth", [1, 2, -1], ids=["first", "second", "last"])
@pytest.mark.parametrize(
    "exc", [RuntimeError("injected failure"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_registration_failing_midway_leaves_model_unchanged(case, mode, h, monkeypatch, nth, exc):
    model = case.model()
    nth = len(case.paths) if nth == -1 else nth
    snap = h.snapshot(model)
    x = case.inputs()
    with torch.no_grad():
        out = model(*x)
    calls = _fail_on_call(monkeypatch, nth, exc)
    with pytest.raises(type(exc)):
        add_lora(model, case.targets, rank=case.rank, mode=mode)
    assert calls["n"] == nth
    h.assert_unchanged(model, snap)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(*x), out)
    # ...and the model takes LoRA normally afterwards.
    add_lora(model, case.targets, rank=case.rank, mode=mode)
    assert sorted(p for p, *_ in iter_lora(model)) == sorted(case.paths)


def test_registration_failing_midway_keeps_parameter_order(zoo, mode, h, monkeypatch):
    model = zoo["mlp"].model()
    snap = h.snapshot(model)
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        add_lora(model, rank=2, mode=mode)
    h.assert_unchanged(model, snap, order=True)


def test_registration_failing_with_existing_adapter(case, mode, h, monkeypatch):
    model = case.model()
    add_lora(model, case.targets, rank=case.rank, mode=mode, adapter="first")
    h.randomize(model)
    model.eval()
    snap = h.snapshot(model)
    x = case.inputs()
    with torch.no_grad():
        out = model(*x)
    grad_out = model(*x).detach()
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected"):
        add_lora(model, case.targets, rank=case.rank, mode=mode, adapter="second")
    h.assert_unchanged(model, snap)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(*x), out)
    assert torch.equal(model(*x).detach(), grad_out)
    merge_lora(model)
    with torch.no_grad():
        assert torch.allclose(model(*x), out, rtol=1e-4, atol=1e-5)


def test_load_lora_failing_midway_leaves_model_unchanged(case, mode, h, monkeypatch, tmp_path):
    assert len(case.paths) >= 2
    src = add_lora(case.model(), case.targets, rank=case.rank, mode=mode)
    h.randomize(src)
    path = save_lora(src, tmp_path / "a.pt")
    model = case.model()
    snap = h.snapshot(model)
    _fail_on_call(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected"):
        load_lora(model, path, mode=mode)
    h.assert_unchanged(model, snap)


# --------------------------------------------------------------------------- adapter files


def _saved(tmp_path, h, hidden=8, mode="factored"):
    src = add_lora(Net(hidden), ["fc1", "fc2", "holder.my_param"], rank=2, mode=mode)
    h.randomize(src)
    return save_lora(src, tmp_path / "adapter.pt")


def test_load_into_other_architecture(mode, h, tmp_path, zoo):
    path = _saved(tmp_path, h)
    other = Net(hidden=9)  # same names, other shapes
    msg = _refuses(other, h, lambda: load_lora(other, path, mode=mode), r"shape")
    assert "fc1.weight" in msg
    conv = zoo["conv2d"].model()
    _refuses_plain(conv, h, lambda: load_lora(conv, path, mode=mode), r"does not have")


def test_load_into_model_with_same_adapter_of_other_rank_or_layers(mode, h, tmp_path):
    path = _saved(tmp_path, h)
    model = add_lora(Net(), ["fc1", "fc2", "holder.my_param"], rank=3, mode=mode)
    msg = _refuses(model, h, lambda: load_lora(model, path), r"rank 3")
    assert "rank 2" in msg
    model = add_lora(Net(), ["fc1"], rank=2, mode=mode)
    _refuses(
        model, h, lambda: load_lora(model, path), r"already exists in the model on other layers"
    )


def test_load_unknown_adapter_from_file(mode, h, tmp_path):
    path = _saved(tmp_path, h)
    model = Net()
    _refuses(
        model,
        h,
        lambda: load_lora(model, path, adapter="nope"),
        r"has no adapter 'nope'.*\['default'\]",
    )


@pytest.mark.parametrize(
    "keep",
    [
        0.0,
        0.3,
        0.6,
        0.95,
    ],
)
def test_truncated_file(h, tmp_path, keep):
    path = _saved(tmp_path, h)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    model = Net()
    _refuses(
        model, h, lambda: load_lora(model, path), r"corrupt, truncated, or not a lora_param adapter"
    )


def test_random_bytes_file(h, tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
        .to(torch.uint8)
        .numpy()
        .tobytes()
    )
    model = Net()
    _refuses(model, h, lambda: load_lora(model, path), r"cannot read adapter file")


def test_text_file(h, tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"r": 8}))
    model = Net()
    _refuses(model, h, lambda: load_lora(model, path), r"cannot read adapter file")


def test_missing_file(h, tmp_path):
    model = Net()
    _refuses(model, h, lambda: load_lora(model, tmp_path / "nope.pt"), r"does not exist")
    _refuses(model, h, lambda: load_lora(model, tmp_path), r"is a folder, not a file")


def test_plain_state_dict_file(h, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Net().state_dict(), path)
    model = Net()
    msg = _refuses(model, h, lambda: load_lora(model, path), r"not a lora_param adapter file")
    assert "load_base_state_dict" in msg


def test_file_with_code_is_refused(h, tmp_path):
    """A pickle that needs arbitrary classes is refused (weights_only), not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": lora_param.core.io.FORMAT, "obj": _Holder()}, path)
    model = Net()
    _refuses(model, h, lambda: load_lora(model, path), r"cannot read adapter file")


def _forge(path, config, tensors, fmt=None):
    payload = {
        "format": fmt or lora_param.core.io.FORMAT,
        "config": config if isinstance(config, str) else json.dumps(config),
        "tensors": tensors,
    }
    torch.save(payload, path)
    return path


def _real_payload(tmp_path, h):
    path = _saved(tmp_path, h)
    payload = torch.load(path, weights_only=True)
    return json.loads(payload["config"]), dict(payload["tensors"])


def test_forged_files(h, tmp_path):
    model = Net()
    config, tensors = _real_payload(tmp_path, h)
    key = "default.fc1.weight.lora_A"

    missing = {k: v for k, v in tensors.items() if k != key}
    p = _forge(tmp_path / "missing.pt", config, missing)
    _refuses(model, h, lambda: load_lora(model, p), r"lacks tensor 'default.fc1.weight.lora_A'")

    wrong = dict(tensors, **{key: torch.zeros(3, 6)})
    p = _forge(tmp_path / "shape.pt", config, wrong)
    _refuses(model, h, lambda: load_lora(model, p), r"has shape \(3, 6\), its config says \(2, 6\)")

    extra = dict(tensors, **{"default.fc9.weight.lora_A": torch.zeros(2, 6)})
    p = _forge(tmp_path / "extra.pt", config, extra)
    _refuses(model, h, lambda: load_lora(model, p), r"tensors its config does not describe")

    p = _forge(tmp_path / "json.pt", "{not json", tensors)
    _refuses(model, h, lambda: load_lora(model, p), r"damaged config")

    p = _forge(tmp_path / "fmt.pt", config, tensors, fmt="something/else")
    _refuses(model, h, lambda: load_lora(model, p), r"not a lora_param adapter file")

    shape = json.loads(json.dumps(config))
    shape["adapters"]["default"]["layers"]["fc1.weight"]["shape"] = [8, 5]
    p = _forge(tmp_path / "cfgshape.pt", shape, tensors)
    _refuses(
        model, h, lambda: load_lora(model, p), r"has shape \[8, 6\] in this model but \[8, 5\]"
    )


@pytest.mark.parametrize("damage", ["no-layers", "no-rank", "layers-list"])
def test_forged_config_structure(h, tmp_path, damage):
    model = Net()
    config, tensors = _real_payload(tmp_path, h)
    if damage == "no-layers":
        del config["adapters"]["default"]["layers"]
    elif damage == "no-rank":
        del config["adapters"]["default"]["layers"]["fc1.weight"]["rank"]
    else:
        config["adapters"]["default"]["layers"] = ["fc1.weight"]
    p = _forge(tmp_path / "cfg.pt", config, tensors)
    _refuses(model, h, lambda: load_lora(model, p), r"config")


# --------------------------------------------------------------------------- atomic save


def _failing_save(monkeypatch):
    real = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    return real


def test_atomic_save_new_file(h, tmp_path, monkeypatch):
    model = add_lora(Net(), "fc1", rank=2)
    target = tmp_path / "sub" / "adapter.pt"
    _failing_save(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_lora(model, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_save_keeps_old_file(h, tmp_path, monkeypatch):
    model = add_lora(Net(), "fc1", rank=2)
    h.randomize(model)
    target = save_lora(model, tmp_path / "adapter.pt")
    old = target.read_bytes()
    h.randomize(model, seed=3)
    _failing_save(monkeypatch)
    with pytest.raises(OSError):
        save_lora(model, target)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]
    fresh = load_lora(Net(), target)
    assert fresh is not None


def test_atomic_save_interrupted_by_replace(h, tmp_path, monkeypatch):
    model = add_lora(Net(), "fc1", rank=2)
    target = save_lora(model, tmp_path / "adapter.pt")
    old = target.read_bytes()
    h.randomize(model)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_lora(model, target)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt"]


# --------------------------------------------------------------------------- base checkpoints


def test_load_base_state_dict_refuses_bad_checkpoints(mode, h):
    model = add_lora(Net(), ["fc1", "holder.my_param"], rank=2, mode=mode)
    h.randomize(model)
    plain = Net().state_dict()

    missing = {k: v for k, v in plain.items() if k != "fc2.weight"}
    msg = _refuses(
        model, h, lambda: load_base_state_dict(model, missing), r"missing \['fc2.weight'\]"
    )
    assert "strict=False" in msg

    unexpected = dict(plain, **{"fc3.weight": torch.zeros(2, 2)})
    _refuses(
        model, h, lambda: load_base_state_dict(model, unexpected), r"unexpected \['fc3.weight'\]"
    )

    # A wrong shape late in the dict: nothing at all is copied (fc1 comes first).
    shaped = dict(plain)
    shaped["encoder.0.weight"] = torch.zeros(7, 8)
    _refuses(
        model,
        h,
        lambda: load_base_state_dict(model, shaped),
        r"'encoder.0.weight' has shape \(7, 8\)",
    )
    _refuses(model, h, lambda: load_base_state_dict(model, shaped, strict=False), r"has shape")

    other = Net(hidden=9).state_dict()
    _refuses(model, h, lambda: load_base_state_dict(model, other), r"shape")

    lora_sd = model.state_dict()  # a LoRA model's own state_dict is not a base checkpoint
    _refuses(model, h, lambda: load_base_state_dict(model, lora_sd), r"unexpected")
