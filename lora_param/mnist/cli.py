"""Command line: ``lora-param-mnist`` / ``python -m lora_param.mnist``."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

from .data import MNISTNotFoundError
from .split import SPLIT_SEED, VALIDATION_SIZE
from .train import RECIPES, PretrainConfig

QUICK_PRETRAIN_STEPS = 1000


def _digit(value: str) -> int | str:
    if value.lower() == "worst":
        return "worst"
    try:
        digit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a digit 0-9 or 'worst', got {value!r}"
        ) from None
    if not 0 <= digit <= 9:
        raise argparse.ArgumentTypeError(f"expected a digit 0-9 or 'worst', got {value!r}")
    return digit


def _positive(cast: Callable[[str], float], what: str) -> Callable[[str], float]:
    """An argparse type converter accepting only values > 0."""

    def convert(value: str) -> float:
        try:
            x = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return x

    return convert


_positive_int = _positive(int, "a positive integer")


def _non_negative_int(value: str) -> int:
    try:
        x = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value!r}")
    return x


_positive_float = _positive(float, "a positive number")


def _variant(value: str) -> str:
    """An argparse type: a variant the MLP takes, with its options (``oft:side=output``)."""
    from lora_param import LoRAError

    from .adapters import parse_variant

    try:
        return parse_variant(value).label
    except LoRAError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


EXAMPLES = """\
examples:
  # the tutorial: pretrain, rank-1 LoRA on the 9s, test set once; files in runs/mnist
  lora-param-mnist --data-dir ./data --out runs/mnist

  # the balanced recipe with OFT (LyCORIS's output side) at LoRA rank 1's parameter budget
  lora-param-mnist --data-dir ./data --recipe balanced --variant oft:side=output

  # compare adapters over seeds, learning rate chosen on validation per run
  lora-param-mnist --data-dir ./data --seeds 0-4 --recipe tutorial balanced \\
      --variant lora dora oft --init default pissa --lrs 5e-4 1e-3 2e-3 --out runs/variants

  # evaluate a saved adapter on its pretrained model, no training
  lora-param-mnist --data-dir ./data --load-adapter runs/mnist/adapter.pt
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples as written; an option's default after its help where it has a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or "(default" in text
            or "[default" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    from .adapters import INIT_CHOICES, mlp_variants

    p = argparse.ArgumentParser(
        prog="lora-param-mnist",
        description="Reference LoRA pipeline: pretrain an MLP on MNIST, then fine-tune a rank-1\n"
        "LoRA (or another adapter variant) on one digit and measure what it fixes and what\n"
        "it breaks. Every choice is made on a validation split; the test set is read once.",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data-dir", default="./data", help="MNIST root; the IDX files go in <data-dir>/MNIST/raw/"
    )
    g.add_argument(
        "--no-download", dest="download", action="store_false", help="never try to download MNIST"
    )
    g.add_argument(
        "--validation-size",
        type=_non_negative_int,
        help=f"training images held out (stratified) for every choice the run makes; pretraining "
        f"sees the rest [default: {VALIDATION_SIZE:,}; with --load-adapter, the split recorded "
        "beside the adapter]",
    )
    g.add_argument(
        "--tutorial-data",
        "--no-validation-split",
        dest="tutorial_data",
        action="store_true",
        help="no validation split: pretrain on all 60,000 training images as the tutorial does "
        "(side-by-side comparisons); choices are then made on the training images",
    )
    g.add_argument(
        "--split-seed", type=int, default=SPLIT_SEED, help="seed of the validation split"
    )
    g = p.add_argument_group("adapter")
    g.add_argument(
        "--variant",
        type=_variant,
        nargs="+",
        default=["lora"],
        metavar="NAME[:OPTS]",
        help=f"adapter variant: {', '.join(mlp_variants())}; options after a colon, e.g. "
        "oft:side=output (the fields of its options class). Each gets, per layer, the rank "
        "(OFT: block size) whose trainable count is closest to LoRA at --rank. With --seeds, "
        "several",
    )
    g.add_argument(
        "--init",
        choices=INIT_CHOICES,
        nargs="+",
        default=["default"],
        help="default: A ~ N(0, 1) as the tutorial (the variant's own init where it has no "
        "such); pissa / olora: start from the weight's SVD / QR, the weight untouched (LoRA and "
        "DoRA). With --seeds, several: each applies to the variants that have it",
    )
    g.add_argument(
        "--rank",
        type=_positive_int,
        default=1,
        help="LoRA rank; for another variant, the LoRA rank whose trainable-parameter count it "
        "matches",
    )
    g.add_argument(
        "--alpha",
        type=_positive_float,
        default=1.0,
        help="LoRA alpha (scale = alpha / rank, the scale every variant trains at)",
    )
    g.add_argument(
        "--ranks",
        type=_positive_int,
        nargs="+",
        metavar="R",
        help="rank sweep: one fine-tune per rank from the same pretrained model, e.g. 1 2 4 8",
    )
    g.add_argument(
        "--quantize",
        choices=("nf4", "int8"),
        help="store the pretrained layers packed (QLoRA: 4-bit NormalFloat or 8-bit), LoRA on top",
    )
    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--digit",
        type=_digit,
        help="digit to fine-tune on: 0-9, or 'worst' (the most validation errors) [default: 9, as "
        "the tutorial; "
        "with --load-adapter, the digit recorded beside the adapter]",
    )
    g.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        nargs="+",
        default=["tutorial"],
        help="tutorial: the target digit only (shows forgetting); balanced: replay other digits "
        "too. With --seeds, several: --recipe tutorial balanced",
    )
    g.add_argument("--steps", type=_positive_int, help="fine-tuning steps (default: the recipe's)")
    g.add_argument(
        "--batch-size", type=_positive_int, help="fine-tuning batch size (default: the recipe's)"
    )
    g.add_argument(
        "--lr", type=_positive_float, help="fine-tuning learning rate (default: the recipe's)"
    )
    g.add_argument(
        "--lrs",
        type=_positive_float,
        nargs="+",
        metavar="LR",
        help="learning rates to choose from on validation, one fine-tune each: the largest "
        "validation cut in target errors within 0.5 points of accuracy, else the smallest drop",
    )
    g.add_argument(
        "--distill",
        type=float,
        help="weight of the KL term to the LoRA-off model on replayed images (balanced recipe)",
    )
    g = p.add_argument_group("pretraining")
    g.add_argument("--pretrain-epochs", type=_positive_int, default=1, help="pretraining epochs")
    g.add_argument(
        "--pretrain-steps", type=_positive_int, help="stop pretraining after this many steps"
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help=f"pretrain for {QUICK_PRETRAIN_STEPS} steps only (a smoke run, lower accuracy)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="pretrained checkpoint: loaded instead of pretraining if it exists, else written "
        "after pretraining (with --seeds: a folder of per-seed checkpoints)",
    )
    g = p.add_argument_group("seeds table")
    g.add_argument(
        "--seeds",
        metavar="SPEC",
        help="run each --recipe (and each --variant / --init) for these seeds (e.g. 0-9 or "
        "0,3,5-7), one pretraining per seed, and print per-seed test numbers with mean, std and "
        "worst case (--out writes seeds.json and seeds.txt)",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--out", metavar="DIR", help="write report.json, pretrained.pt, adapter.pt, errors.png here"
    )
    g.add_argument(
        "--load-adapter",
        metavar="FILE",
        help="evaluate a saved adapter on its pretrained checkpoint (default: pretrained.pt beside "
        "it) without training",
    )
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", help="hide the progress bars"
    )
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--seed", type=int, default=0, help="seed: same seed, same numbers on the same machine"
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for evaluation (default: every available core)",
    )
    g.add_argument(
        "--train-threads",
        type=_positive_int,
        default=1,
        help="CPU threads for the batch-10 training loops (more only pay on an idle machine)",
    )
    g.add_argument(
        "--eval-batch-size", type=_positive_int, default=2000, help="test images per batch"
    )
    return p


def config_from_args(
    args: argparse.Namespace,
):  # -> PipelineConfig (imported lazily: torch is slow to import)
    """Turn parsed arguments into a `PipelineConfig`."""
    from .config import PipelineConfig

    pretrain_steps = args.pretrain_steps or (QUICK_PRETRAIN_STEPS if args.quick else None)
    return PipelineConfig(
        validation_size=_validation_size(args),
        split_seed=args.split_seed,
        data_dir=args.data_dir,
        download=args.download,
        digit=args.digit,
        rank=args.rank,
        alpha=args.alpha,
        ranks=args.ranks,
        variant=args.variant[0],
        init=args.init[0],
        lrs=args.lrs,
        recipe=args.recipe[0],
        finetune_steps=args.steps,
        finetune_batch_size=args.batch_size,
        finetune_lr=args.lr,
        distill=args.distill,
        pretrain=PretrainConfig(epochs=args.pretrain_epochs, steps=pretrain_steps),
        seed=args.seed,
        out=args.out,
        checkpoint=args.checkpoint,
        load_adapter=args.load_adapter,
        quantize=args.quantize,
        device=args.device,
        threads=args.threads,
        train_threads=args.train_threads,
        eval_batch_size=args.eval_batch_size,
        progress=args.progress,
    )


def _validation_size(args: argparse.Namespace) -> int:
    """--tutorial-data: 0; else --validation-size, the adapter's recorded split, or the default."""
    if args.tutorial_data:
        return 0
    if args.validation_size is not None:
        return int(args.validation_size)
    if args.load_adapter:
        from .checkpoint import recorded_split

        recorded = recorded_split(args.load_adapter)
        if recorded is not None:
            return recorded
    return VALIDATION_SIZE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline; exit status 0 when both checks pass, 1 when one fails, 2 on bad input."""
    args = build_parser().parse_args(argv)
    parser = build_parser()
    if args.load_adapter and args.ranks:
        parser.error(
            "--load-adapter evaluates one saved adapter; it cannot be combined with --ranks"
        )
    if args.tutorial_data and args.validation_size:
        parser.error("--tutorial-data means no validation split: drop --validation-size")
    if args.seeds and (args.load_adapter or args.ranks):
        parser.error(
            "--seeds runs whole recipes: it cannot be combined with --load-adapter/--ranks"
        )
    if len(args.recipe) > 1 and not args.seeds:
        parser.error("several --recipe values need --seeds (one run fine-tunes one recipe)")
    for flag, values in (("--variant", args.variant), ("--init", args.init)):
        if len(values) > 1 and not args.seeds:
            parser.error(f"several {flag} values need --seeds (one run trains one adapter)")
    if args.load_adapter and (args.variant != ["lora"] or args.init != ["default"] or args.lrs):
        parser.error(
            "--load-adapter evaluates the adapter the file holds: drop --variant/--init/--lrs"
        )
    if args.lrs and args.lr:
        parser.error("--lr trains at one learning rate, --lrs chooses among several: pass one")
    from lora_param import LoRAError

    from .pipeline import run_pipeline
    from .seeds import arms_of, plan_arm

    arms, skipped = arms_of(args.variant, args.init)
    if not arms:
        parser.error(
            f"--init {' '.join(args.init)} is not an initialization of {', '.join(args.variant)}"
        )
    if not args.load_adapter:
        for variant, init in arms:
            try:
                plan_arm(variant, init, args.rank)  # before any work
            except LoRAError as exc:
                parser.error(str(exc))
    for variant, init in skipped:
        print(f"lora-param-mnist: {variant} has no init {init!r}: left out", file=sys.stderr)

    try:
        if args.seeds:
            from .seeds import parse_seeds, run_seeds

            words = list(sys.argv[1:] if argv is None else argv)
            result = run_seeds(
                config_from_args(args),
                parse_seeds(args.seeds),
                args.recipe,
                arms=arms,
                command=shlex.join(["lora-param-mnist", *words]),
            )
            checks = [
                r["lora_off_identical"] and r["frozen_unchanged"]
                for block in result["recipes"].values()
                for r in block["rows"]
            ]
            return 0 if all(checks) else 1
        run = run_pipeline(config_from_args(args))
    except MNISTNotFoundError as exc:
        print(f"lora-param-mnist: error: {exc}", file=sys.stderr)
        return 2
    except (LoRAError, FileNotFoundError) as exc:
        print(f"lora-param-mnist: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if "lora_param[" not in str(exc):  # not one of ours saying which extra to install
            raise
        print(f"lora-param-mnist: error: {exc}", file=sys.stderr)
        return 2
    report = run.report
    return 0 if report["lora_off_identical"] and report["frozen_unchanged"] else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
