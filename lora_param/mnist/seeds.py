"""The seeds table: one recipe (or several) over many seeds, one pretraining per seed.

``lora-param-mnist --seeds 0-9 --recipe tutorial balanced`` pretrains once per seed, fine-tunes
every recipe from that same pretrained model, and tabulates the test set's numbers per seed with
their mean, standard deviation and worst case. Choices inside each run are made on validation.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lora_param import __version__ as lora_param_version
from lora_param.core.errors import LoRAError

from .adapters import Budget, init_applies, init_value, match_budget, parse_variant
from .config import PipelineConfig
from .data import MNISTTensors
from .model import LINEAR_LAYERS, MLP
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
        "variant": report.get("variant", "lora"),
        "init": report.get("init", "default"),
        "variant_rank": report.get("variant_rank"),
        "trainable": report["trainable_params"],
        "lr": report.get("lr"),
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
    several = len(result.get("arms") or [None]) > 1
    for key, block in result["recipes"].items():
        rows, summary = block["rows"], block["summary"]
        chosen = result.get("lrs") is not None
        head = (
            f"{'seed':>4} {'digit':>5} {'target wrong':>13} {'cut':>6} "
            f"{'accuracy':>15} {'change':>8}" + (f" {'lr':>8}" if chosen else "")
        )
        name = repr(block.get("recipe", key))
        if several:
            budget = block["budget"]
            name += (
                f", {arm_label(block['variant'], block['init'])} (rank "
                f"{_rank_text(budget['ranks'])}, {budget['trainable']:,} trainable)"
            )
        lines += [
            f"recipe {name}, test set ({test_size:,} images), choices made on {made_on}:",
            head,
            "-" * len(head),
        ]
        for r in rows:
            lines.append(
                f"{r['seed']:>4} {r['digit']:>5} "
                f"{r['target_before']:>5} -> {r['target_after']:<4} {100 * r['target_cut']:>5.1f}% "
                f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} "
                f"{r['accuracy_change_points']:>+7.2f}pt" + (f" {r['lr']:>8g}" if chosen else "")
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
    if several:
        lines += [
            f"adapters compared at LoRA rank {result['reference_rank']}'s trainable-parameter "
            f"budget (test set, mean ± std over seeds, worst seed in brackets):",
            comparison_table(result),
        ]
    return "\n".join(lines).rstrip()


def _rank_text(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def comparison_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (recipe, adapter): budget, learning rates chosen, the test set's summary."""
    out = []
    for block in result["recipes"].values():
        budget, summary, rows = block["budget"], block["summary"], block["rows"]
        cut, pts = summary["target_cut"], summary["accuracy_change_points"]
        lrs = [r["lr"] for r in rows if r.get("lr") is not None]
        out.append(
            {
                "recipe": block["recipe"],
                "variant": block["variant"],
                "init": block["init"],
                "rank": _rank_text(budget["ranks"]),
                "trainable": budget["trainable"],
                "vs_lora": budget["trainable"] / budget["reference_trainable"],
                "lr": ", ".join(
                    f"{lr:g}" + (f" ×{lrs.count(lr)}" if len(set(lrs)) > 1 else "")
                    for lr in sorted(set(lrs))
                ),
                "seeds": summary["seeds"],
                "cut_mean": 100 * cut["mean"],
                "cut_std": 100 * cut["std"],
                "cut_worst": 100 * cut["worst"],
                "points_mean": pts["mean"],
                "points_std": pts["std"],
                "points_worst": pts["worst"],
                "meet_goal": summary["meet_goal"],
                "checks": all(r["lora_off_identical"] and r["frozen_unchanged"] for r in rows),
            }
        )
    return out


def comparison_table(result: dict[str, Any]) -> str:
    """The printed comparison: one line per (recipe, adapter)."""
    rows = comparison_rows(result)
    width = max([len(arm_label(r["variant"], r["init"])) for r in rows] + [7])
    head = (
        f"{'recipe':<9} {'adapter':<{width}} {'rank':>7} {'trainable':>9} {'lr':>14} "
        f"{'target errors cut':>22} {'accuracy change':>24} {'goal':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['recipe']:<9} {arm_label(r['variant'], r['init']):<{width}} {r['rank']:>7} "
            f"{r['trainable']:>9,} {r['lr']:>14} "
            f"{r['cut_mean']:>6.1f}% ± {r['cut_std']:4.1f} ({r['cut_worst']:5.1f}) "
            f"{r['points_mean']:>+6.2f}pt ± {r['points_std']:4.2f} ({r['points_worst']:+6.2f}) "
            f"{r['meet_goal']:>2}/{r['seeds']}"
        )
    return "\n".join(lines)


def arm_label(variant: str, init: str) -> str:
    """How a (variant, init) pair is named in the table: ``"oft:side=output"``,
    ``"lora init=pissa"``."""
    return variant if init == "default" else f"{variant} init={init}"


def run_seeds(
    config: PipelineConfig,
    seeds: Sequence[int],
    recipes: Sequence[str],
    data: MNISTTensors | None = None,
    arms: Sequence[tuple[str, str]] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run every recipe and adapter for every seed: pretrain once per seed, then fine-tune each
    (recipe, adapter) pair from that pretrained model.

    Args:
        config: Settings shared by every run (``seed``, ``recipe``, ``variant``, ``init``,
            ``ranks`` and ``out`` are set per run; with ``out``, seeds.json and seeds.txt are
            written there). ``checkpoint`` names a folder that caches each seed's pretrained
            model (`checkpoint_name`), so a rerun with the same settings skips pretraining;
            None uses a temporary folder. ``rank`` is the LoRA rank whose trainable count every
            variant matches; ``lrs`` the learning rates each run chooses from on validation.
        seeds: Seeds to run.
        recipes: Recipe names, e.g. ["tutorial", "balanced"].
        data: Loaded tensors; None loads them once from ``config.data_dir``.
        arms: ``(variant, init)`` pairs, e.g. ``[("lora", "default"), ("oft:side=output",
            "default"), ("lora", "pissa")]``; None: ``config``'s one. With several, each
            (recipe, adapter) gets its own block, named ``"<recipe> / <variant>[ init=<init>]"``.
        command: The command line, recorded in the result.

    Returns:
        {"seeds", "seeds_done", "split", "reference_rank", "lrs", "arms", "recipes":
        {name: {"recipe", "variant", "init", "budget", "rows", "summary"}}, "environment",
        "seconds"}.
    """
    if not seeds or not recipes:
        raise LoRAError("give at least one seed and one recipe")
    for name in recipes:
        replace(config, recipe=name).finetune_recipe()  # unknown names fail before any work
    pairs = list(arms) if arms else [(config.variant, config.init)]
    budgets = {pair: plan_arm(*pair, config.rank) for pair in pairs}  # bad adapters fail here
    several = len(pairs) > 1
    start = time.perf_counter()
    environment = {**run_environment(), "command": command}
    blocks: dict[str, dict[str, Any]] = {}
    for name in recipes:
        for variant, init in pairs:
            key = f"{name} / {arm_label(variant, init)}" if several else name
            blocks[key] = {
                "recipe": name,
                "variant": variant,
                "init": init,
                "budget": budgets[(variant, init)].to_dict(),
                "rows": [],
            }
    split: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="lora-param-seeds-") as tmp:
        folder = Path(config.checkpoint) if config.checkpoint else Path(tmp)
        for seed in seeds:
            checkpoint = os.fspath(folder / checkpoint_name(seed))
            for key, block in blocks.items():
                run = run_pipeline(
                    replace(
                        config,
                        seed=seed,
                        recipe=block["recipe"],
                        variant=block["variant"],
                        init=block["init"],
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
                block["rows"].append(row)
                if config.verbose:
                    print(
                        f"seed {seed} {key}: digit {row['digit']} {row['target_before']} -> "
                        f"{row['target_after']} wrong, accuracy {row['accuracy_before']:.4f} -> "
                        f"{row['accuracy_after']:.4f} (test), lr {row['lr']:g}",
                        flush=True,
                    )
            if config.out:  # after every seed, so that an interrupted run leaves its table
                _write(
                    Path(config.out),
                    _result(seeds, split, blocks, config, environment, time.perf_counter() - start),
                )
    result = _result(seeds, split, blocks, config, environment, time.perf_counter() - start)
    if config.out:
        _write(Path(config.out), result)
    if config.verbose:
        print()
        print(seeds_table(result))
    return result


def arms_of(
    variants: Sequence[str], inits: Sequence[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Every (variant, init) pair, split into those the variant has and those it has not."""
    arms: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for variant in dict.fromkeys(variants):
        for init in dict.fromkeys(inits):
            (arms if init_applies(variant.partition(":")[0], init) else skipped).append(
                (variant, init)
            )
    return arms, skipped


def plan_arm(variant: str, init: str, reference_rank: int) -> Budget:
    """The budget of one (variant, init) pair on the MLP, before any work.

    Raises:
        LoRAError: An unknown variant or option, an init the variant does not have, or no rank
            that fits a layer.
    """
    spec = parse_variant(variant)
    if not init_applies(spec.name, init):
        raise LoRAError(f"--init {init} is not an initialization of the {spec.name} variant")
    with torch.device("meta"):
        model = MLP()
    return match_budget(model, LINEAR_LAYERS, spec, init_value(spec.name, init), reference_rank)


def run_environment() -> dict[str, Any]:
    """Where the numbers came from: versions, CPU, cores, the load average now, the date."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "load_average_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lora_param": lora_param_version,
    }


def _result(
    seeds: Sequence[int],
    split: dict[str, Any] | None,
    blocks: dict[str, dict[str, Any]],
    config: PipelineConfig,
    environment: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    done = sorted({r["seed"] for block in blocks.values() for r in block["rows"]})
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "seeds": list(seeds),
        "seeds_done": done,
        "split": split,
        "reference_rank": config.rank,
        "alpha": config.alpha,
        "lrs": list(config.lrs) if config.lrs else None,
        "arms": list(dict.fromkeys((b["variant"], b["init"]) for b in blocks.values())),
        "recipes": {
            key: {**block, "summary": summarize(block["rows"])}
            for key, block in blocks.items()
            if block["rows"]
        },
        "environment": {**environment, "load_average_end": load},
        "seconds": seconds,
    }


def _write(out: Path, result: dict[str, Any]) -> None:
    write_json(result, out / SEEDS_JSON)
    write_text(seeds_table(result) + "\n", out / SEEDS_TEXT)
