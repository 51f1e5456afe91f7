"""Reporting: the summary table, report.json and the per-digit error bar chart."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lora_param.core.atomic import atomic_write

from .evaluate import refuse_test_split

DIGITS = range(10)


def _row(label: str, accuracy: str, cells: Sequence[str], total: str, width: int) -> str:
    return f"{label:<{width}} {accuracy:>8} " + " ".join(f"{c:>5}" for c in cells) + f" {total:>6}"


def results_table(rows: Sequence[tuple[str, Mapping[str, Any]]], width: int | None = None) -> str:
    """Accuracy and wrong answers per digit, one row per model.

    Args:
        rows: (label, result) pairs; a result has "accuracy" and "wrong_per_digit".
        width: Width of the label column (default: the longest label).
    """
    width = width or max([len(label) for label, _ in rows] + [len("change vs pretrained")])
    lines = [_row("", "accuracy", [str(d) for d in DIGITS], "wrong", width)]
    lines.append("-" * len(lines[0]))
    for label, res in rows:
        wrong = res["wrong_per_digit"]
        lines.append(
            _row(label, f"{res['accuracy']:.4f}", [str(w) for w in wrong], str(sum(wrong)), width)
        )
    return "\n".join(lines)


def change_row(before: Mapping[str, Any], after: Mapping[str, Any], width: int = 20) -> str:
    """The row "after - before": accuracy in points, wrong answers per digit with a sign."""
    diff = [a - b for a, b in zip(after["wrong_per_digit"], before["wrong_per_digit"], strict=True)]
    points = 100.0 * (after["accuracy"] - before["accuracy"])
    return _row(
        "change vs pretrained",
        f"{points:+.2f}pt",
        [f"{d:+d}" for d in diff],
        f"{sum(diff):+d}",
        width,
    )


def digit_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], target: int
) -> dict[str, Any]:
    """How the target digit and every other digit changed (wrong answers)."""
    b, a = before["wrong_per_digit"], after["wrong_per_digit"]
    others = {
        str(d): {"before": b[d], "after": a[d], "change": a[d] - b[d]}
        for d in DIGITS
        if d != target
    }
    worst = max((d for d in DIGITS if d != target), key=lambda d: (a[d] - b[d], -d))
    cut = (b[target] - a[target]) / b[target] if b[target] else 0.0
    return {
        "target": {
            "digit": target,
            "before": b[target],
            "after": a[target],
            "change": a[target] - b[target],
            "reduction": cut,
        },
        "others": others,
        "others_total_change": sum(v["change"] for v in others.values()),
        "worst_other": {
            "digit": worst,
            "before": b[worst],
            "after": a[worst],
            "change": a[worst] - b[worst],
        },
        "accuracy_change_points": 100.0 * (after["accuracy"] - before["accuracy"]),
    }


def summary_text(report: Mapping[str, Any]) -> str:
    """The end-of-run summary: table, target and other digits, forgetting note, checks, counts."""
    target = report["target_digit"]
    rank, alpha = report["rank"], report["alpha"]
    variant = report.get("variant") or "lora"
    init = report.get("init") or "default"
    adapter = f"r={rank}" if variant == "lora" else f"{variant}, r={report['variant_rank']}"
    if init != "default":
        adapter += f", init {init}"
    rows = [
        ("pretrained", report["pretrained"]),
        (f"LoRA on ({adapter}, digit {target})", report["lora_on"]),
        ("LoRA off", report["lora_off"]),
    ]
    width = max(len(label) for label, _ in [*rows, ("change vs pretrained", {})])
    lines = [
        f"MNIST TEST SET ({report['pretrained']['total']:,} images, evaluated once per model, "
        "after every choice): accuracy and wrong answers per digit",
        results_table(rows, width),
        change_row(report["pretrained"], report["lora_on"], width),
    ]
    ch = report["changes"]
    t, w = ch["target"], ch["worst_other"]
    lines.append("")
    lines.append(
        f"recipe {report['recipe']['name']!r}, test set: target digit {target}: "
        f"{t['before']} -> {t['after']} wrong ({-100 * t['reduction']:+.0f}%)"
    )
    lines.append(
        f"other digits: {ch['others_total_change']:+d} wrong in total; most hurt: "
        f"digit {w['digit']} {w['before']} -> {w['after']} ({w['change']:+d})"
    )
    lines.append(
        f"overall accuracy: {report['pretrained']['accuracy']:.4f} -> "
        f"{report['lora_on']['accuracy']:.4f} ({ch['accuracy_change_points']:+.2f} points)"
    )
    lines += _choice_lines(report)
    if ch["accuracy_change_points"] < -0.5:
        lines.append(
            f"note: training on digit {target} alone fixes {target}s and breaks other digits "
            "(catastrophic "
            "forgetting): the adapter learned 'answer "
            f"{target}'. `--recipe balanced` replays other digits in every batch to keep them."
        )
    lines.append("")
    lines.append(
        f"check: LoRA off reproduces the pretrained logits exactly: "
        f"{'PASS' if report['lora_off_identical'] else 'FAIL'}"
        f" (max |diff| {report['lora_off_max_abs_diff']:.3g})"
    )
    frozen = "PASS" if report["frozen_unchanged"] else "FAIL"
    lines.append(f"check: no frozen weight changed during fine-tuning: {frozen}")
    budget = report.get("budget")
    if (variant == "lora" and init == "default") or not budget:
        at = f"at rank {rank}, alpha {alpha:g}"
    else:
        at = (
            f"{variant} at rank {report['variant_rank']} (LoRA rank {budget['reference_rank']} "
            f"has {budget['reference_trainable']:,}; scale {alpha / int(rank):g})"
        )
    lines.append(
        f"parameters: {report['base_params']:,} base, {report['lora_params']:,} LoRA "
        f"({report['lora_percent_of_base']:.3f}% of base) {at}"
    )
    sec = report["seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
    return "\n".join(lines)


def _choice_lines(report: Mapping[str, Any]) -> list[str]:
    """Where the choices were made: the split, its numbers, and the worst digit found there."""
    split = report.get("split") or {}
    choices = report.get("choices") or {}
    made_on = choices.get("made_on", "validation")
    block = report.get("validation") if made_on == "validation" else report.get("train_selection")
    lines = []
    if split.get("validation"):
        lines.append(
            f"split: {split['validation_size']:,} training images held out for validation "
            f"(stratified, seed {split['seed']}); pretraining saw the other {split['train_size']:,}"
        )
    elif split:
        lines.append(
            f"split: none (--tutorial-data): pretraining saw all {split['train_size']:,} training "
            "images; choices are made on them"
        )
    if block:
        t = block["changes"]["target"]
        lines.append(
            f"{made_on} ({block['pretrained']['total']:,} images): target digit "
            f"{t['before']} -> {t['after']} wrong ({-100 * t['reduction']:+.0f}%), accuracy "
            f"{block['pretrained']['accuracy']:.4f} -> {block['lora_on']['accuracy']:.4f}"
        )
        worst = report["worst_digit"]
        lines.append(
            f"digit with the most {made_on} errors before fine-tuning: {worst} "
            f"({block['pretrained']['wrong_per_digit'][worst]} wrong)"
        )
    lr = choices.get("lr")
    if lr:
        tried = ", ".join(
            f"{c['lr']:g}: {100 * c['target_cut']:.0f}% cut, {c['accuracy_change_points']:+.2f}pt"
            for c in lr["candidates"]
        )
        lines.append(f"learning rate chosen on {lr['split']}: {lr['value']:g} ({tried})")
    return lines


def _hurt(worst: Mapping[str, Any]) -> str:
    return f"{worst['digit']}: {worst['change']:+d}"


def sweep_table(rows: Sequence[Mapping[str, Any]], target: int) -> str:
    """One row per rank: LoRA parameters, test accuracy and target-digit errors, the other digits'
    change, and the target digit's errors on the split the choice is made on (validation)."""
    split = next((r["selection"]["split"] for r in rows if "selection" in r), None)
    head = (
        f"{'rank':>4} {'alpha':>5} {'LoRA params':>11} {'% base':>7} {'test acc':>8} "
        f"{f'{target}s wrong':>9} "
        f"{'others':>7} {'most hurt':>12} {'seconds':>7}"
        + (f" {f'{split} {target}s':>14}" if split else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        w = r["changes"]["worst_other"]
        chosen_on = ""
        if split and "selection" in r:
            chosen_on = f" {r['selection']['lora_on']['wrong_per_digit'][target]:>14}"
        lines.append(
            f"{r['rank']:>4} {r['alpha']:>5g} {r['lora_params']:>11,} "
            f"{r['lora_percent_of_base']:>6.3f}% "
            f"{r['lora_on']['accuracy']:>8.4f} {r['lora_on']['wrong_per_digit'][target]:>9} "
            f"{r['changes']['others_total_change']:>+7d} {_hurt(w):>12} "
            f"{r['seconds']:>7.1f}" + chosen_on
        )
    return "\n".join(lines)


def gain_stops_at(rows: Sequence[Mapping[str, Any]], target: int, tolerance: int = 1) -> int | None:
    """The first rank after which raising the rank no longer cuts the target digit's errors.

    Args:
        rows: Sweep rows in increasing rank order.
        target: Target digit.
        tolerance: Fewer errors than this does not count as a gain.

    Raises:
        LoRAError: A row's "lora_on" result is marked as computed on the test set.
    """
    for row in rows:
        refuse_test_split(row["lora_on"].get("split"), "the rank where gains stop")
    if not rows:
        return None
    for prev, nxt in itertools.pairwise(rows):
        if (
            prev["lora_on"]["wrong_per_digit"][target] - nxt["lora_on"]["wrong_per_digit"][target]
            < tolerance
        ):
            return int(prev["rank"])
    return int(rows[-1]["rank"])


#: The learning-rate rule keeps candidates that lose at most this many accuracy points.
LR_MAX_DROP_POINTS = 0.5


def choose_lr(candidates: Sequence[Mapping[str, Any]]) -> int:
    """Index of the learning rate to keep, by the rule fixed before any run (validation only).

    Among the candidates whose accuracy drops by at most `LR_MAX_DROP_POINTS`, the largest cut
    in target-digit errors (then the better accuracy change, then the smaller rate); when none
    stays within it, the best accuracy change (then the larger cut, then the smaller rate). The
    balanced recipe's settings were chosen by the same rule.

    Args:
        candidates: ``{"lr", "split", "changes"}`` per rate, "changes" from `digit_changes`.

    Raises:
        LoRAError: A candidate was evaluated on the test set.
    """
    if not candidates:
        raise ValueError("no learning rate to choose from")
    for c in candidates:
        refuse_test_split(c.get("split"), "the learning rate")

    def cut(c: Mapping[str, Any]) -> float:
        return float(c["changes"]["target"]["reduction"])

    def points(c: Mapping[str, Any]) -> float:
        return float(c["changes"]["accuracy_change_points"])

    order = range(len(candidates))
    within = [i for i in order if points(candidates[i]) >= -LR_MAX_DROP_POINTS]
    if within:
        return max(within, key=lambda i: (cut(candidates[i]), points(candidates[i]),
                                          -candidates[i]["lr"]))  # fmt: skip
    return max(order, key=lambda i: (points(candidates[i]), cut(candidates[i]),
                                     -candidates[i]["lr"]))  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return os.fspath(value)
    return value


def write_text(text: str, path: str | os.PathLike[str]) -> Path:
    """Write `text` (UTF-8) atomically: a crash leaves the old file or the new one, never half."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data))


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write `report` as indented JSON (non-finite floats become null), atomically."""
    return write_text(json.dumps(_jsonable(report), indent=2) + "\n", path)


def plot_errors(
    pretrained: Sequence[int],
    lora_on: Sequence[int],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "Wrong answers per digit",
    labels: tuple[str, str] = ("pretrained", "LoRA on"),
    target: int | None = None,
) -> Any:
    """Grouped bar chart of wrong answers per digit, before vs after; saved to `path` when given.

    The target digit's tick label, when given, is drawn in bold red.

    Returns:
        The matplotlib Figure, or None without matplotlib (install ``lora_param[plot]``).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.subplots()
    xs = list(DIGITS)
    w = 0.4
    b1 = ax.bar([x - w / 2 for x in xs], pretrained, w, label=labels[0], color="#4c72b0")
    b2 = ax.bar([x + w / 2 for x in xs], lora_on, w, label=labels[1], color="#dd8452")
    ax.bar_label(b1, fontsize=7)
    ax.bar_label(b2, fontsize=7)
    ax.set_xticks(xs)
    if target is not None:
        tick = ax.get_xticklabels()[target]
        tick.set_color("#c0392b")
        tick.set_fontweight("bold")
    ax.set_xlabel("true digit" + (f" (fine-tuned on {target})" if target is not None else ""))
    ax.set_ylabel("wrong answers (of ~1,000 each)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig
