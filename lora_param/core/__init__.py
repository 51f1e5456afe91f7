"""The core: the LoRA parametrization, injection by name, toggles, freezing, merge and files."""
