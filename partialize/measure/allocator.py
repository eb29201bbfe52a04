"""How the process gets memory for new tensors, and an opt-in that keeps freed memory for reuse.

PyTorch's CPU tensors come from the C allocator. glibc's malloc hands every block above its mmap
threshold (128 KiB at start, raised by frees up to 32 MiB on 64-bit) straight from the kernel and
gives it back when the tensor is freed, so the next tensor of that size touches fresh pages: a page
fault per 4 KiB, with the pages zeroed. On the development VM that costs 0.7 s per GB touched against
0.03-0.1 s for reused memory (``docs/benchmarks.md``), which at batch 16 and 224 px is 20-30% of a
ResNet-50's forward, more for models that write full-width outputs into new tensors. jemalloc and
tcmalloc (what PyTorch's CPU performance guide suggests, through ``LD_PRELOAD``) keep freed memory;
``reuse_freed_memory`` gets glibc to do the same, without a new library, through ``mallopt``:

- ``M_MMAP_THRESHOLD`` 1 GiB: blocks up to 1 GiB come from the heap, not from fresh mappings;
- ``M_TRIM_THRESHOLD`` 2 GiB - 1: freed memory at the top of the heap is not given back;
- ``M_TOP_PAD`` 64 MiB: the heap grows in large steps.

It is process-wide and stays for the rest of the process (glibc has no way back to its dynamic
threshold), so a timing run either uses it for every contender or for none. The price is memory:
the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

from ..errors import PartializeError

ALLOCATORS = ("system", "reuse")
_MALLOPT_PARAM = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3}  # glibc's malloc.h
REUSE_SETTINGS = {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": (1 << 31) - 1, "M_TOP_PAD": 64 << 20}
_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_state: dict = {"reuse": False}


@functools.cache
def _libc() -> tuple[str, str]:
    """``platform.libc_ver()``, read once: it scans the Python executable's file."""
    return platform.libc_ver()


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or _libc()[0] != "glibc":
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


def reuse_freed_memory() -> dict:
    """Keep memory freed by tensors in the heap for the next ones (glibc only; see the module
    docstring). Returns :func:`allocator_state`. Raises ``PartializeError`` where the C library is not
    glibc: there, preload jemalloc or tcmalloc instead."""
    if _state["reuse"]:
        return allocator_state()
    lib = _glibc()
    if lib is None:
        raise PartializeError(
            "--allocator reuse needs glibc's malloc (Linux); on this system preload jemalloc or tcmalloc "
            "(LD_PRELOAD) for the same effect, or time with --allocator system"
        )
    for name, value in REUSE_SETTINGS.items():
        if lib.mallopt(_MALLOPT_PARAM[name], value) != 1:
            raise PartializeError(f"glibc refused mallopt({name}, {value}); time with --allocator system")
    _state["reuse"] = True
    return allocator_state()


def use_allocator(name: str) -> dict:
    """``"system"``: leave the process as it is; ``"reuse"``: :func:`reuse_freed_memory`. Asking for
    ``"system"`` after ``"reuse"`` in the same process is an error (it cannot be undone)."""
    if name not in ALLOCATORS:
        raise PartializeError(f"allocator must be one of {', '.join(ALLOCATORS)}, got {name!r}")
    if name == "reuse":
        return reuse_freed_memory()
    if _state["reuse"]:
        raise PartializeError(
            "this process already keeps freed memory (--allocator reuse), which cannot be undone: time "
            "--allocator system in a new process"
        )
    return allocator_state()


def allocator_state() -> dict:
    """What a CPU timing depends on in the allocator: ``"reuse"`` (set by this module) or ``"system"``,
    the C library, and the environment variables that change malloc (a preloaded jemalloc included)."""
    out = {
        "allocator": "reuse" if _state["reuse"] else "system",
        "libc": "-".join(v for v in _libc() if v) or platform.system(),
        "env": {k: os.environ[k] for k in _ENV if k in os.environ},
    }
    if _state["reuse"]:
        out["mallopt"] = dict(REUSE_SETTINGS)
    return out
