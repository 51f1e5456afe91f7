#!/usr/bin/env python
"""DoRA cost: lora_param's DoRA training step against its own LoRA step and against PEFT's DoRA.

    python benchmarks/bench_dora.py            # MLP and transformer-block models (~3 min)
    python benchmarks/bench_dora.py --quick    # smoke run (tiny models, few repeats)

Method
- time: every variant of a model lives in this process; each repeat times a few training
  steps (forward + backward + AdamW on the adapter parameters) of every variant, round-robin;
  the figure is the median over repeats. Evaluation: model.eval(), torch.no_grad(), one batch.
- memory: each (model, variant) runs in a fresh process; "train Δ MB" is the peak RSS
  (VmHWM, reset after the build through /proc/self/clear_refs) minus the RSS after the build,
  i.e. what the training steps add on top of the model.
- goals (from issue 11): DoRA step <= 1.3x our LoRA step; DoRA's Δ <= 1.1x LoRA's Δ plus one
  copy of the largest adapted weight; faster than PEFT's DoRA on the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(1, str(HERE.parent))

import torch  # noqa: E402
from _results import Column, Goal, Results, add_results_argument  # noqa: E402
from torch import nn  # noqa: E402

import lora_param as lp  # noqa: E402

VARIANTS = ("lora", "dora", "dora-materialized", "peft-lora", "peft-dora")


# --------------------------------------------------------------------------- models


class Block(nn.Module):
    """A pre-norm transformer MLP + attention-projection block made of Linear layers."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.proj(att @ v)
        return x + self.down(torch.relu(self.up(self.norm(x))))


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, list[str]]:
    """Model, input batch and target module names, deterministic."""
    torch.manual_seed(0)
    if name == "mlp":
        d, layers, batch = (128, 2, 16) if quick else (1024, 4, 64)
        model = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])
        return model, torch.randn(batch, d), [str(i) for i in range(layers)]
    d, layers, tokens = (64, 1, 32) if quick else (512, 2, 256)
    model = nn.Sequential(*[Block(d) for _ in range(layers)])
    targets = [f"{i}.{n}" for i in range(layers) for n in ("qkv", "proj", "up", "down")]
    return model, torch.randn(2, tokens, d), targets


def variant(base: nn.Module, targets: list[str], kind: str, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=kind == "peft-dora"
        )
        return get_peft_model(model, cfg)
    mode = "materialized" if kind.endswith("materialized") else "factored"
    return lp.add_lora(
        model, targets, rank=rank, alpha=2 * rank, use_dora=kind.startswith("dora"), mode=mode
    )


def perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or "lora_up" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, n: int) -> None:
    for _ in range(n):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


# --------------------------------------------------------------------------- memory worker


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(name: str, kind: str, quick: bool, rank: int, steps: int) -> None:
    """Print the RSS the training steps add (KB) as JSON; runs in its own process."""
    base, x, targets = build(name, quick)
    model = variant(base, targets, kind, rank)
    del base
    perturb(model)
    opt = optimizer(model)
    before = _rss_kb("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    train_steps(model, opt, x, steps)
    print(json.dumps({"delta_kb": _rss_kb("VmHWM") - before}))


def memory(name: str, kind: str, quick: bool, rank: int, steps: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--worker", name, kind, str(rank), str(steps)]
    if quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_kb"] / 1024


# --------------------------------------------------------------------------- timing


def timings(name: str, kinds: list[str], quick: bool, rank: int, repeats: int) -> dict:
    base, x, targets = build(name, quick)
    models = {k: variant(base, targets, k, rank) for k in kinds}
    for m in models.values():
        perturb(m)
    opts = {k: optimizer(m) for k, m in models.items()}
    for k in kinds:  # warm-up
        train_steps(models[k], opts[k], x, 2)
    train: dict[str, list[float]] = {k: [] for k in kinds}
    evals: dict[str, list[float]] = {k: [] for k in kinds}
    steps = 2 if quick else 3
    for r in range(repeats):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for k in order:
            t = time.perf_counter()
            train_steps(models[k], opts[k], x, steps)
            train[k].append((time.perf_counter() - t) / steps)
        for k in order:
            models[k].eval()
            with torch.no_grad():
                models[k](x)  # the eval cache fills on the first call
                t = time.perf_counter()
                for _ in range(steps):
                    models[k](x)
                evals[k].append((time.perf_counter() - t) / steps)
            models[k].train()
    largest = max(
        (
            m.weight.numel() * m.weight.element_size()
            for m in base.modules()
            if hasattr(m, "weight") and isinstance(m, nn.Linear)
        ),
        default=0,
    )
    return {
        "train": {k: statistics.median(v) for k, v in train.items()},
        "eval": {k: statistics.median(v) for k, v in evals.items()},
        "weight_mb": largest / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, few repeats")
    ap.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    add_results_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        name, kind, rank, steps = args.worker
        worker(name, kind, args.quick, int(rank), int(steps))
        return 0
    try:
        import peft  # noqa: F401

        kinds = list(VARIANTS)
    except ImportError:
        kinds = [k for k in VARIANTS if not k.startswith("peft")]
    repeats = args.repeats or (2 if args.quick else 7)
    record = Results("bench_dora", __doc__, args, argv=argv, threads=args.threads,
                     packages=("peft",))  # fmt: skip
    header = ["model", "variant", "train ms", "vs our LoRA", "eval ms", "train Δ MB"]
    rows, raw, goals = [], [], []
    for name in args.models:
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        res = timings(name, kinds, args.quick, args.rank, repeats)
        mem = {}
        if not args.no_memory:
            # --quick measures our two variants only (each worker is a fresh interpreter)
            for k in ["lora", "dora"] if args.quick else kinds:
                print(f"memory {name}/{k} ...", file=sys.stderr, flush=True)
                mem[k] = memory(name, k, args.quick, args.rank, 2)
        lora_t = res["train"]["lora"]
        for k in kinds:
            rows.append(
                [
                    name,
                    k,
                    f"{res['train'][k] * 1e3:.2f}",
                    f"{res['train'][k] / lora_t:.2f}x",
                    f"{res['eval'][k] * 1e3:.2f}",
                    f"{mem[k]:.1f}" if k in mem else "-",
                ]
            )
            raw.append(
                [name, k, res["train"][k] * 1e3, res["train"][k] / lora_t, res["eval"][k] * 1e3,
                 mem.get(k)]
            )  # fmt: skip
        ratio = res["train"]["dora"] / lora_t
        goals.append(
            Goal(
                ratio <= 1.3,
                f"{name}: DoRA step {ratio:.2f}x our LoRA (goal <= 1.3x)",
                f"{name}: DoRA training step vs our LoRA step",
                ratio,
                1.3,
                "x",
            )
        )
        if mem:
            budget = 1.1 * mem["lora"] + res["weight_mb"]
            goals.append(
                Goal(
                    mem["dora"] <= budget,
                    f"{name}: DoRA train Δ {mem['dora']:.1f} MB vs 1.1 x LoRA's "
                    f"{mem['lora']:.1f} + one weight {res['weight_mb']:.1f} = {budget:.1f} MB",
                    f"{name}: DoRA train Δ vs 1.1 × LoRA's + one weight",
                    mem["dora"],
                    budget,
                    "MB",
                )
            )
        if "peft-dora" in res["train"]:
            vs = res["train"]["peft-dora"] / res["train"]["dora"]
            goals.append(
                Goal(
                    vs > 1,
                    f"{name}: PEFT's DoRA step is {vs:.2f}x ours (goal > 1)",
                    f"{name}: PEFT's DoRA training step vs ours",
                    vs,
                    1.0,
                    "x",
                    ">",
                )
            )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    for ok, text, *_ in goals:
        print(("met   " if ok else "MISSED"), text)
    record.table(
        "dora",
        [Column("model"), Column("variant"), Column("train", "ms"), Column("vs our LoRA", "x"),
         Column("eval", "ms"), Column("train Δ", "MB", ".1f")],
        raw,
        title=f"Training step and evaluation, rank {args.rank}",
    )  # fmt: skip
    record.add_goals(goals)
    record.write(args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
