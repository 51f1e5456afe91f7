"""Per-module classes: parametrize gives a module a generated class that copies share.

``copy.deepcopy`` copies a parametrized module but not its generated class, so a change to
that class (a property removed by ``remove_parametrizations``, a forward swapped) would leak
into every copy. Before changing anything on a module's class, the library gives the module
a private copy of it.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["own_class"]

_SKIP = ("__dict__", "__weakref__")


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own, equal to the one it had."""
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in _SKIP}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)
