"""Argument parsing of ``lora-param-mnist`` and its entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_param.mnist.cli import QUICK_PRETRAIN_STEPS, build_parser, config_from_args, main

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(list(argv)))


def test_defaults_reproduce_the_tutorial() -> None:
    cfg = parse()
    assert (cfg.data_dir, cfg.download, cfg.digit, cfg.rank, cfg.alpha) == (
        "./data",
        True,
        None,
        1,
        1.0,
    )
    assert cfg.recipe == "tutorial" and cfg.ranks is None and cfg.seed == 0 and cfg.out is None
    assert (cfg.pretrain.epochs, cfg.pretrain.batch_size, cfg.pretrain.lr, cfg.pretrain.steps) == (
        1,
        10,
        1e-3,
        None,
    )
    recipe = cfg.finetune_recipe()
    assert (recipe.steps, recipe.batch_size, recipe.lr, recipe.replay) == (100, 10, 1e-3, 0.0)
    assert cfg.load_adapter is None and cfg.checkpoint is None and cfg.progress is True
    assert cfg.train_threads == 1 and cfg.threads is None


def test_every_option() -> None:
    cfg = parse(
        "--data-dir",
        "../shared/data",
        "--no-download",
        "--digit",
        "4",
        "--rank",
        "2",
        "--alpha",
        "8",
        "--ranks",
        "1",
        "2",
        "4",
        "8",
        "--recipe",
        "balanced",
        "--steps",
        "50",
        "--batch-size",
        "20",
        "--lr",
        "0.01",
        "--distill",
        "0.5",
        "--pretrain-epochs",
        "2",
        "--seed",
        "7",
        "--out",
        "runs/x",
        "--checkpoint",
        "pre.pt",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--train-threads",
        "2",
        "--eval-batch-size",
        "500",
        "--no-progress",
    )
    assert cfg.data_dir == "../shared/data" and cfg.download is False and cfg.digit == 4
    assert (cfg.rank, cfg.alpha, cfg.ranks) == (2, 8.0, [1, 2, 4, 8])
    recipe = cfg.finetune_recipe()
    assert (recipe.name, recipe.steps, recipe.batch_size, recipe.lr, recipe.distill) == (
        "balanced",
        50,
        20,
        0.01,
        0.5,
    )
    assert recipe.replay > 0
    assert (
        cfg.pretrain.epochs == 2
        and cfg.seed == 7
        and cfg.out == "runs/x"
        and cfg.checkpoint == "pre.pt"
    )
    assert (cfg.device, cfg.threads, cfg.train_threads, cfg.eval_batch_size, cfg.progress) == (
        "cpu",
        2,
        2,
        500,
        False,
    )


def test_quick_and_worst_digit() -> None:
    cfg = parse("--quick", "--digit", "worst")
    assert cfg.pretrain.steps == QUICK_PRETRAIN_STEPS and cfg.digit == "worst"
    assert parse("--quick", "--pretrain-steps", "7").pretrain.steps == 7
    assert parse("--load-adapter", "a/adapter.pt").load_adapter == "a/adapter.pt"


@pytest.mark.parametrize(
    "argv",
    [
        ["--digit", "10"],
        ["--digit", "nine"],
        ["--rank", "0"],
        ["--alpha", "-1"],
        ["--ranks"],
        ["--recipe", "greedy"],
        ["--steps", "0"],
    ],
)
def test_bad_arguments_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: lora-param-mnist" in capsys.readouterr().err


def test_load_adapter_and_ranks_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--load-adapter", "a.pt", "--ranks", "1", "2"])
    assert "cannot be combined" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_param.mnist", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0 and "--recipe" in proc.stdout and "--load-adapter" in proc.stdout


def test_console_script_is_declared() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'lora-param-mnist = "lora_param.mnist.cli:main"' in text
