"""Atomic file writes: write a temporary file next to the target, fsync it, rename it into place,
fsync the directory. A crash at any moment leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .errors import PartializeError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, force: bool = False) -> str:
    """Call ``write(tmp)`` on a temporary file next to ``path`` and rename it into place.

    Refuses (PartializeError) to replace an existing ``path`` unless ``force``; on any failure the
    temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise PartializeError(f"{path!r} already exists; pass --force (force=True) to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partialize-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _fsync_dir(folder: str) -> None:
    """Persist a rename (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
