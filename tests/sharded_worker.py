"""FSDP2 phases of tests/ddp_worker.py: a packed (QLoRA) base, merged export, every entry point.

Run on both ranks of the spawn in tests/test_distributed.py (2 CPU processes, gloo), each
phase returning what the ranks recorded (numbers, messages) and writing files under ``out/``
that the test process compares with single-process ones (rank 0 writes those from an
unsharded copy of the same model):

* :func:`memory_phase` runs first, in the fresh processes: ``save_merged`` of an FSDP2 model
  of 8 layers of 16 MiB, with rank 0's peak RSS during the call;
* :func:`qlora_phase`: NF4 / int8 bases (``add_lora(quantize=)`` and ``quantize_base`` then
  ``add_lora``) under ``fully_shard``: the packed tensors are sharded, 6 AdamW steps follow a
  single process that sees both ranks' batches, ``save_lora`` / ``load_lora`` / ``save_merged``;
* :func:`merged_phase`: ``save_merged`` of a sharded model with a packed base, DoRA and a
  trained head; split files; a failure on rank 0 raised on every rank;
* :func:`entry_points_phase`: what every other entry point does on a sharded model.
"""

from __future__ import annotations

import copy
import ctypes
import gc
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lora_param import (
    LoRAError,
    adapter_parameters,
    add_lora,
    combine_adapters,
    dequantize_base,
    export_kohya,
    export_peft,
    hotswap_lora,
    import_kohya,
    import_peft,
    iter_lora,
    list_adapters,
    load_lora,
    merge_lora,
    merged_state_dict,
    mixed_adapters,
    prepare_hotswap,
    quantize_base,
    save_lora,
    save_merged,
    set_active_adapters,
)

BIG_LAYERS, BIG_WIDTH = 8, 2048  # 8 Linear layers of 2048 x 2048 float32: 16 MiB each
QLORA_STEPS = 6
QLORA_SETUPS = ("nf4", "int8", "quantize_base")
LR = 1e-2


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def shard(model: nn.Sequential, mesh) -> nn.Sequential:
    """``fully_shard`` on every layer with parameters, then on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Give every adapter tensor a deterministic nonzero change (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if any(k in _ for k in ("lora_B", "lora_magnitude", ".value")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# ---- 8 x 16 MiB: save_merged's memory --------------------------------------------------------


def make_big() -> nn.Sequential:
    """8 bias-free Linear layers of 16 MiB with LoRA rank 4 everywhere, B nonzero."""
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(BIG_WIDTH, BIG_WIDTH, bias=False) for _ in range(BIG_LAYERS)))
    torch.manual_seed(1)
    add_lora(model, rank=4)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, _, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.01)
    return model


def big_input() -> torch.Tensor:
    return torch.randn(4, BIG_WIDTH, generator=torch.Generator().manual_seed(3))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_phase(rank: int, out: Path) -> dict:
    """save_merged of the sharded 8 x 16 MiB model; RSS growth of each rank during the call.

    glibc is told to map blocks of 1 MiB and more directly (and unmap them when freed), so
    RSS follows what is alive rather than what the heap kept; the peak is reset just before
    the call (``/proc/self/clear_refs``).
    """
    if not Path("/proc/self/clear_refs").exists():
        return {"unavailable": "no /proc/self/clear_refs (Linux only)"}
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # glibc's M_MMAP_THRESHOLD: fixed at 1 MiB
    model = make_big()
    if rank == 0:
        with torch.no_grad():
            torch.save(model(big_input()), out / "big_outputs.pt")  # LoRA on, unsharded
    shard(model, _mesh())
    gc.collect()
    dist.barrier()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    save_merged(model, out / "big_merged")
    peak = _status_kb("VmHWM")
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    dist.barrier()
    return {
        "rss_before_kb": before,
        "peak_kb": peak,
        "growth_bytes": (peak - before) * 1024,
        "layer_bytes": BIG_WIDTH * BIG_WIDTH * 4,
        "held_bytes": held,
    }


# ---- QLoRA + FSDP2 ----------------------------------------------------------------------------


def make_qbase() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    )


def make_qlora(setup: str, seed: int = 5) -> nn.Sequential:
    """The QLoRA model of a setup: the order is quantize, add_lora (then fully_shard)."""
    model = make_qbase()
    torch.manual_seed(seed)
    if setup == "quantize_base":
        quantize_base(model, method="nf4")
        add_lora(model, ["0", "2", "4"], rank=4)
    else:
        add_lora(model, ["0", "2", "4"], rank=4, quantize=setup)
    return model


def qbatch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(6, 64, generator=g), torch.randint(0, 4, (6,), generator=g)


def qinput() -> torch.Tensor:
    return torch.randn(5, 64, generator=torch.Generator().manual_seed(11))


def _packed_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this rank holds, bytes of the whole tensors) of the packed base tensors."""
    local = whole = 0
    for name, p in model.named_parameters():
        if ".original" in name and not p.is_floating_point():
            local += p.to_local().numel() * p.element_size()
            whole += p.numel() * p.element_size()
    return local, whole


def qlora_phase(rank: int, world: int, out: Path) -> dict:
    mesh = _mesh()
    results = {}
    for setup in QLORA_SETUPS:
        model = make_qlora(setup)
        ref = copy.deepcopy(model)
        shard(model, mesh)
        local, whole = _packed_bytes(model)
        opt = torch.optim.AdamW(adapter_parameters(model), lr=LR)
        ref_opt = torch.optim.AdamW(adapter_parameters(ref), lr=LR)
        losses, ref_losses = [], []
        for step in range(QLORA_STEPS):
            x, y = qbatch(rank, step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world)
            xs, ys = zip(*(qbatch(r, step) for r in range(world)))
            ref_opt.zero_grad()
            ref_loss = F.cross_entropy(ref(torch.cat(xs)), torch.cat(ys))
            ref_loss.backward()
            ref_opt.step()
            ref_losses.append(float(ref_loss))
        model.eval()
        ref.eval()
        x = qinput()
        with torch.no_grad():
            want = ref(x)
            eval_diff = float((model(x) - want).abs().max())
        save_lora(model, out / f"qlora_{setup}.pt")
        load_diff = None
        if setup != "quantize_base":  # the same NF4 storage as "nf4": trained and saved only
            save_merged(model, out / f"qlora_{setup}_merged")
            fresh = shard(make_qlora(setup, seed=99), mesh)  # other initial A: the file decides
            load_lora(fresh, out / f"qlora_{setup}.pt")
            fresh.eval()
            with torch.no_grad():
                load_diff = float((fresh(x) - want).abs().max())
        if rank == 0:
            save_lora(ref, out / f"qlora_{setup}_ref.pt")
            save_merged(ref, out / f"qlora_{setup}_ref_merged")
            torch.save({"x": x, "on": want}, out / f"qlora_{setup}_outputs.pt")
        dist.barrier()
        results[setup] = {
            "sharded": type(model[0].parametrizations.weight.original0).__name__,
            "packed_local_bytes": local,
            "packed_bytes": whole,
            "losses": losses,
            "reference_losses": ref_losses,
            "eval_max_diff": eval_diff,
            "sharded_load_max_diff": load_diff,
        }
    return results


# ---- save_merged: a packed base, DoRA, a trained head -------------------------------------------


def make_mixed() -> nn.Sequential:
    """NF4 + LoRA on 0, DoRA on 2, an adapter training head 4 in full; nonzero updates."""
    model = make_qbase()
    torch.manual_seed(7)
    add_lora(model, ["0"], rank=4, quantize="nf4")
    add_lora(model, ["2"], rank=4, variant="dora", adapter="d", trainable=["4"])
    return perturb(model, seed=8)


def merged_phase(rank: int, out: Path) -> dict:
    model = make_mixed()
    ref = copy.deepcopy(model)
    shard(model, _mesh())
    save_merged(model, out / "mixed_merged")
    save_merged(model, out / "mixed_merged_d", adapter="d")
    save_merged(model, out / "mixed_merged_split", max_shard_size=40_000)
    if rank == 0:
        save_merged(ref, out / "mixed_ref_merged")
        x = qinput()
        with torch.no_grad():
            on = ref(x)
            set_active_adapters(ref, "d")
            only_d = ref(x)
        torch.save({"x": x, "on": on, "only_d": only_d}, out / "mixed_outputs.pt")
    (out / "not_a_folder").write_text("a file")
    dist.barrier()
    failures = []
    try:  # rank 0 cannot write: every rank hears it (no hang, no half-written file)
        save_merged(model, out / "not_a_folder")
    except LoRAError as exc:
        failures.append(str(exc))
    dist.barrier()
    return {"failures": failures}


# ---- every entry point on a sharded model -----------------------------------------------------


def make_plain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def make_two(seed: int = 3) -> nn.Sequential:
    """LoRA "default" on 0, 2, 4 and LoRA "b" on 0, 2: stackable in mixed batches."""
    model = make_plain()
    torch.manual_seed(seed)
    add_lora(model, ["0", "2", "4"], rank=2)
    add_lora(model, ["0", "2"], rank=2, adapter="b")
    return model


def _refusal(call) -> str:
    try:
        call()
    except LoRAError as exc:
        return str(exc)
    except Exception as exc:  # recorded for the test to fail on: never a raw error
        return f"RAW {type(exc).__name__}: {exc}"
    return "accepted"


def _local(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.to_local().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def entry_points_phase(rank: int, out: Path) -> dict:
    mesh = _mesh()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    rec: dict = {}

    # files from single-process models: two adapters, PEFT and kohya folders of "b"
    source = perturb(make_two(), seed=4)
    if rank == 0:
        save_lora(source, out / "ep_b.pt", adapter="b")
        export_peft(source, out / "ep_peft", adapter="b")
        export_kohya(source, out / "ep_b.safetensors", adapter="b")
    dist.barrier()

    # hotswap_lora (prepared before fully_shard) and mixed_adapters; refusals leave it unchanged
    model = perturb(make_two(), seed=6)
    prepare_hotswap(model, max_rank=4)
    ref = copy.deepcopy(model).eval()
    shard(model, mesh).eval()
    before = _local(model)
    rec["import_peft"] = _refusal(lambda: import_peft(model, out / "ep_peft", adapter="c"))
    rec["import_kohya"] = _refusal(
        lambda: import_kohya(model, out / "ep_b.safetensors", adapter="c")
    )
    rec["combine_adapters"] = _refusal(lambda: combine_adapters(model, {"default": 1.0}, "sum"))
    rec["prepare_hotswap"] = _refusal(lambda: prepare_hotswap(model, max_rank=8))
    rec["quantize_base"] = _refusal(lambda: quantize_base(model))
    rec["merge_lora"] = _refusal(lambda: merge_lora(model))
    rec["merged_state_dict"] = _refusal(lambda: merged_state_dict(model))
    rec["unchanged_after_refusals"] = _same(before, _local(model)) and list_adapters(model) == [
        "default",
        "b",
    ]
    names = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        with mixed_adapters(model, names):
            got = model(x)
        with mixed_adapters(ref, names):
            want = ref(x)
    rec["mixed_max_diff"] = float((got - want).abs().max())
    with torch.no_grad():
        model(x)  # a no_grad evaluation before the swap (fills any cache)
        hotswap_lora(model, out / "ep_b.pt", adapter="default")
        hotswap_lora(ref, out / "ep_b.pt", adapter="default")
        set_active_adapters(model, "default")
        set_active_adapters(ref, "default")
        rec["hotswap_max_diff"] = float((model(x) - ref(x)).abs().max())
        with mixed_adapters(model, names):  # the stacks follow the swap
            got = model(x)
        with mixed_adapters(ref, names):
            want = ref(x)
        rec["mixed_after_swap_max_diff"] = float((got - want).abs().max())

    # load_lora into a sharded model after a no_grad evaluation: the cache must not serve the old
    model = shard(make_two(), mesh).eval()
    fresh = make_two().eval()
    with torch.no_grad():
        model(x)
        load_lora(model, out / "ep_b.pt")
        load_lora(fresh, out / "ep_b.pt")
        rec["load_after_eval_max_diff"] = float((model(x) - fresh(x)).abs().max())

    # the root alone sharded, after a no_grad forward: FSDP2 keeps its parameters gathered
    # (plain tensors) until the next backward; they are still FSDP2's to replace
    from torch.distributed.fsdp import fully_shard

    root_only = make_two()
    fully_shard(root_only, mesh=mesh)
    with torch.no_grad():
        root_only(x)
    rec["gathered_plain"] = type(root_only[0].parametrizations.weight.original).__name__
    rec["gathered_add_lora"] = _refusal(lambda: add_lora(root_only, ["0"], adapter="more"))
    rec["gathered_merge_lora"] = _refusal(lambda: merge_lora(root_only))
    rec["gathered_adapters"] = list_adapters(root_only)

    # DoRA: the magnitude is gathered by every writer
    dora = make_plain()
    torch.manual_seed(9)
    add_lora(dora, ["0", "2", "4"], rank=2, variant="dora")
    perturb(dora, seed=10)
    dora_ref = copy.deepcopy(dora)
    shard(dora, mesh)
    save_lora(dora, out / "ep_dora.pt")
    export_peft(dora, out / "ep_dora_peft")
    export_kohya(dora, out / "ep_dora.safetensors")
    if rank == 0:
        save_lora(dora_ref, out / "ep_dora_ref.pt")
        export_peft(dora_ref, out / "ep_dora_ref_peft")
        export_kohya(dora_ref, out / "ep_dora_ref.safetensors")
    dist.barrier()

    # PiSSA: its frozen start is a buffer (never sharded) beside sharded factors
    pissa = make_plain()
    add_lora(pissa, ["0", "2"], rank=2, init="pissa")
    perturb(pissa, seed=11)
    pissa_ref = copy.deepcopy(pissa)
    shard(pissa, mesh)
    export_kohya(pissa, out / "ep_pissa.safetensors")
    save_merged(pissa, out / "ep_pissa_merged")
    if rank == 0:
        export_kohya(pissa_ref, out / "ep_pissa_ref.safetensors")
        save_merged(pissa_ref, out / "ep_pissa_ref_merged")
    dist.barrier()

    # a packed base: nothing reads the packed shards outside a forward
    packed = shard(make_qlora("nf4"), mesh)
    rec["packed_add_lora"] = _refusal(lambda: add_lora(packed, ["0"], adapter="more"))
    rec["packed_quantize_base"] = _refusal(lambda: quantize_base(packed))
    rec["packed_dequantize_base"] = _refusal(lambda: dequantize_base(packed))
    rec["packed_load_new"] = _refusal(
        lambda: load_lora(packed, out / "qlora_nf4.pt", as_adapter="new")
    )
    rec["packed_adapters"] = list_adapters(packed)
    dist.barrier()
    return rec
