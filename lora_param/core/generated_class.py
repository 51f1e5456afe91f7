"""Per-module classes: parametrize gives a module a generated class that copies share.

``copy.deepcopy`` copies a parametrized module but not its generated class, so a change to
that class (a property removed by ``remove_parametrizations``, a forward swapped) would leak
into every copy. Before changing anything on a module's class, the library gives the module
a private copy of it.

FSDP2's ``fully_shard`` gives a module yet another class, ``FSDP<Name>`` with bases
``(FSDPModule, <the class it had>)``; :func:`layer_class` and
:func:`class_before_parametrizations` look behind it.
"""

from __future__ import annotations

import sys

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["class_before_parametrizations", "layer_class", "own_class"]

_SKIP = ("__dict__", "__weakref__")


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own, equal to the one it had."""
    if not parametrize.is_parametrized(module):
        return
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in _SKIP}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def layer_class(module: nn.Module) -> type:
    """The module's class, behind the ``FSDP<Name>`` class ``fully_shard`` gives it.

    For a parametrized module that is parametrize's generated class (where lora_param sets
    the adapted forward). ``torch.distributed.fsdp`` is not imported here: when nobody
    imported it, no module can be sharded.
    """
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    wrapper = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if wrapper is not None and wrapper in cls.__bases__:
        return next(b for b in cls.__bases__ if b is not wrapper)
    return cls


def class_before_parametrizations(module: nn.Module) -> type:
    """The module's own class (``nn.Linear``, ...): behind parametrize's and FSDP2's classes.

    ``parametrize.type_before_parametrizations`` answers ``FSDPModule`` for a sharded module.
    """
    cls = layer_class(module)
    if parametrize.is_parametrized(module):
        return cls.__bases__[0]
    return cls
