#!/usr/bin/env python
"""Memory per rank: LoRA training of a Llama under FSDP2 (2 CPU ranks, gloo) vs one process.

    python benchmarks/bench_distributed.py            # 8-layer Llama, hidden 768 (~100 M params)
    python benchmarks/bench_distributed.py --quick    # smoke run (tiny Llama, 2 steps)
    python benchmarks/bench_distributed.py --markdown # also print the markdown table (docs)
    python benchmarks/bench_distributed.py --nf4-only # only the rows with an NF4 (QLoRA) base

Each setup runs in fresh processes: ``one process`` (``python`` on this script) and ``FSDP2``
(``torchrun --standalone --nproc-per-node 2``: ``fully_shard`` on every decoder layer, then on
the root). The model is a random-weight ``LlamaForCausalLM`` in float32 with plain LoRA (rank
16 on q/k/v/o), frozen base, AdamW on the adapters, the same per-rank batch (2 x 128 tokens)
in both setups: every rank of the FSDP2 job does what the single process does, on its own
data.

Per rank (the largest over ranks), in MB:
- "params": parameters this rank holds outside a forward pass (for FSDP2, its shards:
  ``to_local()``);
- "after setup": RSS once the model is built, adapted and sharded (the full model was built
  first, then sharded; the freed halves go back to the OS);
- "peak training": the RSS high-water mark during the steps, reset after setup
  (``/proc/self/clear_refs``); "peak - imports": the same less the RSS of the process after its
  imports (torch, transformers), before the model was built;
- "step s": the median step time (CPU, one thread per rank; for orientation only).

Both setups run twice: with glibc's default allocator settings and with
``MALLOC_MMAP_THRESHOLD_=1048576``; then once more each with a QLoRA base (``quantize="nf4"``
on q/k/v/o and the MLP projections: the order is quantize, add_lora, fully_shard) under the
second setting. FSDP2 allocates and frees every layer's gathered weights
in each forward and backward; by default glibc keeps freed blocks under 32 MB in the heap
(its mmap threshold grows with use), so RSS keeps them and the peak reflects the allocator as
much as the sharding. With blocks of 1 MiB and more mapped and unmapped directly, RSS follows
what is alive. (CUDA's caching allocator on a GPU is another story: measure there.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

SIZES = {
    "default": {"hidden": 1024, "layers": 12, "intermediate": 2816, "vocab": 8000, "heads": 16},
    "quick": {"hidden": 64, "layers": 2, "intermediate": 128, "vocab": 512, "heads": 4},
}
TARGETS = ["*.q_proj", "*.k_proj", "*.v_proj", "*.o_proj"]
RANK = 16
BATCH, TOKENS = 2, 128
#: glibc returns blocks of at least this size to the OS when freed (MALLOC_MMAP_THRESHOLD_).
MMAP_THRESHOLD = 1 << 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


#: Layers a QLoRA run stores packed (NF4): the adapted projections and the MLP.
PACKED = [*TARGETS, "*.gate_proj", "*.up_proj", "*.down_proj"]


def worker(size: str, steps: int, out: Path, quantize: str | None = None) -> None:
    """One rank (or the single process): build, adapt, shard, train; write its numbers."""
    import gc

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lora_param import adapter_parameters, add_lora, quantize_base

    torch.set_num_threads(1)
    llama, llama_config = transformers.LlamaForCausalLM, transformers.LlamaConfig  # lazy imports
    imports = _status_kb("VmRSS")
    distributed = "RANK" in os.environ
    if distributed:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    s = SIZES[size]
    config = llama_config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=TOKENS,
    )
    torch.manual_seed(0)
    model = llama(config)
    total_params = sum(p.numel() for p in model.parameters())  # before any packing
    if quantize is not None:
        quantize_base(model, PACKED, method=quantize)
    add_lora(model, TARGETS, rank=RANK)
    if distributed:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.model.embed_tokens, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: final norm and lm_head
    held = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
        for p in model.parameters()
    )
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, s["vocab"], (BATCH, TOKENS), generator=gen)
    gc.collect()
    after_setup = _status_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, loss
        times.append(time.perf_counter() - start)
    peak = _status_kb("VmHWM")
    record = {
        "rank": rank,
        "params_bytes": held,
        "total_params": total_params,
        "imports_kb": imports,
        "after_setup_kb": after_setup,
        "peak_kb": peak,
        "step_s": statistics.median(times),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def _run(
    setup: str, size: str, steps: int, mmap_threshold: int | None, quantize: str | None = None
) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    with tempfile.TemporaryDirectory() as tmp:
        args = [__file__, "--worker", "--size", size, "--steps", str(steps), "--out", tmp]
        if quantize is not None:
            args += ["--quantize", quantize]
        if setup == "fsdp2":
            launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
            command = [sys.executable, *launcher, *args]
        else:
            command = [sys.executable, *args]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"{setup} failed ({proc.returncode})")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


#: The table: (column, unit, format spec); MB are per rank, the larger of the ranks.
COLUMNS = [
    ("setup", "", ""),
    ("malloc", "", ""),
    ("params", "MB", ",.0f"),
    ("after setup", "MB", ",.0f"),
    ("peak training", "MB", ",.0f"),
    ("peak - imports", "MB", ",.0f"),
    ("step", "s", ".2f"),
]


def _results_writer() -> Any:
    """benchmarks/_results.py where the checkout has it (the shared results files), else None."""
    if not (HERE / "_results.py").exists():
        return None
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import _results

    return _results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama, 2 steps")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--nf4-only", action="store_true", help="only the NF4-base rows (mmap >= 1 MiB)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default=None, help=argparse.SUPPRESS)
    writer = _results_writer()
    if writer is not None:
        writer.add_results_argument(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args.size, args.steps, args.out, args.quantize)
        return
    size = "quick" if args.quick else "default"
    steps = args.steps or (2 if args.quick else 4)
    s = SIZES[size]
    rows: list[dict[str, Any]] = []
    runs = [("single", "one process", 1), ("fsdp2", "FSDP2, 2 ranks", 2)]
    plan = [
        (threshold, allocator, setup, label, ranks, None)
        for threshold, allocator in ((None, "glibc default"), (MMAP_THRESHOLD, "mmap >= 1 MiB"))
        for setup, label, ranks in runs
    ]
    plan = [] if args.nf4_only else plan
    plan += [
        (MMAP_THRESHOLD, "mmap >= 1 MiB", setup, f"{label}, NF4 base", ranks, "nf4")
        for setup, label, ranks in runs
    ]
    for threshold, allocator, setup, label, ranks, quantize in plan:
        records = _run(setup, size, steps, threshold, quantize)
        assert len(records) == ranks, records
        rows.append(
            {
                "setup": label,
                "malloc": allocator,
                "params": max(r["params_bytes"] for r in records) / 2**20,
                "after setup": max(r["after_setup_kb"] for r in records) / 1024,
                "peak training": max(r["peak_kb"] for r in records) / 1024,
                "peak - imports": max(r["peak_kb"] - r["imports_kb"] for r in records) / 1024,
                "step": max(r["step_s"] for r in records),
            }
        )
        total = records[0]["total_params"]
    header = (
        f"Llama, hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}: "
        f"{total / 1e6:.1f} M params float32; LoRA rank {RANK} on q/k/v/o; batch {BATCH} x "
        f"{TOKENS} tokens per rank; {steps} AdamW steps; CPU, gloo, 1 thread per rank"
    )
    print(header)
    names = [f"{c} {u}".strip() if u == "s" else c for c, u, _ in COLUMNS]
    cells = [[format(row[c], spec) for c, _, spec in COLUMNS] for row in rows]
    widths = [max(len(n), *(len(r[i]) for r in cells)) for i, n in enumerate(names)]
    print("  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)) + "   (MB per rank)")
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    if args.markdown:
        print()
        print("| " + " | ".join(names) + " |")
        print("|" + "|".join(" --- " for _ in names) + "|")
        for r in cells:
            print("| " + " | ".join(r) + " |")
    if writer is not None:
        # --nf4-only writes its own part: it never replaces the full run's file.
        part = "nf4" if args.nf4_only else None
        results = writer.Results("bench_distributed", __doc__, args, threads=1, part=part)
        columns = [writer.Column(c, u, spec) for c, u, spec in COLUMNS]
        results.table("memory per rank", columns, rows, title=header)
        results.write(args.results_dir)


if __name__ == "__main__":
    main()
