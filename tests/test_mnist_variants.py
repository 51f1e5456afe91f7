"""The MNIST job's adapter variants: --variant / --init, equal budgets, the learning-rate choice,
the variants table of the seeds command, and the grouped --help (tiny synthetic MNIST)."""

from __future__ import annotations

import json
import re
import shlex
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

from lora_param import (
    LoRAError,
    LoRAParametrization,
    VariantConfig,
    add_lora,
    parameter_counts,
    variant_names,
)
from lora_param.core import variant as variant_module
from lora_param.core.variant import init_variant, variant_class
from lora_param.mnist import MLP, PipelineConfig, PretrainConfig, run_pipeline
from lora_param.mnist.adapters import (
    INIT_CHOICES,
    add_adapter,
    init_applies,
    init_value,
    match_budget,
    mlp_variants,
    parse_variant,
)
from lora_param.mnist.cli import EXAMPLES, build_parser, main
from lora_param.mnist.model import LINEAR_LAYERS
from lora_param.mnist.report import choose_lr

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim())
    path.write_bytes(header + struct.pack(f">{data.dim()}I", *data.shape) + data.numpy().tobytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny MNIST (200 train, 60 test): digit d is a bright bar at row 2 + 2d, over noise."""
    folder = tmp_path_factory.mktemp("variants_mnist")
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(2)
    for prefix, n in (("train", 200), ("t10k", 60)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 120, (n, 28, 28), generator=g)
        for i, y in enumerate(labels.tolist()):
            images[i, 2 + 2 * y, 4:24] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.to(torch.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.to(torch.uint8))
    return folder


def _config(root: Path, **kw) -> PipelineConfig:
    base = {
        "data_dir": str(root),
        "download": False,
        "pretrain": PretrainConfig(steps=5),
        "validation_size": 50,
        "finetune_steps": 2,
        "progress": False,
        "verbose": False,
        "threads": 1,
    }
    return PipelineConfig(**{**base, **kw})


def _meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return MLP()


class Small(nn.Module):
    """Three Linear layers shaped like the MLP's, 20x smaller (real weights: SVD, QR are cheap)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(40, 50)
        self.linear2 = nn.Linear(50, 100)
        self.linear3 = nn.Linear(100, 10)


# --- which variants, which inits -------------------------------------------------------------


def test_the_mlp_takes_every_registered_linear_variant_but_init_implementations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = mlp_variants()
    assert {"lora", "dora", "oft"} <= set(names) and set(names) <= set(variant_names())
    assert "pissa" not in names and "pissa_dora" not in names  # reached with --init pissa
    assert {"loha", "lokr"} & set(variant_names()) <= set(names)

    # a variant registered later joins without a change to the MNIST job
    @dataclass(frozen=True)
    class ToyConfig(VariantConfig):
        name: ClassVar[str] = "toy"

    class Toy(LoRAParametrization):
        variant: ClassVar[str] = "toy"

    monkeypatch.setitem(variant_module._CONFIGS, "toy", ToyConfig)
    monkeypatch.setitem(variant_module._CLASSES, "toy", [Toy])
    assert mlp_variants()[-1] == "toy"
    budget = match_budget(_meta_mlp(), LINEAR_LAYERS, parse_variant("toy"), "gaussian", 1)
    assert budget.trainable == 6_794


def test_parse_variant_options_and_clear_refusals() -> None:
    spec = parse_variant("oft:side=output,rescale=true,constraint=0.5")
    assert spec.options == (("side", "output"), ("rescale", True), ("constraint", 0.5))
    assert parse_variant(spec.label) == spec and spec.config().side == "output"
    with pytest.raises(LoRAError, match=r"no option 'sides'.*side"):
        parse_variant("oft:sides=output")
    with pytest.raises(LoRAError, match=r"'pissa' is lora with --init pissa"):
        parse_variant("pissa")
    with pytest.raises(LoRAError, match="key=value"):
        parse_variant("oft:side")


def test_inits_apply_where_the_variant_has_them() -> None:
    assert init_value("lora", "default") == "gaussian"  # the tutorial's A ~ N(0, 1)
    assert init_value("oft", "default") == variant_class("oft", "linear").inits[0]
    assert init_applies("lora", "pissa") and init_applies("dora", "olora")
    assert not init_applies("oft", "pissa")
    for name in mlp_variants():  # a variant's default init is one it accepts
        cls = variant_class(init_variant(name, init_value(name, "default")), "linear")
        assert init_value(name, "default") in cls.inits


# --- the budget ---------------------------------------------------------------------------------


def test_budget_is_lora_rank_1s_where_the_variant_can_match_it() -> None:
    model = _meta_mlp()
    lora = match_budget(model, LINEAR_LAYERS, parse_variant("lora"), "gaussian", 1)
    assert lora.ranks == dict.fromkeys(LINEAR_LAYERS, 1) and lora.trainable == 6_794
    oft = match_budget(model, LINEAR_LAYERS, parse_variant("oft"), "kaiming", 1)
    assert abs(oft.trainable - 6_794) <= 0.01 * 6_794  # block sizes per layer: 7/8/2
    assert oft.rank_text() == "7/8/2" and oft.reference_trainable == 6_794
    dora = match_budget(model, LINEAR_LAYERS, parse_variant("dora"), "gaussian", 1)
    assert dora.rank_arg() == 1 and dora.trainable == 6_794 + 3_010  # + one magnitude per output


@pytest.mark.parametrize("name", mlp_variants())
def test_the_budget_is_what_add_adapter_builds(name: str) -> None:
    for init in INIT_CHOICES:
        if not init_applies(name, init):
            continue
        model = Small()
        torch.manual_seed(0)
        budget = add_adapter(model, LINEAR_LAYERS, parse_variant(name), init, 2, 2.0)
        assert parameter_counts(model).trainable == budget.trainable, (name, init)
        ref = sum(budget.reference.values())
        assert ref == 2 * sum(i + o for i, o in ((40, 50), (50, 100), (100, 10)))


def test_plain_lora_is_the_tutorial_adapter() -> None:
    ours, plain = Small(), Small()
    plain.load_state_dict(ours.state_dict())
    torch.manual_seed(3)
    add_adapter(ours, LINEAR_LAYERS, parse_variant("lora"), "default", 1, 1.0)
    torch.manual_seed(3)
    add_lora(plain, list(LINEAR_LAYERS), rank=1, alpha=1.0, init="gaussian")
    a, b = ours.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the learning-rate choice -------------------------------------------------------------------


def _cand(lr: float, cut: float, points: float, split: str = "validation") -> dict:
    changes = {"target": {"reduction": cut}, "accuracy_change_points": points}
    return {"lr": lr, "split": split, "changes": changes}


def test_choose_lr_keeps_the_largest_cut_within_half_a_point() -> None:
    assert choose_lr([_cand(1e-4, 0.5, 0.2), _cand(1e-3, 0.8, -0.4), _cand(1e-2, 0.95, -3)]) == 1
    assert choose_lr([_cand(1e-3, 0.9, -2.0), _cand(1e-2, 0.99, -5.0)]) == 0  # least loss
    assert choose_lr([_cand(1e-3, 0.8, 0.1), _cand(1e-4, 0.8, 0.1)]) == 1  # tie: smaller rate
    with pytest.raises(LoRAError, match="not on the test set"):
        choose_lr([_cand(1e-3, 0.8, 0.1, split="test")])


# --- the pipeline and the seeds command ----------------------------------------------------------


def test_a_variant_run_chooses_its_learning_rate_on_validation(root: Path) -> None:
    run = run_pipeline(_config(root, variant="oft:side=output", lrs=[1e-3, 1e-2]))
    r = run.report
    assert r["variant"] == "oft:side=output" and r["lora_off_identical"] and r["frozen_unchanged"]
    assert r["budget"]["reference_trainable"] == 6_794 and r["trainable_params"] == 6_100
    choice = r["choices"]["lr"]
    assert choice["split"] == "validation" and choice["value"] == r["lr"] == r["recipe"]["lr"]
    assert [c["lr"] for c in choice["candidates"]] == [1e-3, 1e-2]
    assert {p.variant for p in run.model.modules() if hasattr(p, "variant")} == {"oft"}


def test_seeds_command_compares_adapters(root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "seeds"
    argv = ["--data-dir", str(root), "--no-download", "--no-progress", "--threads", "1",
            "--validation-size", "50", "--pretrain-steps", "5", "--steps", "2", "--seeds", "0",
            "--variant", "lora", "oft", "--init", "default", "olora", "--lrs", "1e-3", "1e-2",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "oft has no init 'olora': left out" in captured.err
    result = json.loads((out / "seeds.json").read_text())
    assert list(result["recipes"]) == [
        "tutorial / lora", "tutorial / lora init=olora", "tutorial / oft"
    ]  # fmt: skip
    oft = result["recipes"]["tutorial / oft"]
    assert oft["budget"]["ranks"] == {"linear1": 7, "linear2": 8, "linear3": 2}
    assert oft["rows"][0]["lr"] in (1e-3, 1e-2) and result["lrs"] == [1e-3, 1e-2]
    assert result["environment"]["command"].startswith("lora-param-mnist --data-dir")
    assert "adapters compared at LoRA rank 1's" in captured.out and "7/8/2" in captured.out
    # the benchmark script's results file is made from this result
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import mnist_variants
        from _results import Results, validate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    record = Results("mnist_variants", mnist_variants.__doc__, {}, argv=[], threads=1)
    mnist_variants.record_seeds(record, result)
    record.write(tmp_path)
    data = json.loads((tmp_path / "mnist_variants-cpu.json").read_text())
    assert validate(data) == [] and data["goals"][0]["verdict"] == "PASS"
    assert [r["rank"] for r in data["tables"][0]["rows"]] == ["1", "1", "7/8/2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "lora", "dora"], "several --variant values need --seeds"),
        (["--init", "default", "pissa"], "several --init values need --seeds"),
        (["--variant", "oft", "--init", "pissa"], "is not an initialization of oft"),
        (["--load-adapter", "a.pt", "--variant", "dora"], "drop --variant/--init/--lrs"),
        (["--lr", "0.1", "--lrs", "0.1", "0.2"], "pass one"),
        (["--variant", "pissa"], "invalid _variant value|'pissa' is lora with --init pissa"),
        (["--variant", "oft:side=diagonal"], "side"),
    ],
)
def test_bad_adapter_options_exit_with_usage(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: lora-param-mnist" in err
    assert re.search(message, err), err


# --- --help ------------------------------------------------------------------------------------


def test_help_groups_options_and_its_examples_parse() -> None:
    parser = build_parser()
    text = parser.format_help()
    groups = ["data:", "adapter:", "fine-tuning:", "pretraining:", "seeds table:", "output:",
              "runtime:", "examples:"]  # fmt: skip
    positions = [text.index("\n" + g) for g in groups]
    assert positions == sorted(positions)
    for action in parser._actions:  # every option is still there
        for flag in action.option_strings:
            assert flag in text, flag
    commands = [
        shlex.split(line.replace("\\\n", " "))
        for line in EXAMPLES.replace("\\\n", " ").splitlines()
        if line.strip().startswith("lora-param-mnist")
    ]
    assert len(commands) == 4
    for words in commands:
        parser.parse_args(words[1:])  # every example is a valid command
