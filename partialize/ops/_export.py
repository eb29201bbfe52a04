"""How the operators behave under exporters.

Eager inference forms write into slices of one output (``out[:, :n] = conv(...)``, ``out=`` views):
one pass fewer than a concatenation. The TorchScript-based ONNX exporter (``dynamo=False``) records
those in-place writes into views wrongly (a deployed ResNet-18 came out 99% wrong), and tracing bakes
data-dependent routing (Ada-PConv) into the graph. So every such forward asks :func:`exporting` and,
under ``torch.jit.trace``, ``torch.onnx.export`` (either exporter) or ``torch.compile``/``torch.export``,
computes the same function out of place with concatenations. ``torch.jit.script`` cannot compile the
operators (dynamic channel slicing helpers, caches): :class:`RefuseScript` makes it fail with a clear
:class:`~partialize.errors.ExportError` instead of a compiler trace.
"""

from __future__ import annotations

import torch

from ..errors import ExportError


@torch.jit.unused
def _python_exporting() -> bool:
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def exporting() -> bool:
    """True while a graph is being captured (tracing, ONNX export, torch.compile / torch.export)."""
    if torch.jit.is_scripting():
        return False
    return _python_exporting()


class RefuseScript:
    """Mixin: ``torch.jit.script`` on a model holding this module raises ExportError with the way out."""

    def __prepare_scriptable__(self):
        raise ExportError(
            f"torch.jit.script cannot compile partialize's {type(self).__name__}; export the deployed model with "
            "torch.jit.trace, torch.onnx.export (either exporter) or `partialize export --format onnx|torchscript`, "
            "which produce the same function"
        )
