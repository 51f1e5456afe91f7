"""0.2's module paths, kept importable for one minor version (with a DeprecationWarning).

0.3 moved modules to show the architecture (``core/`` knows only protocols; variants,
quantized stores, routing and interop plug into it). Code that imported a name from an old
deep path (``from lora_param.core.parametrization import LoRAParametrization``) keeps working
until 0.4: an import finder serves the old module names, and each name read through them
warns and comes from its new home. Everything public is importable from ``lora_param``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

__all__ = ["MOVED", "RENAMED", "install"]

#: Old module -> the modules its names live in now (searched in order).
MOVED: dict[str, tuple[str, ...]] = {
    "lora_param.core.layers": ("lora_param.core.targets",),
    "lora_param.core.registry": ("lora_param.core.lookup",),
    "lora_param.core.trainable_copies": ("lora_param.core.copies",),
    "lora_param.core.factored": ("lora_param.core.forward",),
    "lora_param.core.classes": ("lora_param.core.generated_class",),
    "lora_param.core.parametrization": (
        "lora_param.variants.lora",
        "lora_param.core.eval_cache",
        "lora_param.core.layer_ops",
    ),
    "lora_param.core.dora": ("lora_param.variants.dora",),
    "lora_param.core.experts": ("lora_param.variants.experts", "lora_param.core.targets"),
    "lora_param.quant.registry": ("lora_param.quant.packed",),
    "lora_param.quant.merge": ("lora_param.core.merge",),
}


#: (old module, old name) -> (new module, new name): names that changed, not only moved.
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("lora_param.core.factored", "install_factored_forward"): (
        "lora_param.core.forward",
        "install_forward",
    ),
    ("lora_param.core.factored", "remove_factored_forward"): (
        "lora_param.core.forward",
        "release_forward",
    ),
    ("lora_param.quant.merge", "RequantizationWarning"): (
        "lora_param.core.merge",
        "RequantizationWarning",
    ),
}


class _Moved(types.ModuleType):
    """An old module name: each attribute read warns and is taken from the new modules."""

    def __init__(self, name: str, homes: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved in lora_param 0.3 to {', '.join(homes)}.")
        self._homes = homes

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        renamed = RENAMED.get((self.__name__, attr))
        if renamed is not None:
            home, new = renamed
            warnings.warn(
                f"{self.__name__}.{attr} is {home}.{new} since lora_param 0.3 (the old name goes "
                "in 0.4).",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(home), new)
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                warnings.warn(
                    f"{self.__name__}.{attr} moved to {home}.{attr} in lora_param 0.3; "
                    f"import it from there or from lora_param (the old path goes in 0.4).",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Moved(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        return None


_FINDER = _Finder()


def install() -> None:
    """Serve the old module names (once per process)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
