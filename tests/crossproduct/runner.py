"""Running model cells: each operation's outcome, classified."""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import lora_param as lp

from .cells import OPERATIONS, ModelCell
from .operations import OPS, NotApplicable, make_setup

__all__ = ["Outcome", "run_cell"]


@dataclass(frozen=True)
class Outcome:
    """What one operation did on one model cell.

    Attributes:
        status: ``"pass"``, ``"refused"`` (a LoRAError), ``"n/a"``, ``"wrong"`` (an
            AssertionError: wrong numbers or state) or ``"crash"`` (any other exception).
        message: The error's message (first line of a refusal's).
    """

    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "refused", "n/a")


def _classify(exc: BaseException) -> Outcome:
    if isinstance(exc, lp.LoRAError):
        return Outcome("refused", str(exc))
    if isinstance(exc, NotApplicable):
        return Outcome("n/a", str(exc))
    if isinstance(exc, AssertionError):
        return Outcome("wrong", str(exc))
    return Outcome("crash", f"{type(exc).__name__}: {exc}")


def run_cell(
    cell: ModelCell, operations: list[str] | None = None, timings: dict | None = None
) -> dict[str, Outcome]:
    """Set ``cell`` up and run ``operations`` (default: all) on it.

    When ``add_lora`` refuses, the other operations are ``n/a`` (there is no model).
    """
    ops = [o for o in OPERATIONS if operations is None or o in operations]
    out: dict[str, Outcome] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        try:
            setup = make_setup(cell, Path(tmp))
            OPS["add_lora"](setup)
            out["add_lora"] = Outcome("pass")
        except Exception as exc:
            out["add_lora"] = _classify(exc)
            for op in ops:
                out.setdefault(op, Outcome("n/a", "add_lora did not give a model"))
            return out
        for op in ops:
            if op == "add_lora":
                continue
            start = time.perf_counter()
            torch.manual_seed(0)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    OPS[op](setup)
                out[op] = Outcome("pass")
            except Exception as exc:
                out[op] = _classify(exc)
            if timings is not None:
                timings[op] = timings.get(op, 0.0) + time.perf_counter() - start
    return out
