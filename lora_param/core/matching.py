"""Target patterns: globs, lists of globs, compiled regexes and callables over module names."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeGuard, TypeVar, cast

from torch import nn

from .errors import LoRAError

__all__ = ["Pattern", "Targets", "as_patterns", "is_literal", "matches", "nearest", "pick"]

Pattern = str | re.Pattern[str] | Callable[[str, nn.Module], bool]
Targets = Pattern | Sequence[Pattern] | None
T = TypeVar("T")

_GLOB_CHARS = set("*?[")


def as_patterns(targets: Targets, what: str) -> list[Pattern]:
    """Normalize one pattern or a sequence of them into a list, checking each one's type."""
    if targets is None:
        return []
    items = [targets] if isinstance(targets, (str, re.Pattern)) or callable(targets) else targets
    try:
        items = list(items)
    except TypeError:
        raise LoRAError(
            f"{what} must be a glob string, a list of them, a compiled regex or a callable "
            f"(name, module) -> bool; got {type(targets).__name__}."
        ) from None
    for item in items:
        if not (isinstance(item, (str, re.Pattern)) or callable(item)):
            raise LoRAError(
                f"{what} contains {item!r} of type {type(item).__name__}; use glob strings, "
                "compiled regexes or callables (name, module) -> bool."
            )
    return items


def is_literal(pattern: Pattern) -> TypeGuard[str]:
    """True for a plain name with no glob characters."""
    return isinstance(pattern, str) and not (_GLOB_CHARS & set(pattern))


def matches(pattern: Pattern, name: str, module: nn.Module | None = None) -> bool:
    """Whether ``name`` (a module or tensor path) matches the pattern in full."""
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern)
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(name) is not None
    # Only string patterns are ever matched without a module (see the callers).
    return bool(pattern(name, cast(nn.Module, module)))


def nearest(name: str, candidates: Sequence[str], limit: int = 5) -> list[str]:
    """Candidates that look most like ``name`` (for 'did you mean' hints)."""
    close = difflib.get_close_matches(name, candidates, n=limit, cutoff=0.5)
    tail = name.split(".")[-1].strip("*?")
    if tail:
        close += [c for c in candidates if c.endswith(tail) and c not in close]
    return close[:limit]


def pick(value: T | Mapping[str, T], names: Sequence[str], what: str) -> T:
    """Resolve a per-pattern setting such as ``rank={"fc1": 8, "*": 2}`` for one layer.

    The first key (in the mapping's order) matching any of ``names`` wins.
    """
    if not isinstance(value, Mapping):
        return value
    for key, val in value.items():
        if any(fnmatch.fnmatchcase(n, key) for n in names):
            return val
    raise LoRAError(
        f"{what} has no pattern matching '{names[0]}'; add a catch-all entry such as "
        f'{{"*": ...}} to {what}.'
    )
