"""lora_param's adapter file: its format tag, and reading one with every field checked.

A file written by :func:`lora_param.save_lora` is a ``torch.save`` dict with ``"format"``
(:data:`FORMAT`), ``"config"`` (JSON: per adapter, per adapted tensor its matrix view, its
``variant`` and that variant's fields; and its trained copies), ``"tensors"`` (each entry's
tensors, keyed ``"<adapter>.<tensor path>.<tensor name>"``) and ``"copies"`` (per-adapter
heads and biases). Reading checks all of it before a caller changes any model; files written
by 0.2 (format 1) are read as the same adapters.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import LoRAError
from .paths import check_input_file
from .targets import LayerSpec
from .variant import variant_class

__all__ = ["FORMAT", "READABLE", "layer_spec", "read_lora_file"]

FORMAT = "lora_param.adapter/2"
#: Formats :func:`read_lora_file` reads: 0.2's (LoRA and DoRA by a ``use_dora`` flag) and 0.3's
#: (a ``variant`` per layer, the variant's tensors by name).
READABLE = ("lora_param.adapter/1", FORMAT)

_LAYER_FIELDS: dict[str, Any] = {
    "kind": str,
    "shape": list,
    "fan_in": int,
    "fan_out": int,
    "fan_in_fan_out": bool,
    "variant": str,
    "dropout": (int, float),
}


def _upgrade_layer(layer: dict[str, Any]) -> None:
    """A 0.2 (format 1) layer entry in 0.3's terms: ``use_dora`` becomes the variant."""
    if "variant" not in layer:
        layer["variant"] = "dora" if layer.pop("use_dora", False) is True else "lora"
    layer.pop("experts", None)  # the expert count is the shape's first dimension


def _check_config(adapters: Any, path: str) -> None:
    """Check a file's config field by field, so a forged file fails with a clear message."""

    def bad(what: str) -> LoRAError:
        return LoRAError(f"adapter file {path!r} has a damaged config: {what}.")

    if not isinstance(adapters, dict) or not adapters:
        raise bad("no adapters")
    for name, spec in adapters.items():
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("layers"), dict)
            or not spec["layers"]
        ):
            raise bad(f"adapter {name!r} lists no layers")
        for tpath, layer in spec["layers"].items():
            if not isinstance(layer, dict):
                raise bad(f"layer {tpath!r} of {name!r} is not a mapping")
            if not isinstance(layer.get("use_dora", False), bool):
                raise bad(f"layer {tpath!r} of {name!r} has use_dora={layer['use_dora']!r}")
            _upgrade_layer(layer)
            for field, kind in _LAYER_FIELDS.items():
                value = layer.get(field)
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise bad(f"layer {tpath!r} of {name!r} has {field}={value!r}")
            shape = layer["shape"]
            if not shape or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
            ):
                raise bad(f"layer {tpath!r} of {name!r} has shape={shape!r}")
            if min(layer["fan_in"], layer["fan_out"]) <= 0:
                raise bad(f"layer {tpath!r} of {name!r} has non-positive sizes")
            if not 0 <= layer["dropout"] < 1:
                raise bad(f"layer {tpath!r} of {name!r} has dropout out of range")
            if layer["kind"] == "experts" and len(shape) != 3:
                raise bad(f"layer {tpath!r} of {name!r} is an expert tensor of shape {shape}")
            try:
                cls = variant_class(layer["variant"], layer["kind"], tpath)
                cls.check_fields(layer_spec(layer), layer, tpath)
            except LoRAError as e:
                raise bad(f"layer {tpath!r} of {name!r}: {e}") from None
        copies = spec.get("copies", {})
        if not isinstance(copies, dict):
            raise bad(f"adapter {name!r} has copies that are not a mapping")
        for tpath, copy in copies.items():
            if (
                not isinstance(copy, dict)
                or copy.get("role") not in ("module", "bias")
                or not isinstance(copy.get("owner"), str)
                or not isinstance(copy.get("shape"), list)
            ):
                raise bad(f"copy {tpath!r} of {name!r} is not described by role, owner and shape")


def layer_spec(layer: Mapping[str, Any]) -> LayerSpec:
    """The :class:`LayerSpec` an adapter file's layer entry describes."""
    return LayerSpec(
        layer["kind"],
        tuple(layer["shape"]),
        int(layer["fan_in"]),
        int(layer["fan_out"]),
        bool(layer["fan_in_fan_out"]),
    )


def read_lora_file(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """Read and check a file written by :func:`save_lora`.

    Files from before per-adapter copies kept the trained heads and biases under
    ``"trainable"``, by plain tensor path; they are read as copies of every adapter in the file.

    Returns:
        The adapters' config, the adapter tensors, and the adapters' trained copies keyed
        ``"<adapter>.<tensor path>"`` (described by each adapter's ``"copies"`` config).
    """
    path = check_input_file(
        path, "adapter file", "; save_lora writes one file (a PEFT folder? use import_peft)"
    )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        detail = (str(e).strip().splitlines() or ["empty or unreadable file"])[0][:200]
        raise LoRAError(
            f"cannot read adapter file {str(path)!r}: it is corrupt, truncated, or not a "
            f"lora_param adapter file ({type(e).__name__}: {detail})."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE:
        found = payload.get("format") if isinstance(payload, dict) else None
        if isinstance(found, str) and found.startswith("lora_param.adapter/"):
            raise LoRAError(
                f"{str(path)!r} was written by a newer lora_param (format {found!r}; this "
                f"version reads {list(READABLE)}): upgrade lora_param to load it."
            )
        raise LoRAError(
            f"{str(path)!r} is not a lora_param adapter file (format {FORMAT!r} expected); "
            "use load_base_state_dict for plain checkpoints or import_peft for PEFT folders."
        )
    try:
        adapters = json.loads(payload["config"])["adapters"]
        tensors = dict(payload["tensors"])
        extras = dict(payload.get("copies", {}))
        legacy = dict(payload.get("trainable", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise LoRAError(f"adapter file {str(path)!r} has a damaged config: {e!r}.") from None
    _check_config(adapters, str(path))
    if not all(
        isinstance(t, Tensor) for t in [*tensors.values(), *extras.values(), *legacy.values()]
    ):
        raise LoRAError(f"adapter file {str(path)!r} holds something other than tensors.")
    for tpath, value in legacy.items():
        module_name, _, leaf = tpath.rpartition(".")
        role = "bias" if "bias" in leaf else "module"
        for name, spec in adapters.items():
            copies = spec.setdefault("copies", {})
            copies[tpath] = {"role": role, "owner": module_name, "shape": list(value.shape)}
            extras[f"{name}.{tpath}"] = value
    described = {f"{n}.{t}" for n, spec in adapters.items() for t in spec.get("copies", {})}
    if set(extras) - described:
        raise LoRAError(
            f"adapter file {str(path)!r} has copies its config does not describe: "
            f"{sorted(set(extras) - described)[:5]}"
        )
    for name, spec in adapters.items():
        for tpath, copy in spec.get("copies", {}).items():
            value = extras.get(f"{name}.{tpath}")
            if value is None or list(value.shape) != copy["shape"]:
                raise LoRAError(
                    f"adapter file {str(path)!r}: the copy {tpath!r} of {name!r} is missing or "
                    "does not have the shape its config says."
                )
    return adapters, tensors, extras
