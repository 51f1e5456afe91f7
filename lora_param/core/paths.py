"""Path checks for every reader and writer: say what is wrong before anything is touched.

Writers call :func:`check_output_file` or :func:`check_output_folder` before they write (or
create) anything; readers call :func:`check_input_file` or :func:`check_input_folder`. Each raises
:class:`LoRAError` in the library's words instead of an ``IsADirectoryError`` about a temporary
file or a "does not exist" for a folder that does.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LoRAError

__all__ = [
    "check_input_file",
    "check_input_folder",
    "check_output_file",
    "check_output_folder",
]


def _check_parents(path: Path, what: str) -> None:
    """The nearest existing ancestor must be a writable folder (missing ones are created)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LoRAError(
            f"cannot write {what} {str(path)!r}: {str(parent)!r} is a file, not a folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LoRAError(
            f"cannot write {what} {str(path)!r}: the folder {str(parent)!r} is not writable "
            "(permissions or a read-only file system); choose another place."
        )


def check_output_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Check that ``path`` can be written as a file; missing parent folders will be created.

    Args:
        path: Where the file goes.
        what: What the file is, for the message (``"adapter file"``).

    Returns:
        The path, as a Path.

    Raises:
        LoRAError: ``path`` is a folder, a parent is a file, or the place is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise LoRAError(
            f"cannot write {what} {str(path)!r}: it is an existing folder; pass a file path "
            f"such as {str(path / 'adapter.pt')!r}."
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise LoRAError(f"cannot write {what} {str(path)!r}: the existing file is read-only.")
    _check_parents(path, what)
    return path


def check_output_folder(path: str | os.PathLike, what: str = "folder") -> Path:
    """Check that ``path`` can be used (or created) as a folder to write files into.

    Raises:
        LoRAError: ``path`` is a file, a parent is a file, or the place is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LoRAError(f"cannot write {what} {str(path)!r}: it is a file, not a folder.")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise LoRAError(f"cannot write {what} {str(path)!r}: the folder is not writable.")
        return path
    _check_parents(path, what)
    return path


def check_input_file(path: str | os.PathLike, what: str = "file", hint: str = "") -> Path:
    """Check that ``path`` is an existing, readable file.

    Args:
        path: The file to read.
        what: What the file is, for the message.
        hint: Added to the message when ``path`` is a folder (e.g. which reader takes folders).

    Raises:
        LoRAError: ``path`` is missing, a folder, or not readable.
    """
    path = Path(path)
    if path.is_dir():
        raise LoRAError(f"{what} {str(path)!r} is a folder, not a file{hint}.")
    if not path.exists():
        raise LoRAError(f"{what} {str(path)!r} does not exist.")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise LoRAError(f"{what} {str(path)!r} is not a readable file.")
    return path


def check_input_folder(path: str | os.PathLike, what: str = "folder", hint: str = "") -> Path:
    """Check that ``path`` is an existing folder.

    Raises:
        LoRAError: ``path`` is missing or is a file.
    """
    path = Path(path)
    if not path.exists():
        raise LoRAError(f"{what} {str(path)!r} does not exist.")
    if not path.is_dir():
        raise LoRAError(f"{what} {str(path)!r} is a file, not a folder{hint}.")
    return path
