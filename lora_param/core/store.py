"""The base-store protocol: how the frozen weight under the adapters is stored.

A plain weight needs no store: it is the ``original`` of its parametrization list. A packed
one (NF4, int8, a bitsandbytes layer's weight) is held by a :class:`BaseStore`, always the
first entry of the weight's list, registered by :mod:`lora_param.quant`. The rest of the
library talks to stores only through this protocol:

* the weight in the compute dtype (:meth:`BaseStore.forward`) and widened to at least float32
  (:meth:`BaseStore.weight_fp32`);
* the layer's output without adapters (:meth:`BaseStore.base_output`): the lean QLoRA
  forward, which dequantizes again in backward rather than keeping the weight;
* how it takes a merge (:meth:`BaseStore.merge_step`): a plain weight in the compute dtype,
  or requantized in place (lossy, with the error it adds);
* how a plain checkpoint weight is stored in it (:meth:`BaseStore.pack`);
* how many weights it stands for (:meth:`BaseStore.numel`) and whether an evaluation cache
  may hold a full-precision copy of it (never, for packed stores: :attr:`cacheable`).

Its state_dict form is its parametrization list's ``original0``, ``original1``, ... (no 0-d
tensors, so FSDP2 can shard them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import LoRAError

__all__ = ["BaseStore", "MergeStep"]

#: ``(apply, error)``: ``apply()`` installs the merged weight once the adapters are dropped;
#: ``error`` is the relative error requantization added (None when not requantizing).
MergeStep = tuple[Callable[[], None], "float | None"]


class BaseStore(nn.Module):
    """First entry of a weight's parametrization list: a packed frozen base weight.

    Subclasses set :attr:`kind` and :attr:`shape` and implement :meth:`forward`,
    :meth:`base_output` and :meth:`merge_step`.
    """

    #: The store exists only to carry adapters (a bitsandbytes layer's weight): removing the
    #: last adapter removes it too, giving the layer its own parameter back.
    removed_with_adapters: ClassVar[bool] = False
    #: An evaluation cache may keep a full-precision copy of the adapted weight.
    cacheable: ClassVar[bool] = False

    kind: str
    shape: tuple[int, ...]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype :meth:`forward` returns."""
        raise NotImplementedError

    def forward(self, *stored: Any) -> Tensor:
        """The weight, dequantized to the compute dtype (a new tensor, the caller's own)."""
        raise NotImplementedError

    def weight_fp32(self, *stored: Any) -> Tensor:
        """The weight as the model sees it, widened to at least float32 (a new tensor)."""
        weight = self.forward(*stored)
        return weight.to(torch.promote_types(weight.dtype, torch.float32))

    def base_output(self, layer: Any, x: Tensor, stored: tuple[Any, ...], bias: bool) -> Tensor:
        """The layer's output without adapters (without its bias when ``bias`` is False)."""
        raise NotImplementedError

    def merge_step(
        self, layer: nn.Module, stored: tuple[Any, ...], merged: Tensor, requantize: bool
    ) -> MergeStep:
        """Plan storing ``merged`` (float32 or wider) as this layer's weight.

        Everything is computed here; the returned function only installs it, after the merged
        adapters were dropped from the weight (the layer's remaining adapters stay on top).
        """
        raise NotImplementedError

    def pack(self, value: Tensor) -> tuple[Tensor, ...]:
        """The stored tensors for a plain weight ``value`` (``load_base_state_dict``)."""
        raise LoRAError(
            f"load_base_state_dict cannot store a checkpoint weight in {type(self).__name__} "
            "storage: the library that packs it (bitsandbytes) does so when it loads the "
            "checkpoint. Load the base checkpoint into the model before add_lora."
        )

    def numel(self) -> int:
        """How many weights the store stands for."""
        n = 1
        for s in self.shape:
            n *= s
        return n
