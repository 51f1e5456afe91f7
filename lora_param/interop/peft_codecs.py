"""One codec per variant for PEFT adapter folders: what each variant adds to LoRA's layout.

PEFT's LoRA folder (:mod:`.peft_format`) holds ``lora_A`` / ``lora_B`` per adapted module.
A variant that PEFT expresses inside ``LoraConfig`` adds config flags and per-module tensors:
DoRA sets ``use_dora`` and adds ``lora_magnitude_vector``; LoRA and DoRA started from the
weight (PiSSA, OLoRA) are written as the plain LoRA of rank ``2r`` they equal.
:func:`register_peft_codec` adds a variant; a variant without a codec is refused by
:func:`lora_param.export_peft` with a ``LoRAError`` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..core.distributed import full_tensor
from ..core.errors import LoRAError
from ..core.variant import AdapterVariant
from ..variants.pissa import is_weight_init
from .peft_format import PREFIX

__all__ = [
    "FolderFormat",
    "PeftCodec",
    "codec_for_config",
    "codec_for_entry",
    "folder_format",
    "folder_types",
    "register_peft_codec",
    "register_peft_folder_format",
]


class PeftCodec:
    """Plain LoRA's codec: PEFT's LoRA layout as it is, no extra flag or tensor."""

    variant: ClassVar[str] = "lora"
    #: ``adapter_config.json`` fields this variant sets (checked on import, written on export).
    flags: ClassVar[dict[str, Any]] = {}
    #: Per-module key suffixes the variant adds (after ``<module path>.``).
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def factors(self, p: AdapterVariant) -> tuple[Tensor, Tensor, int, float]:
        """The LoRA ``(A, B, rank, alpha)`` PEFT's folder holds for the entry (gathered if
        sharded); ``A`` is ``(rank, fan_in)`` and ``B`` ``(fan_out, rank)``, our layout."""
        lora = cast(Any, p)
        return full_tensor(lora.lora_A), full_tensor(lora.lora_B), int(lora.rank), lora.alpha

    def export_extra(self, p: AdapterVariant, module_path: str, target: str) -> dict[str, Tensor]:
        """The variant's tensors beyond ``lora_A`` / ``lora_B`` for one module, keyed in full."""
        return {}

    def matches(self, config: Mapping[str, Any]) -> int:
        """How specifically a PEFT ``adapter_config.json`` describes this variant (0: not)."""
        flags = self.flags
        return len(flags) if flags and all(config.get(k) == v for k, v in flags.items()) else 0

    def add_lora_options(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """``add_lora`` keywords that build this variant's entries when importing ``config``."""
        return {"variant": self.variant}

    def import_extra(self, p: AdapterVariant, extra: Mapping[str, Tensor], where: str) -> None:
        """Load what :meth:`export_extra` wrote into a freshly added entry."""


class PeftDoRACodec(PeftCodec):
    """DoRA: ``use_dora`` and ``lora_magnitude_vector`` (``(out,)``; ``(1, out, 1, ...)`` for
    convolutions)."""

    variant: ClassVar[str] = "dora"
    flags: ClassVar[dict[str, Any]] = {"use_dora": True}
    extra_keys: ClassVar[tuple[str, ...]] = ("lora_magnitude_vector",)

    def export_extra(self, p: AdapterVariant, module_path: str, target: str) -> dict[str, Tensor]:
        if target != "module":
            raise LoRAError(
                f"'{module_path}': PEFT has no DoRA for parameters given by name "
                "(target_parameters)."
            )
        m = full_tensor(p.tensors()["lora_magnitude"])
        if p.kind == "conv":
            m = m.reshape(1, -1, *([1] * (len(p.weight_shape) - 2)))
        return {f"{PREFIX}{module_path}.lora_magnitude_vector": m}

    def import_extra(self, p: AdapterVariant, extra: Mapping[str, Tensor], where: str) -> None:
        magnitude = extra.get("lora_magnitude_vector")
        target = p.tensors()["lora_magnitude"]
        if magnitude is None or magnitude.numel() != target.numel():
            raise LoRAError(f"{where}: lora_magnitude_vector is missing or has another size.")
        target.copy_(magnitude.reshape(target.shape))


class PeftPiSSACodec(PeftCodec):
    """LoRA started from the weight (PiSSA, OLoRA) as the plain LoRA of rank ``2r`` it equals.

    Export writes PEFT's own conversion target (``save_pretrained(path_initial_model_for_weight_
    conversion=...)``): ``[A; A0]``, ``[B, -B0]``, alpha doubled, ``init_lora_weights: true``,
    which a stock PEFT loads onto the pretrained model. Import reads PEFT's *unconverted* PiSSA
    or OLoRA folders (``init_lora_weights: "pissa"`` / ``"olora"``, factors trained on PEFT's
    residual base): the start is computed again from the model's weight, as PEFT's own loading
    does, so the pretrained model gives PEFT's outputs. A converted folder is plain LoRA.
    """

    variant: ClassVar[str] = "pissa"
    dora: ClassVar[bool] = False

    def factors(self, p: AdapterVariant) -> tuple[Tensor, Tensor, int, float]:
        entry = cast(Any, p)
        a, b = full_tensor(entry.lora_A), full_tensor(entry.lora_B)
        a0, b0 = full_tensor(entry.lora_A0), full_tensor(entry.lora_B0)
        alpha = entry.alpha * (2**0.5 if entry.use_rslora else 2.0)
        return torch.cat([a, a0]), torch.cat([b, -b0], dim=1), 2 * int(entry.rank), alpha

    def matches(self, config: Mapping[str, Any]) -> int:
        init = config.get("init_lora_weights")
        return 2 if is_weight_init(init) and bool(config.get("use_dora")) == self.dora else 0

    def add_lora_options(self, config: Mapping[str, Any]) -> dict[str, Any]:
        init = config["init_lora_weights"]
        if init not in ("pissa", "olora"):
            raise LoRAError(
                f"the PEFT folder was trained from init_lora_weights={init!r}, a randomized "
                "start that cannot be computed again; convert it to plain LoRA in PEFT first "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=<the folder of "
                "the untrained adapter>))."
            )
        return {"variant": "dora" if self.dora else "lora", "init": init}


class PeftPiSSADoRACodec(PeftPiSSACodec, PeftDoRACodec):
    """DoRA started from the weight: the rank-``2r`` LoRA and the magnitude, ``use_dora``."""

    variant: ClassVar[str] = "pissa_dora"
    dora: ClassVar[bool] = True


_CODECS: dict[str, PeftCodec] = {}


def register_peft_codec(codec: PeftCodec) -> None:
    """Let ``export_peft`` / ``import_peft`` handle ``codec.variant``."""
    _CODECS[codec.variant] = codec


def codec_for_entry(p: AdapterVariant, path: str) -> PeftCodec:
    """The codec of an entry's variant; LoRAError when PEFT's LoRA format cannot hold it."""
    codec = _CODECS.get(p.variant)
    if codec is None:
        raise LoRAError(
            f"adapter {p.adapter!r} on '{path}' is a {p.variant} adapter, which PEFT's LoRA "
            "adapter folder cannot express; save it with save_lora."
        )
    return codec


def codec_for_config(config: Mapping[str, Any]) -> PeftCodec:
    """The codec that describes a PEFT ``adapter_config.json`` most specifically (plain LoRA
    when none does)."""
    best = max(_CODECS.values(), key=lambda c: c.matches(config))
    return best if best.matches(config) else _CODECS["lora"]


@dataclass(frozen=True)
class FolderFormat:
    """A PEFT folder type other than LORA (PEFT keeps LoHa, LoKr, OFT in tuners of their own).

    Attributes:
        peft_type: The ``peft_type`` of ``adapter_config.json`` (``"LOHA"``, ...).
        variant: The lora_param variant it holds.
        export: ``(model, adapter) -> (config, tensors)``: the folder's config fields and
            tensors, keys in full (``base_model.model.<path>.<name>``); LoRAError for what the
            format cannot hold.
        load: ``(model, config, tensors, adapter, freeze, mode) -> None``: checks everything
            against the model, then adds the adapter (all or nothing).
    """

    peft_type: str
    variant: str
    export: Callable[[nn.Module, str], tuple[dict[str, Any], dict[str, Tensor]]]
    load: Callable[..., None]


_FOLDERS: dict[str, FolderFormat] = {}


def register_peft_folder_format(fmt: FolderFormat) -> None:
    """Let ``export_peft`` write, and ``import_peft`` read, folders of ``fmt.peft_type``."""
    _FOLDERS[fmt.peft_type] = fmt


def folder_types() -> list[str]:
    """The ``peft_type`` values of the registered folder formats (besides LORA)."""
    return [t for t, fmt in _FOLDERS.items() if fmt.variant]


def folder_format(
    *, peft_type: str | None = None, variant: str | None = None
) -> FolderFormat | None:
    """The registered folder format for a ``peft_type`` or a variant, if any."""
    for fmt in _FOLDERS.values():
        if fmt.peft_type == peft_type or fmt.variant == variant:
            return fmt
    return None


register_peft_codec(PeftCodec())
register_peft_codec(PeftDoRACodec())
register_peft_codec(PeftPiSSACodec())
register_peft_codec(PeftPiSSADoRACodec())
