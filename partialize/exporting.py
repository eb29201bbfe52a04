"""Export a converted model in inference form: ONNX (checked under onnxruntime), TorchScript, safetensors.

Every export starts from ``partialize.deploy(model)`` (BN folded, PAT_sp merged, DPConv frozen, Ada-PConv
hard-routed, PConv slicing) and is verified against it on the same random input, and on a batch of
another size, before the file is moved into place; an existing file is never overwritten unless
``force``.

The operators know how to be captured in a graph (``partialize.ops._export``): under tracing and
either ONNX exporter they compute the same function out of place, and an input-adaptive operator
(Ada-PConv) runs every branch and selects per sample, since a graph cannot group the batch by routing.
Where that changes the cost, the operator says so (``export_note()``) and the export result carries
the note. ONNX goes through the dynamo exporter (dynamic batch axis); the TorchScript-based one
(``dynamo=False``) gives the same result on the deployed forms (tests/test_export_ops.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import serialization as pio
from ._fs import atomic_write
from .base_model import check_runs_at
from .errors import PartializeError
from .inference import deploy, eval_reference
from .ops.registry import operators_in

__all__ = ["ExportResult", "FORMATS", "export", "export_notes", "export_onnx", "export_torchscript"]

FORMATS = ("onnx", "torchscript", "safetensors")
TOLERANCE = 1e-4


def _deployed(model: nn.Module, example: torch.Tensor, tol: float) -> tuple[nn.Module, float | None]:
    """The inference form of ``model`` and, when this call deployed it, its relative error against the
    eval-mode trained model on ``example`` (checked: over ``tol`` nothing is written)."""
    if getattr(model, "_partialize_deployed", False):
        return model, None
    deployed = deploy(model, example)
    with torch.no_grad():  # Ada-PConv: the reference routes hard as well (see eval_reference)
        derr = rel_err(deployed(example), eval_reference(model)(example))
    _check(derr, "deployed model vs eval-mode trained model", tol)
    return deployed, derr


def export_notes(model: nn.Module) -> list[str]:
    """What the operators of a deployed ``model`` say an exported graph does differently (once each),
    with how many layers each note is about."""
    counts: dict[str, int] = {}
    for op in operators_in(model).values():
        note = op.export_note()
        if note:
            counts[note] = counts.get(note, 0) + 1
    return [f"{note} ({n} layer(s))" for note, n in counts.items()]


@dataclass
class ExportResult:
    """What an export wrote and how it was checked."""

    path: str
    format: str
    input_shape: tuple[int, ...]
    max_rel_err: float | None = None  # exported file vs deployed PyTorch model, same input
    deploy_rel_err: float | None = None  # deployed vs eval-mode trained model, same input
    notes: list[str] = field(default_factory=list)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the relative error used by every check)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check(err: float, what: str, tol: float) -> None:
    if not err <= tol:  # also catches NaN
        raise PartializeError(
            f"{what}: max relative error {err:.2e} > {tol:.0e}; nothing was written. "
            "Please report this with the model and recipe."
        )


def export_onnx(
    model: nn.Module,
    path: str,
    example: torch.Tensor,
    *,
    force: bool = False,
    tol: float = TOLERANCE,
    opset: int | None = None,
) -> ExportResult:
    """Export the inference form of ``model`` to ONNX (dynamo exporter, dynamic batch) and verify it
    under onnxruntime on ``example`` and on a batch of another size before writing ``path``. A model
    not yet deployed is deployed here and checked against its eval-mode self on ``example`` first."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime as ort
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise PartializeError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
            "pip install 'partialize[export]'"
        ) from None

    eager, derr = _deployed(model, example, tol)
    net = eager
    other = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=torch.Generator().manual_seed(1))
    # torch.export specialises a dimension of size 1, so trace with at least 2 samples to keep the batch
    # axis dynamic; one eager call first fills PAT_sf's position-index cache for this H x W (the index
    # becomes a constant of the graph instead of a cdist, which has no ONNX lowering)
    traced_x = example if example.shape[0] >= 2 else other[:2]
    with torch.no_grad():
        net(traced_x)
    errs: list[float] = []

    def write_and_check(tmp: str) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                net,
                (traced_x,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                input_names=["input"],
                output_names=["output"],
                opset_version=opset,
                verbose=False,
            )
            prog.save(tmp)
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        for x in (example, other):
            with torch.no_grad():
                ref = eager(x)  # eager hard routing, not the select form that was exported
            got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
            errs.append(rel_err(got, ref))
        _check(max(errs), "ONNX model under onnxruntime vs deployed PyTorch model", tol)

    atomic_write(path, write_and_check, force=force)
    res = ExportResult(os.fspath(path), "onnx", tuple(example.shape), max(errs), derr)
    res.notes.append(
        f"verified with onnxruntime {ort.__version__} at batch {example.shape[0]} and "
        f"{example.shape[0] + 1}; batch axis dynamic, spatial size fixed at "
        f"{example.shape[-2]}x{example.shape[-1]}"
    )
    res.notes.extend(export_notes(eager))
    return res


def export_torchscript(
    model: nn.Module, path: str, example: torch.Tensor, *, force: bool = False, tol: float = TOLERANCE
) -> ExportResult:
    """Trace the inference form of ``model`` to TorchScript (``torch.jit.trace``) and verify it on
    ``example`` and on a batch of another size before writing ``path`` (a model not yet deployed is
    deployed here and checked against its eval-mode self first). The input's spatial size is fixed by
    the trace; the batch size is not."""
    eager, derr = _deployed(model, example, tol)
    net = eager
    errs: list[float] = []

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(net, (example,), check_trace=False)
            torch.jit.save(traced, tmp)
            loaded = torch.jit.load(tmp)
            other = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=torch.Generator().manual_seed(1))
            for x in (example, other):
                errs.append(rel_err(loaded(x), eager(x)))
        _check(max(errs), "TorchScript model vs deployed PyTorch model", tol)

    atomic_write(path, write, force=force)
    res = ExportResult(os.fspath(path), "torchscript", tuple(example.shape), max(errs), derr)
    res.notes.append("torch.jit.trace: spatial size fixed at export; load with torch.jit.load")
    res.notes.extend(export_notes(eager))
    return res


def export(
    checkpoint: str,
    fmt: str,
    out: str | None = None,
    *,
    input_size: int | None = None,
    batch: int = 1,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Load ``checkpoint`` (a partialize .safetensors), deploy it and write it as ``fmt``.

    ``safetensors`` writes the trained tensors and the plan with ``deployed: true``: ``partialize.load``
    replays the plan, loads the tensors and deploys (deterministic, tested bit-for-bit). The other
    formats are checked against the deployed model on the same input (relative error <= 1e-4).
    """
    if fmt not in FORMATS:
        raise PartializeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    say = progress or (lambda _msg: None)
    plan = pio.read_plan(checkpoint)  # validates format before anything else happens
    if out is None:
        stem = os.fspath(checkpoint).removesuffix(".safetensors")
        out = stem + {"onnx": ".onnx", "torchscript": ".ts.pt", "safetensors": ".deployed.safetensors"}[fmt]
    if os.path.abspath(out) == os.path.abspath(checkpoint):
        raise PartializeError(f"--out {out!r} is the input checkpoint; choose another path")
    if os.path.exists(out) and not force:
        raise PartializeError(f"{out!r} already exists; pass --force to overwrite it")
    say(f"loading {checkpoint}")
    trained = pio.load(checkpoint, deployed=False).eval()
    if input_size:  # a size the model cannot take: the reason and the fix, not a traceback from the exporter
        check_runs_at(trained, input_size, os.path.basename(os.fspath(checkpoint)), "--input-size")
        hw = (input_size, input_size)
    else:  # the shape the model was converted at, H x W as it was (not W x W)
        hw = tuple(plan.input_shape[-2:]) if len(plan.input_shape or ()) == 4 else (224, 224)
    chans = plan.input_shape[1] if len(plan.input_shape) == 4 else 3
    example = torch.randn(batch, chans, *hw, generator=torch.Generator().manual_seed(0))
    say("deploying (BN folded, PAT_sp merged, DPConv frozen, Ada-PConv hard routing)")
    deployed, derr = _deployed(trained, example, TOLERANCE)
    if fmt == "safetensors":
        say(f"writing {out}")
        path = pio.save(trained, out, deployed=True, overwrite=force)
        redo = pio.load(path)
        with torch.no_grad():
            err = rel_err(redo(example), deployed(example))
        if not err <= TOLERANCE:  # the file does not reproduce the deployed model: do not leave it
            os.remove(path)
            _check(err, "reloaded safetensors vs deployed model", TOLERANCE)
        res = ExportResult(path, fmt, tuple(example.shape), err)
        res.notes.append("trained tensors + plan with deployed=true: partialize.load(path) returns the deployed model")
    elif fmt == "onnx":
        say(f"exporting ONNX (torch.onnx dynamo exporter) and checking it with onnxruntime -> {out}")
        res = export_onnx(deployed, out, example, force=force)
    else:
        say(f"tracing TorchScript -> {out}")
        res = export_torchscript(deployed, out, example, force=force)
    res.deploy_rel_err = derr
    return res
