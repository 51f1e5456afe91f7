"""transformers' ``Trainer`` with adapter-only checkpoints, and a safe ``save_pretrained``.

* :class:`LoRATrainer` is a ``transformers.Trainer`` whose checkpoints and final save hold the
  adapters (``lora_adapters.pt`` for :func:`~lora_param.load_lora`, plus a PEFT folder's
  ``adapter_config.json`` / ``adapter_model.safetensors`` when the adapter can be expressed in
  PEFT's format) instead of the whole model. The optimizer, scheduler and RNG states are the
  Trainer's own; ``resume_from_checkpoint`` loads the adapters back into the model, so training
  continues exactly where it stopped. :class:`LoRATrainerMixin` gives any other ``Trainer``
  subclass (TRL's ``SFTTrainer``, ...) the same checkpoints:
  ``class LoRASFTTrainer(LoRATrainerMixin, SFTTrainer): pass``.
* Under accelerate's FSDP2 (``fsdp_version: 2``, either state-dict type) and DeepSpeed ZeRO-3,
  every rank takes part in a save, the adapters alone are gathered and rank 0 writes them; a
  checkpoint holds no copy of the base (no ``pytorch_model_fsdp_*``). Under DDP only the main
  process writes and every process loads.
* On a model that carries LoRA, ``save_pretrained`` writes the *merged* model (plain keys such as
  ``...q_proj.weight`` holding ``W + sBA`` of the enabled adapters), which ``from_pretrained``
  loads with the outputs LoRA gives; the model itself is not changed. ``add_lora`` installs this
  on every model that has a ``save_pretrained`` method (see
  :func:`lora_param.core.hf_save.guard_save_pretrained`).

``transformers`` is imported only when :class:`LoRATrainer` is first used
(``pip install "lora_param[hf]"``); the mixin imports nothing until a Trainer calls it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import LoRAError
from ..core.io import load_lora, save_lora
from ..core.lookup import list_adapters
from ..training.loraplus import LR_EMBEDDING, lora_plus_param_groups
from .engine_state import adapters_from_state_dict, adapters_sharded, gathered_adapters
from .peft_export import export_peft
from .peft_format import unwrap_model

__all__ = [
    "ADAPTER_FILE",
    "LoRATrainer",
    "LoRATrainerMixin",
    "save_adapters",
]

ADAPTER_FILE = "lora_adapters.pt"
#: transformers.trainer's names for the scheduler state and FSDP's whole-model checkpoint.
SCHEDULER_FILE = "scheduler.pt"
FSDP_MODEL_PREFIX = "pytorch_model_fsdp"
_log = logging.getLogger(__name__)


def save_adapters(model: nn.Module, output_dir: str | os.PathLike, *, peft: bool = True) -> Path:
    """Write every adapter of ``model`` into ``output_dir`` without the base weights.

    On a sharded (FSDP2) model this is a collective: call it on every rank; rank 0 writes.

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


class LoRATrainerMixin:
    """Adapter-only checkpoints for any ``transformers.Trainer`` subclass (TRL's included).

    Put it first among the bases: ``class LoRASFTTrainer(LoRATrainerMixin, SFTTrainer): pass``
    (:class:`LoRATrainer` is ``LoRATrainerMixin`` + ``Trainer``). It replaces the Trainer's
    hooks that decide what a checkpoint and the final save hold and how a checkpoint is read
    back; everything else (the training loop, the optimizer and scheduler states, TRL's data
    handling) is the Trainer's own.

    Under FSDP2 (accelerate's ``fsdp_version: 2``) every rank takes part in the save (the
    adapter shards are gathered, never the base) and rank 0 writes; under DeepSpeed ZeRO-3 the
    adapter parameters alone are gathered for the save. A ``state_dict`` that the Trainer hands
    to ``_save`` (a gathered full state dict) is where the adapters are read from.

    With ``loraplus_ratio`` the Trainer's optimizer (``args.optim``, or
    ``optimizer_cls_and_kwargs``) is built from :func:`lora_param.lora_plus_param_groups`: ``B``
    learns at ``loraplus_ratio * args.learning_rate``, ``A`` at ``args.learning_rate``, the
    weight decay is ``args.weight_decay`` (none on biases and norms); the scheduler scales
    every group alike.

    Args:
        *args: As the Trainer class it is combined with.
        save_peft: Also write PEFT's ``adapter_config.json`` / ``adapter_model.safetensors``.
        loraplus_ratio: Train with LoRA+ (``B``'s learning rate over ``A``'s, 16 in the paper);
            None: the Trainer's own parameter groups.
        loraplus_lr_embedding: With LoRA+, the learning rate of adapters on embedding layers
            (PEFT's default, 1e-6).
        **kwargs: As the Trainer class it is combined with.

    Raises:
        LoRAError: the model has no adapters, accelerate is set up for FSDP1 (its flattened
            parameters hide the adapters; use ``fsdp_version: 2``), the model was sharded
            with ``fully_shard`` while the Trainer is not set up for FSDP, or
            ``loraplus_ratio`` comes with an optimizer of your own (``optimizers=``).
    """

    save_peft: bool = True
    loraplus_ratio: float | None = None
    loraplus_lr_embedding: float = LR_EMBEDDING
    # Set by transformers.Trainer, which this mixin is combined with (annotations only).
    args: Any
    model: Any  # nn.Module (Trainer declares it more loosely)
    state: Any
    accelerator: Any
    optimizer: Any
    lr_scheduler: Any
    model_wrapped: Any
    is_fsdp_enabled: bool
    is_deepspeed_enabled: bool

    def __init__(
        self,
        *args: Any,
        save_peft: bool = True,
        loraplus_ratio: float | None = None,
        loraplus_lr_embedding: float = LR_EMBEDDING,
        **kwargs: Any,
    ) -> None:
        self.save_peft = save_peft
        if loraplus_ratio is not None:
            for name, value in (
                ("loraplus_ratio", loraplus_ratio),
                ("loraplus_lr_embedding", loraplus_lr_embedding),
            ):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise LoRAError(f"{name} must be a positive number, got {value!r}.")
            if (kwargs.get("optimizers") or (None, None))[0] is not None:
                raise LoRAError(
                    "pass either loraplus_ratio= or optimizers=: LoRA+ builds the optimizer's "
                    "parameter groups (for your own optimizer, give it "
                    "lora_param.lora_plus_param_groups(model, lr, ratio))."
                )
        self.loraplus_ratio = loraplus_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        super().__init__(*args, **kwargs)
        model = unwrap_model(self.model)
        if not list_adapters(model):
            raise LoRAError(
                "LoRATrainer trains adapters, and this model has none: call add_lora (or "
                "load_lora) on it first, or use transformers.Trainer."
            )
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise LoRAError(
                "LoRATrainer under FSDP needs FSDP2: FSDP1 flattens the parameters, so the "
                "adapters cannot be saved or loaded by name. Set fsdp_version: 2 in the "
                "accelerate config (or fsdp_config={'version': 2} in TrainingArguments)."
            )
        if adapters_sharded(model) and not self.is_fsdp_enabled:
            raise LoRAError(
                "the model's adapters are already sharded (fully_shard) but the Trainer is not "
                "set up for FSDP, so it would wrap the shards in DistributedDataParallel. Launch "
                "with accelerate's FSDP2 config (fsdp_version: 2), or pass the unsharded model "
                "and let accelerate shard it."
            )

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        """The Trainer's optimizer; with ``loraplus_ratio``, on LoRA+'s parameter groups."""
        if self.loraplus_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)  # type: ignore[misc]
        opt_model = self.model if model is None else model
        trainer: Any = self
        given = getattr(trainer, "optimizer_cls_and_kwargs", None)
        if given is None:
            given = trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_cls, kwargs = given[0], dict(given[1])
        if _is_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
            raise LoRAError(
                f"loraplus_ratio needs an optimizer built from parameter groups; "
                f"optim={self.args.optim!r} builds its own. Use an optimizer such as "
                "'adamw_torch', or leave loraplus_ratio out."
            )
        groups = lora_plus_param_groups(
            unwrap_model(opt_model),
            lr=self.args.learning_rate,
            ratio=self.loraplus_ratio,
            lr_embedding=self.loraplus_lr_embedding,
            weight_decay=self.args.weight_decay,
        )
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapters (every rank takes part when they are sharded or partitioned).

        Under FSDP and DeepSpeed, ``Trainer.save_model`` would gather the whole model to rank
        0 (FSDP's ``FULL_STATE_DICT``, DeepSpeed) or write nothing (``SHARDED_STATE_DICT``);
        here every rank gathers the adapters alone and rank 0 writes them.
        """
        model = unwrap_model(self.model)
        engine = self.is_fsdp_enabled or self.is_deepspeed_enabled or adapters_sharded(model)
        if not engine:
            super().save_model(output_dir, _internal_call)  # type: ignore[misc]
            return
        folder = output_dir if output_dir is not None else self.args.output_dir
        with gathered_adapters(model):
            self._save(folder)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(  # type: ignore[attr-defined]
                commit_message="Model save", revision=self.args.hub_revision
            )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapters, config, processor and arguments into ``output_dir``.

        Args:
            output_dir: The folder; default ``args.output_dir``.
            state_dict: A gathered state dict of the whole model (Trainer passes one under
                FSDP's ``FULL_STATE_DICT`` or DeepSpeed): the adapters are taken from it on the
                rank that writes. None: they are read from the model, gathered from every rank
                when sharded (then every rank must call this).
        """
        args = self.args
        output_dir = output_dir if output_dir is not None else args.output_dir
        model = unwrap_model(self.model)
        collective = state_dict is None and adapters_sharded(model)
        if not (args.should_save or collective):
            return
        source = (
            adapters_from_state_dict(model, state_dict)
            if state_dict is not None
            else contextlib.nullcontext()
        )
        with source:  # checks the state dict before anything is written
            if args.should_save:
                os.makedirs(output_dir, exist_ok=True)
            save_adapters(model, output_dir, peft=self.save_peft)
        if not args.should_save:
            return
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(output_dir)
        processing = getattr(self, "processing_class", None)
        if processing is not None:
            processing.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, "training_args.bin"))

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """As ``Trainer.train``; under DeepSpeed, resumes from checkpoints without the base.

        DeepSpeed checkpoints written here leave the frozen tensors out; DeepSpeed's strict
        load would call them missing, so while training runs the model's ``load_state_dict``
        does not count frozen tensors as missing.
        """
        model = unwrap_model(self.model)
        hook = (
            model.register_load_state_dict_post_hook(_frozen_not_missing)
            if self.is_deepspeed_enabled
            else None
        )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            if hook is not None:
                hook.remove()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer and scheduler states, without a copy of the base weights."""
        if self.is_deepspeed_enabled:
            # Trainer leaves the frozen weights out of DeepSpeed's checkpoint for PEFT models only
            from accelerate.utils import DeepSpeedSchedulerWrapper

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            own = not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)
            if own and self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))
            return
        if not self.is_fsdp_enabled:
            super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]
            return
        # Trainer writes pytorch_model_fsdp_* (every base weight) here too; the adapters are
        # in the checkpoint already. The optimizer state covers the adapter parameters only.
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(
            self.accelerator.state.fsdp_plugin,
            self.accelerator,
            self.optimizer,
            self.model,
            output_dir,
        )
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_FILE))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        """Load a checkpoint's adapters into the model (Trainer restores optimizer and RNG).

        On a sharded model each rank keeps its own shard; under ZeRO-3 every rank must call it.
        """
        folder = Path(resume_from_checkpoint)
        path = folder / ADAPTER_FILE
        if not path.is_file():
            full = folder.is_dir() and any(
                p.name.startswith(FSDP_MODEL_PREFIX) for p in folder.iterdir()
            )
            what = " (it holds transformers.Trainer's whole-model FSDP checkpoint)" if full else ""
            raise LoRAError(
                f"'{resume_from_checkpoint}' has no {ADAPTER_FILE}{what}"
                "; LoRATrainer resumes from the checkpoints it wrote itself (checkpoint-<step> "
                "folders under output_dir)."
            )
        target = unwrap_model(model if model is not None else self.model)
        with gathered_adapters(target, modifier_rank=0):
            load_lora(target, path, freeze=False)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the best checkpoint's adapters."""
        best = self.state.best_model_checkpoint
        _log.info("loading the best adapters from %s (score %s)", best, self.state.best_metric)
        self._load_from_checkpoint(best)


if TYPE_CHECKING:  # what type checkers and the API reference see; built on first use at run time
    from transformers import Trainer

    class LoRATrainer(LoRATrainerMixin, Trainer):
        """A ``transformers.Trainer`` whose checkpoints hold the adapters, not the base.

        Use it exactly as ``Trainer``; the model must already have adapters (``add_lora``). Each
        ``checkpoint-<step>`` folder holds ``lora_adapters.pt`` (and a PEFT adapter folder's files
        when PEFT can represent the adapter) with the optimizer, scheduler and RNG states;
        ``train(resume_from_checkpoint=...)`` continues exactly. ``save_model()`` writes the
        adapters the same way; for a merged model that ``from_pretrained`` loads, call
        ``model.save_pretrained(folder)`` (it merges on the fly). Under accelerate's FSDP2 and
        DeepSpeed ZeRO-3 the same holds: every rank takes part in a save, rank 0 writes the
        adapters alone. Other ``Trainer`` subclasses get the same behaviour from
        :class:`LoRATrainerMixin`.

        Args:
            *args: As ``transformers.Trainer``.
            save_peft: Also write PEFT's ``adapter_config.json`` / ``adapter_model.safetensors``.
            loraplus_ratio: Train with LoRA+: ``B`` at this many times ``args.learning_rate``
                (see :class:`LoRATrainerMixin`); None: the Trainer's own parameter groups.
            loraplus_lr_embedding: With LoRA+, the learning rate of adapters on embeddings.
            **kwargs: As ``transformers.Trainer``.

        Raises:
            LoRAError: The model has no adapters.
            ImportError: transformers is not installed (``pip install "lora_param[hf]"``).
        """

        def __init__(
            self,
            *args: Any,
            save_peft: bool = True,
            loraplus_ratio: float | None = None,
            loraplus_lr_embedding: float = ...,
            **kwargs: Any,
        ) -> None: ...


def _is_factory(optimizer_cls: Any) -> bool:
    """Whether transformers returned an optimizer factory (Muon, Dion), not a class."""
    try:
        from transformers.trainer_optimizer import is_optimizer_factory
    except ImportError:  # pragma: no cover - older transformers have no factories
        return False
    return bool(is_optimizer_factory(optimizer_cls))


def _frozen_not_missing(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: frozen tensors are not "missing".

    DeepSpeed checkpoints written by :class:`LoRATrainerMixin` leave out what does not train
    (the base, disabled adapters): the model built again for resuming already holds it.
    """
    if not incompatible.missing_keys:
        return
    frozen = {n for n, t in module.named_parameters(remove_duplicate=False) if not t.requires_grad}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]


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

    class LoRATrainer(LoRATrainerMixin, trainer):
        __doc__ = _LORA_TRAINER_DOC

    LoRATrainer.__module__ = __name__
    LoRATrainer.__qualname__ = "LoRATrainer"  # as if defined at module level (docs, pickling)
    return LoRATrainer


_LORA_TRAINER_DOC = """A ``transformers.Trainer`` whose checkpoints hold the adapters, not the base.

Use it exactly as ``Trainer``; the model must already have adapters (``add_lora``). Each
``checkpoint-<step>`` folder holds ``lora_adapters.pt`` (and a PEFT adapter folder's files
when PEFT can represent the adapter) with the optimizer, scheduler and RNG states;
``train(resume_from_checkpoint=...)`` continues exactly. ``save_model()`` writes the
adapters the same way; for a merged model that ``from_pretrained`` loads, call
``model.save_pretrained(folder)`` (it merges on the fly). Under accelerate's FSDP2 and
DeepSpeed ZeRO-3 the same holds: every rank takes part in a save, rank 0 writes the
adapters alone. Other ``Trainer`` subclasses get the same behaviour from
:class:`LoRATrainerMixin`.

Args:
    *args: As ``transformers.Trainer``.
    save_peft: Also write PEFT's ``adapter_config.json`` / ``adapter_model.safetensors``.
    loraplus_ratio: Train with LoRA+: ``B`` at this many times ``args.learning_rate``
        (see :class:`LoRATrainerMixin`); None: the Trainer's own parameter groups.
    loraplus_lr_embedding: With LoRA+, the learning rate of adapters on embeddings.
    **kwargs: As ``transformers.Trainer``.

Raises:
    LoRAError: The model has no adapters.
    ImportError: transformers is not installed (``pip install "lora_param[hf]"``).
"""
