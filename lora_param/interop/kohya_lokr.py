"""LyCORIS LoKr entries in kohya / A1111 ``.safetensors`` files (``lokr_*`` keys).

One entry per adapted layer, ``<stem>.<suffix>`` (stems as in :mod:`.kohya`): the small
factor ``lokr_w1`` ``(a, c)`` or ``lokr_w1_a`` ``(a, r)`` and ``lokr_w1_b`` ``(r, c)``; the
large one ``lokr_w2`` ``(b, d[, *kernel])``, or ``lokr_w2_a`` ``(b, r)`` and ``lokr_w2_b``
``(r, d · prod(kernel))``, or the tucker form ``lokr_t2`` ``(r, r, *kernel)``, ``lokr_w2_a``
``(r, b)``, ``lokr_w2_b`` ``(r, d)``; ``alpha``. The split ``out = a · b``, ``in = c · d`` is read
from the tensors, so files made with any ``factor`` load.

The scale, as LyCORIS, A1111 and ComfyUI read these files: ``alpha / r`` with ``r`` the rows of
the factored ``*_b`` tensor (absent ``alpha``: 1), and **1 when both factors are full** (no
rank; ``alpha`` is ignored). lora_param's LoKr always scales by ``alpha / rank`` (PEFT's rule),
so a file with both factors full loads with ``rank = alpha = 1``, and such an adapter whose
scale is not 1 is written with the scale folded into ``lokr_w1``. ``dora_scale`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant
from ..variants.lokr import KronLayout, LoKrParametrization
from .kohya_codecs import KohyaCodec, plain_fields, read_alpha, register_kohya_codec
from .kohya_loha import check_parts, refuse_weight_decompose, scale_alpha

__all__ = ["KohyaLoKrCodec", "read_layout"]

_KEYS = frozenset(
    {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
)


def read_layout(
    stem: str, parts: Mapping[str, Tensor], target: AdaptTarget
) -> tuple[KronLayout, int | None]:
    """The layout and rank (None: both factors full) of a LoKr entry, from its tensors.

    Raises:
        LoRAError: The tensors do not form a LoKr update of the layer's shape.
    """
    spec, where = target.spec, target.module_name
    inputs = int(spec.shape[1]) if spec.kind == "conv" else spec.fan_in
    kernel = tuple(int(k) for k in spec.shape[2:]) if spec.kind == "conv" else ()

    def bad(why: str) -> LoRAError:
        return LoRAError(
            f"{stem!r} is not a LoKr update of '{where}' ({spec.fan_out} outputs, {inputs} "
            f"inputs{f', kernel {kernel}' if kernel else ''}): {why}; the file was made for "
            "another model."
        )

    for name in _KEYS & set(parts):
        if parts[name].dim() < 2:
            raise bad(f"{name} has shape {tuple(parts[name].shape)}")
    w1_factored = "lokr_w1" not in parts
    if w1_factored:
        a, c = parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1]
    else:
        a, c = parts["lokr_w1"].shape[:2]
    if spec.fan_out % a or inputs % c:
        raise bad(f"its small factor is {a}x{c}")
    b, d = spec.fan_out // a, inputs // c
    tucker = "lokr_t2" in parts
    w2_factored = "lokr_w2" not in parts
    if tucker and not (w2_factored and any(s != 1 for s in kernel)):
        raise bad("lokr_t2 (the tucker form) needs a factored w2 on a kernel larger than 1")
    ranks = set()
    if w1_factored:
        ranks.add(int(parts["lokr_w1_b"].shape[0]))
    if w2_factored:
        ranks.add(int(parts["lokr_w2_b"].shape[0]))
    if len(ranks) > 1:
        raise bad(f"its factored tensors have different ranks {sorted(ranks)}")
    layout = KronLayout(
        (int(a), int(b)), (int(c), int(d)), kernel, w1_factored, w2_factored, tucker
    )
    return layout, (ranks.pop() if ranks else None)


class KohyaLoKrCodec(KohyaCodec):
    """LyCORIS LoKr (``lokr_w1`` / ``lokr_w1_a``/``_b``, ``lokr_w2`` / ``lokr_w2_a``/``_b``,
    ``lokr_t2``)."""

    variant: ClassVar[str] = "lokr"
    required: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = _KEYS | {"alpha", "dora_scale"}
    network_module: ClassVar[str] = "lycoris.kohya"
    algo: ClassVar[str | None] = "lokr"

    def claims(self, parts: Mapping[str, Tensor]) -> bool:
        """A full or factored ``w1`` and ``w2`` (one form each), and nothing else."""
        keys = set(parts)
        if not keys <= self.optional:
            return False
        w1 = ("lokr_w1" in keys) != ({"lokr_w1_a", "lokr_w1_b"} <= keys)
        w2 = ("lokr_w2" in keys) != ({"lokr_w2_a", "lokr_w2_b"} <= keys)
        half = bool({"lokr_w1_a", "lokr_w1_b"} & keys) and "lokr_w1" in keys
        half2 = bool({"lokr_w2_a", "lokr_w2_b", "lokr_t2"} & keys) and "lokr_w2" in keys
        return w1 and w2 and not half and not half2

    def read(
        self, stem: str, parts: Mapping[str, Tensor], target: AdaptTarget, module: nn.Module
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        refuse_weight_decompose(stem, parts, "LoKr")
        layout, rank = read_layout(stem, parts, target)
        if rank is None:  # both factors full: LyCORIS's scale is 1, whatever alpha says
            rank, alpha = 1, 1.0
        else:
            alpha = read_alpha(stem, parts.get("alpha"), rank)
        fields = {**plain_fields(self.variant, rank, alpha), **layout.fields()}
        shapes = layout.shapes(rank)
        tensors = dict(parts)
        unflat = (rank, layout.in_split[1], *layout.kernel)  # LyCORIS's functional layout
        if layout.w2_factored and not layout.tucker and tuple(parts["lokr_w2_b"].shape) == unflat:
            tensors["lokr_w2_b"] = parts["lokr_w2_b"].reshape(shapes["lokr_w2_b"])
        return fields, check_parts(stem, tensors, shapes, target.module_name)

    def write(self, p: AdapterVariant) -> dict[str, Tensor]:
        fields = p.fields()
        out = {name: t.detach() for name, t in p.tensors().items()}
        if fields["w1_factored"] or fields["w2_factored"]:
            out["alpha"] = torch.tensor(scale_alpha(fields), dtype=torch.float32)
            return out
        # Both full: LyCORIS reads scale 1 and ignores alpha, so the scale goes into w1.
        scale = cast(LoKrParametrization, p).base_scale()
        if scale != 1.0:
            out["lokr_w1"] = out["lokr_w1"] * scale
        out["alpha"] = torch.tensor(float(fields["rank"]), dtype=torch.float32)
        return out


register_kohya_codec(KohyaLoKrCodec())
