"""The kohya / LyCORIS codec of output-side OFT (LyCORIS diag-OFT, kohya's ``networks/oft.py``).

An entry holds, for one Linear or Conv layer of ``fan_out`` outputs:

* ``oft_blocks``: ``(blocks, b, b)``, ``blocks * b = fan_out``; ``Q = B - Bᵀ`` per block;
* ``alpha``: the norm limit (``‖Q‖_F <= alpha * fan_out``; LyCORIS: 0 means none);
* ``rescale`` (LyCORIS, optional): the per-output scale, ``(fan_out, 1, ...)``.

LyCORIS writes them under the ``lora_unet`` / ``lora_te`` prefixes, kohya's OFT trainer under
``oft_unet``. Both compute ``W' = diag(rescale) · Rᵀ W`` with ``R = (I + Q)(I - Q)⁻¹``: lora_param's
``OFTConfig(side="output")``. Input-side OFT (PEFT's, ``W' = W Rᵀ``) is another operator and is
refused; so are LyCORIS BOFT entries (4-D ``oft_blocks``, a butterfly product of rotations).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant, variant_class
from .kohya_codecs import KohyaCodec, register_kohya_codec, shape_error

__all__ = ["KohyaOFTCodec"]


class KohyaOFTCodec(KohyaCodec):
    """Output-side OFT: ``oft_blocks``, ``alpha`` (the norm limit) and optional ``rescale``."""

    variant: ClassVar[str] = "oft"
    required: ClassVar[frozenset[str]] = frozenset({"oft_blocks"})
    optional: ClassVar[frozenset[str]] = frozenset({"alpha", "rescale"})

    def read(
        self, stem: str, parts: Mapping[str, Tensor], target: AdaptTarget, module: nn.Module
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """The entry as an output-side OFT adapter's fields and tensors (checked)."""
        blocks = parts["oft_blocks"]
        path = target.module_name
        if blocks.dim() == 4:
            raise LoRAError(
                f"{stem}.oft_blocks is 4-D {tuple(blocks.shape)}: a LyCORIS BOFT (butterfly "
                "OFT) entry, a product of several butterfly-permuted block rotations. lora_param "
                "implements OFT's single block-diagonal rotation, not BOFT; this file cannot be "
                "loaded."
            )
        if (
            not blocks.is_floating_point()
            or blocks.dim() != 3
            or blocks.shape[1] != blocks.shape[2]
        ):
            raise shape_error(f"{stem}.oft_blocks", blocks, path, "(blocks, b, b)")
        n, b = int(blocks.shape[0]), int(blocks.shape[1])
        if n * b != target.fan_out:
            raise shape_error(
                f"{stem}.oft_blocks",
                blocks,
                path,
                f"(blocks, b, b) with blocks * b = {target.fan_out}",
            )
        alpha = parts.get("alpha")
        constraint = 0.0
        if alpha is not None:
            if alpha.numel() != 1:
                raise LoRAError(f"{stem}.alpha must be a scalar, got shape {tuple(alpha.shape)}.")
            constraint = float(alpha.float().item())
            if not math.isfinite(constraint) or constraint < 0:
                raise LoRAError(
                    f"{stem}.alpha (OFT's norm limit) is {constraint}; it must be >= 0."
                )
        fields: dict[str, Any] = {
            "variant": self.variant,
            "side": "output",
            "rank": b,
            "constraint": constraint,
            "rescale": "rescale" in parts,
            "dropout": 0.0,
        }
        variant_class(self.variant, target.kind, target.path).check_fields(
            target.spec, fields, target.path
        )
        tensors = {"oft_blocks": blocks}
        if "rescale" in parts:
            scale = parts["rescale"]
            if scale.numel() != target.fan_out or scale.shape[0] != target.fan_out:
                raise shape_error(f"{stem}.rescale", scale, path, f"({target.fan_out}, 1, ...)")
            tensors["rescale"] = scale.reshape(-1)
        return fields, tensors

    def write(self, p: AdapterVariant) -> dict[str, Tensor]:
        """``oft_blocks``, ``alpha`` and, when trained, ``rescale`` ``(fan_out, 1, ...)``."""
        fields = p.fields()
        if fields["side"] != "output":
            raise LoRAError(
                f"adapter {p.adapter!r} is an input-side OFT adapter (PEFT's: W' = W Rᵀ); "
                "kohya and LyCORIS files hold output-side OFT (W' = R W), another operator. "
                "Write it with export_peft or save_lora, or train OFTConfig(side='output')."
            )
        tensors = p.tensors()
        out = {
            "oft_blocks": tensors["oft_blocks"].detach(),
            "alpha": torch.tensor(float(fields["constraint"]), dtype=torch.float32),
        }
        if "rescale" in tensors:
            ones = [1] * (len(p.weight_shape) - 1)
            out["rescale"] = tensors["rescale"].detach().reshape(-1, *ones)
        return out


register_kohya_codec(KohyaOFTCodec())
