"""The pipeline's pieces on tiny data: batching, recipes, checks, report, adapter reload, sweep, plot."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

from lora_param import active_adapters, add_lora, iter_lora, lora_disabled
from lora_param.mnist import (
    BALANCED,
    MLP,
    TUTORIAL,
    FinetuneRecipe,
    PipelineConfig,
    PretrainConfig,
    finetune,
    pretrain,
    run_pipeline,
    shuffled_batches,
)
from lora_param.mnist.checkpoint import base_state, same_tensors
from lora_param.mnist.cli import main
from lora_param.mnist.report import digit_changes, gain_stops_at, plot_errors, summary_text

REPORT_KEYS = {
    "pretrained",
    "lora_on",
    "lora_off",
    "target_digit",
    "worst_digit",
    "rank",
    "alpha",
    "lora_params",
    "base_params",
    "lora_off_identical",
    "frozen_unchanged",
    "seconds",
    "seed",
    "recipe",
    "changes",
}


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(
        f">{data.dim()}I", *data.shape
    )
    path.write_bytes(header + data.contiguous().numpy().tobytes())


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MNIST (200 train, 60 test): each digit is a bright bar at its own row, plus noise."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=g)
        for i, y in enumerate(labels.tolist()):
            images[i, 2 + 2 * y, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.to(torch.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return root


def tiny_config(root: Path, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {
        "data_dir": str(root),
        "download": False,
        "pretrain": PretrainConfig(steps=20),
        "validation_size": 50,
        "finetune_steps": 5,
        "progress": False,
        "verbose": False,
        "seed": 0,
    }
    base.update(kw)
    return PipelineConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("run")
    return run_pipeline(tiny_config(tiny_root, out=str(out))), out


# --- batching and training loops -------------------------------------------------------------


def test_shuffled_batches_cover_each_epoch_and_reproduce() -> None:
    batches = list(shuffled_batches(25, 10, torch.Generator().manual_seed(3)))
    assert [len(b) for b in batches] == [10, 10, 5]
    assert sorted(torch.cat(batches).tolist()) == list(range(25))
    again = list(shuffled_batches(25, 10, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    long = list(shuffled_batches(25, 10, torch.Generator().manual_seed(3), steps=7))
    assert len(long) == 7 and all(torch.equal(a, b) for a, b in zip(long[:3], batches))
    assert sorted(torch.cat(long[3:6]).tolist()) == list(
        range(25)
    )  # second epoch: a new permutation
    assert list(shuffled_batches(25, 10, torch.Generator(), steps=0)) == []


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return MLP(hidden1=16, hidden2=16)


def _synthetic(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 784, generator=g), torch.arange(n) % 10


def test_pretrain_is_reproducible() -> None:
    x, y = _synthetic()
    states = []
    for _ in range(2):
        model = _small_model()
        result = pretrain(
            model,
            x,
            y,
            PretrainConfig(steps=15),
            generator=torch.Generator().manual_seed(5),
            progress=False,
        )
        states.append(model.state_dict())
    assert result.steps == 15 and result.seconds >= 0
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not model.training  # left in eval mode


class LabelSpy:
    """Records the labels of every batch the model sees (images carry their index in pixel 0)."""

    def __init__(self, model: nn.Module, labels: torch.Tensor) -> None:
        self.batches: list[tuple[list[int], list[bool]]] = []
        self.labels = labels

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            idx = args[0][:, 0].round().long()
            enabled = [p.enabled for *_, p in iter_lora(model)]
            self.batches.append((self.labels[idx].tolist(), enabled))

        model.register_forward_pre_hook(hook)


def _indexed_data(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _synthetic(n)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return x, y


def test_tutorial_recipe_sees_only_the_target_digit() -> None:
    x, y = _indexed_data()
    model = add_lora(
        _small_model(), ["linear1", "linear2", "linear3"], rank=1, alpha=1, init="gaussian"
    )
    spy = LabelSpy(model, y)
    result = finetune(
        model,
        x,
        y,
        9,
        TUTORIAL.with_overrides(steps=4),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert result.steps == 4 and len(spy.batches) == 4
    assert all(set(labels) == {9} and len(labels) == 10 for labels, _ in spy.batches[:1])
    assert all(set(labels) == {9} for labels, _ in spy.batches)


def test_balanced_recipe_replays_other_digits_and_distils_with_lora_off() -> None:
    x, y = _indexed_data()
    model = add_lora(
        _small_model(), ["linear1", "linear2", "linear3"], rank=1, alpha=1, init="gaussian"
    )
    spy = LabelSpy(model, y)
    recipe = FinetuneRecipe(
        "balanced", steps=3, batch_size=10, replay=0.4, target_weight=3.0, distill=1.0
    )
    finetune(
        model,
        x,
        y,
        9,
        recipe,
        teacher=lambda: lora_disabled(model),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert len(spy.batches) == 6  # per step: the teacher (LoRA off), then the student (LoRA on)
    for teacher, student in zip(spy.batches[0::2], spy.batches[1::2]):
        t_labels, t_enabled = teacher
        s_labels, s_enabled = student
        assert len(t_labels) == 4 and 9 not in t_labels and not any(t_enabled)
        assert len(s_labels) == 10 and all(s_enabled)
        assert s_labels[:6] == [9] * 6 and s_labels[6:] == t_labels
    assert active_adapters(model) == ["default"]  # restored after each teacher pass


def test_balanced_without_distill_needs_no_teacher_and_weights_the_target() -> None:
    x, y = _indexed_data()
    model = add_lora(
        _small_model(), ["linear1", "linear2", "linear3"], rank=1, alpha=1, init="gaussian"
    )
    spy = LabelSpy(model, y)
    finetune(
        model,
        x,
        y,
        3,
        BALANCED.with_overrides(steps=2, distill=0.0),
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert len(spy.batches) == 2
    labels = spy.batches[0][0]
    n_replay = round(BALANCED.replay * BALANCED.batch_size)
    assert len(labels) == BALANCED.batch_size and labels.count(3) == BALANCED.batch_size - n_replay


def test_balanced_distill_requires_a_teacher() -> None:
    x, y = _indexed_data()
    model = add_lora(_small_model(), rank=1)
    with pytest.raises(ValueError, match="teacher"):
        finetune(model, x, y, 9, BALANCED.with_overrides(distill=1.0), progress=False)


def test_finetune_trains_only_lora_and_needs_it() -> None:
    x, y = _indexed_data()
    model = _small_model()
    with pytest.raises(ValueError, match="did you add LoRA"):
        finetune(model.requires_grad_(False), x, y, 9, progress=False)
    model = add_lora(_small_model(), rank=1, init="gaussian")
    before = base_state(model)
    finetune(model, x, y, 9, TUTORIAL.with_overrides(steps=3), progress=False)
    assert same_tensors(before, base_state(model))
    assert any(p.lora_B.abs().sum() > 0 for *_, p in iter_lora(model))


# --- the whole pipeline on tiny data ---------------------------------------------------------------


def test_report_has_the_promised_keys_and_files(tiny_run) -> None:
    run, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= report.keys()
    for key in ("pretrained", "lora_on", "lora_off"):
        assert (
            set(report[key]) >= {"accuracy", "wrong_per_digit"}
            and len(report[key]["wrong_per_digit"]) == 10
        )
    assert report["lora_off_identical"] is True and report["frozen_unchanged"] is True
    assert report["lora_params"] == 6794 and report["base_params"] == 2_807_010
    assert (
        report["rank"] == 1
        and report["alpha"] == 1.0
        and report["target_digit"] == 9
        and report["seed"] == 0
    )
    assert report["recipe"]["name"] == "tutorial" and report["recipe"]["steps"] == 5
    assert report["recipe"]["pretrain"]["steps"] == 20
    assert {
        "data",
        "pretrain",
        "eval_pretrained",
        "finetune",
        "eval_lora_on",
        "eval_lora_off",
        "total",
    } <= report["seconds"].keys()
    assert report["lora_off"] == {**report["pretrained"], "seconds": report["lora_off"]["seconds"]}
    for name in ("adapter.pt", "pretrained.pt", "errors.png"):
        assert (out / name).is_file()
    assert (out / "errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.report["lora_on"] == report["lora_on"]


def test_summary_shows_table_changes_and_checks(tiny_run) -> None:
    text = summary_text(tiny_run[0].report)
    for needle in (
        "pretrained",
        "LoRA on",
        "LoRA off",
        "change vs pretrained",
        "target digit 9",
        "other digits",
        "most hurt",
        "LoRA off reproduces the pretrained logits exactly: PASS",
        "no frozen weight changed during fine-tuning: PASS",
        "2,807,010 base, 6,794 LoRA (0.242% of base)",
    ):
        assert needle in text


def test_same_seed_same_numbers(tiny_root: Path, tiny_run) -> None:
    again = run_pipeline(tiny_config(tiny_root)).report
    first = tiny_run[0].report
    for key in ("pretrained", "lora_on", "lora_off"):
        assert {k: v for k, v in again[key].items() if k != "seconds"} == {
            k: v for k, v in first[key].items() if k != "seconds"
        }


def test_load_adapter_reproduces_the_run(tiny_root: Path, tiny_run, tmp_path: Path) -> None:
    _, out = tiny_run
    code = main(
        [
            "--data-dir",
            str(tiny_root),
            "--no-download",
            "--no-progress",
            "--load-adapter",
            str(out / "adapter.pt"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    first = json.loads((out / "report.json").read_text())
    loaded = json.loads((tmp_path / "report.json").read_text())
    assert loaded["loaded_adapter"] == str(out / "adapter.pt") and loaded["finetune"] is None
    assert loaded["target_digit"] == 9 and loaded["rank"] == 1
    for key in ("pretrained", "lora_on", "lora_off"):
        assert loaded[key]["wrong_per_digit"] == first[key]["wrong_per_digit"]
        assert loaded[key]["accuracy"] == first[key]["accuracy"]
    assert loaded["lora_off_identical"] and loaded["frozen_unchanged"]


def test_worst_digit_and_sidecar_digit(tiny_root: Path, tmp_path: Path) -> None:
    run = run_pipeline(tiny_config(tiny_root, digit="worst", out=str(tmp_path)))
    report = run.report
    assert report["target_digit"] == report["worst_digit"]
    wrong = report["pretrained"]["wrong_per_digit"]
    assert wrong[report["worst_digit"]] == max(wrong)
    loaded = run_pipeline(tiny_config(tiny_root, load_adapter=str(tmp_path / "adapter.pt"))).report
    assert (
        loaded["target_digit"] == report["target_digit"]
    )  # read from the report.json beside the adapter
    assert loaded["recipe"] == report["recipe"]
    assert loaded["lora_on"]["wrong_per_digit"] == report["lora_on"]["wrong_per_digit"]


def test_checkpoint_is_a_cache(tiny_root: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "cache" / "pre.pt"
    first = run_pipeline(tiny_config(tiny_root, checkpoint=str(ckpt))).report
    assert ckpt.is_file() and first["pretrain"]["steps"] == 20
    second = run_pipeline(tiny_config(tiny_root, checkpoint=str(ckpt))).report
    assert second["pretrain"] == {"loaded_from": str(ckpt)}
    assert second["pretrained"]["wrong_per_digit"] == first["pretrained"]["wrong_per_digit"]
    assert second["lora_on"]["wrong_per_digit"] == first["lora_on"]["wrong_per_digit"]


def test_pipeline_restores_the_thread_count(tiny_root: Path) -> None:
    before = torch.get_num_threads()
    run_pipeline(tiny_config(tiny_root, threads=1, finetune_steps=1))
    assert torch.get_num_threads() == before


def test_load_adapter_without_checkpoint_is_a_clear_error(
    tiny_root: Path, tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = tiny_run
    lone = tmp_path / "adapter.pt"
    lone.write_bytes((out / "adapter.pt").read_bytes())
    code = main(["--data-dir", str(tiny_root), "--no-progress", "--load-adapter", str(lone)])
    err = capsys.readouterr().err
    assert code == 2 and "pretrained checkpoint" in err and "Traceback" not in err


def test_rank_sweep_one_row_per_rank(tiny_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = run_pipeline(tiny_config(tiny_root, ranks=[1, 2], verbose=True))
    rows = run.report["sweep"]
    assert [r["rank"] for r in rows] == [1, 2]
    assert [r["lora_params"] for r in rows] == [6794, 2 * 6794]
    assert all(r["lora_off_identical"] and r["frozen_unchanged"] for r in rows)
    assert run.report["gain_stops_at_rank"] in (1, 2)
    assert "rank sweep" in capsys.readouterr().out


def test_balanced_pipeline_runs(tiny_root: Path) -> None:
    report = run_pipeline(
        tiny_config(tiny_root, recipe="balanced", finetune_steps=4, distill=0.5)
    ).report
    assert report["recipe"]["name"] == "balanced" and report["recipe"]["distill"] == 0.5
    assert report["lora_off_identical"] and report["frozen_unchanged"]


def test_without_matplotlib_the_plot_is_skipped(
    tiny_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot_errors([1] * 10, [2] * 10, tmp_path / "x.png") is None
    run_pipeline(tiny_config(tiny_root, out=str(tmp_path), verbose=True, finetune_steps=1))
    assert "matplotlib is not installed: skipping errors.png" in capsys.readouterr().out
    assert not (tmp_path / "errors.png").exists() and (tmp_path / "report.json").is_file()


def test_digit_changes_and_gain_stop() -> None:
    before = {"accuracy": 0.9, "wrong_per_digit": [5, 5, 5, 5, 5, 5, 5, 5, 5, 50]}
    after = {"accuracy": 0.8, "wrong_per_digit": [5, 6, 5, 5, 90, 5, 5, 5, 5, 10]}
    ch = digit_changes(before, after, 9)
    assert ch["target"] == {"digit": 9, "before": 50, "after": 10, "change": -40, "reduction": 0.8}
    assert ch["worst_other"]["digit"] == 4 and ch["others_total_change"] == 86
    assert ch["accuracy_change_points"] == pytest.approx(-10.0)
    rows = [
        {"rank": r, "lora_on": {"wrong_per_digit": [0] * 9 + [w]}}
        for r, w in ((1, 30), (2, 20), (4, 20), (8, 5))
    ]
    assert gain_stops_at(rows, 9) == 2


def test_benchmark_script_runs_both_sides(
    tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """benchmarks/bench_mnist_pipeline.py on tiny data: both sides run and the table prints (timings not checked)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mnist_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_mnist_pipeline", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = torch.get_num_threads()
    assert (
        bench.main(
            [
                "--data-dir",
                str(tiny_root),
                "--pretrain-steps",
                "5",
                "--json",
                str(tmp_path / "b.json"),
                "--results-dir",
                str(tmp_path / "results"),  # never into the checkout
            ]
        )
        == 0
    )
    assert torch.get_num_threads() == before
    out = capsys.readouterr().out
    assert "speed-up" in out and "end to end: ours is" in out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["pretrain_steps"] == 5 and result["ours"]["checks"]["lora_off_identical"]
    assert (
        result["naive"]["lora_off"]["wrong_per_digit"]
        == result["naive"]["pretrained"]["wrong_per_digit"]
    )
