"""``python -m tests.crossproduct [--table] [--full] [--docs] [--only SUBSTR]``.

``--table`` runs the cells (the covering subset, or the full product with ``--full``) and
prints the table; ``--docs`` writes the support-matrix page. Run from the repository root.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from .cells import OPERATIONS, SAMPLED, all_cells, compile_sample, covering_cells
from .report import PAGE, support_matrix_page, table
from .runner import run_cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crossproduct")
    parser.add_argument("--table", action="store_true", help="run the cells, print the table")
    parser.add_argument("--full", action="store_true", help="the full product, not the subset")
    parser.add_argument("--only", default="", help="cells whose id contains all these (a,b)")
    parser.add_argument("--docs", action="store_true", help=f"write {PAGE}")
    args = parser.parse_args(argv)
    if args.docs:
        Path(PAGE).parent.mkdir(parents=True, exist_ok=True)
        Path(PAGE).write_text(support_matrix_page(), encoding="utf-8")
        print(f"wrote {PAGE}")
    if args.table:
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)  # tiny shapes: as the suite runs them (tests/conftest.py)
        cells = all_cells() if args.full else covering_cells()
        if args.only:
            cells = [c for c in cells if all(s in c.id for s in args.only.split(","))]
        sample = compile_sample(cells, pairs=args.full)
        start = time.perf_counter()
        results = []
        skipped = []
        for cell in cells:
            ops = [o for o in OPERATIONS if o not in SAMPLED or cell in sample]
            try:
                results.append((cell, run_cell(cell, ops)))
            except pytest.skip.Exception as exc:  # an optional dependency is missing
                skipped.append(f"{cell.id}: {exc}")
        print(table(results))
        if skipped:
            print(f"\nSkipped {len(skipped)} models (optional dependencies missing):")
            print("\n".join(f"  {line}" for line in skipped))
        print(f"\n{len(cells)} models in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
