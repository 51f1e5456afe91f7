"""Writing a file so that a crash never leaves half of it: temporary file, fsync, replace."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "open_beside", "sync_close"]


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def open_beside(path: str | os.PathLike) -> tuple[BinaryIO, Path]:
    """A new temporary file in ``path``'s folder (created if missing), open for writing.

    It gets the permissions a plainly created file would get (``0o666`` less the umask,
    usually 0644): the temporary file ``mkstemp`` makes is private (0600), and ``os.replace``
    keeps its mode.

    Returns:
        The open file and its path (``os.replace`` it onto ``path`` once written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _default_mode())
        return os.fdopen(fd, "wb"), Path(tmp)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise


def sync_close(f: BinaryIO) -> None:
    """Flush, fsync and close a file written through :func:`open_beside`."""
    with f:
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Write a file through a temporary file in the same folder and ``os.replace``.

    A crash leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    f, tmp = open_beside(path)
    try:
        write(f)
        sync_close(f)
        os.replace(tmp, path)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
