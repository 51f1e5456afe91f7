"""Reference pipeline: the classic MNIST LoRA demonstration on lora_param's public API.

Pretrain an MLP (784-1000-2000-10) for one epoch, add a rank-1 LoRA to its three linear
layers, fine-tune on one digit, and measure what that fixes (the digit) and what it breaks
(the others), with LoRA on and off. Run it with ``lora-param-mnist`` or
``python -m lora_param.mnist``; needs ``lora_param[mnist]`` (torchvision), and
``lora_param[plot]`` (matplotlib) for the bar chart.
"""

from .data import MNISTNotFoundError, MNISTTensors, digit_subset, load_mnist, load_split, normalize
from .evaluate import EvalResult, evaluate, predict_logits, worst_digit
from .model import LINEAR_LAYERS, MLP, build_model
from .pipeline import PipelineConfig, PipelineRun, run_pipeline
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
    "TrainResult",
    "build_model",
    "digit_subset",
    "evaluate",
    "finetune",
    "load_mnist",
    "load_split",
    "normalize",
    "predict_logits",
    "pretrain",
    "run_pipeline",
    "shuffled_batches",
    "worst_digit",
]
