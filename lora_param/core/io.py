"""Adapters on disk: state dicts, safe atomic files with their config, base checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .dora import is_dora, magnitude_size
from .errors import LoRAError
from .freeze import freeze_base
from .inject import Mode, inject
from .layers import base_tensor, join, parameter_target, tensor_names
from .merge import remove_lora
from .registry import check_adapters_exist, iter_lora, list_adapters

__all__ = [
    "FORMAT",
    "adapter_config",
    "atomic_write",
    "load_base_state_dict",
    "load_lora",
    "lora_state_dict",
    "read_lora_file",
    "save_lora",
]

FORMAT = "lora_param.adapter/1"


def _selected(model: nn.Module, adapter: str | None) -> list[str]:
    if adapter is None:
        names = list_adapters(model)
        if not names:
            raise LoRAError("this model has no adapters; call add_lora first.")
        return names
    check_adapters_exist(model, [adapter])
    return [adapter]


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The adapter tensors alone, keyed ``"<adapter>.<tensor path>.lora_A"`` / ``.lora_B``.

    Args:
        model: A model with adapters.
        adapter: One adapter's name; None for all of them.

    Returns:
        Detached tensors (shared storage with the model, as ``state_dict`` does).
    """
    names = set(_selected(model, adapter))
    out: dict[str, Tensor] = {}
    for path, _, _, p in iter_lora(model):
        if p.adapter in names:
            out[f"{p.adapter}.{path}.lora_A"] = p.lora_A.detach()
            out[f"{p.adapter}.{path}.lora_B"] = p.lora_B.detach()
            if is_dora(p):
                out[f"{p.adapter}.{path}.lora_magnitude"] = p.lora_magnitude.detach()
    return out


def adapter_config(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """JSON-ready description of adapters: per layer kind, shape, rank, alpha and options."""
    names = _selected(model, adapter)
    config: dict[str, Any] = {name: {"layers": {}} for name in names}
    for path, _, _, p in iter_lora(model):
        if p.adapter in config:
            config[p.adapter]["layers"][path] = {
                "kind": p.kind,
                "shape": list(p.weight_shape),
                "fan_in": p.fan_in,
                "fan_out": p.fan_out,
                "fan_in_fan_out": p.fan_in_fan_out,
                "rank": p.rank,
                "alpha": p.alpha,
                "use_rslora": p.use_rslora,
                "dropout": p.dropout_p,
                "init": p.init,
                "enabled": p.enabled,
            }
            if is_dora(p):
                config[p.adapter]["layers"][path]["use_dora"] = True
    return config


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Write a file through a temporary file in the same folder and ``os.replace``.

    A crash leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _trainable_extras(model: nn.Module) -> dict[str, Tensor]:
    """Trainable parameters that are not adapters (a head, biases), by their plain names."""
    lora = {id(t) for *_, p in iter_lora(model) for t in p.parameters()}
    return {
        name: tensor
        for name, tensor in _plain_parameters(model).items()
        if tensor.requires_grad and id(tensor) not in lora
    }


def _plain_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by the names they have without parametrize (``fc.weight``, not ``...original``)."""
    out: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        if ".parametrizations" in f".{module_name}":
            continue
        for name in tensor_names(module):
            tensor = base_tensor(module, name)
            if isinstance(tensor, nn.Parameter):
                out.setdefault(join(module_name, name), tensor)
    return out


def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    include_trainable: bool = True,
) -> Path:
    """Save adapters (all, or one) with their config to one file, atomically.

    The file holds only tensors, strings and numbers, and is read back with
    ``torch.load(weights_only=True)``: loading a stranger's file runs no code.

    Args:
        model: A model with adapters.
        path: Where to write.
        adapter: Save only this adapter; None saves all of them.
        include_trainable: Also save the other trainable parameters (a head made trainable
            with ``trainable=``, biases from ``bias=``), so that ``load_lora`` restores them.

    Returns:
        The path written.
    """
    extras = _trainable_extras(model) if include_trainable else {}
    payload = {
        "format": FORMAT,
        "config": json.dumps({"adapters": adapter_config(model, adapter)}),
        "tensors": {k: v.contiguous().cpu() for k, v in lora_state_dict(model, adapter).items()},
        "trainable": {k: v.detach().contiguous().cpu() for k, v in extras.items()},
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


_LAYER_FIELDS: dict[str, Any] = {
    "kind": str,
    "shape": list,
    "fan_in": int,
    "fan_out": int,
    "fan_in_fan_out": bool,
    "rank": int,
    "alpha": (int, float),
    "use_rslora": bool,
    "dropout": (int, float),
    "init": str,
}


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
            for field, kind in _LAYER_FIELDS.items():
                value = layer.get(field)
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise bad(f"layer {tpath!r} of {name!r} has {field}={value!r}")
            if min(layer["fan_in"], layer["fan_out"], layer["rank"]) <= 0 or layer["alpha"] <= 0:
                raise bad(f"layer {tpath!r} of {name!r} has non-positive sizes")
            if not 0 <= layer["dropout"] < 1 or layer["init"] not in ("kaiming", "gaussian"):
                raise bad(f"layer {tpath!r} of {name!r} has dropout/init out of range")
            if not isinstance(layer.get("use_dora", False), bool):
                raise bad(f"layer {tpath!r} of {name!r} has use_dora={layer['use_dora']!r}")


def read_lora_file(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """Read and check a file written by :func:`save_lora`.

    Returns:
        The adapters' config, the adapter tensors, and the other trainable tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"adapter file {str(path)!r} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files
        detail = (str(e).strip().splitlines() or ["empty or unreadable file"])[0][:200]
        raise LoRAError(
            f"cannot read adapter file {str(path)!r}: it is corrupt, truncated, or not a "
            f"lora_param adapter file ({type(e).__name__}: {detail})."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LoRAError(
            f"{str(path)!r} is not a lora_param adapter file (format {FORMAT!r} expected); "
            "use load_base_state_dict for plain checkpoints or import_peft for PEFT folders."
        )
    try:
        adapters = json.loads(payload["config"])["adapters"]
        tensors = dict(payload["tensors"])
        extras = dict(payload.get("trainable", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise LoRAError(f"adapter file {str(path)!r} has a damaged config: {e!r}.") from None
    _check_config(adapters, str(path))
    if not all(isinstance(t, Tensor) for t in [*tensors.values(), *extras.values()]):
        raise LoRAError(f"adapter file {str(path)!r} holds something other than tensors.")
    return adapters, tensors, extras


def _check_file_against_model(
    model: nn.Module, adapters: Mapping[str, Any], tensors: Mapping[str, Tensor], path: str
) -> None:
    expected = set()
    for name, spec in adapters.items():
        for tpath, layer in spec["layers"].items():
            shapes: list[tuple[str, tuple[int, ...]]] = [
                (f"{name}.{tpath}.lora_A", (layer["rank"], layer["fan_in"])),
                (f"{name}.{tpath}.lora_B", (layer["fan_out"], layer["rank"])),
            ]
            if layer.get("use_dora", False):
                shapes.append((f"{name}.{tpath}.lora_magnitude", (magnitude_size(layer),)))
            for key, shape in shapes:
                expected.add(key)
                if key not in tensors:
                    raise LoRAError(f"adapter file {path!r} lacks tensor {key!r}.")
                if tuple(tensors[key].shape) != shape:
                    raise LoRAError(
                        f"adapter file {path!r}: {key!r} has shape {tuple(tensors[key].shape)}, "
                        f"its config says {shape}."
                    )
    extra = sorted(set(tensors) - expected)
    if extra:
        raise LoRAError(
            f"adapter file {path!r} has tensors its config does not describe: {extra[:5]}"
        )


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    freeze: bool = True,
    mode: Mode = "factored",
) -> nn.Module:
    """Load adapters saved by :func:`save_lora`, injecting them first if the model lacks them.

    On a fresh copy of the base model this injects and loads in one call. Keys and shapes are
    checked against the model before anything changes; on error the model is unchanged.

    Args:
        model: The base model (with or without the adapters already added).
        path: File written by :func:`save_lora`.
        adapter: Load only this adapter from the file; None loads all of them.
        freeze: Freeze the base model as ``add_lora(freeze=True)`` does.
        mode: Forward mode for newly injected adapters.

    Returns:
        The model.
    """
    adapters, tensors, extras = read_lora_file(path)
    targets = _plain_parameters(model)
    for name, value in extras.items():
        if name not in targets or tuple(targets[name].shape) != tuple(value.shape):
            have = tuple(targets[name].shape) if name in targets else "nothing"
            raise LoRAError(
                f"adapter file {str(path)!r} holds trainable tensor {name!r} of shape "
                f"{tuple(value.shape)}, but the model has {have} there."
            )
    if adapter is not None:
        if adapter not in adapters:
            raise LoRAError(
                f"adapter file {str(path)!r} has no adapter {adapter!r}; it has {list(adapters)}."
            )
        adapters = {adapter: adapters[adapter]}
        tensors = {k: v for k, v in tensors.items() if k.startswith(adapter + ".")}
    _check_file_against_model(model, adapters, tensors, str(path))
    existing = {(p.adapter, tpath): p for tpath, _, _, p in iter_lora(model)}
    modules = dict(model.named_modules())
    plans: dict[str, list] = {}
    for name, spec in adapters.items():
        present = {t for (a, t) in existing if a == name}
        if present and present != set(spec["layers"]):
            raise LoRAError(
                f"adapter {name!r} already exists in the model on other layers than in "
                f"{str(path)!r}: model-only {sorted(present - set(spec['layers']))[:5]}, "
                f"file-only {sorted(set(spec['layers']) - present)[:5]}. remove_lora it first."
            )
        plans[name] = [] if present else _plan_from_config(modules, spec["layers"], str(path))
        for tpath, layer in spec["layers"].items():
            if present:
                p = existing[(name, tpath)]
                if is_dora(p) != layer.get("use_dora", False):
                    raise LoRAError(
                        f"adapter {name!r} on '{tpath}' is "
                        f"{'DoRA' if is_dora(p) else 'plain LoRA'} in the model but "
                        f"{'plain LoRA' if is_dora(p) else 'DoRA'} in {str(path)!r}; "
                        "remove_lora it first."
                    )
                if (p.rank, p.fan_in, p.fan_out) != (
                    layer["rank"],
                    layer["fan_in"],
                    layer["fan_out"],
                ):
                    raise LoRAError(
                        f"adapter {name!r} on '{tpath}' has rank {p.rank} and matrix "
                        f"{p.fan_out}x{p.fan_in} in the model, but rank {layer['rank']} and "
                        f"{layer['fan_out']}x{layer['fan_in']} in {str(path)!r}."
                    )
    injected: list[str] = []
    try:
        for name, plan in plans.items():
            if plan:
                inject(model, plan, adapter=name, mode=mode)
                injected.append(name)
    except BaseException:
        for name in injected:
            remove_lora(model, name)
        raise
    loaded = {(p.adapter, tpath): p for tpath, _, _, p in iter_lora(model)}
    with torch.no_grad():
        for name, spec in adapters.items():
            for tpath, layer in spec["layers"].items():
                p = loaded[(name, tpath)]
                p.lora_A.copy_(tensors[f"{name}.{tpath}.lora_A"])
                p.lora_B.copy_(tensors[f"{name}.{tpath}.lora_B"])
                if is_dora(p):
                    p.lora_magnitude.copy_(tensors[f"{name}.{tpath}.lora_magnitude"])
                p.enabled = layer.get("enabled", True)
        for name, value in extras.items():
            targets[name].copy_(value)
    if freeze:
        freeze_base(model, [], "none")
        for name in extras:
            targets[name].requires_grad_(True)
    return model


def _plan_from_config(
    modules: Mapping[str, nn.Module], layers: Mapping[str, Any], path: str
) -> list:
    plan = []
    for tpath, layer in layers.items():
        module_name, _, tensor = tpath.rpartition(".")
        module = modules.get(module_name)
        if module is None or tensor not in tensor_names(module):
            raise LoRAError(
                f"adapter file {path!r} adapts '{tpath}', which this model does not have; "
                "load it into the same architecture it was trained on."
            )
        target = parameter_target(module_name, module, tensor)
        if (
            list(target.shape) != list(layer["shape"])
            or target.fan_in_fan_out != layer["fan_in_fan_out"]
        ):
            raise LoRAError(
                f"'{tpath}' has shape {list(target.shape)} in this model but "
                f"{layer['shape']} in adapter file {path!r}."
            )
        options = {k: layer[k] for k in ("rank", "alpha", "use_rslora", "dropout", "init")}
        if layer.get("use_dora", False):
            options["use_dora"] = True
        plan.append((target, options))
    return plan


def load_base_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> nn.Module:
    """Load a plain pretrained checkpoint into a model that already has LoRA.

    Parametrize renames ``fc.weight`` to ``fc.parametrizations.weight.original``, so a plain
    checkpoint no longer loads with ``load_state_dict(strict=True)``. This maps the keys,
    ignores the adapter tensors (they are not in a base checkpoint) and checks keys and
    shapes before copying anything.

    Args:
        model: A model with (or without) adapters.
        state_dict: A state dict of the model without LoRA.
        strict: Require the checkpoint to cover every base tensor and nothing else.

    Returns:
        The model.
    """
    renamed: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                if plist.is_tensor:
                    renamed[join(module_name, tensor)] = join(
                        module_name, f"parametrizations.{tensor}.original"
                    )
    own = model.state_dict()
    lora_ids = {id(t) for *_, p in iter_lora(model) for t in p.parameters()}
    lora_keys = {k for k, v in model.named_parameters(remove_duplicate=False) if id(v) in lora_ids}
    mapped = {renamed.get(k, k): v for k, v in state_dict.items()}
    base_keys = set(own) - lora_keys
    missing = sorted(base_keys - set(mapped))
    unexpected = sorted(set(mapped) - base_keys)
    if strict and (missing or unexpected):
        raise LoRAError(
            f"checkpoint does not fit the base model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}. Pass strict=False to load what fits."
        )
    for key, value in mapped.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise LoRAError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model's has "
                f"{tuple(own[key].shape)}."
            )
    model.load_state_dict({k: v for k, v in mapped.items() if k in base_keys}, strict=False)
    return model
