"""Output files: checked before the work starts, written atomically, never overwritten by surprise.

``check_output`` refuses, before anything slow runs, a path that exists (unless ``force``), is a
folder, is one of the inputs, or lies in a folder that cannot be written. ``atomic_write`` writes a
temporary file next to the target, fsyncs it, gives it the mode a plain ``open()`` would (the
umask; an existing file keeps its mode), renames it into place and fsyncs the folder: a crash or a
full disk at any moment leaves the old file or the new one, never a torn one or a stray temporary.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable

from .errors import PartializeError

_TMP_PREFIX = ".partialize-"


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _why(e: OSError) -> str:
    """What an OSError means for the user, with the fix."""
    code = e.errno
    if code == errno.ENOSPC or code == errno.EDQUOT:
        return "the disk is full (or over quota): free some space or choose another folder"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable (read-only or no permission): choose a writable folder"
    if code == errno.ENOENT:
        return "the folder cannot be created there: choose an existing, writable folder"
    if code == errno.ENAMETOOLONG:
        return "the file name is too long: choose a shorter one"
    return (e.strerror or str(e)) + ": choose another path"


_IO_WORDS = {
    errno.ENOSPC: ("No space left", "os error 28"),
    errno.EROFS: ("Read-only file system", "os error 30"),
    errno.EACCES: ("Permission denied", "os error 13"),
}


def _io_failure(e: BaseException, folder: str) -> str | None:
    """What a failed write means for the user when it was the file system (None: not an I/O failure).

    Besides OSError, recognises I/O errors that writers wrap in their own exceptions (safetensors'
    SafetensorError "os error 28", torch.save's RuntimeError) by their text, or by a folder with
    (almost) no free space left while the temporary file is still there.
    """
    if isinstance(e, OSError):
        return _why(e)
    text = str(e)
    for code, words in _IO_WORDS.items():
        if any(w in text for w in words):
            return _why(OSError(code, os.strerror(code)))
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    if st.f_bavail * st.f_frsize < 1 << 20:
        return _why(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return None


def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder or "."


def check_output(
    path: str | os.PathLike,
    *,
    force: bool = False,
    option: str = "--out",
    inputs: Iterable[str | os.PathLike | None] = (),
) -> str:
    """Refuse ``path`` now, before the work that would fill it, if it cannot or must not be written.

    Raises PartializeError naming ``option`` and the fix: the path is a folder, is one of ``inputs``
    (never overwritten, even with ``force``), exists and ``force`` is False, or its folder cannot be
    created or written (checked by creating and removing a temporary file there).
    """
    path = os.fspath(path)
    if not path:
        raise PartializeError(f"{option}: empty path; give a file name")
    if os.path.isdir(path):
        raise PartializeError(f"{option} {path!r} is a folder; give a file name (e.g. {os.path.join(path, 'out')})")
    for src in inputs:
        if src is not None and os.path.exists(os.fspath(src)) and os.path.abspath(path) == os.path.abspath(src):
            raise PartializeError(f"{option} {path!r} is also an input; choose another path for the output")
    if os.path.lexists(path) and not force:
        raise PartializeError(f"{option} {path!r} already exists; pass --force (force=True) to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    probe_dir = _existing_ancestor(folder)
    if not os.path.isdir(probe_dir):
        raise PartializeError(f"{option} {path!r}: {probe_dir!r} is a file, not a folder; choose another path")
    check_folder(folder, option=f"{option} {path!r}")
    return path


def check_folder(folder: str | os.PathLike, *, option: str = "--out") -> None:
    """Refuse now a folder outputs will be written to that cannot be created or written."""
    probe_dir = _existing_ancestor(os.path.abspath(os.fspath(folder) or "."))
    try:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".probe", dir=probe_dir)
    except OSError as e:
        raise PartializeError(f"cannot write {option}: {_why(e)}") from None
    os.close(fd)
    os.remove(tmp)


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], *, force: bool = False, option: str | None = None
) -> str:
    """Call ``write(tmp)`` on a temporary file next to ``path`` and rename it into place.

    Refuses (PartializeError) to replace an existing ``path`` unless ``force``; on any failure the
    temporary file is removed and ``path`` is untouched. A file system error (full disk, read-only
    folder), also one a writer wraps in its own exception, is a PartializeError that names the path
    and the fix. The new file gets the mode of the
    file it replaces, else 0666 less the umask (like ``open()``), not mkstemp's 0600.
    """
    path = os.fspath(path)
    label = f"{option} {path!r}" if option else repr(path)
    if os.path.isdir(path):
        raise PartializeError(f"{label} is a folder; give a file name")
    if os.path.lexists(path) and not force:
        raise PartializeError(f"{label} already exists; pass --force (force=True) to overwrite it")
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
        os.close(fd)
        write(tmp)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:  # the data is on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(folder)
    except PartializeError:
        raise
    except Exception as e:  # writers wrap I/O errors (safetensors, torch.save): recognise them
        why = _io_failure(e, folder)
        if why is None:
            raise
        raise PartializeError(f"cannot write {label}: {why}; nothing was written") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: str | os.PathLike, text: str, *, force: bool = False, option: str | None = None) -> str:
    """``atomic_write`` of UTF-8 text (reports, tables)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write, force=force, option=option)


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
