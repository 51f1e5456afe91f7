"""What a reference run is asked to do (:class:`PipelineConfig`) and the files it writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .split import SPLIT_SEED, VALIDATION_SIZE
from .train import RECIPES, FinetuneRecipe, PretrainConfig

__all__ = [
    "ADAPTER_FILE",
    "CONFUSION_FILE",
    "PLOT_FILE",
    "PRETRAINED_FILE",
    "REPORT_FILE",
    "PipelineConfig",
]


PRETRAINED_FILE = "pretrained.pt"
ADAPTER_FILE = "adapter.pt"
REPORT_FILE = "report.json"
PLOT_FILE = "errors.png"
CONFUSION_FILE = "confusion.png"


@dataclass
class PipelineConfig:
    """Everything a run depends on (the CLI's options).

    Attributes:
        data_dir: MNIST root (IDX files in ``<data_dir>/MNIST/raw/``).
        download: Let torchvision download MNIST when absent.
        digit: Digit to fine-tune on: 0-9, "worst" (the digit with the most errors before
            fine-tuning), or None: 9 as in the tutorial, or with `load_adapter` the digit recorded
            in the report.json beside the adapter.
        rank: LoRA rank; with another `variant`, the LoRA rank whose trainable-parameter count
            the variant's ranks match (see `lora_param.mnist.adapters`).
        alpha: LoRA alpha (scale = alpha / rank; every variant is trained at this scale).
        ranks: Rank sweep: one fine-tune per rank from the same pretrained model.
        variant: The adapter: a registered variant that adapts Linear layers, with its options
            after a colon (``"lora"``, ``"dora"``, ``"oft:side=output"``).
        init: ``"default"`` (the tutorial's A ~ N(0, 1) where the variant takes it, else the
            variant's own), ``"pissa"`` or ``"olora"`` (from the weight, LoRA and DoRA).
        lrs: Learning rates to choose from on the selection split (validation), one fine-tune
            each; None trains once at the recipe's (or `finetune_lr`).
        recipe: Fine-tuning recipe ("tutorial" or "balanced"), see `train.RECIPES`.
        finetune_steps: Override the recipe's steps.
        finetune_batch_size: Override the recipe's batch size.
        finetune_lr: Override the recipe's learning rate.
        distill: Override the recipe's distillation weight.
        pretrain: Pretraining settings.
        validation_size: Training images held out (stratified) for every choice the run makes;
            pretraining then sees the rest (50,000 by default). 0 restores the tutorial's data:
            all 60,000 train, and choices are made on the training images.
        split_seed: Seed of the validation split (fixed by default, so seeds share one split).
        seed: Seeds the model init, data order, LoRA init.
        out: Folder for report.json, pretrained.pt, adapter.pt, errors.png; None writes nothing.
        checkpoint: Pretrained checkpoint: loaded instead of pretraining when it exists, else
            written after pretraining (a cache for repeated runs).
        load_adapter: Evaluate this saved adapter instead of fine-tuning.
        quantize: "nf4" or "int8" stores the pretrained layers packed (QLoRA) before LoRA;
            "pretrained" then means the packed model (the fp32 one is in ``base_storage``).
        device: "auto", "cpu", "cuda", ...
        threads: CPU threads for evaluation; None uses every core this process may run on.
        train_threads: CPU threads for the batch-10 training loops. One by default: at batch 10
            each op is too small for intra-op threads to pay (1.4x faster on an idle 2-core
            machine) and a thread preempted by any other process stalls every op (15x slower
            when something else runs). Thread count changes float results, so it is fixed.
        eval_batch_size: Test images per evaluation batch.
        progress: Show tqdm bars.
        verbose: Print the summary and phase messages.
    """

    data_dir: str = "./data"
    download: bool = True
    digit: int | str | None = None
    rank: int = 1
    alpha: float = 1.0
    ranks: list[int] | None = None
    variant: str = "lora"
    init: str = "default"
    lrs: list[float] | None = None
    recipe: str = "tutorial"
    finetune_steps: int | None = None
    finetune_batch_size: int | None = None
    finetune_lr: float | None = None
    distill: float | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    validation_size: int = VALIDATION_SIZE
    split_seed: int = SPLIT_SEED
    seed: int = 0
    out: str | None = None
    checkpoint: str | None = None
    load_adapter: str | None = None
    quantize: str | None = None
    device: str = "auto"
    threads: int | None = None
    train_threads: int | None = 1
    eval_batch_size: int = 2000
    progress: bool = True
    verbose: bool = True

    def finetune_recipe(self) -> FinetuneRecipe:
        """The recipe with this config's overrides applied."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        return RECIPES[self.recipe].with_overrides(
            steps=self.finetune_steps,
            batch_size=self.finetune_batch_size,
            lr=self.finetune_lr,
            distill=self.distill,
        )
