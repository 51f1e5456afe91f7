#!/usr/bin/env python
"""Mixed-adapter batches: one forward serving 8 adapters vs one adapter's forward vs PEFT.

    python benchmarks/bench_mixed.py            # the issue's setting (a few minutes on 2 cores)
    python benchmarks/bench_mixed.py --quick    # smoke run on a tiny model

Setting: a 4-layer pre-norm transformer with plain ``nn.Linear`` projections (q, k, v, o,
fc1, fc2; d_model 768, 12 heads, FFN 3072), 8 adapters of rank 16 on every linear layer, a
batch of 64 sequences of 32 tokens whose examples use the 8 adapters in turn. Evaluation
mode under ``torch.no_grad()``.

Variants (same base weights, same adapter tensors in both libraries):
- ``ours one``: ``set_active_adapters(model, "a0")``; forward (the cached ``W + sBA`` path).
- ``ours mixed``: ``with mixed_adapters(model, names): model(x)`` (entering the block is timed).
- ``peft one``: PEFT with the 8 adapters, ``set_adapter("a0")``.
- ``peft mixed``: PEFT's ``model(x, adapter_names=names)``.

Time: variants run round-robin with a rotating start; figure = median per-call time over the
repeats (after one warm-up call each). Memory: each variant in a fresh process; "peak +MB" is
the RSS high-water mark during one forward minus the RSS before it (/proc/self/clear_refs
reset), "stack MB" the stacked factors ``mixed_adapters`` caches. Goals: ours mixed <= 1.3x
ours one, and ours mixed faster than peft mixed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
import torch.nn.functional as F  # noqa: E402
from _results import Column, Goal, Results, add_results_argument  # noqa: E402
from torch import nn  # noqa: E402

from lora_param import add_lora, iter_lora, mixed_adapters, set_active_adapters  # noqa: E402

GOAL_VS_ONE = 1.3
SIZES = {
    "full": {
        "layers": 4,
        "d": 768,
        "heads": 12,
        "ffn": 3072,
        "batch": 64,
        "tokens": 32,
        "rank": 16,
    },
    "quick": {"layers": 2, "d": 64, "heads": 4, "ffn": 128, "batch": 16, "tokens": 8, "rank": 4},
}
ADAPTERS = [f"a{i}" for i in range(8)]


class Block(nn.Module):
    """Pre-norm transformer block whose projections are plain Linear layers."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(n, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ffn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_ours(size: dict) -> nn.Module:
    torch.manual_seed(0)
    model = Transformer(size["layers"], size["d"], size["heads"], size["ffn"]).eval()
    for name in ADAPTERS:
        add_lora(model, layer_types=nn.Linear, rank=size["rank"], adapter=name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for *_, p in iter_lora(model):
            p.lora_B.copy_(torch.randn(p.lora_B.shape, generator=g) * 0.02)
    return model


def build_peft(size: dict, ours: nn.Module) -> nn.Module:
    """PEFT on the same base weights with the same 8 adapters' tensors."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = Transformer(size["layers"], size["d"], size["heads"], size["ffn"]).eval()
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    cfg = LoraConfig(r=size["rank"], lora_alpha=size["rank"], target_modules=targets)
    model = get_peft_model(base, cfg, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, cfg)
    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        for path, _, _, p in iter_lora(ours):
            layer = modules[path.rsplit(".", 1)[0]]
            layer.lora_A[p.adapter].weight.copy_(p.lora_A)
            layer.lora_B[p.adapter].weight.copy_(p.lora_B)
    return model.eval()


def mix_names(batch: int) -> list[str]:
    return [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]


def make_input(size: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(size["batch"], size["tokens"], size["d"], generator=g)


def variants(size: dict, with_peft: bool) -> dict:
    """name -> (model, call) for every variant."""
    ours = build_ours(size)
    x = make_input(size)
    names = mix_names(size["batch"])

    def ours_one() -> torch.Tensor:
        return ours(x)

    def ours_mixed() -> torch.Tensor:
        with mixed_adapters(ours, names):
            return ours(x)

    out = {"ours one": (ours, ours_one), "ours mixed": (ours, ours_mixed)}
    if with_peft:
        peft = build_peft(size, ours)
        out["peft one"] = (peft, lambda: peft(x))
        out["peft mixed"] = (peft, lambda: peft(x, adapter_names=names))
    return out


def prepare(name: str, model: nn.Module) -> None:
    """Put a model in the state its variant needs (the two libraries share nothing)."""
    if name == "ours one":
        set_active_adapters(model, ["a0"])
    elif name == "peft one":
        model.base_model.set_adapter("a0")


def time_variants(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    with torch.no_grad():
        for name, (model, fn) in fns.items():  # warm-up (fills caches, stacks)
            prepare(name, model)
            fn()
        for r in range(repeats):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                model, fn = fns[name]
                prepare(name, model)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def check_outputs(fns: dict) -> list[tuple[str, float]]:
    """Ours mixed vs PEFT mixed, and each ours mixed row vs its adapter alone: (what, max diff)."""
    with torch.no_grad():
        prepare("ours one", fns["ours one"][0])
        mixed = fns["ours mixed"][1]()
        one = fns["ours one"][1]()
        checks = [("ours mixed rows of a0 vs ours one", _diff(mixed[0::8], one[0::8]))]
        if "peft mixed" in fns:
            checks.append(("ours mixed vs peft mixed", _diff(mixed, fns["peft mixed"][1]())))
    return checks


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _verdict(d: float) -> str:
    return "MATCH" if d < 1e-3 else "MISMATCH"


def memory_worker(name: str, quick: bool) -> None:
    """Fresh process: build, warm up, reset the RSS peak, run one forward, print JSON."""
    size = SIZES["quick" if quick else "full"]
    fns = variants(size, with_peft=name.startswith("peft"))
    model, fn = fns[name]
    with torch.no_grad():
        prepare(name, model)
        fn()
        fn()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss()
        fn()
        peak = _status_kb("VmHWM") * 1024  # not ru_maxrss: exited threads pin that one
    stack = 0
    if name == "ours mixed":
        from lora_param.routing.mixed import _ROUTERS

        for route in _ROUTERS[model].stacked.values():  # private: the stacked (A, B) per layer
            stacks = route._stacks.value
            if stacks is not None:
                stack += sum(t.numel() * t.element_size() for t in stacks)
    print(json.dumps({"peak_mb": (peak - before) / 2**20, "stack_mb": stack / 2**20}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_memory(names: list[str], quick: bool, threads: int) -> dict[str, dict]:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024))
    for name in names:
        cmd = [sys.executable, __file__, "--memory-worker", name, "--threads", str(threads)]
        cmd += ["--quick"] if quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        try:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            print(f"memory worker {name!r} FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (quick: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process runs")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    add_results_argument(parser)
    args = parser.parse_args(argv)
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.quick)
        return
    try:
        import peft  # noqa: F401

        with_peft = True
    except ImportError:
        with_peft = False
        print("peft is not installed (pip install peft): its variants are skipped")
    size = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or (3 if args.quick else 5)
    threads_now = torch.get_num_threads()
    record = Results("bench_mixed", __doc__, args, argv=argv, threads=threads_now,
                     packages=("peft",))  # fmt: skip
    record.note(f"setting: {size}, 8 adapters, {repeats} timed repeats")
    print(f"setting: {size}, 8 adapters, torch {torch.__version__}, threads {threads_now}, "
          f"{os.cpu_count()} logical cores")  # fmt: skip
    fns = variants(size, with_peft)
    checks = check_outputs(fns)
    for what, d in checks:
        print(f"{what}: max |diff| {d:.2e} ({_verdict(d)})")
    times = time_variants(fns, repeats)
    memory = (
        {} if args.no_memory else measure_memory(list(fns), args.quick, torch.get_num_threads())
    )
    one = times["ours one"]
    print(
        f"\n{'variant':<12} {'ms/forward':>11} {'vs ours one':>12} {'peak +MB':>9} {'stack MB':>9}"
    )
    rows = []
    for name, t in times.items():
        mem = memory.get(name, {})
        peak = f"{mem['peak_mb']:.0f}" if "peak_mb" in mem else "-"
        stack = f"{mem['stack_mb']:.1f}" if mem.get("stack_mb") else "-"
        print(f"{name:<12} {t * 1e3:>11.1f} {t / one:>11.2f}x {peak:>9} {stack:>9}")
        rows.append([name, t * 1e3, t / one, mem.get("peak_mb"), mem.get("stack_mb") or None])
    goals = []
    ratio = times["ours mixed"] / one
    goals.append(Goal(ratio <= GOAL_VS_ONE,
                      f"ours mixed / ours one = {ratio:.2f}x (goal <= {GOAL_VS_ONE}x)",
                      "8 adapters mixed in one batch vs one adapter (ours)",
                      ratio, GOAL_VS_ONE, "x"))  # fmt: skip
    if with_peft:
        vs_peft = times["ours mixed"] / times["peft mixed"]
        peft_ratio = times["peft mixed"] / times["peft one"]
        goals.append(Goal(vs_peft < 1,
                          f"ours mixed / peft mixed = {vs_peft:.2f}x "
                          f"(goal < 1; peft mixed / peft one = {peft_ratio:.2f}x)",
                          "mixed-adapter forward: ours vs PEFT's (adapter_names=)",
                          vs_peft, 1.0, "x", "<"))  # fmt: skip
    print()
    for g in goals:
        print(f"{'PASS' if g.passed else 'FAIL'} {g.text}")
    record.table(
        "forward",
        [Column("variant"), Column("forward", "ms", ".1f"), Column("vs ours one", "x"),
         Column("peak +", "MB", ".0f"), Column("stack", "MB", ".1f")],
        rows,
        title="One forward, eval mode under no_grad",
    )  # fmt: skip
    record.table(
        "checks",
        [Column("check"), Column("max |diff|", fmt=".2e"), Column("verdict")],
        [[what, d, _verdict(d)] for what, d in checks],
        title="Outputs",
    )
    record.add_goals(goals)
    record.write(args.results_dir)


if __name__ == "__main__":
    main()
