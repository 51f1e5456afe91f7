"""Sharded models (FSDP2 ``fully_shard``, DTensor): gather to write, scatter to load.

Under FSDP2 every parameter outside a forward pass is a ``DTensor`` holding one shard per rank.
Writing a file needs the full tensors, so :func:`gather_full` all-gathers them on every rank
(a collective) and :func:`write_once` lets rank 0 alone write, atomically, and tells every rank
whether it worked. For big tensors :func:`gather_to_rank0` gathers into rank 0 alone, one
buffer, no copies; :func:`gathered_parameters` lets rank 0 compute with modules whose
parameters are sharded. :func:`copy_into` loads a full tensor into a sharded parameter by keeping
this rank's slice only (no communication: every rank reads the file itself).

A collective made by one rank only (``if rank == 0: save_lora(...)``) would wait forever for
the others; :func:`check_in` waits at most :data:`CHECK_IN_TIMEOUT` for every rank and then
raises :class:`LoRAError` saying so. Models that are not sharded never communicate.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .errors import LoRAError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeIs

__all__ = [
    "CHECK_IN_TIMEOUT",
    "IMPORT_BEFORE_SHARDING",
    "ORDER",
    "check_in",
    "copy_into",
    "fsdp_modules",
    "full_tensor",
    "gather_full",
    "gather_to_rank0",
    "gathered_parameters",
    "holds_shards",
    "is_partitioned",
    "is_sharded",
    "refuse_sharded",
    "write_once",
]

#: The order that works with FSDP2, for messages: FSDP2 shards the parameters it finds and
#: cannot follow later changes to them.
ORDER = (
    "quantize the base first (quantize_base, or add_lora(..., quantize=...)), then add_lora, "
    "then fully_shard each block and the root."
)

#: What to do instead of importing adapters into a sharded model, for messages.
IMPORT_BEFORE_SHARDING = (
    "Import the adapter before fully_shard, on every rank; to load new values into adapters "
    "the sharded model already has, use load_lora with a save_lora file (each rank keeps its "
    "own shard)."
)

#: How long a sharded save or export waits for every rank to reach it before it says that it
#: was called on some ranks only.
CHECK_IN_TIMEOUT = timedelta(seconds=300)


def is_sharded(tensor: Any) -> TypeIs[DTensor]:
    """Whether ``tensor`` is a DTensor (a shard of a tensor spread over ranks).

    Importing ``torch.distributed.tensor`` takes seconds; when nobody imported it, no tensor can
    be a DTensor, so it is never imported here.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def fsdp_modules(model: torch.nn.Module) -> set[int]:
    """Ids of the modules whose parameters FSDP2 manages: all under a ``fully_shard``-ed module.

    Their parameters are DTensors except between a forward and its backward, and after a
    forward of a module that keeps them gathered (FSDP2's default for the root): then they
    are plain tensors FSDP2 will replace again, and must not be changed either.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if wrapper is None:
        return set()
    return {id(sub) for m in model.modules() if isinstance(m, wrapper) for sub in m.modules()}


def is_partitioned(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 parameter whose data is not on this rank now."""
    numel = getattr(tensor, "ds_numel", None)
    return numel is not None and tensor.numel() != numel


def holds_shards(module: torch.nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is sharded: the tensor itself, or what parametrize stores for it.

    A packed weight is stored as several tensors (``original0``, ...); reading the weight
    itself would dequantize shards.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        plist = cast(torch.nn.ModuleDict, module.parametrizations)[name]
        return any(is_sharded(t) for t in plist.parameters(recurse=False))
    return is_sharded(getattr(module, name, None))


def _require_process_group(what: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        raise LoRAError(
            f"{what}: the model holds sharded tensors (DTensor) but no process group is "
            "initialized; call it from the distributed job, on every rank."
        )


def check_in(what: str, timeout: timedelta | None = None) -> None:
    """Wait until every rank has reached this call; raise if some never do.

    Args:
        what: The call, for the message (``"save_lora"``).
        timeout: How long to wait; default :data:`CHECK_IN_TIMEOUT`.

    Raises:
        LoRAError: no process group, or some rank did not arrive in time (the call was made on
            some ranks only, e.g. under ``if rank == 0``).
    """
    import torch.distributed as dist

    _require_process_group(what)
    wait = CHECK_IN_TIMEOUT if timeout is None else timeout
    try:
        dist.barrier(timeout=wait)
    except RuntimeError as exc:  # gloo/nccl report a timeout as RuntimeError subclasses
        raise LoRAError(
            f"{what} on a sharded (FSDP2) model is a collective: every rank must call it, not "
            f"only rank 0; rank {dist.get_rank()} waited {wait.total_seconds():g} s for the "
            f"others ({type(exc).__name__}). Call it on every rank; only rank 0 writes the file."
        ) from None


def gather_full(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full CPU copies of the tensors; sharded ones are all-gathered (every rank must call this).

    The iteration order of ``tensors`` must be the same on every rank (it is when it comes from
    the same model), since each sharded tensor is one collective.
    """
    return {key: full_tensor(tensor) for key, tensor in tensors.items()}


def full_tensor(tensor: Tensor) -> Tensor:
    """A full, detached CPU copy of ``tensor``; all-gathered first if it is sharded."""
    full = tensor.full_tensor() if is_sharded(tensor) else tensor
    return full.detach().to("cpu").contiguous().clone()


def gather_to_rank0(tensor: Tensor) -> Tensor | None:
    """The whole tensor on rank 0 (None on the other ranks); a plain tensor as it is, anywhere.

    A collective for a sharded tensor: every rank calls it, in the same order. FSDP2's layout
    (one mesh dimension, ``Shard(0)``) is received straight into its rows of one buffer on
    rank 0, shard by shard (a gather would stage the whole tensor once more); the other ranks
    send their shard and allocate nothing. Other layouts are all-gathered.
    """
    if not is_sharded(tensor):
        return tensor.detach()
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    group = mesh.get_group() if mesh.ndim == 1 else None
    if (
        group is None
        or tensor.dim() == 0
        or tuple(tensor.placements) != (Shard(0),)
        or dist.get_global_rank(group, 0) != 0
    ):
        full = tensor.full_tensor().detach()
        return full if _rank() == 0 else None
    world = dist.get_world_size(group)
    rows = tensor.shape[0]
    chunk = -(-rows // world)  # torch.chunk's rows per rank; the last ranks may hold fewer
    spans = [(r * chunk, min(rows, (r + 1) * chunk)) for r in range(world)]
    local = tensor.to_local().detach()
    me = dist.get_rank(group)
    if me != 0:
        start, stop = spans[me]
        if stop > start:
            dist.send(local.contiguous(), dst=0, group=group)  # dst: rank 0 of the world
        return None
    out = local.new_empty((rows, *local.shape[1:]))
    start, stop = spans[0]
    out[start:stop].copy_(local)
    for r in range(1, world):
        start, stop = spans[r]
        if stop > start:
            dist.recv(out[start:stop], src=dist.get_global_rank(group, r), group=group)
    return out


@contextlib.contextmanager
def gathered_parameters(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Inside the block, rank 0 sees the modules' sharded parameters whole (a collective).

    Every rank gathers every sharded parameter of ``modules`` (in the same order); on rank 0
    each is replaced by a plain frozen copy for the block and put back after it, as FSDP2
    itself does around a forward. The model must not run a forward inside the block.
    """
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    try:
        for module in modules:
            for sub in module.modules():
                for name, param in list(sub._parameters.items()):
                    if param is None or not is_sharded(param):
                        continue
                    full = gather_to_rank0(param)
                    if full is not None:
                        swapped.append((sub, name, param))
                        sub._parameters[name] = torch.nn.Parameter(full, requires_grad=False)
        yield
    finally:
        for sub, name, param in reversed(swapped):
            sub._parameters[name] = param


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_once(path: str | os.PathLike, write: Callable[[], Any], *, collective: bool) -> Path:
    """Run ``write`` (which writes ``path``) on rank 0 only, and share its outcome.

    Args:
        path: What ``write`` writes, returned on every rank.
        write: Writes the file(s); may raise (a ``LoRAError`` for a bad path).
        collective: True for a sharded model: rank 0 writes, then every rank learns whether it
            worked and raises the same ``LoRAError`` if not. False: just ``write()``.

    Returns:
        ``path`` as a Path.
    """
    if not collective:
        write()
        return Path(path)
    import torch.distributed as dist

    failure: list[str | None] = [None]
    if _rank() == 0:
        try:
            write()
        except Exception as exc:  # reported to every rank below, then raised here too
            failure[0] = str(exc) if isinstance(exc, LoRAError) else f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise LoRAError(f"rank 0 could not write {str(path)!r}: {failure[0]}")
    return Path(path)


def copy_into(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for plain and sharded parameters (this rank's slice of ``value``).

    Communication-free: every rank holds the full ``value`` (it read the file itself).
    """
    if not is_sharded(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    local = distribute_tensor(
        value.to(dtype=param.dtype, device=param.device),
        param.device_mesh,
        param.placements,
        src_data_rank=None,
    )
    param.to_local().copy_(local.to_local())


def refuse_sharded(
    model: torch.nn.Module,
    what: str,
    fix: str,
    problem: str = "cannot change a sharded (FSDP2) model in place",
) -> None:
    """Raise if the model's parameters are sharded: ``what`` cannot work on FSDP2 shards.

    Adding, merging or removing adapters replaces or moves parameters that FSDP2 manages (it
    would keep all-gathering into the old places), which breaks the model's next forward.

    Args:
        model: The model about to change.
        what: The call, for the message.
        fix: What to do instead, for the message.
        problem: What ``what`` cannot do, for the message.
    """
    sharded = [name for name, p in model.named_parameters() if is_sharded(p)]
    managed = fsdp_modules(model)
    if managed and not sharded:  # gathered for now (after a forward): still FSDP2's
        sharded = [n for n, _ in model.named_parameters()][:1] or ["(no parameter)"]
    if sharded:
        raise LoRAError(
            f"{what} {problem} (e.g. {sharded[0]!r}): FSDP2 manages its parameters. {fix}"
        )
