"""Hot-swapping an adapter in a compiled model: new weights, same tensors, no recompilation.

``torch.compile`` guards on tensor shapes and on Python numbers a graph reads. An adapter's
rank is a shape and its scale a Python float, so loading another adapter would recompile.
``prepare_hotswap`` (before compiling) zero-pads every adapter's ``A`` and ``B`` to one
maximum rank and turns its scale into a 0-d tensor buffer; ``hotswap_lora`` then copies a new
adapter's factors and scale into those very tensors. Zero rows and columns add nothing, so
the update stays exactly ``scale * B @ A`` of the adapter loaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.adapter_file import read_lora_file
from ..core.errors import LoRAError
from ..core.lookup import check_adapters_exist, iter_lora, list_adapters
from ..core.targets import base_tensor, join, tensor_names
from ..variants.lora import LoRAParametrization

__all__ = ["hotswap_lora", "prepare_hotswap"]


def _plain_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by their names without parametrize (``fc.weight``, not ``...original``)."""
    out: dict[str, Tensor] = {}
    for module_name, module in model.named_modules():
        if ".parametrizations" in f".{module_name}":
            continue
        for name in tensor_names(module):
            tensor = base_tensor(module, name)
            if isinstance(tensor, nn.Parameter):
                out.setdefault(join(module_name, name), tensor)
    return out


def _entries(model: nn.Module, adapter: str | None) -> dict[str, LoRAParametrization]:
    """``{tensor path: parametrization}`` of one adapter (or of all, keyed ``adapter/path``)."""
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    elif not list_adapters(model):
        raise LoRAError("this model has no adapters; call add_lora first.")
    out: dict[str, LoRAParametrization] = {}
    for path, _, _, p in iter_lora(model):
        if adapter is None or p.adapter == adapter:
            if type(p) is not LoRAParametrization:
                raise LoRAError(
                    f"hot-swapping supports plain LoRA only; adapter {p.adapter!r} on "
                    f"'{path}' is a {type(p).__name__}."
                )
            out[path if adapter is not None else f"{p.adapter}/{path}"] = p
    return out


def _alpha_for(scale: float, rank: int, use_rslora: bool) -> float:
    """The alpha that gives ``scale`` at ``rank`` (so saved files keep the update)."""
    return scale * (math.sqrt(rank) if use_rslora else rank)


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
            rank, an adapter is missing or is not plain LoRA. Nothing is changed then.
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise LoRAError(f"max_rank must be a positive integer, got {max_rank!r}.")
    entries = _entries(model, adapter)
    too_big = [
        f"{k} (rank {p.lora_A.shape[0]})"
        for k, p in entries.items()
        if p.lora_A.shape[0] > max_rank
    ]
    if too_big:
        raise LoRAError(
            f"max_rank={max_rank} is smaller than the rank of {', '.join(too_big[:5])}; pass "
            "a max_rank at least as large as every adapter you will swap in."
        )
    with torch.no_grad():
        for p in entries.values():
            _pad(p, max_rank)


def _pad(p: LoRAParametrization, max_rank: int) -> None:
    rank = p.lora_A.shape[0]
    scale = p.scale
    if rank < max_rank:
        a, b = p.lora_A, p.lora_B
        new_a = a.new_zeros(max_rank, a.shape[1])
        new_b = b.new_zeros(b.shape[0], max_rank)
        new_a[:rank] = a
        new_b[:, :rank] = b
        p.lora_A = nn.Parameter(new_a, requires_grad=a.requires_grad)
        p.lora_B = nn.Parameter(new_b, requires_grad=b.requires_grad)
    if not isinstance(scale, Tensor):
        del p.__dict__["scale"]
        p.register_buffer(
            "scale", torch.tensor(float(scale), device=p.lora_A.device), persistent=False
        )
    p.rank = max_rank
    p.alpha = _alpha_for(float(p.scale), max_rank, p.use_rslora)
    p.clear_cache()


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
    entries: Mapping[str, LoRAParametrization],
    layers: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    name: str,
    adapter: str,
    path: str,
) -> list[tuple[LoRAParametrization, Tensor | None, Tensor | None, float]]:
    """Check the whole file against the prepared adapter; return what to copy where."""
    unprepared = [k for k, p in entries.items() if not isinstance(p.scale, Tensor)]
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
    plan: list[tuple[LoRAParametrization, Tensor | None, Tensor | None, float]] = []
    for tpath, p in entries.items():
        layer = layers.get(tpath)
        if layer is None:
            plan.append((p, None, None, 1.0))  # zero factors: no update
            continue
        rank, room = layer["rank"], p.lora_A.shape[0]
        if (layer["fan_in"], layer["fan_out"]) != (p.fan_in, p.fan_out):
            raise LoRAError(
                f"'{tpath}' is {p.fan_out}x{p.fan_in} in the model but "
                f"{layer['fan_out']}x{layer['fan_in']} in {path!r}."
            )
        if rank > room:
            raise LoRAError(
                f"adapter file {path!r} has rank {rank} on '{tpath}', more than the "
                f"{room} prepare_hotswap made room for; prepare with a larger max_rank."
            )
        lora_a, lora_b = (
            tensors.get(f"{name}.{tpath}.lora_A"),
            tensors.get(f"{name}.{tpath}.lora_B"),
        )
        if (
            lora_a is None
            or lora_b is None
            or lora_a.shape != (rank, p.fan_in)
            or lora_b.shape
            != (
                p.fan_out,
                rank,
            )
        ):
            raise LoRAError(f"adapter file {path!r} lacks well-shaped factors for '{tpath}'.")
        denom = math.sqrt(rank) if layer["use_rslora"] else rank
        plan.append((p, lora_a, lora_b, layer["alpha"] / denom))
    return plan


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
    the file loaded; each adapter keeps its enabled state.

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
    plan = _plan_swap(entries, adapters[name]["layers"], tensors, name, adapter, str(path))
    params = _plain_parameters(model)
    for key, value in extras.items():
        if key not in params or params[key].shape != value.shape:
            raise LoRAError(
                f"adapter file {str(path)!r} holds trainable tensor {key!r} of shape "
                f"{tuple(value.shape)}, which does not fit this model."
            )
    with torch.no_grad():
        for p, lora_a, lora_b, scale in plan:
            rank = 0 if lora_a is None else lora_a.shape[0]
            p.lora_A[rank:].zero_()
            p.lora_B[:, rank:].zero_()
            if lora_a is not None and lora_b is not None:
                p.lora_A[:rank].copy_(lora_a)
                p.lora_B[:, :rank].copy_(lora_b)
            p.scale.fill_(scale)  # type: ignore[attr-defined]  # a tensor once prepared
            p.alpha = _alpha_for(scale, p.lora_A.shape[0], p.use_rslora)
            p.clear_cache()
        for key, value in extras.items():
            params[key].copy_(value)
    return model
