"""Training modes, put back exactly: ``model.train(was)`` after ``model.eval()`` sets every submodule
to the root's mode, so a user's frozen BN (``bn.eval()`` in a training model) came back training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def modes_kept(module: nn.Module) -> Iterator[nn.Module]:
    """After the block, each submodule of ``module`` back in the mode it had before, whatever happened
    inside (something that sets the modes of modules it shares with ``module``, for one)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """``module`` (all of it) in training mode ``training`` inside the block (eval by default); after
    it, each submodule back in the mode it had before (:func:`modes_kept`)."""
    with modes_kept(module):
        module.train(training)
        yield module
