"""Memory of packing one large weight (and of reading it back), and the time of one NF4 dequantize.

A ``vocab × hidden`` bf16 weight (default 32,000 × 4,096: an LLM's embedding) is packed
with ``quantize_base`` (NF4 with double quantization, and int8) and then dequantized once
(``layer.weight``). Peak resident memory above the process's state just before is printed
as a multiple of the weight's own bytes; the goal is a small multiple (≤ 2×: the packed
result plus chunk-sized temporaries, never float32 copies of the whole weight). Each method
runs in a fresh process.

Dequantize time: one read of ``layer.weight`` of an NF4-packed ``nn.Linear`` (default 2,048 in,
5,632 out: a Llama MLP projection, as ``bench_llm.py``'s generation dequantizes for every token)
under ``torch.no_grad()``, in float32 and bf16, with 1 and 2 torch threads, for our pure-PyTorch
kernel (``kernel="torch"``, what ``"auto"`` uses on the CPU) and bitsandbytes' compiled one
(``kernel="bitsandbytes"``, where it is installed and gives our values for the shape). The
kernels are timed interleaved in one process (warm-up first); figure = median over repeats.

    python benchmarks/bench_quantize.py [--rows 32000 --cols 4096]
    python benchmarks/bench_quantize.py --quick          # smoke run (small weights)
"""

from __future__ import annotations

import argparse
import json
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

from _results import Column, Goal, Results, add_results_argument  # noqa: E402

GOAL = 2.0


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child(rows: int, cols: int, method: str) -> None:
    import torch
    from torch import nn

    from lora_param import quantize_base

    torch.manual_seed(0)
    layer = nn.Embedding(rows, cols, dtype=torch.bfloat16)
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    start = _peak_bytes()
    quantize_base(layer, method=method)
    packed = sum(t.numel() * t.element_size() for t in layer.parameters())
    after_pack = _peak_bytes()
    with torch.no_grad():
        weight = layer.weight
    after_read = _peak_bytes()
    del weight
    print(
        json.dumps(
            {
                "method": method,
                "weight_bytes": weight_bytes,
                "packed_bytes": packed,
                "bits_per_param": 8 * packed / layer.weight.numel(),
                "pack_peak_x": (after_pack - start) / weight_bytes,
                "read_peak_x": (after_read - start) / weight_bytes,
            }
        )
    )


def dequantize_times(
    out_features: int, in_features: int, threads: list[int], repeats: int, log
) -> list[list]:
    """Rows (kernel, dtype, threads, ms per read) for one NF4-packed Linear; n/a as None."""
    import torch
    from torch import nn

    from lora_param import LoRAError, quantize_base

    layers = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for kernel in ("torch", "bitsandbytes"):
            torch.manual_seed(0)
            layer = nn.Linear(in_features, out_features, bias=False, dtype=dtype)
            try:
                quantize_base(layer, method="nf4", kernel=kernel)
            except (LoRAError, ImportError) as e:
                log(f"  dequantize {kernel}/{dtype_name}: not measured: {e}")
                continue
            layers[(kernel, dtype_name)] = layer
    rows = []
    default_threads = torch.get_num_threads()
    for n in threads:
        torch.set_num_threads(n)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in layers}
        keys = list(layers)
        with torch.no_grad():
            for key in keys:  # warm-up (bitsandbytes' first call also checks it gives our values)
                _ = layers[key].weight
            for r in range(repeats):
                for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                    t0 = time.perf_counter()
                    _ = layers[key].weight
                    times[key].append(time.perf_counter() - t0)
        for kernel in ("torch", "bitsandbytes"):
            for dtype_name in ("fp32", "bf16"):
                xs = times.get((kernel, dtype_name))
                rows.append([kernel, dtype_name, n, statistics.median(xs) * 1e3 if xs else None])
    torch.set_num_threads(default_threads)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--child", choices=["nf4", "int8"])
    parser.add_argument(
        "--dequantize-shape", type=int, nargs=2, default=[5632, 2048], metavar=("OUT", "IN"),
        help="the NF4 Linear whose dequantize is timed (default 5632 2048)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=21, help="timed reads per kernel")
    parser.add_argument("--quick", action="store_true", help="smoke run: small weights")
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.cols, args.dequantize_shape, args.repeats = 2048, 1024, [512, 256], 3
    if args.child:
        _child(args.rows, args.cols, args.child)
        return
    record = Results("bench_quantize", __doc__, args, argv=argv, threads=max(args.threads),
                     packages=("bitsandbytes",))  # fmt: skip
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    print(f"weight {args.rows} x {args.cols} bf16; peak RSS growth as a multiple of its bytes")
    print("| method | bits/param | packing peak | packing + one dequantized read | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    packing, goals = [], []
    for method in ("nf4", "int8"):
        out = subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--cols", str(args.cols),
             "--child", method],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        verdict = "PASS" if r["pack_peak_x"] <= GOAL else "FAIL"
        print(
            f"| {method} | {r['bits_per_param']:.3f} | {r['pack_peak_x']:.2f}x | "
            f"{r['read_peak_x']:.2f}x | pack ≤ {GOAL:g}x: {verdict} |"
        )
        packing.append([method, r["bits_per_param"], r["pack_peak_x"], r["read_peak_x"]])
        goals.append(
            Goal(
                r["pack_peak_x"] <= GOAL,
                f"{method}: packing peak {r['pack_peak_x']:.2f}x the weight's bytes",
                f"{method}: peak RSS growth while packing, in weight bytes",
                r["pack_peak_x"],
                GOAL,
                "x",
            )
        )
    out_f, in_f = args.dequantize_shape
    print(
        f"\nNF4 dequantize (one read of layer.weight) of a {out_f:,} x {in_f:,} Linear, "
        f"median of {args.repeats} (ms)"
    )
    times = dequantize_times(out_f, in_f, args.threads, args.repeats, log)
    print("| kernel | dtype | threads | ms |")
    print("| --- | --- | ---: | ---: |")
    for kernel, dtype_name, n, ms in times:
        print(f"| {kernel} | {dtype_name} | {n} | {'-' if ms is None else f'{ms:.1f}'} |")
    record.table(
        "packing",
        [Column("method"), Column("bits/param", fmt=".3f"), Column("packing peak", "x"),
         Column("packing + one dequantized read", "x")],
        packing,
        title=f"Packing a {args.rows:,} × {args.cols:,} bf16 weight: peak RSS growth in weight "
        "bytes (fresh process per method)",
    )  # fmt: skip
    record.table(
        "dequantize",
        [Column("kernel"), Column("dtype"), Column("threads"), Column("dequantize", "ms", ".1f")],
        times,
        title=f"NF4 dequantize of a {out_f:,} × {in_f:,} weight (one read of layer.weight), "
        f"median of {args.repeats}",
    )
    record.add_goals(goals)
    record.write(args.results_dir)


if __name__ == "__main__":
    main()
