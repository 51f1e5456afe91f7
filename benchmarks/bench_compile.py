#!/usr/bin/env python
"""Training step of a LoRA'd MNIST MLP, eager vs ``torch.compile``.

    python benchmarks/bench_compile.py                      # batch 10 and 256, factored mode
    python benchmarks/bench_compile.py --modes factored materialized --repeats 15
    python benchmarks/bench_compile.py --markdown           # also print a markdown table
    python benchmarks/bench_compile.py --quick              # smoke run (batch 10, 2 short blocks)

Model: the tutorial's MLP 784-1000-2000-10 with LoRA rank 1 on its three Linear layers
(``add_lora(model, rank=1)``), base frozen. Training step = forward + cross-entropy + backward +
AdamW step on the adapter parameters. ``torch.compile`` compiles the model (default inductor
backend); the optimizer step is eager in both variants.

Method: both variants live in this process, start from the same weights and see the same data
(random MNIST-shaped batches, made up front). After warm-up (which includes compilation, timed
separately), each repeat times a block of steps of each variant, alternating which one goes
first; the reported figure is the median over repeats of the per-step time, and the ratio is
eager / compiled (> 1: compile is faster).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import Column, Results, add_results_argument

from lora_param import adapter_parameters, add_lora


def mnist_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 1000),
        nn.ReLU(),
        nn.Linear(1000, 2000),
        nn.ReLU(),
        nn.Linear(2000, 10),
    )


def make_step(model: nn.Module, fn, opt):
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fn(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def bench(batch: int, mode: str, repeats: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    base = mnist_mlp()
    eager_model = add_lora(copy.deepcopy(base), rank=1, mode=mode)
    compiled_model = copy.deepcopy(eager_model)
    compiled_fn = torch.compile(compiled_model)
    steps_fn = {
        "eager": make_step(
            eager_model, eager_model, torch.optim.AdamW(adapter_parameters(eager_model), lr=1e-3)
        ),
        "compiled": make_step(
            compiled_model,
            compiled_fn,
            torch.optim.AdamW(adapter_parameters(compiled_model), lr=1e-3),
        ),
    }
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
        for _ in range(steps)
    ]

    t0 = time.perf_counter()
    first_compiled = steps_fn["compiled"](*data[0]).item()
    compile_s = time.perf_counter() - t0
    first_eager = steps_fn["eager"](*data[0]).item()  # keeps both variants on the same trajectory
    for _ in range(warmup):
        for name in steps_fn:
            for x, y in data:
                steps_fn[name](x, y)

    times = {name: [] for name in steps_fn}
    order = list(steps_fn)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            fn = steps_fn[name]
            t0 = time.perf_counter()
            for x, y in data:
                fn(x, y)
            times[name].append((time.perf_counter() - t0) / len(data))

    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "batch": batch,
        "mode": mode,
        "eager_ms": med["eager"] * 1e3,
        "compiled_ms": med["compiled"] * 1e3,
        "speedup": med["eager"] / med["compiled"],
        "compile_s": compile_s,
        "first_loss_diff": abs(first_eager - first_compiled),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 256])
    parser.add_argument(
        "--modes", nargs="+", default=["factored"], choices=["factored", "materialized"]
    )
    parser.add_argument(
        "--repeats", type=int, default=11, help="timed blocks per variant (median taken)"
    )
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: batch 10, 2 blocks of 2 steps"
    )
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.steps, args.warmup = [10], 2, 2, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    record = Results("bench_compile", __doc__, args, argv=argv)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; MLP 784-1000-2000-10, LoRA rank 1 on all Linear layers"
    )
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            row = bench(batch, mode, args.repeats, args.steps, args.warmup)
            rows.append(row)
            print(
                f"mode={row['mode']:<12} batch={row['batch']:<4} eager {row['eager_ms']:8.3f} ms/step  "
                f"compiled {row['compiled_ms']:8.3f} ms/step  ratio eager/compiled {row['speedup']:.2f}x  "
                f"(compile {row['compile_s']:.1f} s, |loss eager - compiled| at step 1: {row['first_loss_diff']:.1e})",
                flush=True,
            )
    record.table(
        "compile",
        [Column("mode"), Column("batch"), Column("eager", "ms/step", ".3f"),
         Column("compiled", "ms/step", ".3f"), Column("eager / compiled", "x"),
         Column("compile", "s", ".1f"), Column("|loss eager - compiled| at step 1", fmt=".1e")],
        [[r["mode"], r["batch"], r["eager_ms"], r["compiled_ms"], r["speedup"], r["compile_s"],
          r["first_loss_diff"]] for r in rows],
        title=f"Training step, median of {args.repeats} blocks of {args.steps} steps",
    )  # fmt: skip
    record.write(args.results_dir)
    if args.markdown:
        print()
        print("| mode | batch | eager ms/step | compiled ms/step | speed-up |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in rows:
            print(
                f"| {row['mode']} | {row['batch']} | {row['eager_ms']:.2f} | {row['compiled_ms']:.2f} "
                f"| {row['speedup']:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
