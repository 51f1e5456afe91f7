"""One codec per variant for kohya / LyCORIS ``.safetensors`` entries.

An entry is the tensors a file holds for one module, keyed ``<stem>.<suffix>``. Each codec
knows the suffixes of one family and turns an entry into an adapter entry's fields and tensors
(:meth:`KohyaCodec.read`) and back (:meth:`KohyaCodec.write`):

* LoRA / LoCon (kohya): ``lora_down.weight`` (``A``; a conv keeps its kernel), ``lora_up.weight``
  (``B``; ``(out, r)`` or a 1x1 conv), ``alpha`` (scale ``alpha / r``; absent: ``r``);
* DoRA (LyCORIS ``weight_decompose``): LoRA's keys and ``dora_scale``, the magnitude
  ``(out, 1, ...)``;
* LoRA and DoRA started from the weight (PiSSA, OLoRA): written as the plain LoRA (DoRA) of
  rank ``2r`` they equal, read back as such.

:func:`register_kohya_codec` adds a family (LyCORIS LoHa, LoKr, OFT, ...). On a sharded (FSDP2)
model :meth:`KohyaCodec.write` runs on every rank and returns whole tensors: read the entry's
tensors through :func:`lora_param.core.distributed.full_tensor` (a collective per sharded tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..core.distributed import full_tensor
from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant

__all__ = [
    "KohyaCodec",
    "codec_for_parts",
    "codec_for_variant",
    "known_families",
    "register_kohya_codec",
]


def shape_error(key: str, tensor: Tensor, path: str, want: str) -> LoRAError:
    """The error for a tensor that does not fit the model's layer."""
    return LoRAError(
        f"{key!r} has shape {tuple(tensor.shape)}, but '{path}' needs {want}; the file was "
        "made for another model."
    )


def read_alpha(stem: str, alpha: Tensor | None, rank: int) -> float:
    """An entry's ``alpha`` as a positive number (kohya's rule: absent means ``rank``)."""
    if alpha is None:
        return float(rank)
    if alpha.numel() != 1:
        raise LoRAError(f"{stem}.alpha must be a scalar, got shape {tuple(alpha.shape)}.")
    value = float(alpha.float().item())
    if not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{stem}.alpha is {value}; it must be a positive number.")
    return value


def plain_fields(variant: str, rank: int, alpha: float) -> dict[str, Any]:
    """Entry fields of a LoRA-family adapter read from a file (no dropout, kaiming init)."""
    return {
        "variant": variant,
        "rank": rank,
        "alpha": alpha,
        "dropout": 0.0,
        "init": "kaiming",
        "use_rslora": False,
    }


class KohyaCodec:
    """kohya's LoRA (LoCon for convolutions)."""

    variant: ClassVar[str] = "lora"
    #: Suffixes the entry must hold, and those it may hold.
    required: ClassVar[frozenset[str]] = frozenset({"lora_down.weight", "lora_up.weight"})
    optional: ClassVar[frozenset[str]] = frozenset({"alpha"})
    #: The file's ``ss_network_module`` metadata (the trainer that reads it back), and the
    #: LyCORIS ``algo`` written to ``ss_network_args`` (None: plain kohya LoRA).
    network_module: ClassVar[str] = "networks.lora"
    algo: ClassVar[str | None] = None
    #: Files are read into this variant (False: it writes another family's entries).
    reads: ClassVar[bool] = True

    def claims(self, parts: Mapping[str, Tensor]) -> bool:
        """Whether an entry's suffixes are exactly this family's."""
        keys = set(parts)
        return self.reads and self.required <= keys and keys <= self.required | self.optional

    def read(
        self, stem: str, parts: Mapping[str, Tensor], target: AdaptTarget, module: nn.Module
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The entry's fields and tensors (by the variant's tensor names), checked."""
        lora_a, lora_b = _check_pair(stem, target, module, parts)
        rank = lora_a.shape[0]
        fields = plain_fields(self.variant, rank, read_alpha(stem, parts.get("alpha"), rank))
        return fields, {"lora_A": lora_a, "lora_B": lora_b}

    def factors(self, p: AdapterVariant) -> tuple[Tensor, Tensor, int, float]:
        """The LoRA ``(A, B, rank, alpha)`` written for the entry (our layout; whole tensors:
        shards are all-gathered)."""
        tensors = p.tensors()
        fields = p.fields()
        a, b = full_tensor(tensors["lora_A"]), full_tensor(tensors["lora_B"])
        return a, b, int(fields["rank"]), float(fields["alpha"])

    def write(self, p: AdapterVariant) -> dict[str, Tensor]:
        """The entry for an adapter entry, by suffix."""
        fields = p.fields()
        a, b, rank, alpha = self.factors(p)
        shape = tuple(p.weight_shape)
        if p.kind == "conv":
            a = a.reshape(rank, *shape[1:])
            b = b.reshape(p.fan_out, rank, *([1] * (len(shape) - 2)))
        if fields.get("use_rslora", False):
            alpha *= math.sqrt(rank)  # kohya's scale is alpha / r: the same update
        return {
            "lora_down.weight": a,
            "lora_up.weight": b,
            "alpha": torch.tensor(alpha, dtype=torch.float32),
        }


class KohyaDoRACodec(KohyaCodec):
    """LyCORIS DoRA: LoRA's keys and ``dora_scale`` (the per-output magnitude)."""

    variant: ClassVar[str] = "dora"
    required: ClassVar[frozenset[str]] = KohyaCodec.required | {"dora_scale"}

    def read(
        self, stem: str, parts: Mapping[str, Tensor], target: AdaptTarget, module: nn.Module
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        fields, tensors = super().read(stem, parts, target, module)
        d = parts["dora_scale"]
        if d.dim() == 0 or d.shape[0] != target.fan_out or d.numel() != target.fan_out:
            raise LoRAError(
                f"{stem}.dora_scale has shape {tuple(d.shape)}; only the per-output magnitude "
                f"({target.fan_out}, 1, ...) (LyCORIS wd_on_out=True) is supported."
            )
        return fields, {**tensors, "lora_magnitude": d.reshape(-1)}

    def write(self, p: AdapterVariant) -> dict[str, Tensor]:
        m = full_tensor(p.tensors()["lora_magnitude"])
        ones = [1] * (len(p.weight_shape) - 1)
        return {**super().write(p), "dora_scale": m.reshape(-1, *ones)}


class KohyaPiSSACodec(KohyaCodec):
    """LoRA started from the weight (PiSSA, OLoRA), written as the plain LoRA of rank ``2r``
    it equals (``[A; A0]``, ``[B, -B0]``); files read back as plain LoRA."""

    variant: ClassVar[str] = "pissa"
    reads: ClassVar[bool] = False

    def factors(self, p: AdapterVariant) -> tuple[Tensor, Tensor, int, float]:
        a, b, rank, alpha = cast(Any, p).equivalent_lora()
        return a, b, int(rank), float(alpha)


class KohyaPiSSADoRACodec(KohyaPiSSACodec, KohyaDoRACodec):
    """DoRA started from the weight: the rank-``2r`` LoRA and ``dora_scale``."""

    variant: ClassVar[str] = "pissa_dora"


def _check_pair(
    stem: str, target: AdaptTarget, module: nn.Module, parts: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Check down/up against the layer and return ``(A, B)`` as (r, fan_in) and (fan_out, r)."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    path = target.module_name
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoRAError(f"{stem!r}: lora_down/lora_up must be floating-point tensors.")
    rank = down.shape[0] if down.dim() else 0
    t = target
    is_conv = t.kind == "conv"
    kernel = tuple(t.shape[2:]) if is_conv else ()
    pointwise = all(k == 1 for k in kernel)
    groups = cast(Any, module).groups if is_conv else 1
    if groups != 1:
        raise LoRAError(
            f"'{path}' is a grouped convolution (groups={groups}); kohya LoRA does not "
            "describe those."
        )
    # A Linear takes (r, in) or 1x1-conv (r, in, 1, 1) keys; a 1x1 conv takes either too.
    as_matrix = (
        down.dim() >= 2
        and down.shape[1] == t.fan_in
        and all(s == 1 for s in down.shape[2:])
        and pointwise
    )
    as_kernel = is_conv and tuple(down.shape[1:]) == tuple(t.shape[1:])
    if not (rank > 0 and (as_matrix or as_kernel)):
        want = f"({rank}, {t.fan_in // max(1, math.prod(kernel))}, {', '.join(map(str, kernel))})"
        raise shape_error(f"{stem}.lora_down.weight", down, path, want if is_conv else "(r, in)")
    up_ok = (
        up.dim() >= 2
        and tuple(up.shape[:2]) == (t.fan_out, rank)
        and all(s == 1 for s in up.shape[2:])
    )
    if not up_ok:
        raise shape_error(f"{stem}.lora_up.weight", up, path, f"({t.fan_out}, {rank}[, 1, 1])")
    return down.reshape(rank, t.fan_in), up.reshape(t.fan_out, rank)


_CODECS: dict[str, KohyaCodec] = {}


def register_kohya_codec(codec: KohyaCodec) -> None:
    """Let ``import_kohya`` / ``export_kohya`` handle ``codec.variant``'s entries."""
    _CODECS[codec.variant] = codec


def codec_for_parts(parts: Mapping[str, Tensor]) -> KohyaCodec | None:
    """The codec whose family an entry's suffixes are (None: another method, or incomplete)."""
    return next((c for c in _CODECS.values() if c.claims(parts)), None)


def codec_for_variant(p: AdapterVariant, path: str) -> KohyaCodec:
    """The codec writing an entry's variant; LoRAError when kohya/LyCORIS files have none."""
    codec = _CODECS.get(p.variant)
    if codec is None:
        raise LoRAError(
            f"'{path}' holds a {p.variant} adapter, which kohya/LyCORIS files do not describe "
            f"(they hold {sorted(_CODECS)}); save it with save_lora."
        )
    return codec


def known_families() -> str:
    """The suffixes every registered codec reads, for messages."""
    return "; ".join(
        f"{c.variant}: {'/'.join(sorted(c.required | c.optional))}"
        for c in _CODECS.values()
        if c.reads
    )


register_kohya_codec(KohyaCodec())
register_kohya_codec(KohyaDoRACodec())
register_kohya_codec(KohyaPiSSACodec())
register_kohya_codec(KohyaPiSSADoRACodec())
