#!/usr/bin/env python
"""Cost of per-adapter heads and biases: copies (this library) vs in place vs PEFT.

    python benchmarks/bench_trainable_copies.py            # MNIST-sized MLP, batch 64
    python benchmarks/bench_trainable_copies.py --quick    # smoke run

The model is the tutorial's MLP 784-1000-2000-10 with LoRA (rank 4) on ``linear1`` and
``linear2``, the head ``linear3`` trained in full and every bias trained. Variants:

- ``copies``: ``add_lora(trainable="linear3", bias="all")``: the adapter's own copies;
- ``in-place``: LoRA only, then the head and biases set trainable in place (the old
  behaviour, the floor: no parametrization on those tensors);
- ``peft``: PEFT with ``modules_to_save=["linear3"], bias="all"`` (when installed).

Method: all variants live in this process; each repeat times one block of calls of every
variant, round-robin; reported figure = median over repeats of the per-call time. Training
step = forward + backward + AdamW step on the trainable parameters; evaluation =
``model.eval()`` under ``torch.no_grad()``. Ratios are against ``in-place`` in the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import Column, Results, add_results_argument

from lora_param import add_lora


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(784, 1000)
        self.linear2 = nn.Linear(1000, 2000)
        self.linear3 = nn.Linear(2000, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(torch.relu(self.linear2(torch.relu(self.linear1(x)))))


def _variants(base: nn.Module) -> dict[str, nn.Module]:
    out = {
        "copies": add_lora(
            copy.deepcopy(base), ["linear1", "linear2"], rank=4, trainable="linear3", bias="all"
        )
    }
    in_place = add_lora(copy.deepcopy(base), ["linear1", "linear2"], rank=4)
    in_place.linear3.requires_grad_(True)
    for name, p in in_place.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)
    out["in-place"] = in_place
    try:
        import peft
    except ImportError:
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(
            r=4, target_modules=["linear1", "linear2"], modules_to_save=["linear3"], bias="all"
        )
        out["peft"] = peft.get_peft_model(copy.deepcopy(base), config)
    return out


def _steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable, Callable]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return train, evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    add_results_argument(parser)
    args = parser.parse_args(argv)
    record = Results("bench_trainable_copies", __doc__, args, argv=argv, packages=("peft",))
    repeats, calls = (3, 2) if args.quick else (15, 5)
    torch.manual_seed(0)
    base = MLP()
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    models = _variants(base)
    fns = {name: _steps(m, x, y) for name, m in models.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for phase, i in (("train", 0), ("eval", 1)):
        for f in fns.values():
            f[i]()  # warm-up
        for r in range(repeats):
            names = list(fns)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                start = time.perf_counter()
                for _ in range(calls):
                    fns[name][i]()
                times.setdefault((name, phase), []).append((time.perf_counter() - start) / calls)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"{'variant':10} {'train ms':>9} {'vs in-place':>12} {'eval ms':>9} {'vs in-place':>12}")
    ref = {p: statistics.median(times[("in-place", p)]) for p in ("train", "eval")}
    rows = []
    for name in fns:
        t, e = (statistics.median(times[(name, p)]) for p in ("train", "eval"))
        print(
            f"{name:10} {t * 1e3:9.2f} {t / ref['train']:11.2f}x {e * 1e3:9.2f} "
            f"{e / ref['eval']:11.2f}x"
        )
        rows.append([name, t * 1e3, t / ref["train"], e * 1e3, e / ref["eval"]])
    record.table(
        "copies",
        [Column("variant"), Column("train", "ms", ".2f"), Column("train vs in-place", "x"),
         Column("eval", "ms", ".2f"), Column("eval vs in-place", "x")],
        rows,
        title=f"Batch {args.batch}, {repeats} repeats of {calls} calls (median)",
    )  # fmt: skip
    record.write(args.results_dir)


if __name__ == "__main__":
    main()
