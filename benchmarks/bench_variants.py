#!/usr/bin/env python
"""Adapter variants' cost: training step and memory vs our LoRA and vs PEFT's same variant.

    python benchmarks/bench_variants.py                 # MLP and a transformer layer (~15 min)
    python benchmarks/bench_variants.py --quick         # smoke run (small models, few repeats)
    python benchmarks/bench_variants.py --models mlp --variants lora loha

Method
- models: the MNIST MLP of bench_lora (784-1000-2000-10, batch 256; adapters on its three
  Linear layers) and bench_lora's transformer encoder layer (d 768, 12 heads, FFN 3072, one
  layer, batch 4 x 128 tokens; adapters on the FFN's linear1 and linear2, since PEFT's LoHa,
  LoKr and OFT do not adapt nn.MultiheadAttention), built by benchmarks/_bench_models.py.
- variants, ours and PEFT's on the same layers with the same settings: lora (rank 8, alpha 8),
  dora (PEFT: LoraConfig(use_dora=True)), loha (LoHaConfig, rank 8), lokr (LoKrConfig, rank 8),
  oft-input (PEFT's OFT: OFTConfig(oft_block_size=b), Cayley-Neumann series; b = 8 on the MLP,
  32 on the transformer), oft-output (LyCORIS's diag-OFT: PEFT has none), pissa (the PiSSA
  start: init="pissa"; PEFT: init_lora_weights="pissa"). Adapter tensors that start at zero
  get small random values in both libraries, so every update is non-zero. A variant that is
  not registered in this lora_param (lora_param.variant_names()) is left out.
- time: every (variant, library) of a model lives in this process; each repeat times a block
  of training steps (forward + backward + AdamW on the adapter's parameters) of each,
  round-robin with a rotating start; the figure is the median over repeats. Rounds are not
  thrown away on a busy machine unless --busy-threshold says so: the load is recorded.
- memory: each (model, variant, library) in a fresh process (glibc mmap threshold fixed);
  "train Δ" is the peak RSS during the steps minus the RSS after the build (high-water mark
  reset through /proc/self/clear_refs), i.e. what training adds on top of the model.
- goal per variant and model: our training step <= PEFT's same variant. Each variant's ratio
  to our LoRA step is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(1, str(HERE.parent))

import _bench_models as bm  # noqa: E402
import torch  # noqa: E402
from _results import Column, Goal, Results, add_results_argument  # noqa: E402
from torch import nn  # noqa: E402

import lora_param as lp  # noqa: E402

#: Variants in table order, and the registered variant each needs on our side.
VARIANTS: dict[str, str] = {
    "lora": "lora",
    "dora": "dora",
    "loha": "loha",
    "lokr": "lokr",
    "oft-input": "oft",
    "oft-output": "oft",
    "pissa": "pissa",
}
#: OFT block sizes (they must divide the rotated dimension of every adapted layer).
OFT_BLOCKS = {"mlp": {"input": 8, "output": 10}, "transformer": {"input": 32, "output": 32}}
MODELS = ("mlp", "transformer")
LIBRARIES = ("ours", "peft")


# --------------------------------------------------------------------------- models


def make_spec(name: str, quick: bool) -> bm.Spec:
    """The model: bench_lora's MLP, or one layer of bench_lora's transformer encoder."""
    if name == "mlp":
        return bm.make_specs(quick)["mlp"][0 if quick else 1]  # batch 10 / batch 256
    if name != "transformer":
        raise ValueError(f"unknown model {name!r}: choose from {MODELS}")
    params = dict(bm.make_specs(quick)["transformer"][0].params)
    params.update(layers=1, batch=2, seq=16) if quick else params.update(layers=1, batch=4)
    desc = (
        f"TransformerEncoder layer (d{params['d_model']}, {params['nhead']}h, FFN "
        f"{params['ffn']}), batch {params['batch']}x{params['seq']} tokens"
    )
    return bm.Spec("transformer", "transformer", desc, 8, params)


def targets(spec: bm.Spec) -> list[str]:
    """The layers both libraries adapt."""
    if spec.family == "transformer":
        return [f"layers.{i}.{n}" for i in range(spec.params["layers"]) for n in
                ("linear1", "linear2")]  # fmt: skip
    return ["linear1", "linear2", "linear3"]


def available(variant: str) -> bool:
    """Whether this lora_param has the variant (LoHa and LoKr arrived in 0.3)."""
    return VARIANTS[variant] in lp.variant_names()


def add_ours(model: nn.Module, variant: str, spec: bm.Spec, rank: int) -> nn.Module:
    names = targets(spec)
    if variant.startswith("oft-"):
        side = variant.removeprefix("oft-")
        block = OFT_BLOCKS[spec.family][side]
        return lp.add_lora(model, names, rank=block, variant=lp.OFTConfig(side=side))
    if variant == "pissa":
        return lp.add_lora(model, names, rank=rank, alpha=rank, init="pissa")
    return lp.add_lora(model, names, rank=rank, alpha=rank, variant=variant)


def peft_config(variant: str, spec: bm.Spec, rank: int) -> Any | None:
    """PEFT's config of the same variant, or None where PEFT has none."""
    import peft

    names = targets(spec)
    if variant in ("lora", "dora", "pissa"):
        init: Any = "pissa" if variant == "pissa" else True
        return peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=names,
                               use_dora=variant == "dora", init_lora_weights=init)  # fmt: skip
    if variant == "loha":
        return peft.LoHaConfig(r=rank, alpha=rank, target_modules=names)
    if variant == "lokr":
        return peft.LoKrConfig(r=rank, alpha=rank, target_modules=names)
    if variant == "oft-input":
        block = OFT_BLOCKS[spec.family]["input"]
        return peft.OFTConfig(r=0, oft_block_size=block, target_modules=names)
    return None


@torch.no_grad()
def fill_zeros(model: nn.Module) -> None:
    """Small random values in every trainable tensor that starts at zero (same in both libraries,
    up to the tensors' names), so that no update is a zero."""
    g = torch.Generator().manual_seed(1)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def build(spec: bm.Spec, variant: str, library: str, rank: int, base: nn.Module | None = None):
    """A model with the variant added by ``library`` (on a copy of ``base``, or a fresh base)."""
    import copy

    model = spec.build_base() if base is None else copy.deepcopy(base)
    if library == "ours":
        model = add_ours(model, variant, spec, rank)
    else:
        import peft

        config = peft_config(variant, spec, rank)
        if config is None:
            raise ValueError(f"PEFT has no {variant}")
        model = peft.get_peft_model(model, config)
    fill_zeros(model)
    return model


def has_peft(variant: str) -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return variant != "oft-output"


# --------------------------------------------------------------------------- memory


def worker(model_name: str, variant: str, library: str, quick: bool, rank: int, steps: int) -> None:
    """Fresh process: build one (variant, library), run ``steps`` training steps, print JSON."""
    spec = make_spec(model_name, quick)
    model = build(spec, variant, library, rank)
    batch = spec.make_batch()
    gc.collect()
    build_peak = bm.maxrss_bytes()
    baseline = bm.rss_bytes() if bm.reset_peak_rss() else build_peak
    model.train()
    step = bm.TrainStep(spec, model, batch)
    for _ in range(steps):
        step()
    peak = bm.maxrss_bytes()
    print(json.dumps({"delta": peak - (baseline or 0), "peak": max(peak, build_peak)}))


def memory(model_name: str, variant: str, library: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--rank", str(args.rank),
           "--worker", model_name, variant, library, str(args.memory_steps)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {model_name}/{variant}/{library} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing


def timings(spec: bm.Spec, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Median training-step seconds and trainable counts per (variant, library)."""
    base = spec.build_base()
    batch = spec.make_batch()
    steps: dict[str, Callable[[], None]] = {}
    trainable: dict[str, int] = {}
    for variant in variants:
        for library in LIBRARIES:
            if library == "peft" and not has_peft(variant):
                continue
            model = build(spec, variant, library, args.rank, base)
            model.train()
            key = f"{library}:{variant}"
            trainable[key] = bm.trainable_count(model)
            steps[key] = bm.TrainStep(spec, model, batch)
    stats: dict[str, Any] = {}
    quick = args.quick
    result = bm.time_interleaved(
        steps,
        repeats=args.repeats or (2 if quick else 7),
        warmup=1,
        target_block_s=0.0 if quick or spec.family == "transformer" else 0.25,
        busy_threshold=args.busy_threshold,
        max_wait_s=args.max_wait,
        stats=stats,
    )
    return {
        "train": {k: t.median for k, t in result.items()},
        "trainable": trainable,
        "stats": stats,
    }


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _mb(x: dict | None, key: str) -> float | None:
    return None if x is None else x[key] / 2**20


def weight_mb(spec: bm.Spec) -> float:
    """The adapted weights' size: what one weight-sized update per layer takes (fp32)."""
    base = spec.build_base()
    return sum(base.get_submodule(n).weight.numel() for n in targets(spec)) * 4 / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small models, few repeats")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rank", type=int, default=8, help="rank of the LoRA-family variants")
    ap.add_argument("--repeats", type=int, help="timing rounds (default 7; --quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--memory-steps", type=int, default=3, help="training steps per memory run")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--busy-threshold", type=float, default=1.0,
                    help="rerun a timing round when other processes used more than this share "
                    "of the CPU (default 1.0: never; the load is recorded)")  # fmt: skip
    ap.add_argument("--max-wait", type=float, default=1.0, help="seconds to wait for a quiet CPU")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    add_results_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        name, variant, library, steps = args.worker
        worker(name, variant, library, args.quick, args.rank, int(steps))
        return 0
    variants = [v for v in args.variants if available(v)]
    missing = [v for v in args.variants if v not in variants]
    record = Results("bench_variants", __doc__, args, argv=argv, threads=args.threads,
                     packages=("peft",))  # fmt: skip
    rows: list[dict[str, Any]] = []
    goals: list[Goal] = []
    busy: list[str] = []
    for name in args.models:
        spec = make_spec(name, args.quick)
        print(f"timing {name}: {spec.desc} ...", file=sys.stderr, flush=True)
        res = timings(spec, variants, args)
        st = res["stats"]
        busy.append(
            f"{name}: other processes used {100 * st.get('others_mean', 0):.0f}% of the CPU on "
            f"average while timing (worst round {100 * st.get('others_max', 0):.0f}%), "
            f"{st.get('kept', 0)} rounds kept, {st.get('discarded', 0)} rerun"
        )
        mem: dict[str, dict | None] = {}
        if not args.no_memory:
            # --quick measures two runs only (each is a fresh interpreter): ours and PEFT's LoRA
            keys = ["ours:lora", "peft:lora"] if args.quick else list(res["train"])
            for key in keys:
                if key not in res["train"]:
                    continue
                library, variant = key.split(":")
                print(f"memory {name}/{variant}/{library} ...", file=sys.stderr, flush=True)
                mem[key] = memory(name, variant, library, args)
        train, count = res["train"], res["trainable"]
        lora_ours, lora_peft = train.get("ours:lora"), train.get("peft:lora")
        for variant in variants:
            ours, peft_t = train.get(f"ours:{variant}"), train.get(f"peft:{variant}")
            vs = _ratio(ours, peft_t)
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "trainable": count.get(f"ours:{variant}"),
                    "PEFT trainable": count.get(f"peft:{variant}"),
                    "ours": None if ours is None else ours * 1e3,
                    "PEFT": None if peft_t is None else peft_t * 1e3,
                    "ours / PEFT": vs,
                    "vs our LoRA": _ratio(ours, lora_ours),
                    "PEFT vs PEFT LoRA": _ratio(peft_t, lora_peft),
                    "ours train Δ": _mb(mem.get(f"ours:{variant}"), "delta"),
                    "PEFT train Δ": _mb(mem.get(f"peft:{variant}"), "delta"),
                }
            )
            if vs is not None:
                goals.append(
                    Goal(
                        vs <= 1.0,
                        f"{'PASS' if vs <= 1.0 else 'FAIL'}  {name}: {variant} step "
                        f"{ours * 1e3:.1f} ms vs PEFT's {peft_t * 1e3:.1f} ms ({vs:.2f}x, goal "
                        "<= 1)",
                        f"{name}: {variant} training step, ours / PEFT's",
                        vs,
                        1.0,
                        "x",
                    )
                )
    columns = [
        Column("model"), Column("variant"), Column("trainable"), Column("PEFT trainable"),
        Column("ours", "ms", ".1f"), Column("PEFT", "ms", ".1f"), Column("ours / PEFT", "x"),
        Column("vs our LoRA", "x"), Column("PEFT vs PEFT LoRA", "x"),
        Column("ours train Δ", "MB", ".1f"), Column("PEFT train Δ", "MB", ".1f"),
    ]  # fmt: skip
    _print(columns, rows)
    for g in goals:
        print(g.text)
    record.table(
        "variants",
        columns,
        rows,
        title=f"Training step per variant (rank {args.rank}; OFT block sizes "
        f"{OFT_BLOCKS['mlp']['input']}/{OFT_BLOCKS['mlp']['output']} on the MLP, "
        f"{OFT_BLOCKS['transformer']['input']} on the transformer), median ms",
    )
    record.add_goals(goals)
    sizes = ", ".join(
        f"{weight_mb(make_spec(n, args.quick)):.1f} MB on the {n}" for n in args.models
    )
    for text in [
        *busy,
        "ours / PEFT < 1: our step is faster; 'vs our LoRA' is each variant's step over our "
        "LoRA step in the same run.",
        "LoHa and LoKr build a weight-sized update ΔW wherever they materialize it: one per "
        f"adapted layer, kept for backward ({sizes} in fp32). PEFT's LoHa and LoKr layers form "
        "ΔW in every forward; ours compute LoHa as a rank-r² branch where "
        "r²·(fan_in + fan_out) <= fan_in·fan_out and LoKr through its two Kronecker factors, "
        "forming ΔW only elsewhere (see each variant's page): the step times and the train Δ "
        "columns show what each costs here.",
        "oft-output (LyCORIS's diag-OFT) has no PEFT counterpart; oft-input is PEFT's OFT "
        "(Cayley-Neumann series, 5 terms) on both sides.",
        *(f"{v}: not registered in this lora_param, left out" for v in missing),
    ]:
        record.note(text)
        print(text)
    record.write(args.results_dir)
    return 0


def _print(columns: list[Column], rows: list[dict[str, Any]]) -> None:
    def cell(value: Any, col: Column) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}x" if col.unit == "x" else format(value, col.fmt or ".2f")
        return f"{value:,}" if isinstance(value, int) else str(value)

    head = [c.name + (f" {c.unit}" if c.unit and c.unit != "x" else "") for c in columns]
    table = [head] + [[cell(r[c.name], c) for c in columns] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
