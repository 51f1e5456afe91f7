"""PEFT's LoHa folders (``peft_type: "LOHA"``, ``peft.LoHaConfig``) both ways.

Per layer ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b`` (and, with
``use_effective_conv2d`` on a convolution whose kernel is larger than 1, ``hada_t1`` /
``hada_t2``): the shapes of :class:`~lora_param.LoHaParametrization`, but for ``nn.Conv1d``'s
tucker cores, which PEFT keeps ``(r, r, k, 1)``. The scale is ``alpha / r`` in both libraries
(an rsLoRA adapter is written with the equivalent ``alpha``). Shared rules:
:mod:`.peft_lycoris`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant
from ..variants.loha import LoHaParametrization
from .kohya_codecs import plain_fields
from .kohya_loha import check_parts
from .peft_lycoris import Layer, LycorisFolder, conv1d_tucker, effective_conv2d, tucker_capable

__all__ = ["PeftLoHaFolder"]


class PeftLoHaFolder(LycorisFolder):
    """PEFT's ``LOHA`` folder type."""

    peft_type: ClassVar[str] = "LOHA"
    variant: ClassVar[str] = "loha"
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
    )

    def config_fields(self, layers: list[Layer]) -> dict[str, Any]:
        """``use_effective_conv2d``."""
        flag = effective_conv2d(
            layers,
            lambda p, m: bool(p.fields()["use_tucker"]) if tucker_capable(m) else None,
            "LoHaConfig",
        )
        return {"use_effective_conv2d": flag}

    def layer_tensors(self, p: AdapterVariant, module: nn.Module, where: str) -> dict[str, Tensor]:
        own = p.tensors()
        return {
            name: conv1d_tucker(t, module, to_peft=True) if name.startswith("hada_t") else t
            for name, t in own.items()
        }

    def read_layer(
        self,
        config: Mapping[str, Any],
        parts: Mapping[str, Tensor],
        target: AdaptTarget,
        module: nn.Module,
        rank: int,
        alpha: float,
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        where = f"the PEFT LOHA folder's '{target.module_name}'"
        tucker = bool(config.get("use_effective_conv2d", False)) and tucker_capable(module)
        fields = {**plain_fields(self.variant, rank, alpha), "use_tucker": tucker}
        shapes = LoHaParametrization.tensor_shapes(target.spec, fields)
        if set(parts) != set(shapes):
            raise LoRAError(
                f"{where} has the tensors {sorted(parts)}; a LoHa layer of rank {rank} there has "
                f"{sorted(shapes)} (use_effective_conv2d={tucker})."
            )
        tensors = {
            n: conv1d_tucker(t, module, to_peft=False) if n.startswith("hada_t") else t
            for n, t in parts.items()
        }
        return fields, check_parts(where, tensors, shapes, target.module_name)


PeftLoHaFolder().register()
