"""transformers' ``Trainer`` with adapter-only checkpoints, and a safe ``save_pretrained``.

* :class:`LoRATrainer` is a ``transformers.Trainer`` whose checkpoints and final save hold the
  adapters (``lora_adapters.pt`` for :func:`~lora_param.load_lora`, plus a PEFT folder's
  ``adapter_config.json`` / ``adapter_model.safetensors`` when the adapter can be expressed in
  PEFT's format) instead of the whole model. The optimizer, scheduler and RNG states are the
  Trainer's own; ``resume_from_checkpoint`` loads the adapters back into the model, so training
  continues exactly where it stopped.
* On a model that carries LoRA, ``save_pretrained`` writes the *merged* model (plain keys such as
  ``...q_proj.weight`` holding ``W + sBA`` of the enabled adapters), which ``from_pretrained``
  loads with the outputs LoRA gives; the model itself is not changed. ``add_lora`` installs this
  on every model that has a ``save_pretrained`` method (see
  :func:`lora_param.core.hf_save.guard_save_pretrained`).

``transformers`` is imported only when :class:`LoRATrainer` is first used
(``pip install "lora_param[hf]"``). Tested in one process; under DDP only the main process
writes and every process loads (untested). FSDP and DeepSpeed checkpoints (which hand ``_save``
a gathered ``state_dict``) are not supported.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import LoRAError
from ..core.io import load_lora, save_lora
from ..core.registry import list_adapters
from .peft_export import export_peft
from .peft_format import unwrap_model

__all__ = ["ADAPTER_FILE", "LoRATrainer", "save_adapters"]  # noqa: F822 (LoRATrainer: lazy)

ADAPTER_FILE = "lora_adapters.pt"
_log = logging.getLogger(__name__)


def save_adapters(model: nn.Module, output_dir: str | os.PathLike, *, peft: bool = True) -> Path:
    """Write every adapter of ``model`` into ``output_dir`` without the base weights.

    Args:
        model: A model with adapters.
        output_dir: The folder (created if needed).
        peft: Also write a PEFT adapter folder's two files when the model has one adapter that
            PEFT can represent; otherwise only ``lora_adapters.pt`` is written (logged).

    Returns:
        The path of ``lora_adapters.pt``.
    """
    out = Path(output_dir)
    path = save_lora(model, out / ADAPTER_FILE)
    if peft:
        names = list_adapters(model)
        if len(names) == 1:
            try:
                export_peft(model, out)
            except (LoRAError, ImportError) as e:
                _log.warning("no PEFT folder written to %s: %s", out, e)
        else:
            _log.warning("no PEFT folder written to %s: a PEFT folder holds one adapter", out)
    return path


def _trainer_class() -> type:
    try:
        from transformers import Trainer
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'LoRATrainer needs transformers; install it with `pip install "lora_param[hf]"` '
            "(or `pip install transformers accelerate`)."
        ) from exc
    return Trainer


class _LoRATrainerMixin:
    """The three Trainer hooks that decide what a checkpoint holds and how it is read back."""

    save_peft: bool = True
    # Set by transformers.Trainer, which this mixin is combined with (annotations only).
    args: Any
    model: nn.Module
    state: Any

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapters, config, processor and arguments (``state_dict`` is not used)."""
        args = self.args
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return
        model = unwrap_model(self.model)
        os.makedirs(output_dir, exist_ok=True)
        save_adapters(model, output_dir, peft=self.save_peft)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(output_dir)
        processing = getattr(self, "processing_class", None)
        if processing is not None:
            processing.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load a checkpoint's adapters into the model (Trainer restores optimizer and RNG)."""
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        if not path.is_file():
            raise LoRAError(
                f"'{resume_from_checkpoint}' has no {ADAPTER_FILE}; LoRATrainer resumes from the "
                "checkpoints it wrote itself (checkpoint-<step> folders under output_dir)."
            )
        target = model if model is not None else self.model
        load_lora(unwrap_model(target), path, freeze=False)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapters."""
        best = self.state.best_model_checkpoint
        _log.info("loading the best adapters from %s (score %s)", best, self.state.best_metric)
        self._load_from_checkpoint(best)


def __getattr__(name: str) -> Any:
    # LoRATrainer subclasses transformers.Trainer: it is built on first use, so that importing
    # this module (and lora_param) never imports transformers.
    if name == "LoRATrainer":
        cls = _build_trainer()
        globals()["LoRATrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_trainer() -> type:
    trainer: Any = _trainer_class()

    class LoRATrainer(_LoRATrainerMixin, trainer):
        __doc__ = _LORA_TRAINER_DOC

        def __init__(self, *args: Any, save_peft: bool = True, **kwargs: Any) -> None:
            self.save_peft = save_peft
            super().__init__(*args, **kwargs)
            if not list_adapters(unwrap_model(self.model)):
                raise LoRAError(
                    "LoRATrainer trains adapters, and this model has none: call add_lora (or "
                    "load_lora) on it first, or use transformers.Trainer."
                )

    LoRATrainer.__module__ = __name__
    return LoRATrainer


_LORA_TRAINER_DOC = """A ``transformers.Trainer`` whose checkpoints hold the adapters, not the base.

Use it exactly as ``Trainer``; the model must already have adapters (``add_lora``). Each
``checkpoint-<step>`` folder holds ``lora_adapters.pt`` (and a PEFT adapter folder's files when
PEFT can represent the adapter) with the optimizer, scheduler and RNG states;
``train(resume_from_checkpoint=...)`` continues exactly. ``save_model()`` writes the adapters
the same way; for a merged model that ``from_pretrained`` loads, call
``model.save_pretrained(folder)`` (it merges on the fly).

Args:
    *args: As ``transformers.Trainer``.
    save_peft: Also write PEFT's ``adapter_config.json`` / ``adapter_model.safetensors``.
    **kwargs: As ``transformers.Trainer``.
"""
