"""Benchmark results as JSON files, written by every script in ``benchmarks/`` beside its printout.

A script builds one :class:`Results`, adds its tables and goal lines as it prints them, and
writes ``<results-dir>/<script>-<device>.json`` at the end (``<script>-<device>-quick.json`` for
a ``--quick`` smoke run, which ``render_results.py`` never renders). A script whose runs are
measured separately (``bench_llm.py``: one per dtype) writes one file per part,
``<script>-<device>-<part>.json``::

    results = Results("bench_lora", __doc__, args, threads=2, packages=("peft", "torchvision"))
    results.table("timings", [Column("model"), Column("train", "ms")], rows)
    results.goal("train step factored <= PEFT", measured=2.7, threshold=2.9, unit="ms",
                 passed=True, text="PASS  mlp-b10: train step ...")
    results.write(args.results_dir)

A file records the machine (CPU model, cores, threads used, RAM, a hash of the host name, the
load average at start and end: other processes' load makes timings noisy), the versions of
Python, torch, lora_param and the other libraries the script uses, the date, the command line
and parsed arguments, every table row (values keyed by column name; columns carry units) and
every goal (description, measured value, threshold, PASS/FAIL). Only the standard library and
torch (for the device name) are used, so a results file is written wherever a script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_DIR",
    "REQUIRED_FIELDS",
    "SCHEMA",
    "Column",
    "Goal",
    "Results",
    "add_results_argument",
    "device_label",
    "results_path",
    "validate",
]

HERE = Path(__file__).resolve().parent
#: Where result files go by default (and where ``render_results.py`` reads them).
DEFAULT_DIR = HERE / "results"
#: Format version of a results file.
SCHEMA = 1
#: Top-level keys every results file has (``validate`` checks them).
REQUIRED_FIELDS = (
    "schema",
    "script",
    "title",
    "description",
    "device",
    "part",
    "quick",
    "date",
    "command",
    "arguments",
    "machine",
    "versions",
    "load_average",
    "elapsed_s",
    "tables",
    "goals",
    "notes",
)
_COMPARISONS = ("<=", "<", ">=", ">")
_MACHINE_FIELDS = ("host_sha256", "cpu", "logical_cores", "usable_cores", "threads", "platform")
_VERSION_FIELDS = ("python", "torch", "lora_param")


@dataclass(frozen=True)
class Column:
    """One table column: its name, unit ("" for none) and an optional format spec for the page.

    ``fmt`` is a ``format()`` spec such as ``".2f"`` or ``",.0f"``; empty: the renderer's default
    (integers with thousands separators, other numbers to four significant digits).
    """

    name: str
    unit: str = ""
    fmt: str = ""


class Goal(NamedTuple):
    """One goal line as a script prints it, and what it compares.

    ``passed`` is None when the goal could not be checked; ``comparison`` says how ``measured``
    must relate to ``threshold`` (``"<="``, ``"<"``, ``">="``, ``">"``).
    """

    passed: bool | None
    text: str
    description: str
    measured: float | None
    threshold: float | None
    unit: str = ""
    comparison: str = "<="


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--results-dir`` (default ``benchmarks/results``) to a script's parser."""
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_DIR,
        help="write the results JSON here (default: benchmarks/results; --quick runs get a "
        "'-quick' suffix and are never rendered)",
    )


def device_label(device: Any = "cpu") -> str:
    """``"cpu"``, or ``"cuda-<model>"`` for a CUDA device (e.g. ``"cuda-h100"``)."""
    kind = str(device).split(":", 1)[0]
    if kind != "cuda":
        return kind
    import torch

    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").split()
    model = "".join(ch for ch in (name[0] if name else "gpu") if ch.isalnum())
    return f"cuda-{model or 'gpu'}"


def results_path(
    results_dir: str | os.PathLike, script: str, device: str, quick: bool, part: str | None = None
) -> Path:
    """``<results_dir>/<script>-<device>[-<part>].json`` (``-quick`` before ``.json`` for smoke
    runs)."""
    stem = "-".join(x for x in (script, device, part, "quick" if quick else None) if x)
    return Path(results_dir) / f"{stem}.json"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(package: str) -> str | None:
    if package == "python":
        return platform.python_version()
    if package == "lora_param" and "lora_param" in sys.modules:
        # the imported one (a checkout on PYTHONPATH may differ from the installed metadata)
        return getattr(sys.modules["lora_param"], "__version__", None)
    if package == "torch" and "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any] | None:
    """The checkout's commit and whether it had local changes (None outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=HERE, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE, capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def _plain(value: Any) -> Any:
    """A JSON-safe copy: paths and other objects as strings, NaN/inf as None, tuples as lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor or numpy scalar
        with contextlib.suppress(Exception):
            return _plain(value.item())
    return str(value)


def _command_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--results-dir`` (where the file goes does not change the numbers)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--results-dir":
            skip = True
        elif not arg.startswith("--results-dir="):
            out.append(arg)
    return out


def _description(doc: str | None) -> tuple[str, str]:
    """(first line, the paragraphs after it that are not command examples) of a docstring."""
    paragraphs = [p.strip("\n") for p in (doc or "").strip().split("\n\n") if p.strip()]
    if not paragraphs:
        return "", ""
    title = paragraphs[0].strip().splitlines()[0].strip()
    rest = [p for p in paragraphs[1:] if not p.lstrip().startswith(("python ", "$ "))]
    return title, "\n\n".join(rest)


class Results:
    """One run of one benchmark script: collects tables and goals, then writes one JSON file.

    Args:
        script: The script's name without ``.py`` (the file name's first part).
        doc: The script's docstring (its first line becomes the page's heading).
        args: The parsed arguments (recorded; ``quick`` is read from them when present).
        threads: Torch threads the measurements used.
        packages: Other distributions whose versions matter (e.g. ``("peft",)``).
        device: Where it ran: ``"cpu"`` or a CUDA device (labelled ``"cuda-<model>"``).
        argv: The command-line arguments (default ``sys.argv[1:]``).
        quick: A smoke run (default: ``args.quick``).
        part: Which part of the script's measurements this run is, when they are run
            separately (e.g. ``"fp32"``); None for a script measured in one run.
    """

    def __init__(
        self,
        script: str,
        doc: str | None,
        args: argparse.Namespace | Mapping[str, Any] | None = None,
        *,
        threads: int | None = None,
        packages: Iterable[str] = (),
        device: Any = "cpu",
        argv: Sequence[str] | None = None,
        quick: bool | None = None,
        part: str | None = None,
    ) -> None:
        arguments = dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})
        arguments.pop("results_dir", None)
        if quick is None:
            quick = bool(arguments.get("quick", False))
        if threads is None:
            with contextlib.suppress(ImportError):
                import torch

                threads = torch.get_num_threads()
        title, description = _description(doc)
        argv = _command_args(sys.argv[1:] if argv is None else argv)
        self._start = time.perf_counter()
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "script": script,
            "title": title,
            "description": description,
            "device": device_label(device),
            "part": part,
            "quick": quick,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join(["python", f"benchmarks/{script}.py", *argv]),
            "arguments": _plain(arguments),
            "machine": {
                "host_sha256": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12],
                "cpu": _cpu_model(),
                "logical_cores": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0))
                if hasattr(os, "sched_getaffinity")
                else os.cpu_count(),
                "threads": threads,
                "ram_gib": _ram_gib(),
                "platform": platform.platform(),
            },
            "versions": {},
            "git": _git(),
            "load_average": {"start": _load(), "end": None},
            "elapsed_s": None,
            "tables": [],
            "goals": [],
            "notes": [],
        }
        if self.data["device"].startswith("cuda"):
            import torch

            self.data["machine"]["gpu"] = torch.cuda.get_device_name(device)
        self._packages = ["python", "torch", "lora_param", *packages]

    # ----------------------------------------------------------------- recording

    def table(
        self,
        name: str,
        columns: Sequence[Column | str],
        rows: Iterable[Sequence[Any] | Mapping[str, Any]],
        *,
        title: str = "",
    ) -> None:
        """Add a table: rows as sequences in column order, or mappings keyed by column name."""
        cols = [c if isinstance(c, Column) else Column(c) for c in columns]
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise ValueError(f"table {name!r}: column names repeat: {names}")
        out = []
        for row in rows:
            if isinstance(row, Mapping):
                unknown = set(row) - set(names)
                if unknown:
                    raise ValueError(f"table {name!r}: unknown columns {sorted(unknown)}")
                values = {n: row.get(n) for n in names}
            else:
                if len(row) != len(names):
                    raise ValueError(f"table {name!r}: row {row!r} has not {len(names)} values")
                values = dict(zip(names, row, strict=True))
            out.append(_plain(values))
        self.data["tables"].append(
            {"name": name, "title": title, "columns": [asdict(c) for c in cols], "rows": out}
        )

    def goal(
        self,
        description: str,
        *,
        measured: float | None,
        threshold: float | None,
        passed: bool | None,
        unit: str = "",
        comparison: str = "<=",
        text: str = "",
    ) -> None:
        """Add a goal line: ``passed`` None when it could not be checked (a figure is missing).

        ``comparison`` says how ``measured`` must relate to ``threshold`` (``"<="``, ``"<"``,
        ``">="``, ``">"``); ``text`` is the line the script printed.
        """
        if comparison not in _COMPARISONS:
            raise ValueError(f"comparison must be one of {_COMPARISONS}, got {comparison!r}")
        self.data["goals"].append(
            {
                "description": description,
                "measured": _plain(measured),
                "threshold": _plain(threshold),
                "comparison": comparison,
                "unit": unit,
                "verdict": "n/a" if passed is None else "PASS" if passed else "FAIL",
                "text": text,
            }
        )

    def add_goals(self, goals: Iterable[Goal]) -> None:
        """Add several :class:`Goal` lines."""
        for g in goals:
            self.goal(
                g.description,
                measured=g.measured,
                threshold=g.threshold,
                passed=g.passed,
                unit=g.unit,
                comparison=g.comparison,
                text=g.text,
            )

    def note(self, text: str) -> None:
        """Add a sentence the page shows under the tables (a method note, a warning)."""
        self.data["notes"].append(text)

    # ----------------------------------------------------------------- writing

    def path(self, results_dir: str | os.PathLike) -> Path:
        """Where :meth:`write` puts this run's file in ``results_dir``."""
        data = self.data
        return results_path(
            results_dir, data["script"], data["device"], data["quick"], data["part"]
        )

    def write(self, results_dir: str | os.PathLike = DEFAULT_DIR) -> Path:
        """Fill in versions, end load and elapsed time; write the file atomically; its path."""
        self.data["versions"] = {p: _version(p) for p in self._packages}
        self.data["load_average"]["end"] = _load()
        self.data["elapsed_s"] = round(time.perf_counter() - self._start, 1)
        problems = validate(self.data)
        if problems:
            raise ValueError("results incomplete: " + "; ".join(problems))
        path = self.path(results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        print(f"results written to {path}", file=sys.stderr)
        return path


def validate(data: Mapping[str, Any]) -> list[str]:
    """What a results file lacks (empty when it has every required field)."""
    problems = [f"no {key!r}" for key in REQUIRED_FIELDS if key not in data]
    machine, versions = data.get("machine") or {}, data.get("versions") or {}
    problems += [f"no machine.{k}" for k in _MACHINE_FIELDS if k not in machine]
    problems += [f"no versions.{k}" for k in _VERSION_FIELDS if not versions.get(k)]
    load = data.get("load_average") or {}
    problems += [f"no load_average.{k}" for k in ("start", "end") if k not in load]
    for table in data.get("tables", []):
        names = [c.get("name") for c in table.get("columns", [])]
        if not names or any(set(row) != set(names) for row in table.get("rows", [])):
            problems.append(f"table {table.get('name')!r}: rows do not match its columns")
    for goal in data.get("goals", []):
        missing = [k for k in ("description", "measured", "threshold", "verdict") if k not in goal]
        if missing or goal.get("verdict") not in ("PASS", "FAIL", "n/a"):
            problems.append(f"goal {goal.get('description')!r}: incomplete")
    return problems
