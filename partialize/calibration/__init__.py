"""Keep what the model knew: calibrate a converted model on unlabelled images, the original as target.

``partialize.calibrate(model, original, data)`` returns a calibrated copy (``model`` and ``original``
are untouched). Steps, in order (each measured in docs/benchmarks.md):

1. **channel choice** (``permute.py``): the original's coupled channel groups are reordered by
   importance so the converted convs compute the most important channels; the permutation leaves
   the original's function unchanged (checked), and the plan is replayed on the permuted original.
   Only for a model that still holds the weights ``apply`` gave it (fine-tuned weights are kept).
   **head choice** (``"heads"``, not a default step): what operators choose from the data
   (``PartialOperator.data_params``: the heads ``partial_attention`` keeps and the head
   ``single_head_attention`` starts from, by what each adds to the output) merged into the plan
   before it is replayed; measured no better than the default heads on a ViT-Tiny (docs/calibration.md).
2. **BN statistics** re-estimated on the converted model (``"bn"``, ``steps.recalibrate_bn``); or, not
   a default step, matched to the original's (``"bn_match"``, ``steps.match_bn_statistics``): each BN
   normalises what it now receives to the mean and spread the original's BN gives its own input on
   the same images, so a BN whose input the conversion did not change keeps its statistics, and
   distillation then keeps them (BN in eval mode). The two agree where the images match the
   original's training data; measured in docs/calibration.md.
3. **closed-form refit** of each BN after a converted layer (``steps.refit_bn_affine``); not in the
   default steps: measured to lower accuracy after step 2 (docs/calibration.md).
4. **block-wise distillation** of each block holding converted layers (``steps.distil_blocks``).

A :class:`Fidelity` report (agreement with the original, KL, per-layer feature error) is taken
before and after, on held-out calibration images, and kept on the result (``CalibrationResult``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..engine.apply import apply_plan
from .data import CalibrationError, calibration_images
from .fidelity import Fidelity, fidelity
from .permute import permute_by_importance
from .steps import distil_blocks, match_bn_statistics, recalibrate_bn, refit_bn_affine

__all__ = ["CalibrationError", "CalibrationResult", "Fidelity", "calibrate", "calibrate_model", "fidelity"]

STEPS = ("channels", "heads", "bn", "bn_match", "refit", "distil")
#: what runs by default: the closed-form BN refit is measured to hurt after BN recalibration, the
#: head choice from data measured no better than the last heads on a ViT-Tiny, and BN statistics
#: matched to the original's ("bn_match") measured better than re-estimation on calibration images of
#: another contrast but worse on blurred or brighter ones (docs/calibration.md)
DEFAULT_STEPS = ("channels", "bn", "distil")


@dataclass
class CalibrationResult:
    """What calibration did: the calibrated model, fidelity before and after (held-out images), per
    block distillation errors, the steps run, notes and the time it took."""

    model: nn.Module
    before: Fidelity
    after: Fidelity
    steps: list[str]
    blocks: dict[str, dict] = field(default_factory=dict)
    refitted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        # not asdict(self): it would deep-copy the calibrated model only to drop it
        skip = ("model", "before", "after")  # the model is dropped; the fidelities have their own to_dict
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        return d | {"before": self.before.to_dict(), "after": self.after.to_dict()}


def _fresh(model: nn.Module, original: nn.Module) -> bool:
    """True when ``model`` still holds exactly what ``apply`` gives ``original`` (nothing trained yet)."""
    plan = model._partialize_plan
    again = apply_plan(original, plan, check=False)
    a, b = again.state_dict(), model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def calibrate_model(
    model: nn.Module,
    original: nn.Module,
    data: str | os.PathLike | torch.Tensor | Iterable,
    *,
    images: int = 512,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    input_size: int | None = None,
    use: tuple[str, ...] = DEFAULT_STEPS,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> CalibrationResult:
    """Calibrate a copy of ``model`` (converted from ``original`` by partialize) and report fidelity;
    see the module docstring. ``use`` picks steps from ``STEPS``; ``steps`` is the number of
    distillation steps per block."""
    t0 = time.perf_counter()
    plan = getattr(model, "_partialize_plan", None)
    if plan is None:
        raise CalibrationError("calibrate needs a model converted by partialize (partialize.apply / convert)")
    unknown = sorted(set(use) - set(STEPS))
    if unknown:
        raise CalibrationError(f"unknown calibration step(s) {unknown}; choose from {', '.join(STEPS)}")
    if "bn" in use and "bn_match" in use:
        raise CalibrationError(
            "use either 'bn' (re-estimate BN statistics) or 'bn_match' (match the original's), not both"
        )
    if steps < 0 or lr <= 0 or batch_size < 1:
        raise CalibrationError(f"steps must be >= 0, lr > 0 and batch_size >= 1 (got {steps}, {lr}, {batch_size})")
    size = input_size or (tuple(plan.input_shape[-2:]) if plan.input_shape else None)  # the plan's H x W
    # ``images`` to calibrate on and, beyond them, an eighth as many (16-256) held out for the fidelity
    # report; a folder with fewer images gives an eighth of what it has to the held-out set
    extra = min(max(16, images // 8), 256)
    x = calibration_images(data, original, images + extra, input_size=size, seed=seed)
    held = extra if x.shape[0] >= images + extra else max(1, x.shape[0] // 8) if x.shape[0] > 1 else 0
    x, check = (x[:-held], x[-held:]) if held else (x, x)
    layers = [e.layer for e in plan.converted_outermost]
    notes: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        reference, cal, plan = _start(model, original, plan, layers, x, use, notes)
        _trainable_as(cal, model)
        before = fidelity(model, original, check)
        refitted, blocks = _run_steps(cal, reference, layers, x, use, steps, lr, batch_size, seed, progress)
    after = fidelity(cal, reference, check)
    if after.kl > before.kl:  # the BN step has no guard: images unlike the original's data can do this
        notes.append(
            f"calibration left the model further from the original on the held-out images (KL {before.kl:.3g} -> "
            f"{after.kl:.3g}); if the calibration images differ from the original's training data, try "
            "use=('channels', 'bn_match', 'distil')"
        )
    cal._partialize_plan = plan  # with the choices made from data, if any
    return CalibrationResult(
        cal, before, after, [s for s in STEPS if s in use], blocks, refitted, notes, int(x.shape[0]),
        time.perf_counter() - t0,
    )  # fmt: skip


def _trainable_as(cal: nn.Module, model: nn.Module) -> None:
    """Give ``cal`` the requires_grad flags of ``model``'s parameters (True for any it lacks): ``cal``
    may be rebuilt from the original, whose flags (a frozen teacher's, say) must not decide what
    calibration trains or what the calibrated model can fine-tune."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in cal.named_parameters():
        p.requires_grad_(flags.get(n, True))


def _start(model, original, plan, layers, x, use, notes):
    """(the reference the calibrated model is compared with, the model to calibrate, its plan)."""
    if "channels" in use or "heads" in use:
        if _fresh(model, original):
            if "channels" in use:
                reference, more = permute_by_importance(original, layers, x)
                notes += more
            else:
                reference = copy.deepcopy(original).eval()
            if "heads" in use:
                plan = _choose_from_data(reference, plan, x, notes)
            return reference, apply_plan(reference, plan, check=False).eval(), plan
        notes.append("channel choice skipped: the model's weights are no longer what apply gave it (kept)")
    return copy.deepcopy(original).eval(), copy.deepcopy(model).eval(), plan


def _choose_from_data(reference: nn.Module, plan, x: torch.Tensor, notes: list[str], images: int = 256):
    """The plan with each converted layer's data-chosen parameters (``PartialOperator.data_params``:
    the heads an attention keeps...) merged in, from the layer's calls on the calibration images."""
    from ..engine._calls import capture_calls
    from ..ops import get_operator
    from ..ops.base import PartialOperator

    wanted = [
        e for e in plan.converted_outermost
        if get_operator(e.variant).data_params.__func__ is not PartialOperator.data_params.__func__
    ]  # fmt: skip
    if not wanted:
        return plan
    calls = capture_calls(reference, x[:images], [e.layer for e in wanted])
    chosen = {}
    for e in wanted:
        more = get_operator(e.variant).data_params(reference.get_submodule(e.layer), calls[e.layer], dict(e.params))
        if more:
            chosen[e.layer] = more
    if not chosen:
        return plan
    notes.append(
        f"choice from data: {len(chosen)} layer(s) ({', '.join(sorted({k for c in chosen.values() for k in c}))})"
    )
    entries = [
        dataclasses.replace(e, params={**e.params, **chosen[e.layer]}) if e.layer in chosen else e for e in plan.entries
    ]
    return dataclasses.replace(plan, entries=entries)


def _run_steps(cal, reference, layers, x, use, steps, lr, batch_size, seed, progress):
    refitted: list[str] = []
    blocks: dict[str, dict] = {}
    if "bn" in use:
        recalibrate_bn(cal, x)
    if "bn_match" in use:
        match_bn_statistics(cal, reference, x)
    if "refit" in use:
        refitted = refit_bn_affine(cal, reference, layers, x)
    if "distil" in use and steps > 0:
        # matched statistics are not the batch's own where the images are not the original's data:
        # distillation then normalises with them (BN in eval mode), or it would train against others
        blocks = distil_blocks(cal, reference, layers, x, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                               bn_train="bn_match" not in use, progress=progress)  # fmt: skip
    return refitted, blocks


def calibrate(model: nn.Module, original: nn.Module, data, *, images: int = 512, **kwargs) -> nn.Module:
    """A calibrated copy of ``model`` (see :func:`calibrate_model`, which also returns the fidelity
    report; it is kept on the result as ``model.calibration``)."""
    res = calibrate_model(model, original, data, images=images, **kwargs)
    res.model.calibration = res.to_dict()
    return res.model
