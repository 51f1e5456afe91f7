"""Training helpers: optimizer parameter groups for adapters (LoRA+)."""

from .loraplus import lora_plus_param_groups

__all__ = ["lora_plus_param_groups"]
