"""Interchange with other libraries' formats and workflows (PEFT, ...); optional dependencies.

Importing this package registers the file codecs of the variants other formats keep in their
own layouts: LyCORIS LoHa entries in kohya files, PEFT's LOHA folders.
"""

from . import kohya_loha, peft_loha  # noqa: F401  (register codecs)
