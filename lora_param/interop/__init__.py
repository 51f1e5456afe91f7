"""Interchange with other libraries' formats and workflows (PEFT, kohya/LyCORIS, Trainer).

One module per format (``peft_*``, ``kohya*``), with one codec per variant registered in it;
importing this package registers the codecs of variants PEFT and LyCORIS keep in formats of
their own (OFT's, LoHa's and LoKr's PEFT folders and LyCORIS entries). Optional dependencies
(safetensors, peft, transformers) are imported only when a function needs them.
"""

from . import kohya_loha as _kohya_loha  # noqa: F401  (registers LyCORIS/kohya LoHa entries)
from . import kohya_lokr as _kohya_lokr  # noqa: F401  (registers LyCORIS/kohya LoKr entries)
from . import kohya_oft as _kohya_oft  # noqa: F401  (registers LyCORIS/kohya OFT entries)
from . import peft_loha as _peft_loha  # noqa: F401  (registers PEFT's LOHA folders)
from . import peft_lokr as _peft_lokr  # noqa: F401  (registers PEFT's LOKR folders)
from . import peft_oft as _peft_oft  # noqa: F401  (registers PEFT's OFT and BOFT folders)
