"""The one exception type the library raises for bad input."""

from __future__ import annotations

__all__ = ["LoRAError"]


class LoRAError(ValueError):
    """Bad input to a lora_param function; the model was left unchanged."""
