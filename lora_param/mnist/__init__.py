"""Reference pipeline: the classic MNIST LoRA demonstration on lora_param's public API.

Pretrain an MLP (784-1000-2000-10) for one epoch, add a rank-1 LoRA to its three linear
layers, fine-tune on one digit, and measure what that fixes (the digit) and what it breaks
(the others), with LoRA on and off. Every choice is made on a validation split held out of
the training images; the test set is evaluated once per model, at the end. Run it with
``lora-param-mnist`` or ``python -m lora_param.mnist``; needs ``lora_param[mnist]``
(torchvision), and ``lora_param[plot]`` (matplotlib) for the plots.
"""

from .confusion import confusion_change, confusion_matrix, plot_confusion_change
from .data import MNISTNotFoundError, MNISTTensors, digit_subset, load_mnist, load_split, normalize
from .evaluate import EvalResult, evaluate, predict_logits, worst_digit
from .model import LINEAR_LAYERS, MLP, build_model
from .pipeline import PipelineConfig, PipelineRun, run_pipeline
from .seeds import parse_seeds, run_seeds, seeds_table
from .split import SplitInfo, hold_out_validation, stratified_split
from .train import (
    BALANCED,
    RECIPES,
    TUTORIAL,
    FinetuneRecipe,
    PretrainConfig,
    TrainResult,
    finetune,
    pretrain,
    shuffled_batches,
)

__all__ = [
    "BALANCED",
    "LINEAR_LAYERS",
    "MLP",
    "RECIPES",
    "TUTORIAL",
    "EvalResult",
    "FinetuneRecipe",
    "MNISTNotFoundError",
    "MNISTTensors",
    "PipelineConfig",
    "PipelineRun",
    "PretrainConfig",
    "SplitInfo",
    "TrainResult",
    "build_model",
    "confusion_change",
    "confusion_matrix",
    "digit_subset",
    "evaluate",
    "finetune",
    "hold_out_validation",
    "load_mnist",
    "load_split",
    "normalize",
    "parse_seeds",
    "plot_confusion_change",
    "predict_logits",
    "pretrain",
    "run_pipeline",
    "run_seeds",
    "seeds_table",
    "shuffled_batches",
    "stratified_split",
    "worst_digit",
]
