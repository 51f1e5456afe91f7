"""``--quantize nf4|int8``: the pretrained MLP's layers stored packed (QLoRA), LoRA on top.

The pretrained model is quantized right after pretraining (or loading its fp32 checkpoint), so
every later step (the "pretrained" evaluation, LoRA, the LoRA-off and frozen-base checks) sees
the packed base it trains on. The report's ``base_storage`` says what the base takes in bytes,
packed and in fp32, and the fp32 model's test accuracy.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lora_param import quantize_base

from .model import LINEAR_LAYERS

__all__ = ["QUANTIZE_METHODS", "base_bytes", "quantize_pretrained", "storage_line"]

QUANTIZE_METHODS = ("nf4", "int8")


def base_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (state_dict: parameters, buffers, packed codes)."""
    return sum(
        t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, Tensor)
    )


def quantize_pretrained(
    model: nn.Module, method: str | None, fp32_accuracy: float | None
) -> dict[str, Any]:
    """Pack the pretrained MLP's three layers in place (``method`` None: leave it as is).

    Args:
        model: The pretrained MLP (plain weights).
        method: ``"nf4"``, ``"int8"`` or None.
        fp32_accuracy: Test accuracy of the plain model, for the report (None: not measured).

    Returns:
        The report's ``base_storage`` block.
    """
    plain = base_bytes(model)
    if method is not None:
        quantize_base(model, list(LINEAR_LAYERS), method=method)  # type: ignore[arg-type]
    return {
        "quantize": method,
        "bytes": base_bytes(model),
        "fp32_bytes": plain,
        "fp32_accuracy": fp32_accuracy,
    }


def storage_line(storage: dict[str, Any]) -> str:
    """One summary line: what the base takes, and against fp32 when it is packed."""
    if storage["quantize"] is None:
        return f"base stored in fp32: {storage['bytes']:,} bytes"
    return (
        f"base stored as {storage['quantize']}: {storage['bytes']:,} bytes "
        f"({storage['bytes'] / storage['fp32_bytes']:.2f}x the fp32 {storage['fp32_bytes']:,}); "
        f"fp32 pretrained accuracy {storage['fp32_accuracy']:.4f}"
    )
