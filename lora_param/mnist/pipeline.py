"""The whole reference run: pretrain, evaluate, add LoRA, fine-tune on one digit, check, report."""

from __future__ import annotations

import copy
import functools
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_param import (
    LoRAError,
    iter_lora,
    load_lora,
    lora_disabled,
    parameter_counts,
    save_lora,
    trainable_summary,
)
from lora_param import (
    __version__ as lora_param_version,
)
from lora_param.core.atomic import atomic_write

from .adapters import add_adapter, init_value, parse_variant
from .checkpoint import (
    base_state,
    check_checkpoint_split,
    checkpoint_split_file,
    load_checkpoint,
    recorded_split,
    report_beside,
    same_tensors,
)
from .config import (
    ADAPTER_FILE,
    CONFUSION_FILE,
    PLOT_FILE,
    PRETRAINED_FILE,
    REPORT_FILE,
    PipelineConfig,
)
from .confusion import confusion_block, plot_confusion_change
from .data import MNISTTensors, load_mnist
from .evaluate import EvalResult, evaluate, worst_digit
from .model import LINEAR_LAYERS, build_model
from .quantized import quantize_pretrained, storage_line
from .report import (
    LR_MAX_DROP_POINTS,
    choose_lr,
    digit_changes,
    gain_stops_at,
    plot_errors,
    summary_text,
    sweep_table,
    write_json,
)
from .runtime import PhaseTimer, available_cpus, num_threads, resolve_device
from .split import hold_out_validation
from .train import finetune, pretrain

# run_pipeline and what it returns; the other names lived here before 0.2.1 and stay importable.
__all__ = [
    "ADAPTER_FILE",
    "CONFUSION_FILE",
    "PLOT_FILE",
    "PRETRAINED_FILE",
    "REPORT_FILE",
    "PhaseTimer",
    "PipelineConfig",
    "PipelineRun",
    "available_cpus",
    "base_state",
    "check_checkpoint_split",
    "checkpoint_split_file",
    "load_checkpoint",
    "num_threads",
    "recorded_split",
    "resolve_device",
    "run_pipeline",
    "same_tensors",
    "split_data",
]


def _say(config: PipelineConfig, message: str) -> None:
    if config.verbose:
        print(message, flush=True)


def _finetune_once(
    base: nn.Module,
    data: MNISTTensors,
    config: PipelineConfig,
    rank: int,
    target: int,
    pre_selection: EvalResult,
    timer: PhaseTimer,
    device: torch.device,
) -> tuple[nn.Module, dict[str, Any]]:
    """Add the adapter (LoRA at `rank`, or another variant at LoRA rank `rank`'s budget) to a
    copy of `base`, fine-tune it (once per learning rate of ``config.lrs``, keeping the one
    `choose_lr` picks) or load it, and evaluate on the selection split (validation; the
    training images with the tutorial's data), never on test."""
    model = copy.deepcopy(base)
    recipe = config.finetune_recipe()
    result: dict[str, Any] = {"rank": rank, "alpha": config.alpha}
    with timer("add_lora"):
        if config.load_adapter:
            load_lora(model, config.load_adapter)
        else:
            torch.manual_seed(
                config.seed + 1000 * rank + 1
            )  # LoRA A ~ N(0, 1): same draw for a given seed
            spec = parse_variant(config.variant)
            budget = add_adapter(model, LINEAR_LAYERS, spec, config.init, rank, config.alpha)
            result.update(
                variant=spec.label,
                init=config.init,
                init_value=init_value(spec.name, config.init),
                budget=budget.to_dict(),
                variant_rank=budget.rank_text(),
            )
        model.to(device)
    counts = parameter_counts(model)
    images, labels, split = data.selection()

    def select(candidate: nn.Module, desc: str) -> EvalResult:
        with timer("eval_lora_on"):
            return evaluate(
                candidate,
                images,
                labels,
                batch_size=config.eval_batch_size,
                desc=desc,
                progress=config.progress,
                split=split,
            )

    if config.load_adapter:
        entries = [p for *_, p in iter_lora(model)]
        ranks = sorted({int(p.fields()["rank"]) for p in entries})
        alphas = sorted({float(p.fields().get("alpha") or 0.0) for p in entries})
        result["rank"] = ranks[0] if len(ranks) == 1 else ranks
        result["alpha"] = alphas[0] if len(alphas) == 1 else alphas
        result["variant"] = ", ".join(sorted({p.variant for p in entries}))
        result["finetune"] = None
        on = select(model, f"evaluate LoRA on ({split})")
    else:
        lrs = config.lrs or [recipe.lr]
        tried: list[tuple[nn.Module, dict[str, Any], EvalResult]] = []
        for lr in lrs:
            candidate = copy.deepcopy(model) if len(lrs) > 1 else model
            gen = torch.Generator().manual_seed(config.seed + 1)
            with timer("finetune"), num_threads(config.train_threads):
                train = finetune(
                    candidate,
                    data.train_images,
                    data.train_labels,
                    target,
                    recipe.with_overrides(lr=lr),
                    teacher=functools.partial(lora_disabled, candidate),
                    generator=gen,
                    progress=config.progress,
                )
            desc = f"evaluate LoRA on ({split})" + (f", lr {lr:g}" if len(lrs) > 1 else "")
            on = select(candidate, desc)
            row = {
                "lr": lr,
                "split": split,
                "changes": digit_changes(pre_selection.to_dict(), on.to_dict(), target),
                "accuracy": on.accuracy,
                "finetune": train.to_dict(),
            }
            tried.append((candidate, row, on))
        pick = choose_lr([row for _, row, _ in tried]) if len(tried) > 1 else 0
        model, chosen, on = tried[pick]
        result["finetune"] = chosen["finetune"]
        result["lr"] = chosen["lr"]
        if len(tried) > 1:
            result["lr_choice"] = {
                "value": chosen["lr"],
                "split": split,
                "rule": f"largest {split} cut within {LR_MAX_DROP_POINTS} points of accuracy, "
                "else the smallest accuracy drop",
                "candidates": [
                    {
                        "lr": row["lr"],
                        "target_after": row["changes"]["target"]["after"],
                        "target_cut": row["changes"]["target"]["reduction"],
                        "accuracy": row["accuracy"],
                        "accuracy_change_points": row["changes"]["accuracy_change_points"],
                    }
                    for _, row, _ in tried
                ],
            }
        del tried
    result.update(
        {
            "selection": {
                "split": split,
                "lora_on": on.to_dict(),
                "changes": digit_changes(pre_selection.to_dict(), on.to_dict(), target),
            },
            "lora_params": counts.lora,
            "base_params": counts.base,
            "trainable_params": counts.trainable,
            "lora_percent_of_base": counts.lora_percent_of_base,
        }
    )
    return model, result


def _test_once(
    model: nn.Module,
    data: MNISTTensors,
    config: PipelineConfig,
    target: int,
    pre: EvalResult,
    pre_state: dict[str, Tensor],
    timer: PhaseTimer,
) -> dict[str, Any]:
    """The test set, once, for a fine-tuned model: LoRA on, LoRA off, the checks, the confusion."""
    with timer("eval_lora_on"):
        on = evaluate(
            model,
            data.test_images,
            data.test_labels,
            batch_size=config.eval_batch_size,
            desc="evaluate LoRA on (test)",
            progress=config.progress,
            split="test",
        )
    with timer("eval_lora_off"), lora_disabled(model):
        off = evaluate(
            model,
            data.test_images,
            data.test_labels,
            batch_size=config.eval_batch_size,
            desc="evaluate LoRA off (test)",
            progress=config.progress,
            split="test",
        )
    with timer("checks"):
        assert pre.logits is not None and off.logits is not None and on.logits is not None
        identical = torch.equal(off.logits, pre.logits)
        max_diff = float((off.logits - pre.logits).abs().max())
        frozen = same_tensors(pre_state, base_state(model))
        confusion = confusion_block(pre.logits, on.logits, data.test_labels, "test")
    return {
        "lora_on": on.to_dict(),
        "lora_off": off.to_dict(),
        "lora_off_identical": identical,
        "lora_off_max_abs_diff": max_diff,
        "frozen_unchanged": frozen,
        "changes": digit_changes(pre.to_dict(), on.to_dict(), target),
        "confusion": confusion,
    }


@dataclass
class PipelineRun:
    """What `run_pipeline` returns.

    Attributes:
        report: The JSON-ready report (what report.json holds).
        model: The fine-tuned model with its adapter (the first rank of a sweep).
        base: The pretrained model, without LoRA.
        data: The MNIST tensors used, split as the run split them (pass them back to
            `run_pipeline` with the same split settings to reuse them).
    """

    report: dict[str, Any]
    model: nn.Module
    base: nn.Module
    data: MNISTTensors


def run_pipeline(config: PipelineConfig, data: MNISTTensors | None = None) -> PipelineRun:
    """Run the reference pipeline: print the summary, write the files asked for, return everything.

    Args:
        config: The run's settings.
        data: MNIST tensors already loaded (tests, notebooks); None loads from ``config.data_dir``.

    Returns:
        The report (results before/with/without LoRA, checks, counts, timings, recipe) and models.
    """
    threads = config.threads or available_cpus()
    with num_threads(threads):
        return _run(config, data, threads)


def split_data(data: MNISTTensors, config: PipelineConfig) -> MNISTTensors:
    """`data` with the validation split `config` asks for (already-split data is checked, reused).

    Raises:
        LoRAError: `data` was split with other settings than `config`'s.
    """
    if data.split is None:
        return hold_out_validation(data, config.validation_size, config.split_seed)
    info = data.split
    want_seed = config.split_seed if config.validation_size else None
    if info.validation_size != config.validation_size or info.seed != want_seed:
        raise LoRAError(
            f"the data passed in was split with {info.validation_size} validation images "
            f"(seed {info.seed}), the config asks for {config.validation_size} (seed {want_seed}): "
            "pass the unsplit tensors from load_mnist()"
        )
    return data


def _choose_target(config: PipelineConfig, worst: int, sidecar: dict[str, Any]) -> int:
    if config.digit == "worst":
        return worst
    if config.digit is not None:
        return int(config.digit)
    if isinstance(sidecar.get("target_digit"), int):
        return int(sidecar["target_digit"])
    return 9


def _run(config: PipelineConfig, data: MNISTTensors | None, threads: int) -> PipelineRun:
    total_start = time.perf_counter()
    timer = PhaseTimer()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    recipe = config.finetune_recipe()

    checkpoint = config.checkpoint
    if config.load_adapter and checkpoint is None:
        checkpoint = os.fspath(Path(config.load_adapter).with_name(PRETRAINED_FILE))
    if config.load_adapter and not (checkpoint and Path(checkpoint).is_file()):
        raise FileNotFoundError(
            f"--load-adapter needs the pretrained checkpoint it was trained on: "
            f"{checkpoint} does not exist (pass --checkpoint)"
        )
    with timer("data"):
        if data is None:
            _say(config, f"loading MNIST from {Path(config.data_dir).resolve() / 'MNIST' / 'raw'}")
            data = load_mnist(config.data_dir, download=config.download)
        data = split_data(data, config).to(device)
    assert data.split is not None
    sel_images, sel_labels, sel_split = data.selection()

    base = build_model(config.seed, device)
    pretrain_result = None
    with timer("pretrain"):
        if checkpoint and Path(checkpoint).is_file():
            _say(config, f"loading the pretrained model from {checkpoint}")
            check_checkpoint_split(checkpoint, data.split)
            load_checkpoint(base, checkpoint)
        else:
            gen = torch.Generator().manual_seed(config.seed)
            with num_threads(config.train_threads):
                pretrain_result = pretrain(
                    base,
                    data.train_images,
                    data.train_labels,
                    config.pretrain,
                    generator=gen,
                    progress=config.progress,
                )
            if checkpoint:  # a cache: the next run with the same --checkpoint skips pretraining
                state = base_state(base)
                atomic_write(checkpoint, lambda f: torch.save(state, f))
                write_json(data.split.to_dict(), checkpoint_split_file(checkpoint))
    plain_state = base_state(base)
    fp32_accuracy = None
    if config.quantize:
        with timer("quantize"):
            fp32 = evaluate(
                base, data.test_images, data.test_labels, progress=False, split="test"
            )  # reported beside the packed model's accuracy, never used for a choice
            fp32_accuracy = fp32.accuracy
    base_storage = quantize_pretrained(base, config.quantize, fp32_accuracy)
    with timer("eval_pretrained"):
        pre_selection = evaluate(
            base,
            sel_images,
            sel_labels,
            batch_size=config.eval_batch_size,
            desc=f"evaluate pretrained ({sel_split})",
            progress=config.progress,
            split=sel_split,
        )
    pre_state = base_state(base)
    worst = worst_digit(pre_selection)
    sidecar = report_beside(config.load_adapter) if config.load_adapter else {}
    target = _choose_target(config, worst, sidecar)

    ranks = config.ranks or [config.rank]
    tuned: list[tuple[nn.Module, dict[str, Any]]] = []
    for rank in ranks:
        start = time.perf_counter()
        model_r, row = _finetune_once(
            base, data, config, rank, target, pre_selection, timer, device
        )
        row["seconds"] = time.perf_counter() - start
        tuned.append((model_r, row))
        if len(tuned) == 1:
            _say(config, trainable_summary(model_r))
        if config.load_adapter:
            break
    gain_stop = None
    if config.ranks:
        gain_stop = gain_stops_at(
            [{"rank": row["rank"], **row["selection"]} for _, row in tuned], target
        )

    # Every choice is made: now the test set, once per model.
    with timer("eval_pretrained"):
        pre = evaluate(
            base,
            data.test_images,
            data.test_labels,
            batch_size=config.eval_batch_size,
            desc="evaluate pretrained (test)",
            progress=config.progress,
            split="test",
        )
    sweep = []
    for model_r, row in tuned:
        row.update(_test_once(model_r, data, config, target, pre, pre_state, timer))
        sweep.append(row)
    model, first = tuned[0]

    recipe_info: dict[str, Any] = {
        **recipe.to_dict(),
        "pretrain": asdict(config.pretrain),
        "target_digit": target,
        "init": first.get("init_value", "gaussian"),
        "layers": list(LINEAR_LAYERS),
        "variant": first.get("variant", "lora"),
        "lr": first.get("lr", recipe.lr),
    }
    if config.load_adapter:  # the adapter's own recipe, as recorded beside it (if it was)
        recipe_info = sidecar.get("recipe") or {"name": "loaded adapter"}
    choices: dict[str, Any] = {
        "made_on": sel_split,
        "target_digit": {
            "value": target,
            "how": "--digit worst" if config.digit == "worst" else "given",
        },
        "worst_digit": {"value": worst, "split": pre_selection.split},
    }
    if gain_stop is not None or config.ranks:
        choices["gain_stops_at_rank"] = {"value": gain_stop, "split": sel_split}
    if "lr_choice" in first:
        choices["lr"] = first["lr_choice"]
    selection_block = {
        "pretrained": pre_selection.to_dict(),
        "lora_on": first["selection"]["lora_on"],
        "changes": first["selection"]["changes"],
    }
    test_block = {
        "pretrained": pre.to_dict(),
        "lora_on": first["lora_on"],
        "lora_off": first["lora_off"],
        "changes": first["changes"],
    }
    report: dict[str, Any] = {
        # the top-level results are the test set's (as before); "validation" holds the choices'
        "pretrained": pre.to_dict(),
        "lora_on": first["lora_on"],
        "lora_off": first["lora_off"],
        "target_digit": target,
        "worst_digit": worst,
        "rank": first["rank"],
        "alpha": first["alpha"],
        "variant": first.get("variant", "lora"),
        "init": first.get("init", "default"),
        "variant_rank": first.get("variant_rank", str(first["rank"])),
        "budget": first.get("budget"),
        "lr": first.get("lr"),
        "lora_params": first["lora_params"],
        "base_params": first["base_params"],
        "trainable_params": first["trainable_params"],
        "lora_percent_of_base": first["lora_percent_of_base"],
        "lora_off_identical": first["lora_off_identical"],
        "lora_off_max_abs_diff": first["lora_off_max_abs_diff"],
        "frozen_unchanged": first["frozen_unchanged"],
        "base_storage": base_storage,
        "changes": first["changes"],
        "split": data.split.to_dict(),
        "validation": selection_block if sel_split == "validation" else None,
        "train_selection": selection_block if sel_split == "train" else None,
        "test": test_block,
        "choices": choices,
        "confusion": first["confusion"],
        "seed": config.seed,
        "recipe": recipe_info,
        "pretrain": pretrain_result.to_dict() if pretrain_result else {"loaded_from": checkpoint},
        "finetune": first["finetune"],
        "loaded_adapter": config.load_adapter,
        "seconds": {},
        "environment": {
            "device": str(device),
            "threads": threads,
            "train_threads": config.train_threads or threads,
            "torch": torch.__version__,
            "lora_param": lora_param_version,
            "python": platform.python_version(),
        },
    }
    if config.ranks:
        report["sweep"] = [
            {k: v for k, v in row.items() if k not in ("lora_off", "confusion")} for row in sweep
        ]
        report["gain_stops_at_rank"] = gain_stop

    if config.out:
        with timer("save"):
            report["files"] = _write_files(config, report, model, plain_state, target, recipe_info)
    timer.seconds["total"] = time.perf_counter() - total_start
    report["seconds"] = dict(timer.seconds)
    if config.out:
        write_json(report, Path(config.out) / REPORT_FILE)
    if config.verbose:
        print()
        print(summary_text(report))
        print(storage_line(base_storage))
        if config.ranks:
            print()
            print(
                f"rank sweep (same pretrained model, recipe {recipe.name!r}, digit {target}; "
                f"test numbers, and the {sel_split} errors the choice is made on):"
            )
            print(sweep_table(sweep, target))
            print(
                f"gain in digit-{target} errors ({sel_split}) stops at rank "
                f"{report['gain_stops_at_rank']}"
            )
        if config.out:
            print(f"\nwrote {', '.join(report['files'].values())}")
    return PipelineRun(report=report, model=model, base=base, data=data)


def _write_files(
    config: PipelineConfig,
    report: dict[str, Any],
    model: nn.Module,
    pre_state: dict[str, Tensor],
    target: int,
    recipe_info: dict[str, Any],
) -> dict[str, str]:
    """Write pretrained.pt (`pre_state`: the fp32 weights even when the base is packed),
    adapter.pt and the two plots under ``config.out``; return the paths."""
    assert config.out is not None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report": os.fspath(out / REPORT_FILE)}
    if not config.load_adapter:
        torch.save(pre_state, out / PRETRAINED_FILE)
        save_lora(model, out / ADAPTER_FILE)
        files.update(
            pretrained=os.fspath(out / PRETRAINED_FILE), adapter=os.fspath(out / ADAPTER_FILE)
        )
    name = recipe_info.get("name", "loaded adapter")
    fig = plot_errors(
        report["pretrained"]["wrong_per_digit"],
        report["lora_on"]["wrong_per_digit"],
        out / PLOT_FILE,
        target=target,
        title=f"Test set: wrong answers per digit, LoRA on digit {target} ({name})",
    )
    if fig is None:
        _say(
            config,
            "matplotlib is not installed: skipping errors.png and confusion.png "
            "(pip install 'lora_param[plot]')",
        )
        return files
    files["plot"] = os.fspath(out / PLOT_FILE)
    plot_confusion_change(
        report["confusion"]["change"],
        out / CONFUSION_FILE,
        target=target,
        title=f"Test set: LoRA on digit {target} ({name}) - pretrained",
    )
    files["confusion"] = os.fspath(out / CONFUSION_FILE)
    return files
