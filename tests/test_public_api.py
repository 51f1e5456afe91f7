"""The public surface: every name in ``lora_param.__all__`` resolves and is documented, and
``import lora_param`` stays light (``LoRATrainer`` is built on first access)."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lora_param

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_import_does_not_import_optional_dependencies() -> None:
    done = _run(
        "import sys, lora_param\n"
        "heavy = [m for m in ('transformers', 'peft', 'bitsandbytes', 'safetensors', 'diffusers')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'LoRATrainer' in dir(lora_param)\n"
    )
    assert done.returncode == 0, done.stderr


def test_lora_trainer_is_importable_from_the_package() -> None:
    transformers = pytest.importorskip("transformers")
    from lora_param import LoRATrainer
    from lora_param.interop.transformers import LoRATrainer as same

    assert LoRATrainer is same is lora_param.LoRATrainer
    assert issubclass(LoRATrainer, transformers.Trainer)
    assert "checkpoints hold the adapters" in (LoRATrainer.__doc__ or "")


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'LoraTrainer'"):
        lora_param.LoraTrainer  # noqa: B018


CALLABLES = sorted(
    n
    for n in set(lora_param.__all__) - {"LoRATrainer"}  # its docstring: checked above
    if inspect.isfunction(getattr(lora_param, n)) or inspect.isclass(getattr(lora_param, n))
)


@pytest.mark.parametrize("name", CALLABLES)
def test_public_name_has_a_docstring(name: str) -> None:
    """The API reference is generated from these docstrings: each says what the name does and,
    for a function taking arguments, documents them in an ``Args:`` section."""
    obj = getattr(lora_param, name)
    doc = inspect.getdoc(obj) or ""
    assert len(doc) >= 40, f"{name} needs a docstring"
    if inspect.isfunction(obj):
        params = [p for p in inspect.signature(obj).parameters if p not in ("self",)]
        if params:
            assert "Args:" in doc, f"{name}: document its arguments in an Args: section"


def test_lora_trainer_docstring_matches_its_typing_stub() -> None:
    """The API reference reads the class type checkers see (under TYPE_CHECKING); the class
    built at run time must carry the same docstring."""
    from lora_param.interop import transformers as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    stubs = [
        ast.get_docstring(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and n.name == "LoRATrainer" and ast.get_docstring(n)
    ]
    assert stubs == [inspect.cleandoc(module._LORA_TRAINER_DOC)]
