"""Reusable fuzzing helpers for every reader: damaged bytes, damaged JSON, and the contract check.

The contract every reader keeps (``load_lora``, ``import_peft``, and each reader added later):
a damaged input gives a :class:`LoRAError` or a valid load, and after a ``LoRAError`` the model
is bit-identical to what it was. A new reader's fuzz test needs three lines::

    @FUZZ
    @given(damage=byte_damage())
    def test_my_reader(damage, tmp_path_factory):
        ...write a good file, damage it with damage(data), then
        check_reader_contract(model, lambda: my_reader(model, path), inputs)

Strategies draw *functions* (``bytes -> bytes``, ``value -> value``) so that one strategy serves
any file, whatever its size or structure.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

from lora_param import LoRAError

#: Settings for every fuzz test: reproducible (derandomized), bounded, no timing deadline.
FUZZ = settings(
    max_examples=40,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values of the wrong type or out of range, to put where a config holds something else.
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    10**12,
    0.5,
    -2.5,
    math.nan,
    math.inf,
    "",
    "x",
    "LORA",
    [],
    [1.5],
    ["*"],
    {},
    {"a": 1},
    {"0": 1.5},
    {"0": {"r": 2}},
]


# ------------------------------------------------------------------------------- bytes


@st.composite
def byte_damage(draw: st.DrawFn) -> Callable[[bytes], bytes]:
    """A function that damages a byte string: truncate, flip bits, overwrite, insert or delete.

    Positions are drawn as fractions of the length, so the same damage fits any file.
    """
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    where = draw(st.floats(0, 1, exclude_max=True))
    many = draw(st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8))
    noise = draw(st.binary(min_size=1, max_size=16))
    bit = draw(st.integers(0, 7))

    def damage(data: bytes) -> bytes:
        at = int(where * len(data))
        if kind == "truncate":
            return data[:at]
        if kind == "flip":
            out = bytearray(data)
            for f in many:
                out[int(f * len(out))] ^= 1 << bit
            return bytes(out)
        if kind == "overwrite":
            return data[:at] + noise + data[at + len(noise) :]
        if kind == "insert":
            return data[:at] + noise + data[at:]
        return data[:at] + data[at + len(noise) :]

    damage.__name__ = f"{kind}@{where:.3f}"
    return damage


# ------------------------------------------------------------------------------- JSON


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indexes) into a JSON value, the root included."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def json_damage(draw: st.DrawFn) -> Callable[[Any], Any]:
    """A function that damages a JSON value: one field replaced by an odd value, or deleted.

    The field is drawn as a fraction of the value's path list, so the damage fits any value.
    """
    where = draw(st.floats(0, 1, exclude_max=True))
    action = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    odd = draw(st.sampled_from(ODD_VALUES))

    def damage(value: Any) -> Any:
        value = copy.deepcopy(value)
        paths = _paths(value)
        path = paths[int(where * len(paths))]
        if not path:
            return _damage_root(value, action, odd)
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if action == "replace":
            parent[path[-1]] = copy.deepcopy(odd)
        elif action == "delete":
            del parent[path[-1]]
        else:
            child = parent[path[-1]]
            _add_to(child if isinstance(child, (dict, list)) else parent, odd)
        return value

    damage.__name__ = f"{action}@{where:.3f}={odd!r}"
    return damage


def _add_to(container: dict | list, odd: Any) -> None:
    if isinstance(container, dict):
        container["unexpected_field"] = copy.deepcopy(odd)
    else:
        container.append(copy.deepcopy(odd))


def _damage_root(value: Any, action: str, odd: Any) -> Any:
    if action == "replace":
        return copy.deepcopy(odd)
    if action == "delete":
        return type(value)() if isinstance(value, (dict, list)) else None
    if isinstance(value, (dict, list)):
        _add_to(value, odd)
        return value
    return [value, copy.deepcopy(odd)]


def damage_json_text(text: str, damage: Callable[[Any], Any]) -> str:
    """Apply a :func:`json_damage` function to a JSON document (NaN/Infinity allowed, as Python
    writes them)."""
    return json.dumps(damage(json.loads(text)))


def damage_safetensors_header(data: bytes, damage: Callable[[Any], Any]) -> bytes:
    """Apply a :func:`json_damage` function to a safetensors file's JSON header."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(damage(json.loads(data[8 : 8 + n]))).encode()
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


# ------------------------------------------------------------------------------- contract


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything a failed read must leave as it was: every tensor's bytes, parameters, classes."""
    state = {
        k: (v.dtype, tuple(v.shape), v.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        for k, v in model.state_dict().items()
    }
    return {
        "state": state,
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_same(model: nn.Module, before: dict[str, Any]) -> None:
    """``model`` is bit-identical to the :func:`fingerprint` taken before."""
    now = fingerprint(model)
    assert now["params"] == before["params"]
    assert now["modules"] == before["modules"]
    assert now["state"].keys() == before["state"].keys()
    for k, (dtype, shape, data) in before["state"].items():
        assert now["state"][k][:2] == (dtype, shape), k
        assert torch.equal(now["state"][k][2], data), f"{k} changed after a refused read"


def check_reader_contract(model: nn.Module, read: Callable[[], Any], inputs: tuple) -> str:
    """Run ``read`` (which reads a damaged input into ``model``) and check the contract.

    Returns:
        ``"refused"`` after a ``LoRAError`` (the model bit-identical), ``"loaded"`` after a load
        (the model then still runs on ``inputs``). Any other exception propagates: a failure.
    """
    before = fingerprint(model)
    try:
        read()
    except LoRAError as exc:
        assert str(exc), "a LoRAError must say what is wrong"
        assert_same(model, before)
        return "refused"
    with torch.no_grad():
        model(*inputs)
    return "loaded"
