"""The one exception type the library raises for bad input."""

from __future__ import annotations

__all__ = ["LoRAError"]


class LoRAError(ValueError):
    """Bad input to a lora_param function; the model was left unchanged.

    Every check runs before anything changes: after the error the model, and any file the call
    would have written, are exactly as they were. The message names the problem (the layer,
    file or argument) and how to fix it. A subclass of ``ValueError``.
    """
