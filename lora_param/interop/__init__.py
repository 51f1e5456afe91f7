"""Interchange with other libraries' formats and workflows (PEFT, ...); optional dependencies.

Importing this package registers the file codecs of the variants other formats keep in their
own layouts: LyCORIS LoHa and LoKr entries in kohya files, PEFT's LOHA and LOKR folders.
"""

from . import kohya_loha, kohya_lokr, peft_loha, peft_lokr  # noqa: F401  (register codecs)
