"""Training loops: pretraining and the fine-tuning recipes ("tutorial" and "balanced")."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class TrainResult:
    """What a training loop did: steps, mean loss over all steps and over the last 10%, seconds."""

    steps: int
    mean_loss: float
    final_loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return asdict(self)


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining: every parameter, Adam, cross-entropy (the tutorial: 1 epoch, batch 10, lr 1e-3).

    Attributes:
        epochs: Passes over the 60,000 training images.
        batch_size: Images per step.
        lr: Adam learning rate.
        steps: Stop after this many steps (quick runs); None for `epochs` full passes.
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 1e-3
    steps: int | None = None


@dataclass(frozen=True)
class FinetuneRecipe:
    """How the LoRA factors are fine-tuned on the target digit.

    Attributes:
        name: "tutorial" or "balanced" (or your own).
        steps: Optimisation steps.
        batch_size: Images per step.
        lr: Adam learning rate (linearly decayed to 0 when `lr_decay`).
        replay: Fraction of each batch drawn from the *other* digits (0: the target digit only).
        target_weight: Weight of the target-digit examples in the cross-entropy.
        distill: Weight of a KL term that keeps the replayed images' outputs at the LoRA-off
            model's (the teacher, computed under ``lora_disabled``); 0 turns it off.
        temperature: Softmax temperature of the KL term.
        lr_decay: Decay the learning rate linearly to zero over the steps.
    """

    name: str = "tutorial"
    steps: int = 100
    batch_size: int = 10
    lr: float = 1e-3
    replay: float = 0.0
    target_weight: float = 1.0
    distill: float = 0.0
    temperature: float = 1.0
    lr_decay: bool = False

    def with_overrides(self, **changes: Any) -> FinetuneRecipe:
        """A copy with the given fields changed (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for report.json."""
        return asdict(self)


#: The well-known tutorial: 100 steps of 10 images of the target digit only, Adam lr 1e-3.
TUTORIAL = FinetuneRecipe("tutorial")
#: Target digit plus replayed other digits in every batch, target examples up-weighted, lr decay.
#: Chosen on the validation split by benchmarks/search_balanced.py (seed 0, digit 9: 37 -> 5
#: validation errors, -0.15 points), never on the test set.
BALANCED = FinetuneRecipe(
    "balanced", steps=1000, batch_size=40, lr=1e-3, replay=0.6, target_weight=10.0, lr_decay=True
)
RECIPES: dict[str, FinetuneRecipe] = {"tutorial": TUTORIAL, "balanced": BALANCED}


def make_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused where this torch build supports it on the parameters' device (same updates)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (
        RuntimeError,
        TypeError,
        ValueError,
    ):  # pragma: no cover - old torch / unsupported device
        return torch.optim.Adam(params, lr=lr)


@contextlib.contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormal floats to zero while training (CPU).

    Adam's first moments for dead ReLU units decay into the denormal range within a few hundred
    steps, and on x86 every update touching them then runs several times slower. Values below
    1.2e-38 change no result that matters.
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def shuffled_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    steps: int | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[Tensor]:
    """Index batches as ``DataLoader(shuffle=True)``: a new permutation per epoch, last one partial.

    Args:
        n: Number of examples.
        batch_size: Examples per batch.
        generator: CPU generator; the same state gives the same batches.
        steps: Stop after this many batches (reshuffling as needed); None for one epoch.
        device: Where the index tensors go.
    """
    if n <= 0:
        raise ValueError("no examples to draw batches from")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    done = 0
    while True:
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
            if steps is not None and done >= steps:
                return
            yield perm[start : start + batch_size]
            done += 1
        if steps is None:
            return


def _loop(
    model: nn.Module,
    step_fn: Callable[[], Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    desc: str,
    progress: bool,
    lr_decay: bool = False,
) -> TrainResult:
    """Run `steps` optimisation steps of `step_fn() -> loss` with a progress bar."""
    model.train()
    device = next(model.parameters()).device
    losses = torch.zeros(steps, dtype=torch.float32, device=device)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / steps)
        if lr_decay
        else None
    )
    start = time.perf_counter()
    bar = tqdm(
        total=steps, desc=desc, disable=not progress, unit="step", mininterval=0.5, leave=True
    )
    try:
        with flush_denormal():
            for i in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = step_fn()
                loss.backward()
                optimizer.step()
                if sched is not None:
                    sched.step()
                losses[i] = loss.detach()
                bar.update(1)
                if progress and (i + 1) % 200 == 0:
                    bar.set_postfix(
                        loss=f"{losses[i - 199 : i + 1].mean().item():.3f}", refresh=False
                    )
    finally:
        bar.close()
        model.eval()
    tail = max(1, steps // 10)
    return TrainResult(
        steps=steps,
        mean_loss=float(losses.mean()) if steps else float("nan"),
        final_loss=float(losses[-tail:].mean()) if steps else float("nan"),
        seconds=time.perf_counter() - start,
    )


def pretrain(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: PretrainConfig = PretrainConfig(),
    *,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train every parameter of `model` in place with Adam and cross-entropy.

    Args:
        model: The network.
        images: (N, 784) normalised training images, on the model's device.
        labels: (N,) int64 labels.
        config: Epochs, batch size, learning rate, optional step limit.
        generator: CPU generator for the shuffling (seed it for reproducible runs).
        progress: Show a tqdm bar.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = images.shape[0]
    total = config.steps if config.steps is not None else config.epochs * -(-n // config.batch_size)
    batches = shuffled_batches(n, config.batch_size, generator, steps=total, device=images.device)
    optimizer = make_adam((p for p in model.parameters() if p.requires_grad), config.lr)

    def step() -> Tensor:
        idx = next(batches)
        return F.cross_entropy(model(images[idx]), labels[idx])

    return _loop(model, step, optimizer, total, "pretrain", progress)


def finetune(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    digit: int,
    recipe: FinetuneRecipe = TUTORIAL,
    *,
    teacher: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune the trainable parameters of `model` (the LoRA factors) on one digit.

    With ``recipe.replay == 0`` (the tutorial) every batch holds only the target digit. Otherwise
    each batch holds ``round(replay * batch_size)`` images of the other digits too, the target
    examples weigh ``target_weight`` in the cross-entropy, and with ``distill > 0`` a KL term keeps
    the replayed images' predictions at the LoRA-off model's.

    Args:
        model: Model with LoRA added and its base frozen; parameters with requires_grad train.
        images: (N, 784) all training images, on the model's device.
        labels: (N,) their labels.
        digit: The target digit.
        recipe: Steps, batch size, learning rate and the balanced-recipe knobs.
        teacher: Context-manager factory under which the model computes LoRA-off logits, e.g.
            ``lambda: lora_disabled(model)``; needed when ``recipe.distill > 0``.
        generator: CPU generator for the sampling (seed it for reproducible runs).
        progress: Show a tqdm bar.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to fine-tune: no parameter requires grad (did you add LoRA?)")
    if not 0.0 <= recipe.replay < 1.0:
        raise ValueError(f"replay must be in [0, 1), got {recipe.replay}")
    if recipe.distill > 0 and recipe.replay > 0 and teacher is None:
        raise ValueError(
            "distill > 0 needs a teacher context factory, e.g. lambda: lora_disabled(model)"
        )
    optimizer = make_adam(params, recipe.lr)
    device = images.device
    target_idx = (labels == digit).nonzero().squeeze(1)
    if target_idx.numel() == 0:
        raise ValueError(f"no training image of digit {digit}")
    desc = f"fine-tune on {digit} ({recipe.name})"
    n_replay = (
        0
        if recipe.replay == 0
        else min(recipe.batch_size - 1, max(1, round(recipe.replay * recipe.batch_size)))
    )
    target_batches = shuffled_batches(
        target_idx.numel(),
        recipe.batch_size - n_replay,
        generator,
        steps=recipe.steps,
        device=device,
    )
    if n_replay == 0:

        def step() -> Tensor:
            idx = target_idx[next(target_batches)]
            return F.cross_entropy(model(images[idx]), labels[idx])

        return _loop(model, step, optimizer, recipe.steps, desc, progress, recipe.lr_decay)

    other_idx = (labels != digit).nonzero().squeeze(1)
    other_batches = shuffled_batches(
        other_idx.numel(), n_replay, generator, steps=recipe.steps, device=device
    )
    temp = recipe.temperature

    def balanced_step() -> Tensor:
        t_idx = target_idx[next(target_batches)]
        r_idx = other_idx[next(other_batches)]
        idx = torch.cat([t_idx, r_idx])
        ref = None
        if recipe.distill > 0:
            assert teacher is not None
            with torch.no_grad(), teacher():  # LoRA-off logits, before the student's graph exists
                ref = model(images[r_idx])
        logits = model(images[idx])
        per_example = F.cross_entropy(logits, labels[idx], reduction="none")
        weights = torch.ones_like(per_example)
        weights[: t_idx.numel()] = recipe.target_weight
        loss = (per_example * weights).sum() / weights.sum()
        if ref is not None:
            kl = F.kl_div(
                F.log_softmax(logits[t_idx.numel() :] / temp, dim=1),
                F.log_softmax(ref / temp, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            loss = loss + recipe.distill * temp * temp * kl
        return loss

    return _loop(model, balanced_step, optimizer, recipe.steps, desc, progress, recipe.lr_decay)
