"""Adapters on disk: state dicts, safe atomic files with their config, base checkpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .adapter_file import FORMAT, layer_spec, read_lora_file
from .atomic import atomic_write
from .copies import (
    CopyPlan,
    TrainableCopy,
    check_copyable,
    drop_copies,
    iter_copies,
    register_copies,
)
from .distributed import (
    ORDER,
    check_in,
    copy_into,
    fsdp_modules,
    gather_full,
    is_sharded,
    write_once,
)
from .entries import adapter_lists, entry_list
from .errors import LoRAError
from .freeze import freeze_base
from .inject import Mode, check_adapter_name, inject
from .lookup import check_adapters_exist, iter_lora, list_adapters, owned_tensor_ids
from .merge import remove_lora
from .paths import check_output_file
from .store import BaseStore
from .targets import ExpertLayout, base_tensor, join, parameter_target, tensor_names
from .variant import variant_class

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


def _selected(model: nn.Module, adapter: str | None) -> list[str]:
    if adapter is None:
        names = list_adapters(model)
        if not names:
            raise LoRAError("this model has no adapters; call add_lora first.")
        return names
    check_adapters_exist(model, [adapter])
    return [adapter]


def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The adapter tensors alone, keyed ``"<adapter>.<tensor path>.<name>"``.

    ``<name>`` is the variant's tensor name: ``lora_A`` / ``lora_B`` for LoRA,
    ``lora_magnitude`` too for DoRA, and so on (frozen tensors a variant keeps included).

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
            for name, t in p.tensors().items():
                out[f"{p.adapter}.{path}.{name}"] = t.detach()
    return out


def adapter_config(model: nn.Module, adapter: str | None = None) -> dict[str, Any]:
    """JSON-ready description of adapters: what each one is, never its transient state.

    Per adapted tensor: its matrix view (kind, shape, fans), its variant and that variant's
    fields (rank, alpha, ...), and dropout; per trained copy (a head from ``trainable=``, a
    bias from ``bias=``): its role, owning module and shape. Whether an adapter is enabled is
    not recorded: that is the model's state (``lora_disabled`` is a context), and
    :func:`load_lora` enables what it loads.
    """
    names = _selected(model, adapter)
    config: dict[str, Any] = {name: {"layers": {}, "copies": {}} for name in names}
    for path, _, _, p in iter_lora(model):
        if p.adapter in config:
            config[p.adapter]["layers"][path] = {
                **p.spec.fields(),
                "variant": p.variant,
                "dropout": p.dropout_p,
                **p.fields(),
            }
    for path, _, _, c in iter_copies(model):
        if c.adapter in config:
            config[c.adapter]["copies"][path] = {
                "role": c.role,
                "owner": c.owner,
                "shape": list(c.value.shape),
            }
    return config


def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    include_trainable: bool = True,
) -> Path:
    """Save adapters (all, or one) with their config to one file, atomically.

    The file holds only tensors, strings and numbers, and is read back with
    ``torch.load(weights_only=True)``: loading a stranger's file runs no code. The path is
    checked first (not a folder, a writable place; missing parent folders are created).

    On a sharded (FSDP2) model this is a collective: call it on every rank; the shards are
    gathered and rank 0 alone writes the file.

    Args:
        model: A model with adapters.
        path: Where to write.
        adapter: Save only this adapter; None saves all of them.
        include_trainable: Also save the adapters' own copies of the heads and biases they
            train (``trainable=``, ``bias=``), so that ``load_lora`` restores them.

    Returns:
        The path written.
    """
    config = adapter_config(model, adapter)
    tensors = lora_state_dict(model, adapter)
    copies: dict[str, Tensor] = {}
    for tensor_path, _, _, c in iter_copies(model):
        if c.adapter in config and include_trainable:
            copies[f"{c.adapter}.{tensor_path}"] = c.value.detach()
    if not include_trainable:
        for spec in config.values():
            spec["copies"] = {}
    sharded = any(is_sharded(t) for t in [*tensors.values(), *copies.values()])
    if sharded:
        check_in("save_lora")
    else:
        check_output_file(path, "adapter file")
    payload = {
        "format": FORMAT,
        "config": json.dumps({"adapters": config}),
        "tensors": gather_full(tensors),
        "copies": gather_full(copies),
    }

    def write() -> None:
        check_output_file(path, "adapter file")
        atomic_write(path, lambda f: torch.save(payload, f))

    return write_once(path, write, collective=sharded)


def _check_file_against_model(
    adapters: Mapping[str, Any], tensors: Mapping[str, Tensor], path: str
) -> None:
    """Every tensor each layer's variant needs is in the file with its shape; nothing else."""
    expected = set()
    for name, spec in adapters.items():
        for tpath, layer in spec["layers"].items():
            cls = variant_class(layer["variant"], layer["kind"], tpath)
            for tensor, shape in cls.tensor_shapes(layer_spec(layer), layer).items():
                key = f"{name}.{tpath}.{tensor}"
                expected.add(key)
                if key not in tensors:
                    raise LoRAError(f"adapter file {path!r} lacks tensor {key!r}.")
                if tuple(tensors[key].shape) != tuple(shape):
                    raise LoRAError(
                        f"adapter file {path!r}: {key!r} has shape {tuple(tensors[key].shape)}, "
                        f"its config says {tuple(shape)}."
                    )
    extra = sorted(set(tensors) - expected)
    if extra:
        raise LoRAError(
            f"adapter file {path!r} has tensors its config does not describe: {extra[:5]}"
        )


def _rename(
    adapters: dict[str, Any],
    tensors: dict[str, Tensor],
    copies: dict[str, Tensor],
    new: str,
    path: str,
) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Tensor]]:
    """The one selected adapter under another name (``load_lora(as_adapter=...)``)."""
    check_adapter_name(new, "as_adapter")
    if len(adapters) != 1:
        raise LoRAError(
            f"adapter file {path!r} holds the adapters {list(adapters)}; pass adapter= to choose "
            "the one to load under as_adapter=."
        )
    (old,) = adapters
    cut = len(old) + 1
    return (
        {new: adapters[old]},
        {f"{new}.{k[cut:]}": v for k, v in tensors.items()},
        {f"{new}.{k[cut:]}": v for k, v in copies.items()},
    )


def _plan_file_copies(
    model: nn.Module, adapters: Mapping[str, Any], copies: Mapping[str, Tensor], path: str
) -> tuple[dict[str, list[CopyPlan]], dict[tuple[str, str], Any]]:
    """Check the file's copies against the model; plan the ones the model does not hold yet.

    Returns:
        New copies to register per adapter, and the existing copies by (adapter, tensor path).
    """
    modules = dict(model.named_modules())
    existing = {(c.adapter, tpath): c for tpath, _, _, c in iter_copies(model)}
    plans: dict[str, list[CopyPlan]] = {}
    for name, spec in adapters.items():
        plans[name] = []
        for tpath, info in spec.get("copies", {}).items():
            module_name, _, tensor = tpath.rpartition(".")
            module = modules.get(module_name)
            if module is None or tensor not in tensor_names(module):
                raise LoRAError(
                    f"adapter file {path!r} holds a trained copy of '{tpath}', which this model "
                    "does not have; load it into the same architecture it was trained on."
                )
            have = tuple(base_tensor(module, tensor).shape)
            if have != tuple(copies[f"{name}.{tpath}"].shape):
                raise LoRAError(
                    f"adapter file {path!r} holds trainable tensor {tpath!r} of shape "
                    f"{tuple(copies[f'{name}.{tpath}'].shape)}, but the model has {have} there."
                )
            if (name, tpath) not in existing:
                check_copyable(tpath, module, tensor)
                plans[name].append(CopyPlan(tpath, module, tensor, info["role"], info["owner"]))
    return plans, existing


def _of_adapter(name: str) -> Callable[[TrainableCopy], bool]:
    return lambda c: c.adapter == name


def load_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    freeze: bool = True,
    mode: Mode = "factored",
    as_adapter: str | None = None,
    trainable: bool = True,
) -> nn.Module:
    """Load adapters saved by :func:`save_lora`, injecting them first if the model lacks them.

    On a fresh copy of the base model this injects and loads in one call. Keys and shapes are
    checked against the model before anything changes; on error the model is unchanged. The
    loaded adapters come back with their trained heads and biases (their own copies) and are
    enabled; other adapters of the model keep their state.

    On a sharded (FSDP2) model that already has the adapters, each rank reads the file and
    keeps its own shard (no communication).

    Args:
        model: The base model (with or without the adapters already added).
        path: File written by :func:`save_lora`.
        adapter: Load only this adapter from the file; None loads all of them.
        freeze: Freeze the base model as ``add_lora(freeze=True)`` does.
        mode: Forward mode for newly injected adapters.
        as_adapter: Load the (one) selected adapter under this name instead of its own.
        trainable: False loads the adapters frozen, for inference (toggling keeps them
            frozen).

    Returns:
        The model.
    """
    adapters, tensors, copies = read_lora_file(path)
    if adapter is not None:
        if adapter not in adapters:
            raise LoRAError(
                f"adapter file {str(path)!r} has no adapter {adapter!r}; it has {list(adapters)}."
            )
        adapters = {adapter: adapters[adapter]}
        tensors = {k: v for k, v in tensors.items() if k.startswith(adapter + ".")}
        copies = {k: v for k, v in copies.items() if k.startswith(adapter + ".")}
    if as_adapter is not None:
        adapters, tensors, copies = _rename(adapters, tensors, copies, as_adapter, str(path))
    _check_file_against_model(adapters, tensors, str(path))
    copy_plans, _ = _plan_file_copies(model, adapters, copies, str(path))
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
                _check_existing(existing[(name, tpath)], layer, name, tpath, str(path))
    managed = fsdp_modules(model)
    sharded = [t.path for plan in plans.values() for t, _ in plan if id(t.module) in managed]
    sharded += [c.path for plan in copy_plans.values() for c in plan if id(c.module) in managed]
    if sharded:
        raise LoRAError(
            f"load_lora would add adapters to sharded (FSDP2) layers {sharded[:5]}; add them "
            "before fully_shard (add_lora with the same targets and ranks), then load_lora. "
            f"With FSDP2, {ORDER}"
        )
    injected: list[str] = []
    copied: list[str] = []
    try:
        for name in adapters:
            # Copies first: they replace the pretrained value, updates add on top of them.
            register_copies(copy_plans[name], name)
            copied.append(name)
            if plans[name]:
                inject(model, plans[name], adapter=name, mode=mode, from_file=True)
                injected.append(name)
    except BaseException:
        for name in injected:
            remove_lora(model, name)
        for name in copied:
            for plan in copy_plans[name]:
                drop_copies(plan.module, plan.tensor_name, _of_adapter(name))
        raise
    loaded = {(p.adapter, tpath): p for tpath, _, _, p in iter_lora(model)}
    held = {(c.adapter, tpath): c for tpath, _, _, c in iter_copies(model)}
    with torch.no_grad():
        for name, spec in adapters.items():
            for tpath in spec["layers"]:
                p = loaded[(name, tpath)]
                p.enabled = True
                for tensor, value in p.tensors().items():
                    copy_into(value, tensors[f"{name}.{tpath}.{tensor}"])
                for t in p.trainable_tensors().values():
                    t.requires_grad_(trainable)
                p.clear_cache()
            for tpath in spec.get("copies", {}):
                c = held[(name, tpath)]
                copy_into(c.value, copies[f"{name}.{tpath}"])
                c.enabled = True
                c.value.requires_grad_(trainable)
    if managed:
        # FSDP2 all-gathers into the same tensors without bumping their version counters: a
        # value kept by an evaluation cache would not see the new shards.
        for _, plist in adapter_lists(model):
            plist.clear_cache()
    if freeze:
        freeze_base(model, [], "none")
    return model


def _check_existing(p: Any, layer: Mapping[str, Any], name: str, tpath: str, path: str) -> None:
    """Refuse loading into an existing entry of another variant or shape."""
    if p.variant != layer["variant"]:
        raise LoRAError(
            f"adapter {name!r} on '{tpath}' is a {p.variant} adapter in the model but a "
            f"{layer['variant']} adapter in {path!r}; remove_lora it first."
        )
    want = type(p).tensor_shapes(layer_spec(layer), layer)
    have = {k: tuple(t.shape) for k, t in p.tensors().items()}
    if (p.fan_in, p.fan_out) != (layer["fan_in"], layer["fan_out"]) or have != {
        k: tuple(v) for k, v in want.items()
    }:
        raise LoRAError(
            f"adapter {name!r} on '{tpath}' has rank {getattr(p, 'rank', '?')} and matrix "
            f"{p.fan_out}x{p.fan_in} in the model, but rank {layer.get('rank', '?')} and "
            f"{layer['fan_out']}x{layer['fan_in']} in {path!r}."
        )


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
        layout: ExpertLayout | None = None
        if layer["kind"] == "experts":
            layout = "in_out" if layer["fan_in_fan_out"] else "out_in"
        target = parameter_target(module_name, module, tensor, layout)
        if (target.kind == "experts") != (layer["kind"] == "experts"):
            raise LoRAError(
                f"adapter file {path!r} adapts '{tpath}' as kind {layer['kind']!r}, but this "
                f"model's tensor there is adapted as {target.kind!r} (3-D tensors are adapted per "
                "expert); re-create the adapter with add_lora."
            )
        if (
            list(target.shape) != list(layer["shape"])
            or target.fan_in_fan_out != layer["fan_in_fan_out"]
        ):
            raise LoRAError(
                f"'{tpath}' has shape {list(target.shape)} in this model but "
                f"{layer['shape']} in adapter file {path!r}."
            )
        variant_class(layer["variant"], target.kind, tpath)  # the kind the model gives
        plan.append((target, dict(layer)))
    return plan


def load_base_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> nn.Module:
    """Load a plain pretrained checkpoint into a model that already has LoRA.

    Parametrize renames ``fc.weight`` to ``fc.parametrizations.weight.original``, so a plain
    checkpoint no longer loads with ``load_state_dict(strict=True)``. This maps the keys,
    ignores what the adapters own (their tensors and their trained copies of heads and
    biases: not in a base checkpoint), stores plain weights of packed layers in their packed
    form, and checks keys and shapes before copying anything.

    Args:
        model: A model with (or without) adapters.
        state_dict: A state dict of the model without LoRA.
        strict: Require the checkpoint to cover every base tensor and nothing else.

    Returns:
        The model.
    """
    state_dict = _pack_plain_weights(model, state_dict)
    renamed: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor, plist in module.parametrizations.items():
                if plist.is_tensor:
                    renamed[join(module_name, tensor)] = join(
                        module_name, f"parametrizations.{tensor}.original"
                    )
    own = model.state_dict()
    owned = owned_tensor_ids(model)
    lora_keys = {k for k, v in _named_tensors(model) if id(v) in owned}
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
        if not isinstance(value, Tensor):
            raise LoRAError(
                f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; the "
                "checkpoint is damaged or not a state dict."
            )
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise LoRAError(
                f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model's has "
                f"{tuple(own[key].shape)}."
            )
    model.load_state_dict({k: v for k, v in mapped.items() if k in base_keys}, strict=False)
    return model


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Every parameter and buffer with its state_dict key (shared ones under every name)."""
    out: list[tuple[str, Tensor]] = list(model.named_parameters(remove_duplicate=False))
    out += list(model.named_buffers(remove_duplicate=False))
    return out


def _pack_plain_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace plain weights of packed layers in a checkpoint by their packed tensors.

    ``{"fc.weight": W}`` becomes ``{"fc.parametrizations.weight.original0": codes, ...}``
    when ``fc.weight`` is stored packed in ``model`` (its base store packs it with its own
    settings); other entries pass through.
    """
    out = dict(state_dict)
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            plist = entry_list(module, name)
            store = None if plist is None else plist.store()
            path = join(module_name, name)
            if store is None or path not in out:
                continue
            value = out.pop(path)
            if not isinstance(value, Tensor):
                raise LoRAError(
                    f"checkpoint entry {path!r} is a {type(value).__name__}, not a tensor; the "
                    "checkpoint is damaged or not a state dict."
                )
            if not value.is_floating_point():
                if type(store).pack is BaseStore.pack:
                    store.pack(value)  # this store takes no checkpoint weight: its refusal
                raise LoRAError(
                    f"checkpoint tensor {path!r} is {value.dtype}, not a plain floating-point "
                    f"weight; load_base_state_dict stores a plain checkpoint's weights packed "
                    f"the way this model stores '{path}' ({type(store).__name__}). Pass the "
                    "checkpoint saved before quantization."
                )
            if tuple(value.shape) != tuple(store.shape):
                raise LoRAError(
                    f"checkpoint tensor {path!r} has shape {tuple(value.shape)}, the model's has "
                    f"{tuple(store.shape)}."
                )
            prefix = join(module_name, f"parametrizations.{name}.")
            for i, packed in enumerate(store.pack(value)):
                out[f"{prefix}original{i}"] = packed
    return out
