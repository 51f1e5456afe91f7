"""Judging outcomes against the declarations: right numbers, or a declared refusal."""

from __future__ import annotations

from .cells import ModelCell
from .refusals import expected_refusals
from .runner import Outcome

__all__ = ["problem"]


def problem(cell: ModelCell, op: str, outcome: Outcome) -> str | None:
    """What is wrong with ``outcome`` of ``op`` on ``cell`` (None: nothing)."""
    where = f"{cell.id} {op}"
    if outcome.status in ("wrong", "crash"):
        kind = "wrong numbers or state" if outcome.status == "wrong" else "not a LoRAError"
        return f"{where}: {kind}: {outcome.message}"
    declared = expected_refusals(cell, op)
    if outcome.status == "refused":
        if not declared:
            return (
                f"{where}: refused, and no refusal is declared for this cell "
                f"(tests/crossproduct/refusals.py): {outcome.message}"
            )
        if not any(r.matches(outcome.message) for r in declared):
            return (
                f"{where}: refused with another message than declared "
                f"({[r.match for r in declared]}): {outcome.message}"
            )
        return None
    if declared and outcome.status == "pass":
        return (
            f"{where}: passes, but a refusal is declared for it ({declared[0].gist!r}); "
            "remove or narrow the declaration in tests/crossproduct/refusals.py"
        )
    return None
