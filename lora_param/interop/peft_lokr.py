"""PEFT's LoKr folders (``peft_type: "LOKR"``, ``peft.LoKrConfig``) both ways.

Per layer the tensors of :class:`~lora_param.LoKrParametrization` under the same names
(``lokr_w1`` or ``lokr_w1_a``/``_b``; ``lokr_w2`` or ``lokr_w2_a``/``_b``, or those and
``lokr_t2``, which PEFT keeps ``(r, r, k, 1)`` on ``nn.Conv1d``). PEFT lays a layer out from
the config: the split from ``decompose_factor`` (its ``factorization`` does not order a
divisor pair, LyCORIS's does), ``w1`` factored iff ``decompose_both`` and ``r < max(a, c)/2``,
``w2`` factored iff ``r < max(b, d)/2``, the tucker form from ``use_effective_conv2d``. On
import the layout is read from the tensors; on export a ``decompose_factor``,
``decompose_both`` and per-layer ``r`` that make PEFT lay every layer out as it is are
searched for (an adapter with both factors full gets an ``r`` large enough, and the ``alpha``
that keeps its scale), else the export is refused. The scale is ``alpha / r`` in both.

PEFT 0.21's LoKr on ``nn.Conv1d`` works only with a factored, non-tucker ``w2``: with a full
``w2`` it arranges the Kronecker product wrongly (``torch.kron`` of a 2-D and a 3-D tensor),
with the tucker form its forward raises. Such layers are refused both ways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

from torch import Tensor, nn

from ..core.errors import LoRAError
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant
from ..variants.lokr import KronLayout, LoKrParametrization
from .kohya_codecs import plain_fields
from .kohya_loha import check_parts
from .kohya_lokr import KohyaLoKrCodec, read_layout
from .peft_lycoris import Layer, LycorisFolder, conv1d_tucker, effective_conv2d

__all__ = ["PeftLoKrFolder", "peft_factorization"]


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``factorization``: LyCORIS's, but a divisor ``factor`` comes first as it is."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _layout(p: AdapterVariant) -> KronLayout:
    return cast(LoKrParametrization, p).layout


def _inputs(module: nn.Module, p: AdapterVariant) -> int:
    return int(p.weight_shape[1]) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else p.fan_in


def _refuse_conv1d_full_w2(module: nn.Module, layout: KronLayout, where: str) -> None:
    if isinstance(module, nn.Conv1d) and (layout.tucker or not layout.w2_factored):
        form = "tucker" if layout.tucker else "full"
        raise LoRAError(
            f"{where} is an nn.Conv1d with a {form} LoKr w2, which PEFT 0.21 cannot compute: "
            "with a full w2 it arranges the Kronecker product wrongly (torch.kron of a 2-D and a "
            "3-D tensor), with the tucker form its forward fails. Give the layer a factored w2 "
            "without the tucker form (rank below max(b, d)/2, use_tucker=False), or leave it out."
        )


class PeftLoKrFolder(LycorisFolder):
    """PEFT's ``LOKR`` folder type."""

    peft_type: ClassVar[str] = "LOKR"
    variant: ClassVar[str] = "lokr"
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    )
    extra_fields: ClassVar[dict[str, tuple[Any, str]]] = {
        "decompose_both": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
        "decompose_factor": (
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v != 0,
            "a positive integer or -1",
        ),
    }

    def config_fields(self, layers: list[Layer]) -> dict[str, Any]:
        """``decompose_both``, ``decompose_factor``, ``use_effective_conv2d``."""
        splits = []
        for tensor_path, _, module, p in layers:
            lay = _layout(p)
            _refuse_conv1d_full_w2(module, lay, f"'{tensor_path}'")
            splits.append((p.fan_out, _inputs(module, p), lay.out_split, lay.in_split))
        candidates = [-1, *sorted({d for *_, o, i in splits for d in (*o, *i)})]
        factor = next(
            (
                f
                for f in candidates
                if all(
                    peft_factorization(out, f) == o and peft_factorization(inp, f) == i
                    for out, inp, o, i in splits
                )
            ),
            None,
        )
        if factor is None:
            raise LoRAError(
                "the LoKr layers' splits "
                f"{ {tp: (_layout(p).out_split, _layout(p).in_split) for tp, _, _, p in layers} } "
                "come from no single PEFT decompose_factor; PEFT's LoKrConfig has one for all "
                "layers. Export the layers made with one factor, or save with save_lora."
            )
        decompose_both = any(_layout(p).w1_factored for *_, p in layers)
        config = {
            "decompose_both": decompose_both,
            "decompose_factor": factor,
            "rank_dropout_scale": False,
            "use_effective_conv2d": effective_conv2d(
                layers,
                lambda p, m: (
                    _layout(p).tucker
                    if _layout(p).w2_factored and any(k != 1 for k in _layout(p).kernel)
                    else None
                ),
                "LoKrConfig",
            ),
        }
        for tensor_path, _, _, p in layers:
            self._check_peft_layout(p, self.peft_rank(p, config), config, f"'{tensor_path}'")
        return config

    @staticmethod
    def _check_peft_layout(
        p: AdapterVariant, r: int, config: Mapping[str, Any], where: str
    ) -> None:
        lay = _layout(p)
        (a, b), (c, d) = lay.out_split, lay.in_split
        w1_factored = bool(config["decompose_both"]) and r < max(a, c) / 2
        w2_factored = r < max(b, d) / 2
        if (w1_factored, w2_factored) != (lay.w1_factored, lay.w2_factored):
            raise LoRAError(
                f"{where}: PEFT's LoKr would lay the layer out with w1 "
                f"{'factored' if w1_factored else 'full'} and w2 "
                f"{'factored' if w2_factored else 'full'} (r={r}, decompose_both="
                f"{config['decompose_both']}), but the adapter has w1 "
                f"{'factored' if lay.w1_factored else 'full'} and w2 "
                f"{'factored' if lay.w2_factored else 'full'}; PEFT's LoKrConfig cannot express "
                "it. Save it with save_lora."
            )

    def peft_rank(self, p: AdapterVariant, config: Mapping[str, Any]) -> int:
        """The entry's rank; for both factors full, one at which PEFT keeps both full."""
        lay = _layout(p)
        rank = int(p.fields()["rank"])
        if lay.w1_factored or lay.w2_factored:
            return rank
        (a, b), (c, d) = lay.out_split, lay.in_split
        floor = max(b, d) / 2
        if config["decompose_both"]:
            floor = max(floor, max(a, c) / 2)
        return rank if rank >= floor else max(a, c, b, d)

    def layer_tensors(self, p: AdapterVariant, module: nn.Module, where: str) -> dict[str, Tensor]:
        return {
            name: conv1d_tucker(t, module, to_peft=True) if name == "lokr_t2" else t
            for name, t in p.tensors().items()
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
        where = f"the PEFT LOKR folder's '{target.module_name}'"
        tensors = {
            n: conv1d_tucker(t, module, to_peft=False) if n == "lokr_t2" else t
            for n, t in parts.items()
        }
        if not KohyaLoKrCodec().claims(tensors):
            raise LoRAError(f"{where} has the tensors {sorted(parts)}, which form no LoKr layer.")
        layout, tensor_rank = read_layout(where, tensors, target)
        _refuse_conv1d_full_w2(module, layout, where)
        if tensor_rank is not None and tensor_rank != rank:
            raise LoRAError(
                f"{where} has rank {tensor_rank} in its tensors but r={rank} in the config."
            )
        fields = {
            **plain_fields(self.variant, rank, alpha),
            "factor": int(config.get("decompose_factor", -1)),
            "decompose_both": bool(config.get("decompose_both", False)),
            **layout.fields(),
        }
        return fields, check_parts(where, tensors, layout.shapes(rank), target.module_name)


PeftLoKrFolder().register()
