"""Hot-swapping an adapter in a compiled model: new weights, same tensors, no recompilation.

``torch.compile`` guards on tensor shapes and on Python numbers a graph reads. An adapter's
rank is a shape and its scale a Python float, so loading another adapter would recompile.
``prepare_hotswap`` (before compiling) zero-pads every adapter's ``A`` and ``B`` to one
maximum rank and turns its scale into a 0-d tensor buffer; ``hotswap_lora`` then copies a new
adapter's factors and scale into those very tensors. Zero rows and columns add nothing, so
the update stays exactly ``scale * B @ A`` of the adapter loaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter_file import read_lora_file
from ..core.copies import TrainableCopy, iter_copies
from ..core.distributed import copy_into, fsdp_modules, refuse_sharded
from ..core.errors import LoRAError
from ..core.lookup import check_adapters_exist, clear_lora_cache, iter_lora, list_adapters
from ..core.targets import base_tensor
from ..core.variant import AdapterVariant, require

__all__ = ["hotswap_lora", "prepare_hotswap"]


def _entries(model: nn.Module, adapter: str | None) -> dict[str, AdapterVariant]:
    """``{tensor path: entry}`` of one adapter (or of all, keyed ``adapter/path``)."""
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    elif not list_adapters(model):
        raise LoRAError("this model has no adapters; call add_lora first.")
    out: dict[str, AdapterVariant] = {}
    for path, _, _, p in iter_lora(model):
        if adapter is None or p.adapter == adapter:
            require(p, "hotswap", "hot-swapping", path)
            out[path if adapter is not None else f"{p.adapter}/{path}"] = p
    return out


def prepare_hotswap(model: nn.Module, max_rank: int, adapter: str | None = None) -> None:
    """Make adapters swappable under ``torch.compile``: call it before compiling.

    Every selected adapter's ``A`` (``rank x fan_in``) and ``B`` (``fan_out x rank``) are
    zero-padded to ``max_rank`` (new Parameters: build the optimizer afterwards) and its scale
    becomes a 0-d tensor buffer. The update and the outputs do not change; the recorded
    ``rank`` becomes ``max_rank`` and ``alpha`` is adjusted so that ``save_lora`` files still
    describe the same update. Calling it again is harmless.

    Args:
        model: A model with plain LoRA adapters.
        max_rank: The largest rank any adapter swapped in later will have.
        adapter: Prepare only this adapter; None prepares all of them.

    Raises:
        LoRAError: ``max_rank`` is not a positive integer or is smaller than an adapter's
            rank, an adapter is missing or its variant cannot be swapped, the model is
            sharded (FSDP2) and the adapters would need new tensors (prepare before
            ``fully_shard``). Nothing is changed then.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise LoRAError(f"max_rank must be a positive integer, got {max_rank!r}.")
    entries = _entries(model, adapter)
    if fsdp_modules(model) and any(
        p.swap_room() < max_rank or not p.swap_prepared() for p in entries.values()
    ):
        refuse_sharded(
            model,
            "prepare_hotswap",
            "It pads the adapters into new, larger tensors: call prepare_hotswap before "
            "fully_shard; hotswap_lora then works on the sharded model.",
        )
    too_big = [
        f"{k} (rank {p.swap_room()})" for k, p in entries.items() if p.swap_room() > max_rank
    ]
    if too_big:
        raise LoRAError(
            f"max_rank={max_rank} is smaller than the rank of {', '.join(too_big[:5])}; pass "
            "a max_rank at least as large as every adapter you will swap in."
        )
    with torch.no_grad():
        for p in entries.values():
            p.prepare_swap(max_rank)


def _pick_file_adapter(
    adapters: Mapping[str, Any], adapter: str, file_adapter: str | None, path: str
) -> str:
    if file_adapter is not None:
        if file_adapter not in adapters:
            raise LoRAError(
                f"adapter file {path!r} has no adapter {file_adapter!r}; it has {list(adapters)}."
            )
        return file_adapter
    if adapter in adapters:
        return adapter
    if len(adapters) == 1:
        return next(iter(adapters))
    raise LoRAError(
        f"adapter file {path!r} holds {list(adapters)}, none named {adapter!r}; choose one "
        "with file_adapter=."
    )


def _plan_swap(
    entries: Mapping[str, AdapterVariant],
    layers: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    name: str,
    adapter: str,
    path: str,
) -> list[Callable[[], None]]:
    """Check the whole file against the prepared adapter; return the in-place copies to run."""
    unprepared = [k for k, p in entries.items() if not p.swap_prepared()]
    if unprepared:
        raise LoRAError(
            f"adapter {adapter!r} is not prepared for hot-swapping ({unprepared[0]!r} ...); "
            "call prepare_hotswap(model, max_rank) before torch.compile."
        )
    foreign = sorted(set(layers) - set(entries))
    if foreign:
        raise LoRAError(
            f"adapter file {path!r} adapts {foreign[:5]}, which adapter {adapter!r} does not "
            f"target in this model (it targets {sorted(entries)[:5]}...); a swap cannot add "
            "layers: add the adapter on every layer any swapped adapter uses, then prepare."
        )
    steps = []
    for tpath, p in entries.items():
        layer = layers.get(tpath)
        if layer is not None and layer["variant"] != p.variant:
            raise LoRAError(
                f"adapter file {path!r} holds a {layer['variant']} adapter on '{tpath}', where "
                f"adapter {adapter!r} is {p.variant}; a swap keeps the variant."
            )
        found = (
            {}
            if layer is None
            else {
                k[len(f"{name}.{tpath}.") :]: v
                for k, v in tensors.items()
                if k.startswith(f"{name}.{tpath}.")
            }
        )
        steps.append(p.plan_swap(layer, found, f"'{tpath}' of {path!r}"))
    return steps


def hotswap_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter: str = "default",
    *,
    file_adapter: str | None = None,
) -> nn.Module:
    """Load a ``save_lora`` file into a prepared adapter in place, without recompiling.

    The factors are copied into the padded tensors (the rest zeroed) and the file's scale
    (``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA) into the scale buffer. Layers
    the adapter targets but the file does not get a zero update. Trainable tensors the file
    carries (a head, biases) are copied in place too. Outputs then equal a fresh model with
    the file loaded; each adapter keeps its enabled state. On a sharded (FSDP2) model (prepared
    before ``fully_shard``) each rank reads the file and keeps its own shards.

    Args:
        model: A model prepared with :func:`prepare_hotswap` (compiled or not).
        path: A file written by ``save_lora``.
        adapter: The model's adapter to overwrite.
        file_adapter: Which adapter of the file to load; default: the one named ``adapter``,
            or the file's only adapter.

    Returns:
        The model.

    Raises:
        LoRAError: The swap does not fit (unprepared adapter, larger rank than prepared,
            layers the adapter does not target, other shapes); nothing is changed then.
    """
    adapters, tensors, extras = read_lora_file(path)
    entries = _entries(model, adapter)
    name = _pick_file_adapter(adapters, adapter, file_adapter, str(path))
    steps = _plan_swap(entries, adapters[name]["layers"], tensors, name, adapter, str(path))
    copies = _plan_copies(model, adapter, name, adapters[name].get("copies", {}), extras, str(path))
    with torch.no_grad():
        for step in steps:
            step()
        for c, value in copies:
            copy_into(c.value, value)
    if fsdp_modules(model):
        clear_lora_cache(model)  # FSDP2 gathers into the same tensors, versions unchanged
    return model


def _plan_copies(
    model: nn.Module,
    adapter: str,
    name: str,
    described: Mapping[str, Any],
    extras: Mapping[str, Tensor],
    path: str,
) -> list[tuple[TrainableCopy, Tensor]]:
    """The file adapter's trained heads and biases, to copy into the model adapter's own.

    A copy the model adapter holds but the file lacks goes back to the pretrained value (the
    swapped-in adapter does not train it); a copy the file has but the model adapter lacks
    cannot be added by a swap.
    """
    held = {tpath: c for tpath, _, _, c in iter_copies(model) if c.adapter == adapter}
    missing = sorted(set(described) - set(held))
    if missing:
        raise LoRAError(
            f"adapter file {path!r} trains {missing[:5]}, of which adapter {adapter!r} holds no "
            "copy in this model; a swap cannot add trained tensors: add the adapter with the "
            "same trainable=/bias= (or load_lora the file instead)."
        )
    plan = []
    for tpath, c in held.items():
        value = extras.get(f"{name}.{tpath}")
        if value is None:
            module_name, _, tensor = tpath.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            value = base_tensor(module, tensor)  # the pretrained value under the copy
        if tuple(value.shape) != tuple(c.value.shape):
            raise LoRAError(
                f"adapter file {path!r} holds trainable tensor {tpath!r} of shape "
                f"{tuple(value.shape)}, which does not fit this model ({tuple(c.value.shape)})."
            )
        plan.append((c, value))
    return plan
