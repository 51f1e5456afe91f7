"""LoRA on layers bitsandbytes already quantized (``bnb.nn.Linear4bit``, ``Linear8bitLt``).

Transformers loads ``BitsAndBytesConfig(load_in_4bit=True)`` models with these layers; their
weight is a ``Params4bit`` / ``Int8Params`` whose forward only bitsandbytes can run. Here a
:class:`BnbWeight` entry goes first on the weight's parametrization list (it keeps the
bitsandbytes parameter object as ``original``, untouched) and LoRA goes on top, as on any
layer: the factored forward runs bitsandbytes' own quantized matmul, then adds the LoRA
branches. ``layer.weight`` reads the dequantized weight. Removing the last adapter gives the
bitsandbytes parameter back as the layer's weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..core.entries import drop_entries, entry_list, register_entry, restore_order
from ..core.errors import LoRAError
from ..core.forward import install_forward
from ..core.generated_class import class_before_parametrizations
from ..core.store import BaseStore, MergeStep
from ..core.targets import AdaptTarget, join

__all__ = [
    "BnbWeight",
    "adopt_bnb_layers",
    "bnb_kind",
    "bnb_target",
    "bnb_targets",
    "prepare_bnb_targets",
    "release_bnb_layers",
    "requantized",
    "set_bnb_weight",
    "to_plain_linear",
]

_INV_127 = 7.874015718698502e-3  # float32(1 / 127), bitsandbytes' int8 dequantization factor


def bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes' quantized Linear layers, else None.

    Decided from the class hierarchy, so models without bitsandbytes never import it.
    """
    cls = class_before_parametrizations(module)
    for base in cls.__mro__:
        if base.__module__.startswith("bitsandbytes"):
            if base.__name__ == "Linear4bit":
                return "4bit"
            if base.__name__ == "Linear8bitLt":
                return "8bit"
    return None


def bnb_target(module_name: str, module: Any) -> AdaptTarget:
    """The adapt target of a bitsandbytes layer: its weight seen as ``(out, in)``."""
    shape = (module.out_features, module.in_features)
    path = join(module_name, "weight")
    return AdaptTarget(
        path, module_name, module, "weight", "linear", shape[1], shape[0], False, shape
    )


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise LoRAError(
            "this model has bitsandbytes-quantized layers (Linear4bit / Linear8bitLt), and "
            "adapting them needs bitsandbytes: pip install 'lora_param[quant]'."
        ) from None
    return bitsandbytes


class BnbWeight(BaseStore):
    """First entry on a bitsandbytes layer's weight: dequantizes it; runs its quantized matmul.

    A base store (:class:`lora_param.core.store.BaseStore`) that exists for the adapters' sake:
    removing the last adapter gives the layer its bitsandbytes parameter back.

    Args:
        layer_kind: ``"4bit"`` or ``"8bit"``.
        compute_dtype: Dtype of the dequantized weight (the dtype the weight had before
            quantization); LoRA parameters take it.
        state: The ``Linear8bitLt`` layer's matmul state (holds the row scales after its
            first forward).
    """

    removed_with_adapters = True

    def __init__(self, layer_kind: str, compute_dtype: torch.dtype, state: Any = None) -> None:
        super().__init__()
        self.layer_kind = layer_kind
        self.kind = "linear"
        self.shape: tuple[int, ...] = ()
        self._state = state
        self.register_buffer("_compute", torch.empty(0, dtype=compute_dtype), persistent=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype ``forward`` returns."""
        return cast(Tensor, self._compute).dtype

    def _scales(self, original: Any) -> Tensor:
        scb = getattr(original, "SCB", None)
        return scb if scb is not None else self._state.SCB

    def _check_packed(self, original: Any) -> None:
        """Refuse a weight that is no longer bitsandbytes' own parameter (sharded by FSDP2)."""
        if not type(original).__module__.startswith("bitsandbytes"):
            raise LoRAError(
                f"this bitsandbytes {self.layer_kind} layer's weight is a plain "
                f"{type(original).__name__} now, without its quantization state: the model was "
                "sharded (FSDP2 fully_shard), and bitsandbytes' packed parameters do not survive "
                "sharding (bitsandbytes#1424, #1945). Shard lora_param's own packed base "
                "instead: load the model unquantized, add_lora(model, ..., quantize='nf4') (or "
                "quantize_base, then add_lora), then fully_shard."
            )

    def forward(self, original: Any) -> Tensor:
        """The dequantized weight, ``(out, in)``, in the compute dtype."""
        self._check_packed(original)
        if self.layer_kind == "4bit":
            functional = _bitsandbytes().functional
            weight = functional.dequantize_4bit(original.data, original.quant_state)
            return weight.to(self.compute_dtype)
        rows = original.data.float() * self._scales(original).float().view(-1, 1)
        return (rows * _INV_127).to(self.compute_dtype)

    def base_output(self, layer: Any, x: Tensor, stored: tuple[Any, ...], bias: bool) -> Tensor:
        """The layer's own bitsandbytes matmul (without its bias when ``bias`` is False)."""
        bnb = _bitsandbytes()
        original = stored[0]
        self._check_packed(original)
        b = layer.bias if bias else None
        if self.layer_kind == "4bit":
            if not layer.compute_type_is_set:
                layer.set_compute_type(x)
                layer.compute_type_is_set = True
            dtype = layer.compute_dtype or x.dtype
            if b is not None:
                b = b.to(dtype)
            out = bnb.matmul_4bit(x.to(dtype), original, bias=b, quant_state=original.quant_state)
            return out.to(x.dtype)
        state = layer.state
        state.is_training = layer.training
        if original.CB is not None:  # Linear8bitLt.init_8bit_state, on the stored parameter
            state.CB, state.SCB = original.CB, original.SCB
            original.CB = original.SCB = None
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        out = bnb.matmul(x, original, bias=b, state=state)
        if not state.has_fp16_weights and state.CB is not None:
            original.data = state.CB
        return out

    def merge_step(
        self, layer: nn.Module, stored: tuple[Any, ...], merged: Tensor, requantize: bool
    ) -> MergeStep:
        """An ``nn.Linear`` with the plain merged weight, or the layer requantized."""
        if requantize:
            fresh = requantized(self, stored[0], merged)
            rounded = self.weight_fp32(fresh)
            error = float((rounded - merged).norm() / merged.norm().clamp(min=1e-30))
            return lambda: set_bnb_weight(layer, fresh), error
        value = merged.to(self.compute_dtype)
        return lambda: to_plain_linear(layer, value), None

    def extra_repr(self) -> str:
        return f"bitsandbytes {self.layer_kind}, compute_dtype={self.compute_dtype}"


def _adopt(module: Any) -> None:
    kind = bnb_kind(module)
    original = module.weight
    if kind == "4bit":
        state = getattr(original, "quant_state", None)
        if state is None:
            raise LoRAError(
                "a bitsandbytes Linear4bit layer is not quantized yet (its weight has no "
                "quant_state): move the model to its device (.to(device)) before add_lora."
            )
        if getattr(state, "packing_format_for_cpu", False):
            _unpack_for_cpu(original)
            state = original.quant_state
        head = BnbWeight("4bit", state.dtype)
    else:
        head = BnbWeight("8bit", module.bias.dtype if module.bias is not None else torch.float16)
        head._state = module.state
        if getattr(original, "SCB", None) is None and module.state.SCB is None:
            raise LoRAError(
                "a bitsandbytes Linear8bitLt layer is not quantized yet (no row scales): move "
                "the model to its device (.to(device)) before add_lora."
            )
    head.shape = (module.out_features, module.in_features)
    register_entry(module, "weight", head)
    # The layer's own forward needs its bitsandbytes parameter as `weight`: the adapted
    # forward calls bitsandbytes through the store instead, in either add_lora mode.
    install_forward(module, "linear")
    if kind == "8bit":
        # So do its state_dict hooks (they read `weight.SCB`): the row scales are saved and
        # loaded from where the stored parameter or the matmul state keeps them.
        generated: Any = type(module)  # the module's own class (install_forward made it)
        generated._save_to_state_dict = _save_8bit
        generated._load_from_state_dict = _load_8bit


def _scales_holder(module: Any) -> Any:
    """Where the adapted Linear8bitLt keeps its row scales: the stored parameter, or the
    matmul state once a forward moved them there (as bitsandbytes' init_8bit_state does)."""
    original = module.parametrizations.weight.original
    return original if getattr(original, "SCB", None) is not None else module.state


def _save_8bit(self: Any, destination: Any, prefix: str, keep_vars: bool) -> None:
    """Linear8bitLt's state_dict form (``SCB``, ``weight_format``), its weight parametrized."""
    nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
    scb = _scales_holder(self).SCB
    if not self.state.has_fp16_weights and scb is not None:
        destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)


def _load_8bit(
    self: Any,
    state_dict: Any,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Loads ``SCB`` into where the scales are kept (see :func:`_save_8bit`)."""
    nn.Module._load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
    for key in list(unexpected_keys):
        name = key[len(prefix) :]
        if name == "SCB":
            with torch.no_grad():
                _scales_holder(self).SCB.copy_(state_dict[key])
            unexpected_keys.remove(key)
        elif name == "weight_format":
            unexpected_keys.remove(key)


def _unpack_for_cpu(original: Any) -> None:
    """Give a Linear4bit weight repacked for CPU inference its usual layout back, in place.

    bitsandbytes' Linear4bit.forward in eval mode on a CPU with AVX512-BF16 repacks its weight
    (another code order, bfloat16 block scales) for a faster kernel; ``dequantize_4bit``
    misreads that layout (values off by the weight's size). bitsandbytes undoes it the same
    way before saving the layer (``_save_to_state_dict``) or moving it to a GPU.
    """
    inverse = getattr(_bitsandbytes().functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise LoRAError(
            "this Linear4bit layer's weight was repacked by bitsandbytes for CPU inference, and "
            "this bitsandbytes cannot undo it; save and reload the model (or run it in "
            "training mode before its first evaluation) before add_lora."
        )
    original.data, original.quant_state = inverse(original.data, original.quant_state)


def adopt_bnb_layers(targets: list[AdaptTarget]) -> list[nn.Module]:
    """Put a :class:`BnbWeight` under the weight of each bitsandbytes layer among ``targets``.

    Layers that already have one (a second adapter) are left as they are.

    Returns:
        The layers changed (to undo on failure with :func:`release_bnb_layers`).
    """
    layers = {
        id(t.module): t.module
        for t in targets
        if bnb_kind(t.module) is not None and not parametrize.is_parametrized(t.module, "weight")
    }
    if not layers:
        return []
    _bitsandbytes()
    done: list[nn.Module] = []
    try:
        for module in layers.values():
            _adopt(module)
            done.append(module)
    except BaseException:
        release_bnb_layers(done)
        raise
    return done


def release_bnb_layers(layers: list[nn.Module]) -> None:
    """Give each layer its bitsandbytes weight back (no adapter left on it)."""
    for module in layers:
        drop_entries(module, "weight", lambda p: isinstance(p, BnbWeight))


def prepare_bnb_targets(targets: list[AdaptTarget]) -> Callable[[], None]:
    """Ready bitsandbytes layers among ``targets`` for adapters; return the undo."""
    adopted = adopt_bnb_layers(targets)
    return lambda: release_bnb_layers(adopted)


def bnb_targets(module_name: str, module: nn.Module) -> list[AdaptTarget] | None:
    """The adapt target of a bitsandbytes layer (a target provider), or None for others."""
    return [bnb_target(module_name, module)] if bnb_kind(module) is not None else None


def requantized(head: BnbWeight, original: Any, merged: Tensor) -> Tensor:
    """A new bitsandbytes parameter holding ``merged`` with ``original``'s settings."""
    bnb = _bitsandbytes()
    device = original.device
    if head.layer_kind == "4bit":
        qs = original.quant_state
        fresh = bnb.nn.Params4bit(
            merged.to(qs.dtype).cpu(),
            requires_grad=False,
            quant_type=qs.quant_type,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            quant_storage=original.quant_storage,
        )
        return cast(Tensor, fresh.to(device))
    fresh = bnb.nn.Int8Params(merged.to(head.compute_dtype).cpu(), requires_grad=False)
    fresh.has_fp16_weights = False
    return cast(Tensor, fresh.to(device))


def set_bnb_weight(module: Any, weight: Tensor) -> None:
    """Install a new bitsandbytes parameter (under the adapters that stay, if any)."""
    plist = entry_list(module, "weight")
    if plist is not None:
        plist.original = weight  # a bitsandbytes Parameter
        plist.clear_cache()
    else:
        module.weight = weight
    if bnb_kind(module) == "8bit":
        module.state.CB = module.state.SCB = None


def to_plain_linear(module: nn.Module, weight: Tensor) -> None:
    """Turn a bitsandbytes layer into an ``nn.Linear`` holding ``weight``.

    Adapters still on the layer (one adapter merged of several) stay, now on the plain weight,
    with their parameters and the adapted forward.
    """
    above: list[nn.Module] = []
    order = module.__dict__.get("_lora_param_order")
    plist = entry_list(module, "weight")
    if plist is not None:
        above = list(plist)[1:]
        for i in reversed(range(1, len(plist))):
            del plist[i]
        drop_entries(module, "weight", lambda p: isinstance(p, BnbWeight))  # the store alone
    del module.weight
    module.__class__ = nn.Linear
    module.weight = nn.Parameter(weight, requires_grad=False)
    if order is not None:
        restore_order(module, order)
    for p in above:
        register_entry(module, "weight", p)
    if above:
        install_forward(module, "linear")
