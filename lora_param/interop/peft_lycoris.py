"""PEFT's LyCORIS-family adapter folders (``peft_type`` ``"LOHA"``, ``"LOKR"``): what they share.

PEFT keeps LoHa and LoKr in tuners of their own (``LoHaConfig``, ``LoKrConfig``, both
``LycorisConfig``). Their folder is PEFT's usual pair of files:

* ``adapter_config.json``: ``r`` and ``alpha`` (scale ``alpha / r``), per-layer
  ``rank_pattern`` / ``alpha_pattern``, ``target_modules``, ``modules_to_save``,
  ``use_effective_conv2d`` (the tucker form on convolutions), ``rank_dropout`` and
  ``module_dropout`` (training only), and the variant's own fields;
* ``adapter_model.safetensors``: ``base_model.model.<module path>.<tensor>``, the tensors
  under the same names as lora_param's entries (``hada_w1_a``, ``lokr_w1``, ...).

PEFT adapts ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` with them (not HF ``Conv1D``,
``nn.Conv3d``, embeddings or named parameters) and has no ``bias`` option: such adapters are
refused by ``export_peft`` with a ``LoRAError``. :class:`LycorisFolder` holds the common
reading and writing; each variant's module (:mod:`.peft_loha`, :mod:`.peft_lokr`) adds its
tensors and fields and registers the folder format.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.copies import register_copies
from ..core.errors import LoRAError
from ..core.freeze import freeze_base
from ..core.inject import Mode, inject
from ..core.lookup import iter_lora
from ..core.merge import remove_lora
from ..core.targets import AdaptTarget, module_targets
from ..core.variant import AdapterVariant
from .peft_codecs import FolderFormat, register_peft_folder_format
from .peft_export import (
    _export_copies,
    mha_out_projections,
    rank_pattern_for,
    target_modules_for,
)
from .peft_format import PREFIX, module_names, peft_pattern_key
from .peft_import import _plan_peft_copies

__all__ = ["Layer", "LycorisFolder"]

#: (tensor path, module path, module, entry) of one adapted layer.
Layer = tuple[str, str, nn.Module, AdapterVariant]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    "alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "rank_pattern": (
        lambda v: (
            v is None
            or (isinstance(v, dict) and all(isinstance(x, int) and x > 0 for x in v.values()))
        ),
        "an object of positive integers or null",
    ),
    "alpha_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) for x in v.values())),
        "an object of numbers or null",
    ),
    "use_effective_conv2d": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "rank_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
    "module_dropout": (lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"),
}


class LycorisFolder:
    """A PEFT LyCORIS-family folder type; subclasses add one variant's tensors and fields."""

    peft_type: ClassVar[str] = ""
    variant: ClassVar[str] = ""
    #: The per-layer tensor names the folder holds (after ``<module path>.``).
    suffixes: ClassVar[frozenset[str]] = frozenset()
    #: Config fields the variant adds, with a check and what they must hold.
    extra_fields: ClassVar[dict[str, tuple[Any, str]]] = {}

    # ---- what a variant adds -------------------------------------------------------------------

    def config_fields(self, layers: list[Layer]) -> dict[str, Any]:
        """The variant's config fields for these layers; LoRAError where PEFT has no form."""
        raise NotImplementedError

    def peft_rank(self, p: AdapterVariant, config: Mapping[str, Any]) -> int:
        """The ``r`` PEFT must read for the layer (it decides the layout)."""
        return int(p.fields()["rank"])

    def layer_tensors(self, p: AdapterVariant, module: nn.Module, where: str) -> dict[str, Tensor]:
        """The layer's tensors in PEFT's shapes, by name."""
        raise NotImplementedError

    def read_layer(
        self,
        config: Mapping[str, Any],
        parts: Mapping[str, Tensor],
        target: AdaptTarget,
        module: nn.Module,
        rank: int,
        alpha: float,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """A layer's entry fields and tensors (by the variant's names), checked."""
        raise NotImplementedError

    # ---- writing -------------------------------------------------------------------------------

    def export(self, model: nn.Module, adapter: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The folder's config fields and tensors for one adapter (see :class:`FolderFormat`)."""
        layers: list[Layer] = []
        mha_out = mha_out_projections(model)
        for tensor_path, module, tensor_name, p in iter_lora(model):
            if p.adapter != adapter:
                continue
            module_path = tensor_path.rpartition(".")[0]
            where = f"'{tensor_path}'"
            if tensor_name != "weight" or not isinstance(module, _LAYERS) or not module_path:
                raise LoRAError(
                    f"{where} is a {type(module).__name__}'s {tensor_name}; PEFT's "
                    f"{self.peft_type} adapts the weight of nn.Linear, nn.Conv1d and nn.Conv2d "
                    "submodules only. Leave it out of targets, or save the adapter with save_lora."
                )
            if module_path in mha_out:
                raise LoRAError(
                    f"{where} is the out_proj of an nn.MultiheadAttention, whose forward PEFT "
                    "wraps but attention never calls: PEFT would silently drop it. Leave it out "
                    "(exclude='*.out_proj') to export."
                )
            pads = module.padding if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 0
            if (
                isinstance(module, (nn.Conv1d, nn.Conv2d))
                and module.padding_mode != "zeros"
                and (pads not in ((0,) * len(module.kernel_size), "valid"))
            ):
                raise LoRAError(
                    f"{where} uses padding_mode={module.padding_mode!r}; PEFT's "
                    f"{self.peft_type} convolves its update with zero padding and would compute "
                    "something else. Exclude this layer to export."
                )
            layers.append((tensor_path, module_path, module, p))
        config = self.config_fields(layers)
        paths = [path for _, path, _, _ in layers]
        ranks, alphas = [], []
        tensors: dict[str, Tensor] = {}
        for tensor_path, module_path, module, p in layers:
            r = self.peft_rank(p, config)
            ranks.append(r)
            alphas.append(_alpha_for(p, r))
            for name, t in self.layer_tensors(p, module, f"'{tensor_path}'").items():
                tensors[f"{PREFIX}{module_path}.{name}"] = t.detach()
        default_r, rank_pattern = rank_pattern_for(paths, ranks)
        default_alpha, alpha_pattern = rank_pattern_for(paths, alphas)
        base_names = module_names(model)
        owners = {path: tp for tp, path, _, _ in layers}
        copies, modules_to_save, bias = _export_copies(model, adapter, owners, base_names)
        if bias != "none":
            raise LoRAError(
                f"adapter {adapter!r} trains biases (bias={bias!r}); PEFT's {self.peft_type} "
                "config has no bias option. Add the adapter with bias='none' to export it."
            )
        tensors.update(copies)
        return {
            "r": default_r,
            "alpha": _number(default_alpha),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "target_modules": target_modules_for(base_names, paths),
            "exclude_modules": None,
            "modules_to_save": modules_to_save,
            "init_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_dropout": 0.0,
            "module_dropout": 0.0,
            **config,
        }, tensors

    # ---- reading -------------------------------------------------------------------------------

    def load(
        self,
        model: nn.Module,
        config: Mapping[str, Any],
        raw: Mapping[str, Tensor],
        adapter: str,
        freeze: bool,
        mode: Mode,
    ) -> None:
        """Check everything against the model, then add the adapter (all or nothing)."""
        where = f"PEFT {self.peft_type} folder"
        for field, (ok, expected) in {**_FIELDS, **self.extra_fields}.items():
            if field in config and not ok(config[field]):
                raise LoRAError(
                    f"the {where} is damaged: {field}={config[field]!r} must be {expected}."
                )
        dropped = {k: config[k] for k in ("rank_dropout", "module_dropout") if config.get(k)}
        groups: dict[str, dict[str, Tensor]] = {}
        extras: dict[str, Tensor] = {}
        for key, t in raw.items():
            stripped = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            module_path, _, suffix = stripped.rpartition(".")
            if suffix in self.suffixes:
                groups.setdefault(module_path, {})[suffix] = t
            else:
                extras[stripped] = t
        if not groups:
            raise LoRAError(f"the {where} holds no {self.variant} tensors.")
        copies = _plan_peft_copies(model, config, extras, set(groups), Path(where))
        modules = dict(model.named_modules())
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        plan: list[tuple[AdaptTarget, dict[str, Any]]] = []
        values: dict[str, dict[str, Tensor]] = {}
        for module_path, parts in groups.items():
            module = modules.get(module_path) if module_path else None
            if module is None:
                raise LoRAError(
                    f"the {where} adapts '{module_path}', which this model does not have; is "
                    "this the base model the adapter was trained on?"
                )
            if not isinstance(module, _LAYERS):
                raise LoRAError(
                    f"the {where} adapts '{module_path}', a {type(module).__name__}; PEFT's "
                    f"{self.peft_type} adapts nn.Linear, nn.Conv1d and nn.Conv2d."
                )
            target = module_targets(module_path, module)[0]  # type: ignore[index]
            rank_key = peft_pattern_key(rank_pattern, module_path)
            alpha_key = peft_pattern_key(alpha_pattern, module_path)
            rank = int(rank_pattern[rank_key] if rank_key is not None else config.get("r", 8))
            alpha = float(
                alpha_pattern[alpha_key] if alpha_key is not None else config.get("alpha", 8)
            )
            fields, tensors = self.read_layer(config, parts, target, module, rank, alpha)
            plan.append((target, fields))
            values[target.path] = tensors
        inject(model, plan, adapter=adapter, mode=mode)
        with torch.no_grad():
            for tensor_path, _, _, p in iter_lora(model):
                if p.adapter == adapter:
                    own = p.tensors()
                    for name, value in values[tensor_path].items():
                        own[name].copy_(value.reshape(own[name].shape))
        try:
            register_copies([c for c, _ in copies], adapter, {c.path: v for c, v in copies})
        except BaseException:
            remove_lora(model, adapter)
            raise
        if freeze:
            freeze_base(model, [], "none")
        if dropped:
            warnings.warn(
                f"the {where} sets {dropped}: PEFT's dropout of ranks / whole modules in "
                f"training, which lora_param's {self.variant} does not model (outputs in "
                "evaluation are the same; training the imported adapter further does not drop).",
                stacklevel=3,
            )

    def folder_format(self) -> FolderFormat:
        """This folder type for :func:`~.peft_codecs.register_peft_folder_format`."""
        return FolderFormat(self.peft_type, self.variant, self.export, self.load)

    def register(self) -> None:
        """Let ``export_peft`` / ``import_peft`` handle this folder type."""
        register_peft_folder_format(self.folder_format())


def _alpha_for(p: AdapterVariant, r: int) -> float:
    """The ``alpha`` that gives the entry's scale at PEFT's ``r`` (``alpha / r``)."""
    fields = p.fields()
    if r == fields["rank"] and not fields.get("use_rslora", False):
        return float(fields["alpha"])
    scale = float(fields["alpha"]) / (
        math.sqrt(fields["rank"]) if fields.get("use_rslora", False) else fields["rank"]
    )
    return scale * r


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def conv1d_tucker(t: Tensor, module: nn.Module, to_peft: bool) -> Tensor:
    """A Conv1d tucker core: PEFT stores ``(r, r, k, 1)``, LyCORIS and lora_param ``(r, r, k)``."""
    if not isinstance(module, nn.Conv1d):
        return t
    return t.unsqueeze(-1) if to_peft else t.reshape(t.shape[:3])


def tucker_capable(module: nn.Module) -> bool:
    """A convolution whose kernel is larger than 1 (where PEFT's ``use_effective_conv2d`` acts)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and any(k != 1 for k in module.kernel_size)


def effective_conv2d(layers: list[Layer], flag: Any, what: str) -> bool:
    """PEFT's one ``use_effective_conv2d`` flag for the layers: ``flag(entry, module)`` says
    whether a layer uses the tucker form (None where the flag does not act); LoRAError when
    they disagree."""
    flags = {path: f for _, path, m, p in layers if (f := flag(p, m)) is not None}
    if len(set(flags.values())) > 1:
        raise LoRAError(
            f"some convolutions use the tucker form and some do not ({flags}); PEFT's {what} has "
            "one use_effective_conv2d flag for all of them."
        )
    return any(flags.values())
