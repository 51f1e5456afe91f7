"""The seeds table: one recipe (or several) over many seeds, one pretraining per seed.

``lora-param-mnist --seeds 0-9 --recipe tutorial balanced`` pretrains once per seed, fine-tunes
every recipe from that same pretrained model, and tabulates the test set's numbers per seed with
their mean, standard deviation and worst case. Choices inside each run are made on validation.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_param.core.errors import LoRAError

from .config import PipelineConfig
from .data import MNISTTensors
from .pipeline import run_pipeline
from .report import write_json, write_text

SEEDS_JSON = "seeds.json"
SEEDS_TEXT = "seeds.txt"
#: The balanced recipe's goal, counted per seed in the table's footer.
GOAL_CUT = 0.80
GOAL_POINTS = -0.5


def checkpoint_name(seed: int) -> str:
    """File name of a seed's pretrained model in the seeds command's checkpoint folder."""
    return f"pretrained-seed{seed}.pt"


def parse_seeds(spec: str) -> list[int]:
    """Seeds from "0-9", "3", "0,2,5-7" (ranges inclusive), in the order given, no repeats.

    Raises:
        LoRAError: The text is not a list of non-negative integers and ranges.
    """
    seeds: list[int] = []
    for part in spec.replace(" ", "").split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise LoRAError(f"seeds must look like 0-9 or 0,3,5-7, got {spec!r}")
        first, last = int(lo), int(hi) if dash else int(lo)
        if last < first:
            raise LoRAError(f"seed range {part!r} runs backwards: write {last}-{first}")
        seeds.extend(s for s in range(first, last + 1) if s not in seeds)
    return seeds


def seed_row(report: dict[str, Any]) -> dict[str, Any]:
    """A table row from a run's report: the test set's numbers, and validation's for reference."""
    test = report["test"]
    target = test["changes"]["target"]
    row = {
        "seed": report["seed"],
        "recipe": report["recipe"]["name"],
        "digit": report["target_digit"],
        "target_before": target["before"],
        "target_after": target["after"],
        "target_cut": target["reduction"],
        "accuracy_before": test["pretrained"]["accuracy"],
        "accuracy_after": test["lora_on"]["accuracy"],
        "accuracy_change_points": test["changes"]["accuracy_change_points"],
        "lora_off_identical": report["lora_off_identical"],
        "frozen_unchanged": report["frozen_unchanged"],
    }
    val = report.get("validation")
    if val:
        row["validation_target_cut"] = val["changes"]["target"]["reduction"]
        row["validation_accuracy_change_points"] = val["changes"]["accuracy_change_points"]
    return row


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, standard deviation (n - 1) and worst case of the cut and the accuracy change."""

    def stats(values: list[float], worst: Callable[[list[float]], float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "worst": worst(values),
        }

    cuts = [r["target_cut"] for r in rows]
    points = [r["accuracy_change_points"] for r in rows]
    return {
        "seeds": len(rows),
        "target_cut": stats(cuts, min),
        "accuracy_change_points": stats(points, min),
        "meet_goal": sum(
            c >= GOAL_CUT and p >= GOAL_POINTS for c, p in zip(cuts, points, strict=True)
        ),
    }


def seeds_table(result: dict[str, Any]) -> str:
    """The printed table: per recipe, one row per seed, then mean / std / worst."""
    lines = []
    split = result.get("split") or {}
    test_size = split.get("test_size", 10_000)
    made_on = "validation" if split.get("validation", True) else "the training images"
    done = result.get("seeds_done", result["seeds"])
    if list(done) != list(result["seeds"]):
        lines.append(
            f"partial: seeds {', '.join(map(str, done))} ran, of {len(result['seeds'])} asked for"
        )
    for recipe, block in result["recipes"].items():
        rows, summary = block["rows"], block["summary"]
        head = (
            f"{'seed':>4} {'digit':>5} {'target wrong':>13} {'cut':>6} "
            f"{'accuracy':>15} {'change':>8}"
        )
        lines += [
            f"recipe {recipe!r}, test set ({test_size:,} images), choices made on {made_on}:",
            head,
            "-" * len(head),
        ]
        for r in rows:
            lines.append(
                f"{r['seed']:>4} {r['digit']:>5} "
                f"{r['target_before']:>5} -> {r['target_after']:<4} {100 * r['target_cut']:>5.1f}% "
                f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} "
                f"{r['accuracy_change_points']:>+7.2f}pt"
            )
        cut, pts = summary["target_cut"], summary["accuracy_change_points"]
        lines += [
            "-" * len(head),
            f"target errors cut: mean {100 * cut['mean']:.1f}%, std {100 * cut['std']:.1f}%, "
            f"worst {100 * cut['worst']:.1f}%",
            f"accuracy change:   mean {pts['mean']:+.2f}pt, std {pts['std']:.2f}pt, "
            f"worst {pts['worst']:+.2f}pt",
            f"seeds with >= {100 * GOAL_CUT:.0f}% cut and >= {GOAL_POINTS:+.1f}pt: "
            f"{summary['meet_goal']} of {summary['seeds']}",
            "",
        ]
    return "\n".join(lines).rstrip()


def run_seeds(
    config: PipelineConfig,
    seeds: Sequence[int],
    recipes: Sequence[str],
    data: MNISTTensors | None = None,
) -> dict[str, Any]:
    """Run every recipe for every seed: pretrain once per seed, then fine-tune each recipe from it.

    Args:
        config: Settings shared by every run (``seed``, ``recipe``, ``ranks`` and ``out`` are set
            per run; with ``out``, seeds.json and seeds.txt are written there). ``checkpoint``
            names a folder that caches each seed's pretrained model (`checkpoint_name`), so a
            rerun with the same settings skips pretraining; None uses a temporary folder.
        seeds: Seeds to run.
        recipes: Recipe names, e.g. ["tutorial", "balanced"].
        data: Loaded tensors; None loads them once from ``config.data_dir``.

    Returns:
        {"seeds", "seeds_done", "split", "recipes": {name: {"rows", "summary"}}, "seconds"}.
    """
    if not seeds or not recipes:
        raise LoRAError("give at least one seed and one recipe")
    for name in recipes:
        replace(config, recipe=name).finetune_recipe()  # unknown names fail before any work
    start = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}
    split: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="lora-param-seeds-") as tmp:
        folder = Path(config.checkpoint) if config.checkpoint else Path(tmp)
        for seed in seeds:
            checkpoint = os.fspath(folder / checkpoint_name(seed))
            for name in recipes:
                run = run_pipeline(
                    replace(
                        config,
                        seed=seed,
                        recipe=name,
                        checkpoint=checkpoint,
                        ranks=None,
                        out=None,
                        load_adapter=None,
                        verbose=False,
                    ),
                    data=data,
                )
                data = run.data
                split = run.report["split"]
                row = seed_row(run.report)
                rows[name].append(row)
                if config.verbose:
                    print(
                        f"seed {seed} {name}: digit {row['digit']} {row['target_before']} -> "
                        f"{row['target_after']} wrong, accuracy {row['accuracy_before']:.4f} -> "
                        f"{row['accuracy_after']:.4f} (test)",
                        flush=True,
                    )
            if config.out:  # after every seed, so that an interrupted run leaves its table
                _write(Path(config.out), _result(seeds, split, rows, time.perf_counter() - start))
    result = _result(seeds, split, rows, time.perf_counter() - start)
    if config.verbose:
        print()
        print(seeds_table(result))
    return result


def _result(
    seeds: Sequence[int],
    split: dict[str, Any] | None,
    rows: dict[str, list[dict[str, Any]]],
    seconds: float,
) -> dict[str, Any]:
    done = sorted({r["seed"] for block in rows.values() for r in block})
    return {
        "seeds": list(seeds),
        "seeds_done": done,
        "split": split,
        "recipes": {name: {"rows": r, "summary": summarize(r)} for name, r in rows.items() if r},
        "seconds": seconds,
    }


def _write(out: Path, result: dict[str, Any]) -> None:
    write_json(result, out / SEEDS_JSON)
    write_text(seeds_table(result) + "\n", out / SEEDS_TEXT)
