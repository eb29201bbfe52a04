"""Training checkpoints: plain dicts of tensors, numbers and strings, readable with
``torch.load(..., weights_only=True)``; written atomically (temp file in the same folder, fsync,
``os.replace``), so a crash or kill at any moment leaves either the old file or the new one."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .._fs import atomic_write
from ..errors import CheckpointError

FORMAT = "partialize.train/1"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``state`` (with ``format`` added) to ``path`` atomically; returns the path."""
    payload = {"format": FORMAT, **state}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return atomic_write(path, write, force=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights_only, nothing unpickled)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path!r} is not a readable training checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {e}. "
            "Start again without --resume (or --force) to retrain; best.pt, where present, holds the best "
            "epoch's weights"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path!r} has format {fmt!r}; expected {FORMAT!r} (a partialize training checkpoint)")
    return state


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors/numbers (weights_only friendly)."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Run a block without touching the training's random streams (Python, NumPy, torch CPU).

    Wraps everything in the loop that is not training (progress bar, evaluation, checkpoint writes,
    logging, callbacks): code there may draw from the global RNGs (importing ``rich.console`` draws
    from Python's ``random``, which timm's augmentation uses), and a resumed process would make that
    draw at a different point of the stream than the uninterrupted one.
    """
    py, np_state, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(th)
