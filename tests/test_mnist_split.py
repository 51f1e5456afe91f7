"""The validation split and what it guarantees: choices never see the test set; report blocks,
confusion change, the seeds table (tiny synthetic MNIST, a few steps)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchvision")

from lora_param import LoRAError
from lora_param.mnist import PipelineConfig, PretrainConfig, load_mnist, run_pipeline
from lora_param.mnist import pipeline as pipeline_module
from lora_param.mnist.cli import main
from lora_param.mnist.confusion import confusion_change, confusion_matrix, plot_confusion_change
from lora_param.mnist.evaluate import EvalResult, worst_digit
from lora_param.mnist.report import gain_stops_at
from lora_param.mnist.seeds import parse_seeds
from lora_param.mnist.split import hold_out_validation, stratified_split


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim())
    path.write_bytes(header + struct.pack(f">{data.dim()}I", *data.shape) + data.numpy().tobytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MNIST (300 train, 100 test): digit d is a bright bar at row 2 + 2d, over noise."""
    folder = tmp_path_factory.mktemp("split_mnist")
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 120, (n, 28, 28), generator=g)
        for i, y in enumerate(labels.tolist()):
            images[i, 2 + 2 * y, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.to(torch.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return folder


def config(root: Path, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {
        "data_dir": str(root),
        "download": False,
        "pretrain": PretrainConfig(steps=10),
        "validation_size": 60,
        "finetune_steps": 3,
        "progress": False,
        "verbose": False,
    }
    return PipelineConfig(**{**base, **kw})


# --- the split itself ----------------------------------------------------------------------------


def test_stratified_split_is_disjoint_complete_proportional_and_seeded() -> None:
    labels = torch.cat([torch.full((100 * (c + 1),), c) for c in range(10)])  # 100, 200, ... 1000
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    train, val = stratified_split(labels, 1100, seed=3)
    assert val.numel() == 1100 and train.numel() == labels.numel() - 1100
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(labels.numel()))
    counts = torch.bincount(labels[val], minlength=10)
    assert counts.tolist() == [20 * (c + 1) for c in range(10)]  # 1100 / 5500 of each class
    again = stratified_split(labels, 1100, seed=3)
    assert torch.equal(again[1], val)
    assert not torch.equal(stratified_split(labels, 1100, seed=4)[1], val)
    for bad in (0, labels.numel()):
        with pytest.raises(LoRAError, match="validation size"):
            stratified_split(labels, bad, seed=0)


def test_hold_out_validation_moves_images_out_of_training(root: Path) -> None:
    data = load_mnist(root, download=False)
    split = hold_out_validation(data, 60, seed=0)
    assert split.val_images is not None and split.val_labels is not None and split.split
    assert split.train_images.shape[0] == 240 and split.val_images.shape[0] == 60
    assert torch.bincount(split.val_labels, minlength=10).tolist() == [6] * 10
    train_rows = {tuple(r.tolist()) for r in split.train_images[:, 60:200]}
    assert not any(tuple(r.tolist()) in train_rows for r in split.val_images[:, 60:200])
    assert split.test_images is data.test_images  # the test set is neither copied nor touched
    assert split.split.to_dict() == {
        "validation": True,
        "seed": 0,
        "train_size": 240,
        "validation_size": 60,
        "test_size": 100,
        "stratified": True,
    }
    assert split.selection()[2] == "validation"
    with pytest.raises(LoRAError, match="already"):
        hold_out_validation(split, 60)
    tutorial = hold_out_validation(data, 0)
    assert tutorial.split is not None and not tutorial.split.validation
    assert tutorial.selection()[2] == "train"


# --- no test image is ever used for a choice ----------------------------------------------------


def test_choice_functions_refuse_test_results() -> None:
    result = EvalResult(accuracy=0.5, wrong_per_digit=[1] * 10, total=20, split="test")
    with pytest.raises(LoRAError, match="not on the test set"):
        worst_digit(result)
    rows = [{"rank": 1, "lora_on": result.to_dict()}, {"rank": 2, "lora_on": result.to_dict()}]
    with pytest.raises(LoRAError, match="not on the test set"):
        gain_stops_at(rows, 9)


def test_no_test_image_is_used_for_any_choice(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy on every evaluation and every choice: choices only ever get validation results, and
    the test set is evaluated only after the last choice; scrambling the test set changes no
    choice."""
    events: list[tuple[str, Any]] = []
    real_evaluate = pipeline_module.evaluate

    def spy_evaluate(model, images, labels, **kw):  # type: ignore[no-untyped-def]
        result = real_evaluate(model, images, labels, **kw)
        events.append(("eval", (kw.get("split"), images.data_ptr(), id(result))))
        return result

    def spy_choice(real):  # type: ignore[no-untyped-def]
        def choose(arg, *rest):  # type: ignore[no-untyped-def]
            events.append(("choice", arg))
            return real(arg, *rest)

        return choose

    monkeypatch.setattr(pipeline_module, "evaluate", spy_evaluate)
    monkeypatch.setattr(pipeline_module, "worst_digit", spy_choice(pipeline_module.worst_digit))
    monkeypatch.setattr(pipeline_module, "gain_stops_at", spy_choice(pipeline_module.gain_stops_at))
    run = run_pipeline(config(root, digit="worst", ranks=[1, 2]))
    val_ptr = run.data.val_images.data_ptr()  # type: ignore[union-attr]
    evals = {rid: (split, ptr) for kind, (split, ptr, rid) in (e for e in events if e[0] == "eval")}
    choices = [arg for kind, arg in events if kind == "choice"]
    assert len(choices) == 2  # the worst digit, the rank where gains stop
    assert evals[id(choices[0])] == ("validation", val_ptr)
    assert [row["lora_on"]["split"] for row in choices[1]] == ["validation", "validation"]
    last_choice = max(i for i, e in enumerate(events) if e[0] == "choice")
    test_evals = [i for i, e in enumerate(events) if e[0] == "eval" and e[1][0] == "test"]
    assert len(test_evals) == 1 + 2 * 2  # pretrained, then LoRA on/off per rank
    assert min(test_evals) > last_choice
    assert run.report["choices"]["made_on"] == "validation"

    scrambled = load_mnist(root, download=False)
    g = torch.Generator().manual_seed(9)
    scrambled.test_labels = scrambled.test_labels[torch.randperm(100, generator=g)]
    scrambled.test_images = torch.randn(scrambled.test_images.shape, generator=g)
    other = run_pipeline(config(root, digit="worst", ranks=[1, 2]), data=scrambled).report
    assert other["target_digit"] == run.report["target_digit"]
    assert other["gain_stops_at_rank"] == run.report["gain_stops_at_rank"]
    for key in ("pretrained", "lora_on"):
        ours, theirs = run.report["validation"][key], other["validation"][key]
        assert {**ours, "seconds": 0} == {**theirs, "seconds": 0}
    assert other["test"]["pretrained"] != run.report["test"]["pretrained"]


# --- report.json, the summary, confusion.png ----------------------------------------------------


@pytest.fixture(scope="module")
def written(root: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("written")
    return run_pipeline(config(root, out=str(out), checkpoint=str(out / "cache.pt"))), out


def test_data_split_differently_is_refused(root: Path, written) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LoRAError, match="split with 60"):
        run_pipeline(config(root, validation_size=40), data=written[0].data)


def test_checkpoint_from_another_split_is_refused(root: Path, written) -> None:  # type: ignore[no-untyped-def]
    cache = written[1] / "cache.pt"
    assert json.loads((written[1] / "cache.pt.split.json").read_text())["validation_size"] == 60
    with pytest.raises(LoRAError, match="pretrained with 60 validation images"):
        run_pipeline(config(root, validation_size=0, checkpoint=str(cache)))


def test_report_blocks_and_confusion(written) -> None:  # type: ignore[no-untyped-def]
    run, tmp_path = written
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"] == {
        "validation": True,
        "seed": 0,
        "train_size": 240,
        "validation_size": 60,
        "test_size": 100,
        "stratified": True,
    }
    assert report["validation"]["pretrained"]["total"] == 60
    assert report["validation"]["pretrained"]["split"] == "validation"
    assert {"pretrained", "lora_on", "lora_off", "changes"} <= report["test"].keys()
    assert report["test"]["lora_on"] == report["lora_on"] and report["lora_on"]["split"] == "test"
    assert report["test"]["pretrained"]["total"] == 100
    conf = report["confusion"]
    assert conf["split"] == "test" and (conf["rows"], conf["columns"]) == (
        "true digit",
        "predicted digit",
    )
    for name in ("pretrained", "lora_on"):
        matrix = torch.tensor(conf[name])
        assert matrix.sum(dim=1).tolist() == [10] * 10  # 10 test images of each digit
        wrong = (matrix.sum(dim=1) - matrix.diagonal()).tolist()
        assert wrong == report[name]["wrong_per_digit"]
    assert conf["change"] == confusion_change(conf["pretrained"], conf["lora_on"])
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["confusion"] == str(tmp_path / "confusion.png")
    text = pipeline_module.summary_text(run.report)
    assert "MNIST TEST SET (100 images, evaluated once per model" in text
    assert "60 training images held out for validation (stratified, seed 0)" in text


def test_confusion_matrix_and_plot(tmp_path: Path) -> None:
    logits = torch.eye(10)[[0, 1, 9, 4, 9]]
    labels = torch.tensor([0, 1, 4, 4, 9])
    m = confusion_matrix(logits, labels)
    assert (
        m[4][9] == 1
        and m[4][4] == 1
        and m[0][0] == m[1][1] == m[9][9] == 1
        and sum(map(sum, m)) == 5
    )
    change = confusion_change([[0] * 10 for _ in range(10)], m)
    assert change == m
    fig = plot_confusion_change(change, tmp_path / "c.png", target=4)
    assert fig is not None and (tmp_path / "c.png").stat().st_size > 1000


# --- the CLI: tutorial data, the seeds table ---------------------------------------------------


def _cli(root: Path, *extra: str) -> int:
    common = ["--data-dir", str(root), "--no-download", "--no-progress", "--threads", "1"]
    common += ["--pretrain-steps", "5"]
    return main([*common, "--steps", "2", *extra])


def test_tutorial_data_flag_restores_all_training_images(root: Path, tmp_path: Path) -> None:
    assert _cli(root, "--tutorial-data", "--digit", "worst", "--out", str(tmp_path)) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["split"]["validation"] is False and report["split"]["train_size"] == 300
    assert report["validation"] is None and report["choices"]["made_on"] == "train"
    assert report["train_selection"]["pretrained"]["total"] == 300


def test_parse_seeds() -> None:
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5, 0-1,1") == [5, 0, 1]
    for bad in ("a", "3-1", "1-", ""):
        with pytest.raises(LoRAError):
            parse_seeds(bad)


def test_seeds_command_pretrains_once_per_seed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []
    real = pipeline_module.pretrain

    def counting(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(pipeline_module, "pretrain", counting)
    out = tmp_path / "seeds"
    code = _cli(
        root, "--validation-size", "60", "--seeds", "0-1", "--recipe", "tutorial", "balanced",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0 and len(calls) == 2  # one pretraining per seed, shared by both recipes
    result = json.loads((out / "seeds.json").read_text())
    assert result["seeds"] == [0, 1] and set(result["recipes"]) == {"tutorial", "balanced"}
    for block in result["recipes"].values():
        assert [r["seed"] for r in block["rows"]] == [0, 1]
        assert {"mean", "std", "worst"} == block["summary"]["target_cut"].keys()
        assert {"mean", "std", "worst"} == block["summary"]["accuracy_change_points"].keys()
        assert all(r["lora_off_identical"] and r["frozen_unchanged"] for r in block["rows"])
    tut, bal = result["recipes"]["tutorial"]["rows"], result["recipes"]["balanced"]["rows"]
    assert [r["accuracy_before"] for r in tut] == [r["accuracy_before"] for r in bal]
    text = capsys.readouterr().out
    assert "recipe 'balanced', test set (100 images)" in text and "worst" in text
    assert (out / "seeds.txt").read_text().strip() in text
