"""Worker processes for tests/test_distributed.py: LoRA under DistributedDataParallel and FSDP2.

Each of the 2 ranks (gloo, CPU, loopback only) trains the same LoRA model on its own half of the
batch while rank 0 also trains an undistributed copy on the whole batch: with a mean loss over
equal halves, distributed training must reproduce it. Results go to ``out/`` as files the test
process checks; any exception is written to ``out/error<rank>.txt``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora_param import (
    adapter_parameters,
    add_lora,
    list_adapters,
    lora_disabled,
    lora_state_dict,
    save_lora,
    set_active_adapters,
)
from lora_param.interop.peft import export_peft

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sharded_worker.py
import sharded_worker  # noqa: E402

STEPS = 4
LR = 0.5


def make_base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def make_lora(base: nn.Module, seed: int) -> nn.Module:
    """The trained adapter on every Linear, plus a second adapter that stays inactive."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    add_lora(model, ["0", "2", "4"], rank=2)
    add_lora(model, ["0", "2"], rank=2, adapter="spare")
    set_active_adapters(model, ["default"])  # "spare" is disabled, hence frozen
    return model


def shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 16, generator=g), torch.randint(0, 4, (6,), generator=g)


def eval_input() -> torch.Tensor:
    return torch.randn(5, 16, generator=torch.Generator().manual_seed(7))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _base_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _train_reference(ref: nn.Module, world: int, steps: int) -> None:
    opt = torch.optim.SGD(adapter_parameters(ref, "default"), lr=LR)
    for step in range(steps):
        xs, ys = zip(*(shard(r, step) for r in range(world)))
        opt.zero_grad()
        F.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()


def ddp_phase(rank: int, world: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    base = make_base()
    model = make_lora(
        base, seed=100 + rank
    )  # different A on each rank: DDP must broadcast rank 0's
    ddp = DDP(model)  # find_unused_parameters=False: a disabled adapter must not trip it
    ref = copy.deepcopy(model)  # after the broadcast: the same start as rank 0
    before = _base_snapshot(model)
    spare_before = _flat(adapter_parameters(model, "spare"))
    opt = torch.optim.SGD(adapter_parameters(model, "default"), lr=LR)
    identical_every_step = []
    for step in range(STEPS):
        flat = _flat(adapter_parameters(model, "default"))
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical_every_step.append(all(torch.equal(gathered[0], g) for g in gathered))
        x, y = shard(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
    flat = _flat(adapter_parameters(model, "default"))
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical_every_step.append(all(torch.equal(gathered[0], g) for g in gathered))

    after = _base_snapshot(model)
    result = {
        "identical_every_step": identical_every_step,
        "base_unchanged": before.keys() == after.keys()
        and all(torch.equal(before[k], after[k]) for k in before),
        "spare_unchanged": torch.equal(spare_before, _flat(adapter_parameters(model, "spare"))),
        "trained": not torch.equal(_flat(adapter_parameters(ref, "default")), flat),
    }
    _train_reference(ref, world, STEPS)
    result["max_diff_vs_single_process"] = float(
        (_flat(adapter_parameters(ref, "default")) - flat).abs().max()
    )
    model.eval()
    x = eval_input()
    with torch.no_grad():
        on = model(x)
        with lora_disabled(model):
            result["lora_off_equals_base"] = torch.equal(model(x), base(x))
    if rank == 0:
        save_lora(ddp.module, out / "ddp_adapter.pt")
        export_peft(ddp, out / "ddp_peft", adapter="default")  # looks through the DDP wrapper
        torch.save({"x": x, "on": on}, out / "ddp_outputs.pt")
    dist.barrier()
    return result


def toggle_phase(rank: int, world: int) -> dict:
    """Switching adapters after wrapping: DDP needs find_unused_parameters=True for that."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    add_lora(model, rank=2, adapter="a")
    add_lora(model, rank=2, adapter="b")
    ddp = DDP(model, find_unused_parameters=True)
    opt = torch.optim.SGD(adapter_parameters(model), lr=0.1)
    b_after_switch = None
    for step in range(4):
        if step == 2:
            set_active_adapters(model, ["a"])
            b_after_switch = _flat(adapter_parameters(model, "b"))
        g = torch.Generator().manual_seed(step * 10 + rank)
        opt.zero_grad()
        ddp(torch.randn(4, 8, generator=g)).pow(2).mean().backward()
        opt.step()
    flat = _flat(adapter_parameters(model))
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {
        "completed": True,
        "b_frozen_after_switch": torch.equal(b_after_switch, _flat(adapter_parameters(model, "b"))),
        "identical": all(torch.equal(gathered[0], t) for t in gathered),
    }


def fsdp2_phase(rank: int, world: int, out: Path) -> dict:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return {"skipped": "torch.distributed.fsdp.fully_shard is not available in this torch"}

    base = make_base()
    model = make_lora(base, seed=100)  # FSDP2 shards each rank's local values: same init everywhere
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = type(model[0].parametrizations.weight.original).__name__
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    x_eval = eval_input()
    with torch.no_grad():
        model(x_eval)  # an evaluation before training (fills any cache)
    for step in range(STEPS):
        x, y = shard(rank, step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    full = {
        k: v.full_tensor() if hasattr(v, "full_tensor") else v
        for k, v in lora_state_dict(model).items()
    }
    _train_reference(ref, world, STEPS)
    expected = lora_state_dict(ref)
    result = {
        "sharded_type": sharded,
        "n_trainable": n_trainable,
        "max_diff_vs_single_process": max(
            float((full[k] - expected[k]).abs().max()) for k in expected
        ),
    }
    model.eval()
    with torch.enable_grad():
        on_grad = model(x_eval).detach()
    with torch.no_grad():
        on_no_grad = model(x_eval)
        ref_on = ref(x_eval)
        with lora_disabled(model):
            result["lora_off_equals_base"] = torch.equal(model(x_eval), base(x_eval))
    result["eval_grad_enabled_max_diff"] = float((on_grad - ref_on).abs().max())
    result["eval_no_grad_max_diff"] = float((on_no_grad - ref_on).abs().max())
    # save_lora / export_peft on the sharded model: collectives, rank 0 writes
    save_lora(model, out / "fsdp2_adapter.pt")
    export_peft(model, out / "fsdp2_peft", adapter="default")
    if rank == 0:
        save_lora(ref, out / "fsdp2_reference.pt")
        torch.save({"x": x_eval, "on": ref_on}, out / "fsdp2_outputs.pt")
    result.update(_fsdp2_load_and_refusals(rank, world, out, base, mesh, x_eval, ref_on))
    dist.barrier()
    return result


def _fsdp2_load_and_refusals(rank, world, out, base, mesh, x_eval, ref_on) -> dict:
    """load_lora into a sharded model; merging, removing or adding adapters on shards is refused."""
    from torch.distributed.fsdp import fully_shard

    from lora_param import LoRAError, load_lora, merge_lora, remove_lora

    result = {}
    fresh = make_lora(base, seed=999)  # other initial A: the file must overwrite every shard
    for i in (0, 2, 4):
        fully_shard(fresh[i], mesh=mesh)
    fully_shard(fresh, mesh=mesh)
    load_lora(fresh, out / "fsdp2_adapter.pt")
    fresh.eval()
    with torch.no_grad():
        result["sharded_load_max_diff"] = float((fresh(x_eval) - ref_on).abs().max())
    before = {k: v.to_local().clone() for k, v in fresh.state_dict().items()}
    errors = []
    for change in (merge_lora, remove_lora, lambda m: add_lora(m, rank=2, adapter="more")):
        try:
            change(fresh)
        except LoRAError as exc:
            errors.append(str(exc))
    bare = make_base()
    fully_shard(bare, mesh=mesh)
    try:
        load_lora(bare, out / "fsdp2_adapter.pt")
    except LoRAError as exc:
        errors.append(str(exc))
    after = fresh.state_dict()
    result["refusals"] = errors
    result["unchanged_after_refusal"] = before.keys() == after.keys() and all(
        torch.equal(before[k], after[k].to_local()) for k in before
    )
    result["bare_has_no_adapter"] = not list_adapters(bare)
    return result


def one_rank_only_phase(rank: int, world: int) -> dict:
    """save_lora on a sharded model called by rank 0 alone: a LoRAError, not a hang. Last phase:
    the timed-out barrier leaves the process group unusable."""
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_param import LoRAError
    from lora_param.core import distributed

    distributed.CHECK_IN_TIMEOUT = timedelta(seconds=2)
    mesh = init_device_mesh("cpu", (world,))  # on every rank: may communicate
    dist.barrier()
    message = ""
    if rank == 0:
        model = make_lora(make_base(), seed=1)
        fully_shard(model, mesh=mesh)
        try:
            save_lora(model, "never-written.pt")
        except LoRAError as exc:
            message = str(exc)
    return {"message": message}


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    out = Path(out_dir)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        results = {}
        if fsdp2_available():  # first, in the fresh processes: it measures RSS
            results["memory"] = sharded_worker.memory_phase(rank, out)
        results["ddp"] = ddp_phase(rank, world, out)
        results["toggle"] = toggle_phase(rank, world)
        results["fsdp2"] = fsdp2_phase(rank, world, out)
        if "skipped" not in results["fsdp2"]:
            results["qlora"] = sharded_worker.qlora_phase(rank, world, out)
            results["merged"] = sharded_worker.merged_phase(rank, out)
            results["entry_points"] = sharded_worker.entry_points_phase(rank, out)
            results["one_rank"] = one_rank_only_phase(rank, world)
        (out / f"result{rank}.json").write_text(json.dumps(results))
    except BaseException:
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
