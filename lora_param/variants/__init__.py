"""Adapter variants: LoRA, DoRA, per-expert LoRA, each one file on the variant protocol."""
