"""``save_merged``: the merged model as a safetensors checkpoint, one weight at a time.

Every tensor of the model's state dict is written under its plain name (``fc.weight``, never
``fc.parametrizations.weight.original``); an adapted tensor is written merged (its base, the
adapters' updates through :meth:`~lora_param.AdapterVariant.merged_inplace`, trained copies),
a packed base as a plain weight in its compute dtype. Adapter tensors are left out.

On a sharded (FSDP2) model every rank takes part and rank 0 writes: for each tensor in turn,
its shards are gathered into rank 0 (:func:`~.distributed.gather_to_rank0`), merged there in
that same buffer, written and dropped. The header of each file is written first (shapes and
dtypes are known in advance), so no rank ever holds more than one full weight beyond its own
shards (:class:`~.safetensors_stream.SafetensorsStream`). A transformers ``PreTrainedModel``
gets ``save_pretrained``'s layout: ``config.json`` (and ``generation_config.json``), and
``model.safetensors`` or numbered files with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from .atomic import atomic_write, open_beside, sync_close
from .copies import TrainableCopy
from .distributed import (
    check_in,
    fsdp_modules,
    gather_to_rank0,
    gathered_parameters,
    is_partitioned,
    is_sharded,
)
from .entries import AdapterList
from .entry import AdapterEntry
from .errors import LoRAError
from .generated_class import class_before_parametrizations
from .lookup import check_adapters_exist
from .merge import merge_chain
from .paths import check_output_folder
from .safetensors_stream import SafetensorsStream, TensorSpec
from .targets import join
from .variant import AdapterVariant
from .wrappers import unwrap_model

__all__ = ["save_merged"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass
class _Item:
    """One tensor of the checkpoint: a plain one, or an adapted (parametrized) one."""

    spec: TensorSpec
    tensor: Tensor | None = None
    plist: ParametrizationList | None = None


@dataclass
class _Outcome:
    """What rank 0 wrote so far, or why it stopped (the other ranks keep gathering)."""

    files: list[tuple[BinaryIO, Path, Path]] = field(default_factory=list)
    failure: str | None = None


def _size_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or ``"5GB"`` / ``"500MB"`` / ``"2GiB"``."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise LoRAError(
            f"max_shard_size must be a positive number of bytes or a size such as '5GB' or "
            f"'500MB', got {size!r}."
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _is_pretrained(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (decided from the class hierarchy, no import)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
        for c in type(model).__mro__
    )


def _list_spec(key: str, module: nn.Module, name: str, plist: ParametrizationList) -> TensorSpec:
    """Shape and dtype of the value a parametrized tensor computes, known before computing it.

    A packed base gives its shape and compute dtype; adapters keep the weight's shape and
    dtype; a list of a user's parametrizations alone is evaluated once.
    """
    if isinstance(plist, AdapterList):
        store = plist.store()
        if store is not None:
            return TensorSpec(key, tuple(store.shape), store.compute_dtype)
        owned = plist.owned()
        if owned:
            last = owned[-1]
            shape = (
                last.weight_shape
                if isinstance(last, AdapterVariant)
                else cast(TrainableCopy, last).value.shape
            )
            return TensorSpec(key, tuple(shape), plist.stored()[0].dtype)
    with torch.no_grad():
        value = getattr(module, name)
    return TensorSpec(key, tuple(value.shape), value.dtype)


def _plan(model: nn.Module) -> list[_Item]:
    """Every tensor of the checkpoint, in state-dict order, adapted ones under plain names."""
    lists: dict[str, tuple[nn.Module, str, ParametrizationList]] = {}
    for name, module in model.named_modules():
        if ".parametrizations" in f".{name}" or not parametrize.is_parametrized(module):
            continue
        for tensor, plist in cast(nn.ModuleDict, module.parametrizations).items():
            prefix = join(name, f"parametrizations.{tensor}") + "."
            lists[prefix] = (module, tensor, cast(ParametrizationList, plist))
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    items: list[_Item] = []
    seen_lists: set[str] = set()
    seen_tensors: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        owner = next((p for p in lists if key.startswith(p)), None)
        if owner is not None:
            if owner not in seen_lists:
                seen_lists.add(owner)
                module, tensor, plist = lists[owner]
                plain = owner[: -len(f"parametrizations.{tensor}.")] + tensor
                items.append(_Item(_list_spec(plain, module, tensor, plist), plist=plist))
            continue
        if not isinstance(value, Tensor) or key in ignored or id(value) in seen_tensors:
            continue  # extra state; keys transformers leaves out; a tied weight's second name
        seen_tensors.add(id(value))
        items.append(_Item(TensorSpec(key, tuple(value.shape), value.dtype), tensor=value))
    return items


def _merged(
    plist: ParametrizationList, take: Callable[[AdapterEntry], bool], rank0: bool
) -> Tensor | None:
    """The adapted tensor's value on rank 0 (a collective on sharded models), else None.

    The stored tensors are gathered into new buffers of rank 0's own, so the updates are
    formed in them; a packed store dequantizes into a new tensor too.
    """
    stored = [
        (gather_to_rank0(t), is_sharded(t))
        for n, t in plist.named_parameters(recurse=False)
        if n.startswith("original")
    ]
    entries = [p for p in plist if not isinstance(p, AdapterEntry) or take(p)]
    with gathered_parameters(entries):
        if not rank0:
            return None
        values = tuple(cast(Tensor, t) for t, _ in stored)
        owned = all(sharded for _, sharded in stored)
        del stored
        if isinstance(plist, AdapterList) and plist.store() is not None:
            store = plist.store()
            assert store is not None
            weight = store.weight_fp32(*values)
            del values
            value = merge_chain(list(plist)[1:], weight, take, owned=True)
            return value.to(store.compute_dtype)
        dtype = values[0].dtype
        x = values if len(values) > 1 else values[0]
        del values
        return merge_chain(list(plist), x, take, owned=owned).to(dtype)


def _value(item: _Item, take: Callable[[AdapterEntry], bool], rank0: bool) -> Tensor | None:
    if item.plist is not None:
        return _merged(item.plist, take, rank0)
    assert item.tensor is not None
    full = gather_to_rank0(item.tensor)
    return full if rank0 else None


def _split(items: list[_Item], limit: int) -> list[list[_Item]]:
    """Consecutive groups of at most ``limit`` bytes (a bigger tensor alone), as transformers."""
    groups: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if groups[-1] and size + item.spec.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item.spec.nbytes
    return groups


def _file_names(count: int) -> list[str]:
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _finish(folder: Path, outcome: _Outcome, groups: list[list[_Item]], model: nn.Module) -> None:
    """Rank 0, once every tensor is written: files in place, the index, stale files gone."""
    names = [final.name for _, _, final in outcome.files]
    for f, _, _ in outcome.files:
        sync_close(f)
    for _, tmp, final in outcome.files:
        os.replace(tmp, final)
    outcome.files = []
    if len(names) > 1:
        index = {
            "metadata": {"total_size": sum(i.spec.nbytes for g in groups for i in g)},
            "weight_map": {i.spec.key: n for n, g in zip(names, groups, strict=True) for i in g},
        }
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / INDEX_NAME, lambda f: f.write(text.encode("utf-8")))
    stale = [p for p in folder.iterdir() if _SHARD_FILE.fullmatch(p.name) and p.name not in names]
    stale.append(folder / (WEIGHTS_NAME if len(names) > 1 else INDEX_NAME))  # an older layout
    for path in stale:
        if path.is_file():
            path.unlink()
    if _is_pretrained(model):
        _save_config(folder, model, groups)


def _save_config(folder: Path, model: Any, groups: list[list[_Item]]) -> None:
    """``config.json`` (and ``generation_config.json``) as ``save_pretrained`` writes them."""
    config = model.config
    config.architectures = [class_before_parametrizations(model).__name__.removeprefix("FSDP")]
    floating = [i.spec.dtype for g in groups for i in g if i.spec.dtype.is_floating_point]
    if floating and hasattr(config, "dtype"):
        config.dtype = str(floating[0]).removeprefix("torch.")
    config.save_pretrained(str(folder))
    can_generate = getattr(model, "can_generate", None)
    generation = getattr(model, "generation_config", None)
    if callable(can_generate) and can_generate() and generation is not None:
        generation.save_pretrained(str(folder))


def _abandon(outcome: _Outcome) -> None:
    for f, tmp, _ in outcome.files:
        f.close()
        tmp.unlink(missing_ok=True)
    outcome.files = []


def _fail(outcome: _Outcome, exc: BaseException) -> None:
    if outcome.failure is None:
        text = str(exc) if isinstance(exc, LoRAError) else f"{type(exc).__name__}: {exc}"
        outcome.failure = text
    _abandon(outcome)


def save_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter: str | None = None,
    *,
    max_shard_size: int | str = "50GB",
) -> Path:
    """Write the model with its adapters merged, as safetensors, never holding it whole.

    Every tensor of the model's state dict is written under its plain name: adapted weights
    merged (every variant through its own formula, in at least float32, rounded once to the
    weight's dtype; a packed base as a plain weight in its compute dtype; trained heads and
    biases as trained), adapter tensors left out. The model is not changed. Load the result
    into the model without adapters: ``model.load_state_dict(safetensors.torch.load_file(
    folder / "model.safetensors"))``, or ``from_pretrained(folder)`` for a transformers model,
    which gets ``save_pretrained``'s layout (``config.json``, ``generation_config.json``,
    ``model.safetensors`` or numbered files with ``model.safetensors.index.json``; tied
    weights written once).

    On a sharded (FSDP2) model this is a collective: call it on every rank. The tensors are
    gathered into rank 0 one at a time, merged there in place and written at once, so rank 0
    holds one full weight beyond its shards (the other ranks: a padded shard); rank 0 alone
    writes. On a model that is not sharded no process communicates: call it where the files
    should be written.

    Args:
        model: A model with (or without) adapters; FSDP2-sharded or not (a DDP or
            ``torch.compile`` wrapper is looked through).
        save_directory: Folder to write (created if needed); each file is replaced atomically.
        adapter: Merge only this adapter (whether enabled or not) into the base; None merges
            every enabled adapter: the checkpoint computes what the model computes now.
        max_shard_size: Largest file, in bytes or as ``"5GB"`` / ``"500MB"``; bigger
            checkpoints are split as transformers splits them (a larger tensor gets a file of
            its own).

    Returns:
        The folder, as a Path.

    Raises:
        LoRAError: No such adapter, a folder that cannot be written, a bad ``max_shard_size``,
            a tensor safetensors cannot store, DeepSpeed ZeRO-3 partitions (save the adapters
            and merge in one process); rank 0's failure is raised on every rank, and no file is
            left half written.
    """
    model = unwrap_model(model)
    if adapter is not None:
        check_adapters_exist(model, [adapter])
    limit = _size_bytes(max_shard_size)
    folder = Path(save_directory)
    partitioned = [n for n, p in model.named_parameters() if is_partitioned(p)]
    if partitioned:
        raise LoRAError(
            f"save_merged cannot read DeepSpeed ZeRO-3 partitions (e.g. {partitioned[0]!r}: "
            "an empty tensor on this rank). Save the adapters (trainer.save_model(), or "
            "save_lora inside deepspeed.zero.GatheredParameters), then in one process load_lora "
            "them into the base model and call save_merged there."
        )
    items = _plan(model)
    sharded = bool(fsdp_modules(model)) or any(is_sharded(p) for p in model.parameters())
    if sharded:
        check_in("save_merged")
    rank0 = not sharded or _rank() == 0

    def take(p: AdapterEntry) -> bool:
        return p.enabled if adapter is None else p.adapter == adapter

    outcome = _Outcome()
    groups = _split(items, limit)
    streams: list[SafetensorsStream] = []
    if rank0:
        try:
            check_output_folder(folder, "merged checkpoint folder")
            folder.mkdir(parents=True, exist_ok=True)
            metadata = {"format": "pt"}
            for name in _file_names(len(groups)):
                f, tmp = open_beside(folder / name)
                outcome.files.append((f, tmp, folder / name))
            streams = [
                SafetensorsStream(f, [i.spec for i in g], metadata)
                for (f, _, _), g in zip(outcome.files, groups, strict=True)
            ]
        except Exception as exc:
            _fail(outcome, exc)
    for n, group in enumerate(groups):
        for item in group:
            try:
                value = _value(item, take, rank0 and outcome.failure is None)
                if value is not None and outcome.failure is None:
                    streams[n].write(item.spec.key, value.to(item.spec.dtype))
                del value
            except Exception as exc:
                if not rank0:
                    raise
                _fail(outcome, exc)
        if rank0 and outcome.failure is None:
            try:
                streams[n].close()
            except Exception as exc:
                _fail(outcome, exc)
    if rank0 and outcome.failure is None:
        try:
            _finish(folder, outcome, groups, model)
        except Exception as exc:
            _fail(outcome, exc)
    failure = _share(outcome.failure, sharded)
    if failure is not None:
        raise LoRAError(f"save_merged could not write {str(folder)!r}: {failure}")
    return folder


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _share(failure: str | None, collective: bool) -> str | None:
    """Rank 0's outcome, on every rank of a sharded model."""
    if not collective:
        return failure
    import torch.distributed as dist

    box: list[str | None] = [failure]
    dist.broadcast_object_list(box, src=0)
    return box[0]
