"""Memory of packing one large weight (and of reading it back), each in a fresh process.

A ``vocab × hidden`` bf16 weight (default 32,000 × 4,096: an LLM's embedding) is packed
with ``quantize_base`` (NF4 with double quantization, and int8) and then dequantized once
(``layer.weight``). Peak resident memory above the process's state just before is printed
as a multiple of the weight's own bytes; the goal is a small multiple (≤ 2×: the packed
result plus chunk-sized temporaries, never float32 copies of the whole weight).

    python benchmarks/bench_quantize.py [--rows 32000 --cols 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--child", choices=["nf4", "int8"])
    args = parser.parse_args()
    if args.child:
        _child(args.rows, args.cols, args.child)
        return
    print(f"weight {args.rows} x {args.cols} bf16; peak RSS growth as a multiple of its bytes")
    print("| method | bits/param | packing peak | packing + one dequantized read | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
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


if __name__ == "__main__":
    main()
