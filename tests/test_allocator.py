"""`--allocator reuse` (partialize.measure.allocator): freed tensor memory stays in the heap.

The setting is process-wide and cannot be undone, so every case that sets it runs in its own Python
process. The oracle is glibc's own accounting (``mallinfo2``: bytes in fresh mappings, free bytes kept
in the heap), not partialize's record of what it set.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt / mallinfo2 are glibc's")

# what glibc says about a 64 MiB tensor while it lives and after it is freed
PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def probe():
        big = torch.ones(16 << 20)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
        mapped_while_alive = libc.mallinfo2().hblkhd
        del big
        return {"mapped_while_alive": mapped_while_alive, "heap_free_after": libc.mallinfo2().fordblks}

    out = {"system": probe()}
    if sys.argv[1] == "reuse":
        import partialize
        out["state"] = partialize.reuse_freed_memory()
        probe()  # the first one grows the heap
        out["reuse"] = probe()
    print(json.dumps(out))
    """
)

MIB64 = 64 << 20


def _run(code: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@needs_glibc
def test_reuse_keeps_a_freed_64mib_tensor_in_the_heap():
    out = json.loads(_run(PROBE, "reuse"))
    # glibc's default: the tensor is its own mapping, given back when freed
    assert out["system"]["mapped_while_alive"] >= MIB64
    assert out["system"]["heap_free_after"] < MIB64
    # reuse: it comes from the heap, and the heap keeps it for the next tensor
    assert out["reuse"]["mapped_while_alive"] < MIB64
    assert out["reuse"]["heap_free_after"] >= MIB64
    assert out["state"]["allocator"] == "reuse"
    assert out["state"]["mallopt"]["M_MMAP_THRESHOLD"] == 1 << 30


@needs_glibc
def test_reuse_is_recorded_where_timings_are_and_cannot_be_undone():
    code = textwrap.dedent(
        """
        import json, torch
        from partialize.errors import PartializeError
        from partialize.measure.allocator import use_allocator
        from partialize.measure.speed import environment_fingerprint, measure_speed
        from partialize.recipe_search.costs import fingerprint

        before = fingerprint(1, 2, "cpu")
        assert use_allocator("system")["allocator"] == "system"
        r = measure_speed({"lin": torch.nn.Conv2d(3, 4, 1)}, 8, batch=2, rounds=1, latency=False,
                          min_round_s=0.0, allocator="reuse")
        after = fingerprint(1, 2, "cpu")
        try:
            use_allocator("system")
            undone = "no error"
        except PartializeError as e:
            undone = str(e)
        print(json.dumps({"cond": r["conditions"]["allocator"],
                          "env": environment_fingerprint(1)["memory_allocator"]["allocator"],
                          "before": before["allocator"], "after": after["allocator"], "undone": undone}))
        """
    )
    out = json.loads(_run(code))
    assert out["cond"] == "reuse" and out["env"] == "reuse"
    # the search's cost cache keeps timings of the two allocators apart
    assert (out["before"], out["after"]) == ("system", "reuse")
    assert "cannot be undone" in out["undone"]


def test_unknown_allocator_is_refused():
    from partialize.errors import PartializeError
    from partialize.measure.allocator import use_allocator

    with pytest.raises(PartializeError, match="system, reuse"):
        use_allocator("jemalloc")


@needs_glibc
def test_cli_bench_allocator_reuse(tmp_path):
    js = tmp_path / "b.json"
    code = textwrap.dedent(
        """
        import sys
        from partialize.cli import main
        main(sys.argv[1:], standalone_mode=True)
        """
    )
    args = ["bench", "models", "torchvision:resnet18", "--input-size", "16", "--batch", "2", "--rounds", "1"]
    _run(code, *args, "--allocator", "reuse", "--json", str(js))
    res = json.loads(js.read_text())
    assert res["conditions"]["allocator"] == "reuse"
    assert res["conditions"]["environment"]["memory_allocator"]["mallopt"]["M_TRIM_THRESHOLD"] == (1 << 31) - 1
