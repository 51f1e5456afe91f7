"""``quantize_base`` / ``dequantize_base``: pack a model's frozen weights, or unpack them."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import QuantizationConfig, quantization_config
from ..core.distributed import ORDER, fsdp_modules, holds_shards
from ..core.entries import register_entry
from ..core.errors import LoRAError
from ..core.matching import Targets
from ..core.targets import AdaptTarget
from ..core.variant import AdapterVariant
from .bnb import bnb_kind
from .kernels import Kernel, check_kernel
from .packed import (
    iter_quantized,
    packed_head,
    parametrization_list,
    replace_packed,
    stored_tensors,
)
from .state import install_load_checks
from .weight import Method, QuantizedWeight, check_method

__all__ = [
    "QUANTIZABLE_KINDS",
    "Int8Config",
    "NF4Config",
    "dequantize_base",
    "quantize_base",
    "quantize_targets",
]

#: Layer kinds whose weight can be packed (Linear and subclasses, Conv1d/2d/3d, Embedding,
#: Hugging Face Conv1D).
QUANTIZABLE_KINDS = ("linear", "conv", "embedding", "conv1d_hf")


@dataclass(frozen=True)
class NF4Config(QuantizationConfig):
    """QLoRA's NormalFloat-4: 4-bit codes in absmax blocks (``quantize="nf4"``).

    Attributes:
        block_size: Values per absmax block (32 ... 4096, a power of two; 64 as QLoRA).
        double_quant: Quantize the absmax values again (8-bit, blocks of 256): 0.127 instead of
            0.5 bits per weight of overhead.
        compute_dtype: Dtype the weights are dequantized to; None keeps each weight's dtype.
        kernel: ``"auto"``, ``"torch"`` or ``"bitsandbytes"`` (see
            :mod:`lora_param.quant.kernels`); the values are the same whichever runs.
        residual_rank: Keep each weight's best rank-``r`` part in float32 and quantize only
            the rest (QPiSSA's residual): a smaller quantization error where a few directions
            carry the largest values, for ``r * (out + in)`` more float32 numbers per weight.
            0: plain NF4.
        residual_niter: Find that part with a randomized SVD of this many iterations (fast on
            large weights) instead of a full SVD; None: full SVD.
    """

    name: ClassVar[str] = "nf4"
    block_size: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    kernel: Kernel = "auto"
    residual_rank: int = 0
    residual_niter: int | None = None


@dataclass(frozen=True)
class Int8Config(QuantizationConfig):
    """8-bit codes with one absmax per row (``quantize="int8"``).

    Attributes:
        compute_dtype: Dtype the weights are dequantized to; None keeps each weight's dtype.
        residual_rank: As :class:`NF4Config`'s: quantize only what the best rank-``r`` part
            leaves.
        residual_niter: As :class:`NF4Config`'s.
    """

    name: ClassVar[str] = "int8"
    compute_dtype: torch.dtype | None = None
    residual_rank: int = 0
    residual_niter: int | None = None


def _options(config: QuantizationConfig) -> dict[str, Any]:
    """``quantize_targets`` keywords for a method's options."""
    if isinstance(config, NF4Config):
        return {
            "method": "nf4",
            "block_size": config.block_size,
            "double_quant": config.double_quant,
            "compute_dtype": config.compute_dtype,
            "kernel": config.kernel,
            "residual_rank": config.residual_rank,
            "residual_niter": config.residual_niter,
        }
    assert isinstance(config, Int8Config)
    return {
        "method": "int8",
        "compute_dtype": config.compute_dtype,
        "residual_rank": config.residual_rank,
        "residual_niter": config.residual_niter,
    }


def pack_with(
    found: Sequence[AdaptTarget],
    config: QuantizationConfig,
    *,
    root: nn.Module | None = None,
    explicit: bool = False,
) -> Callable[[], None]:
    """The handler registered for :class:`NF4Config` and :class:`Int8Config`."""
    return quantize_targets(found, explicit=explicit, root=root, **_options(config))


def _check_compute_dtype(compute_dtype: object) -> None:
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise LoRAError(
            f"compute_dtype must be a floating torch.dtype (torch.bfloat16, ...) or None, got "
            f"{compute_dtype!r}."
        )


def _check_target(target: AdaptTarget) -> None:
    module = target.module
    if packed_head(module) is not None:
        raise LoRAError(
            f"'{target.path}' is already quantized; dequantize_base(model) first to quantize it "
            "again with other settings."
        )
    if parametrize.is_parametrized(module, "weight"):
        plist = parametrization_list(module)
        entries = [type(p).__name__ for p in plist]
        hint = (
            "quantize the base before add_lora (or use add_lora(..., quantize=...))"
            if any(isinstance(p, AdapterVariant) for p in plist)
            else "remove them first"
        )
        raise LoRAError(
            f"'{target.path}' already has parametrizations {entries}; the packed weight must be "
            f"the first one: {hint}."
        )


def _check_residual(chosen: Sequence[AdaptTarget], rank: object, niter: object) -> None:
    """A residual rank every chosen weight can hold, and a valid iteration count."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise LoRAError(f"residual_rank must be an integer >= 0, got {rank!r}.")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise LoRAError(f"residual_niter must be None or an integer >= 0, got {niter!r}.")
    for target in chosen:
        rows, cols = target.shape[0], math.prod(target.shape[1:])
        if rank > min(rows, cols):
            raise LoRAError(
                f"residual_rank={rank} exceeds what '{target.path}' ({rows}x{cols} as a matrix) "
                f"can hold, {min(rows, cols)}; lower it or exclude that layer."
            )


def _quantizable(found: Sequence[AdaptTarget], explicit: bool) -> list[AdaptTarget]:
    chosen = [
        t
        for t in found
        if t.param_name == "weight" and t.kind in QUANTIZABLE_KINDS and bnb_kind(t.module) is None
    ]
    skipped = [t.path for t in found if t not in chosen]
    if explicit and skipped:
        raise LoRAError(
            f"cannot quantize {skipped[:5]}: only the weight of Linear, Conv1d/2d/3d, Embedding "
            "and Hugging Face Conv1D layers is stored packed."
        )
    return chosen


def _register(target: AdaptTarget, quant: QuantizedWeight) -> Callable[[], None]:
    """Pack one weight; return the function that puts the original Parameter back."""
    module = target.module
    original = module._parameters["weight"]
    assert original is not None
    requires_grad = original.requires_grad
    # parametrize gives each stored tensor the original's requires_grad: packed integers
    # cannot require grad, and the base is frozen anyway.
    original.requires_grad_(False)
    try:
        register_entry(module, "weight", quant)
    except BaseException:
        original.requires_grad_(requires_grad)
        raise

    def undo() -> None:
        replace_packed(module, original)
        original.requires_grad_(requires_grad)

    return undo


def quantize_targets(
    found: Sequence[AdaptTarget],
    *,
    method: Method = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernel: Kernel = "auto",
    residual_rank: int = 0,
    residual_niter: int | None = None,
    explicit: bool = False,
    root: nn.Module | None = None,
) -> Callable[[], None]:
    """Pack the weights of resolved targets, all or none.

    Args:
        found: Targets from :func:`lora_param.find_targets`.
        method, block_size, double_quant, compute_dtype, kernel: As :func:`quantize_base`.
        residual_rank, residual_niter: As :class:`NF4Config`'s.
        explicit: The caller named these layers: a target that cannot be packed is an error
            (otherwise it is skipped).
        root: The model (its ``load_state_dict`` then checks packed tensors before loading).

    Returns:
        A function that undoes the packing (gives every original Parameter back).
    """
    check_method(method, block_size)
    _check_compute_dtype(compute_dtype)
    check_kernel(kernel)
    chosen = _quantizable(found, explicit)
    if not chosen:
        raise LoRAError(
            "no layer to quantize: quantize_base packs the weight of Linear, Conv1d/2d/3d, "
            "Embedding and Hugging Face Conv1D layers."
        )
    managed = fsdp_modules(root) if root is not None else set()
    sharded = [
        t.path for t in chosen if id(t.module) in managed or holds_shards(t.module, t.param_name)
    ]
    if sharded:
        raise LoRAError(
            f"cannot quantize sharded (FSDP2) weights {sharded[:5]}: FSDP2 manages them and "
            f"would keep gathering the unpacked ones. With FSDP2, {ORDER}"
        )
    for target in chosen:
        _check_target(target)
    _check_residual(chosen, residual_rank, residual_niter)
    undos: list[Callable[[], None]] = []
    try:
        for target in chosen:
            weight = target.module._parameters["weight"]
            assert weight is not None
            quant = QuantizedWeight(
                target.shape,
                method=method,
                block_size=block_size,
                double_quant=double_quant,
                compute_dtype=compute_dtype or weight.dtype,
                kind=target.kind,
                kernel=kernel,
                residual_rank=residual_rank,
                residual_niter=residual_niter,
            ).to(weight.device)
            undos.append(_register(target, quant))
            install_load_checks(target.module)
        if kernel == "bitsandbytes":  # refuse now where its kernel would not give our values
            with torch.no_grad():
                for target in chosen:
                    target.module.weight  # noqa: B018  (dequantizes: checks the kernel)
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    if root is not None:
        install_load_checks(root)

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all


def quantize_base(
    model: nn.Module,
    targets: Targets = None,
    *,
    method: Method | QuantizationConfig = "nf4",
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    kernel: Kernel = "auto",
) -> nn.Module:
    """Store the weights of matching layers packed (4-bit NF4 or 8-bit), frozen, in place.

    Each weight gets a :class:`~lora_param.quant.QuantizedWeight` parametrization:
    ``layer.weight`` reads the dequantized weight, ``state_dict()`` holds the packed tensors
    (``parametrizations.weight.original0``, ...). Call it before :func:`lora_param.add_lora`
    (or use ``add_lora(..., quantize="nf4")``). Everything is checked first; on error the
    model is unchanged.

    Args:
        model: Any ``nn.Module``; changed in place and returned.
        targets: Which layers, in the forms :func:`lora_param.add_lora` accepts; None packs
            every Linear, Conv1d/2d/3d, Embedding and Hugging Face Conv1D weight.
        method: ``"nf4"`` (QLoRA's NormalFloat-4, absmax blocks), ``"int8"`` (per-row
            absmax), or an options object (:class:`lora_param.NF4Config`,
            :class:`lora_param.Int8Config`; the keywords below are then ignored).
        block_size: Values per NF4 absmax block (32 ... 4096, a power of two; 64 as QLoRA).
        double_quant: Quantize NF4's absmax values again (8-bit, blocks of 256), 0.127
            instead of 0.5 bits per weight of overhead.
        compute_dtype: Dtype the weights are dequantized to; None keeps each weight's dtype.
        kernel: How NF4 is dequantized: ``"auto"`` (pure PyTorch on the CPU; on CUDA
            bitsandbytes' compiled kernel where it is installed and checked to give the same
            values, outside ``torch.compile``), ``"torch"`` (pure PyTorch, CPU and CUDA,
            traceable by ``torch.compile``) or ``"bitsandbytes"`` (required: needs ``pip
            install 'lora_param[quant]'``; refused where its kernel would give other
            values, as bitsandbytes 0.50's CPU kernel does for rows that are not a multiple of
            the block size). The values are bit for bit the same whichever runs.

    Returns:
        The model.

    Raises:
        LoRAError: Unknown method, bad block size, a weight that is already packed or
            already has LoRA, a non-floating or 1-D tensor, a pattern that matches nothing, a
            sharded (FSDP2) weight (quantize before ``add_lora`` and ``fully_shard``).
    """
    from ..core.inject import find_targets

    if not isinstance(model, nn.Module):
        raise LoRAError(f"quantize_base needs an nn.Module, got {type(model).__name__}.")
    if isinstance(method, QuantizationConfig):
        options = _options(quantization_config(method))
    else:
        options = {
            "method": method,
            "block_size": block_size,
            "double_quant": double_quant,
            "compute_dtype": compute_dtype,
            "kernel": kernel,
        }
        if method == "int8":
            options = {"method": "int8", "compute_dtype": compute_dtype}
    check_method(options["method"], options.get("block_size", 64))
    _check_compute_dtype(options["compute_dtype"])
    check_kernel(options.get("kernel", "auto"))
    found = find_targets(model, targets)
    quantize_targets(found, explicit=targets is not None, root=model, **options)
    return model


def dequantize_base(model: nn.Module) -> nn.Module:
    """Give every packed weight back as a plain frozen Parameter in its compute dtype.

    The values are exactly what ``layer.weight`` read before (the dequantized weight); LoRA
    adapters on top stay as they are.

    Args:
        model: A model with packed weights (others are left alone).

    Returns:
        The model.

    Raises:
        LoRAError: The packed weights are sharded (FSDP2): dequantize before ``fully_shard``,
            or write a merged checkpoint with :func:`lora_param.save_merged`.
    """
    found = list(iter_quantized(model))
    managed = fsdp_modules(model)
    sharded = [path for path, module, _ in found if id(module) in managed]
    if sharded:
        raise LoRAError(
            f"dequantize_base cannot unpack sharded (FSDP2) weights {sharded[:5]}: the plain "
            "weights would be new parameters that FSDP2 does not manage. Dequantize before "
            "fully_shard; for a merged checkpoint in the compute dtype call "
            "save_merged(model, folder) on every rank."
        )
    with torch.no_grad():
        values = [head(*stored_tensors(module)) for _, module, head in found]
    for (_, module, _), value in zip(found, values, strict=True):
        replace_packed(module, nn.Parameter(value, requires_grad=False))
    return model
