"""Interchange with Hugging Face PEFT: write and read PEFT's LoRA adapter folders.

``export_peft`` (:mod:`.peft_export`) writes one; ``import_peft`` (:mod:`.peft_import`) reads
one, after :mod:`.peft_read` has checked it. The folder layout is described in
:mod:`.peft_format`. Neither needs ``peft`` itself; both need ``safetensors``
(``pip install "lora_param[peft]"``), imported only when called.
"""

from __future__ import annotations

from .peft_export import export_peft
from .peft_import import import_peft

__all__ = ["export_peft", "import_peft"]
