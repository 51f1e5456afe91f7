"""Interchange with other libraries' formats and workflows (PEFT, kohya/LyCORIS, Trainer).

One module per format (``peft_*``, ``kohya*``), with one codec per variant registered in it;
importing this package registers the codecs of variants PEFT and LyCORIS keep in formats of
their own (OFT's PEFT folders and LyCORIS entries). Optional dependencies (safetensors, peft,
transformers) are imported only when a function needs them.
"""

from . import kohya_oft as _kohya_oft  # noqa: F401  (registers LyCORIS/kohya OFT entries)
from . import peft_oft as _peft_oft  # noqa: F401  (registers PEFT's OFT and BOFT folders)
