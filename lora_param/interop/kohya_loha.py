"""LyCORIS LoHa entries in kohya / A1111 ``.safetensors`` files (``hada_*`` keys).

One entry per adapted layer, ``<stem>.<suffix>`` (stems as in :mod:`.kohya`):

* ``hada_w1_a``, ``hada_w2_a``: ``(out, r)``; ``hada_w1_b``, ``hada_w2_b``: ``(r, in · prod(k))``;
* tucker form (convolutions, community files): ``hada_t1``, ``hada_t2`` ``(r, r, *k)`` with
  ``hada_w1_a``/``hada_w2_a`` ``(r, out)`` and ``hada_w1_b``/``hada_w2_b`` ``(r, in)``;
* ``alpha``: scale ``alpha / r`` (absent: ``r``); ``r`` is the rows of ``hada_w1_b``.

These are the names and shapes of :class:`~lora_param.LoHaParametrization`'s tensors, so the
codec only checks them. ``dora_scale`` (LyCORIS's ``weight_decompose`` on LoHa) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant
from ..variants.loha import LoHaParametrization
from .kohya_codecs import KohyaCodec, plain_fields, read_alpha, register_kohya_codec, shape_error

__all__ = ["KohyaLoHaCodec", "check_parts", "refuse_weight_decompose"]


def refuse_weight_decompose(stem: str, parts: Mapping[str, Tensor], family: str) -> None:
    """Raise LoRAError for a LyCORIS entry with ``dora_scale`` (weight decomposition)."""
    if "dora_scale" in parts:
        raise LoRAError(
            f"{stem!r} is a {family} entry with dora_scale (LyCORIS weight_decompose), which "
            f"lora_param's {family} does not model; load the file without it."
        )


def check_parts(
    stem: str,
    parts: Mapping[str, Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    path: str,
) -> dict[str, Tensor]:
    """The entry's tensors named in ``shapes``, checked: floating point, the expected shape."""
    out = {}
    for name, shape in shapes.items():
        t = parts[name]
        if not t.is_floating_point():
            raise LoRAError(f"{stem}.{name} must be a floating-point tensor, got {t.dtype}.")
        if tuple(t.shape) != tuple(shape):
            raise shape_error(f"{stem}.{name}", t, path, str(tuple(shape)))
        out[name] = t
    return out


def scale_alpha(fields: Mapping[str, Any]) -> float:
    """The file's ``alpha`` for an entry's fields: its scale times its rank (rsLoRA converted)."""
    alpha, rank = float(fields["alpha"]), int(fields["rank"])
    return alpha * math.sqrt(rank) if fields.get("use_rslora", False) else alpha


class KohyaLoHaCodec(KohyaCodec):
    """LyCORIS LoHa (``hada_w1_a`` ...; tucker ``hada_t1``/``hada_t2``)."""

    variant: ClassVar[str] = "loha"
    required: ClassVar[frozenset[str]] = frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    )
    optional: ClassVar[frozenset[str]] = frozenset({"alpha", "hada_t1", "hada_t2", "dora_scale"})
    network_module: ClassVar[str] = "lycoris.kohya"
    algo: ClassVar[str | None] = "loha"

    def read(
        self, stem: str, parts: Mapping[str, Tensor], target: AdaptTarget, module: nn.Module
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        refuse_weight_decompose(stem, parts, "LoHa")
        tucker = "hada_t1" in parts or "hada_t2" in parts
        if tucker and not ("hada_t1" in parts and "hada_t2" in parts):
            raise LoRAError(f"{stem!r} has only one of hada_t1 / hada_t2.")
        w1b = parts["hada_w1_b"]
        rank = int(w1b.shape[0]) if w1b.dim() == 2 else 0
        if rank <= 0:
            raise shape_error(f"{stem}.hada_w1_b", w1b, target.module_name, "(r, in)")
        if tucker and not LoHaParametrization.tucker_applies(target.spec, True):
            raise LoRAError(
                f"{stem!r} has the tucker form (hada_t1/hada_t2), but '{target.module_name}' is "
                "not a convolution with a kernel larger than 1."
            )
        fields = {
            **plain_fields(self.variant, rank, read_alpha(stem, parts.get("alpha"), rank)),
            "use_tucker": tucker,
        }
        shapes = LoHaParametrization.tensor_shapes(target.spec, fields)
        return fields, check_parts(stem, parts, shapes, target.module_name)

    def write(self, p: AdapterVariant) -> dict[str, Tensor]:
        out = {name: t.detach() for name, t in p.tensors().items()}
        out["alpha"] = torch.tensor(scale_alpha(p.fields()), dtype=torch.float32)
        return out


register_kohya_codec(KohyaLoHaCodec())
