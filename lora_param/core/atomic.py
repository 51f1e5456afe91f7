"""Writing a file so that a crash never leaves half of it: temporary file, fsync, replace."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write"]


def _default_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Write a file through a temporary file in the same folder and ``os.replace``.

    A crash leaves either the old file or the new one, never half a file. The file gets the
    permissions a plainly created file would get (``0o666`` less the umask, usually 0644):
    the temporary file ``mkstemp`` makes is private (0600), and ``os.replace`` keeps its mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
