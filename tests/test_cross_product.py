"""The cross-product: variant x base store x layer kind x mode x extras x operation.

Every cell gives the numbers of a formula computed independently, or raises a declared
``LoRAError`` (see tests/crossproduct/). By default a covering subset runs (every pair of
axis values, the weak spots of issue 18 pinned); the full product runs with
``--cross-product=full`` (or ``LORA_PARAM_CROSS_PRODUCT=full``), as its own CI step.
``torch.compile`` runs on a sample of the models. ``python -m tests.crossproduct --table``
prints the table of cells.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crossproduct.cells import (
    OPERATIONS,
    SAMPLED,
    ModelCell,
    all_cells,
    compile_sample,
    covering_cells,
)
from crossproduct.report import PAGE, support_matrix_page
from crossproduct.runner import run_cell
from crossproduct.verdict import problem

ROOT = Path(__file__).resolve().parent.parent

#: Cells that exposed a bug, fixed since: they run whatever the subset holds.
REGRESSIONS: list[tuple[str, str]] = [
    # import_peft read a bitsandbytes Linear4bit's packed (n/2, 1) weight as its shape.
    ("lora-bnb4-linear-factored-none", "peft_roundtrip"),
    ("dora-bnb4-linear-materialized-head", "peft_roundtrip"),
    # mixed_adapters: "__base__" rows of a grouped layer (DoRA, trained heads and biases) ran
    # on a sub-batch, whose rounding differs from the base model's on the batch.
    ("dora-nf4-linear-factored-none", "mixed_batch"),
    ("lora-plain-conv2d-factored-head", "mixed_batch"),
    ("lora-plain-linear-factored-bias_all", "mixed_batch"),
    # load_base_state_dict into a bitsandbytes layer: "must be a floating tensor to quantize".
    ("lora-bnb4-linear-factored-bias_all", "load_base_state_dict"),
    ("lora-bnb8-linear-materialized-head", "load_base_state_dict"),
    # An adapted Linear8bitLt hid its row scales from bitsandbytes' state_dict hooks: not saved
    # before a forward, and a RuntimeError loading them after one.
    ("lora-bnb8-linear-factored-none", "state_dict"),
    ("dora-bnb8-linear-materialized-second", "state_dict"),
    # merge_lora(adapter=) into a bitsandbytes layer another adapter stays on was refused
    # (BnbWeight did not keep the remaining adapters, as the store protocol asks).
    ("lora-bnb4-linear-factored-second", "merge_adapter"),
    ("lora-bnb4-linear-factored-second", "merge_requantize"),
    ("dora-bnb8-linear-materialized-second", "merge_adapter"),
    ("dora-bnb8-linear-materialized-second", "merge_requantize"),
]


def _full(config: pytest.Config) -> bool:
    return (
        config.getoption("--cross-product", default=None) == "full"
        or os.environ.get("LORA_PARAM_CROSS_PRODUCT") == "full"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cell" in metafunc.fixturenames:
        full = _full(metafunc.config)
        cells = all_cells() if full else covering_cells()
        sample = compile_sample(cells, pairs=full)
        params = [pytest.param((c, c in sample), id=c.id) for c in cells]
        metafunc.parametrize("cell", params)


def _check(cell: ModelCell, operations: list[str]) -> None:
    outcomes = run_cell(cell, operations)
    problems = [p for op, o in outcomes.items() if (p := problem(cell, op, o))]
    assert not problems, "\n".join(problems)


def test_cell(cell: tuple[ModelCell, bool]) -> None:
    """Every operation on one model: right numbers, or a declared LoRAError."""
    model_cell, compiled = cell
    _check(model_cell, [o for o in OPERATIONS if o not in SAMPLED or compiled])


@pytest.mark.parametrize(("cell_id", "op"), REGRESSIONS, ids=[f"{c}-{o}" for c, o in REGRESSIONS])
def test_regression_cell(cell_id: str, op: str) -> None:
    """A cell that once crashed or gave wrong numbers."""
    _check(ModelCell.parse(cell_id), [op])


def test_covering_subset_covers_every_pair() -> None:
    """The default subset holds every valid pair of axis values (by a model with operations
    where the product has one) and every pinned weak spot."""
    from crossproduct.cells import PINNED, _pairs, has_model

    subset = covering_cells()
    full = all_cells()
    assert set(subset) <= set(full) and len(subset) < len(full) // 5
    assert set(PINNED) <= set(subset)

    def pairs(cells):
        return set().union(*(_pairs(c) for c in cells))

    assert pairs(full) == pairs(subset)
    live = [c for c in full if has_model(c)]
    assert pairs(live) == pairs(c for c in subset if has_model(c))
    assert covering_cells() == subset  # deterministic


def test_support_matrix_page_is_current() -> None:
    """docs/reference/support-matrix.md is what the declarations generate."""
    page = (ROOT / PAGE).read_text(encoding="utf-8")
    assert page == support_matrix_page(), (
        f"{PAGE} is stale: run `python -m tests.crossproduct --docs` and commit it"
    )
