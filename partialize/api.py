"""The public Python API: plan, apply and the whole convert job (what the CLI's ``convert`` runs)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ._fs import check_output
from ._modes import in_mode
from .base_model import build_model, check_runs_at
from .calibration import CalibrationError, CalibrationResult, calibrate_model
from .engine.apply import apply_plan
from .engine.plan import Plan
from .engine.planner import make_plan
from .engine.scan import KINDS, scan_model
from .errors import PartializeError, RecipeError
from .inference import deploy
from .measure.speed import speed_summary
from .ops.registry import list_operators
from .recipe import RATIO_WORDS, SKIP_VARIANTS, check_ratio, load_recipe
from .serialization import save


def _no_override(recipe, ratio, variant, fn: str) -> float | str:
    """``ratio``/``variant`` shape the recipe used when none is given; with a recipe they would be
    ignored, so they are refused. Returns the ratio to use (default 0.25)."""
    if recipe is not None and (ratio is not None or variant is not None):
        given = ", ".join(f"{k}={v!r}" for k, v in (("ratio", ratio), ("variant", variant)) if v is not None)
        raise RecipeError(
            f"partialize.{fn}(model, recipe, {given}): ratio= and variant= set the conversion only when no recipe "
            "is given; with a recipe, set them in it (its defaults: or a rule's ratio:/variant:), or drop the recipe"
        )
    return 0.25 if ratio is None else ratio


def _check_args(model, ratio, variant, example_input, input_size, fn: str) -> None:
    """Refuse bad arguments with the argument's name and the fix (not a pydantic or torch error)."""
    if not isinstance(model, nn.Module):
        raise PartializeError(
            f"partialize.{fn}(model, ...): model must be an nn.Module, got {type(model).__name__}; build it first "
            "(e.g. timm.create_model(name) or partialize.base_model.build_model(spec))"
        )
    try:
        check_ratio(ratio)
    except ValueError:
        raise RecipeError(
            f"partialize.{fn}(..., ratio={ratio!r}): ratio must be a number in (0, 1] (the share of channels "
            f"that keep the expensive op, e.g. 0.25; for partial_attention the share given the cheap mixer) or "
            f"one of {', '.join(RATIO_WORDS)}"
        ) from None
    known = sorted(set(list_operators()) | set(SKIP_VARIANTS))
    if variant is not None and (not isinstance(variant, str) or variant not in known):
        raise RecipeError(
            f"partialize.{fn}(..., variant={variant!r}): unknown variant; use one of {', '.join(known)} "
            "(or register your own with partialize.register_operator)"
        )
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise PartializeError(
            f"partialize.{fn}(..., input_size={input_size!r}): input_size must be a positive int (H = W of the "
            "example input, e.g. 224), or pass example_input=torch.randn(1, 3, H, W)"
        )
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise PartializeError(
            f"partialize.{fn}(..., example_input=...): must be a torch.Tensor (e.g. torch.randn(1, 3, 224, 224)), "
            f"got {type(example_input).__name__}"
        )


def plan(
    model: nn.Module,
    recipe=None,
    *,
    ratio: float | str | None = None,
    variant: str | None = None,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
) -> Plan:
    """Resolve a recipe (path, shipped name, YAML text, dict; default: ``default``) against ``model``.

    Returns an ordered Plan: layer, original, new, params, ratio, delta params/MACs, how each layer
    was found, and the reason for every layer left alone. ``ratio`` (default 0.25) and ``variant`` apply
    only without a recipe (see :func:`apply`).
    """
    ratio = _no_override(recipe, ratio, variant, "plan")
    _check_args(model, ratio, variant, example_input, input_size, "plan")
    return make_plan(model, recipe, example_input=example_input, input_size=input_size, ratio=ratio, variant=variant)


def apply(
    model: nn.Module,
    recipe=None,
    *,
    ratio: float | str | None = None,
    variant: str | None = None,
    inplace: bool = False,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """Convert ``model`` to partial-channel form and return it (a copy unless ``inplace``).

    With no recipe, every eligible 3x3 conv becomes ``variant`` (default PConv) at ``ratio`` (default
    0.25); ``ratio="dynamic"`` gives DPConv, ``"adaptive"`` Ada-PConv. With a recipe, ``ratio`` and
    ``variant`` are refused (a RecipeError): the recipe says them. Weights are inherited; output shape,
    dtype and device are unchanged; the plan is kept on the result (``model._partialize_plan``).
    """
    ratio = _no_override(recipe, ratio, variant, "apply")
    _check_args(model, ratio, variant, example_input, input_size, "apply")
    p = make_plan(model, recipe, example_input=example_input, input_size=input_size, ratio=ratio, variant=variant)
    return apply_plan(model, p, inplace=inplace, example_input=example_input)


def scan(
    model: str | nn.Module,
    input_size: int | None = None,
    *,
    kind: str = "all",
    example_input: torch.Tensor | None = None,
    num_classes: int | None = None,
) -> dict:
    """Every candidate node of ``model`` (a spec as ``convert`` takes, built with random weights, or an
    ``nn.Module``) by kind (``conv``, ``mlp``, ``attention``; ``kind`` picks one, default ``all``), and
    what each registered operator would do there at its default parameters: the layer's MACs before
    and after, or the reason it refuses. Plain data (``format``/``version``, ``nodes``, ``summary``)."""
    if kind != "all" and kind not in KINDS:
        raise PartializeError(f"partialize.scan(..., kind={kind!r}): use one of {', '.join(KINDS)} or all")
    name = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        model = build_model(model, num_classes=num_classes)
    _check_args(model, 0.25, None, example_input, input_size, "scan")
    kinds = KINDS if kind == "all" else (kind,)
    with in_mode(model):  # a model passed in gets each module's own mode back
        if input_size and example_input is None:
            check_runs_at(model, input_size, name, "--input-size")
        return scan_model(model, example_input=example_input, input_size=input_size, kinds=kinds, name=name)


@dataclass
class ConversionResult:
    """What :func:`convert` did: the plan, the converted model (None on a dry run), the side-by-side
    speed of the deployed original and converted models (None when not measured) and the file written."""

    plan: Plan
    model: nn.Module | None = None
    original: nn.Module | None = None
    speed: dict | None = None
    path: str | None = None
    notes: list[str] = field(default_factory=list)
    calibration: CalibrationResult | None = None

    def to_dict(self) -> dict:
        out = {"plan": self.plan.to_dict(), "notes": list(self.notes)}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.speed is not None:
            out["speed"] = self.speed
        if self.path is not None:
            out["out"] = self.path
        return out


def convert(
    model: str | nn.Module,
    recipe=None,
    *,
    weights: str = "random",
    num_classes: int | None = None,
    input_size: int | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    dry_run: bool = False,
    speed: bool = True,
    threads: int = 1,
    batch: int = 16,
    calibrate: str | os.PathLike | None = None,
    calib_images: int = 512,
    calib_steps: int = 200,
    progress: Callable[[str], None] | None = None,
    calib_progress: Callable[[str, int, int, float], None] | None = None,
) -> ConversionResult:
    """The whole ``partialize convert`` job: build ``model`` (a spec, see ``base_model.build_model``, or
    an ``nn.Module``), plan ``recipe`` (default ``default``), convert, time the deployed original and
    converted models side by side (``threads``, latency at batch 1, throughput at ``batch``), and save
    to ``out``. ``out`` is checked before any work: an existing file needs ``force``. ``dry_run`` stops
    after the plan. ``calibrate``: an ImageFolder of unlabelled images (``calib_images`` of them, the
    labels unused) on which the converted model is calibrated against the original before it is timed
    and saved (``partialize.calibrate``; the fidelity report is in the result)."""
    say = progress or (lambda _msg: None)
    if out is not None and not dry_run:  # before the work: an existing or unwritable --out fails now
        out = os.fspath(out)
        out = out if out.endswith(".safetensors") else out + ".safetensors"
        check_output(out, force=force, inputs=[weights] + ([os.fspath(recipe)] if isinstance(recipe, str) else []))
    rec = load_recipe(recipe if recipe is not None else "default")
    size = input_size or rec.input_size
    if calibrate is not None and not os.path.isdir(os.fspath(calibrate)):
        raise CalibrationError(
            f"--calibrate {os.fspath(calibrate)!r} is not a directory: give an ImageFolder of images (labels unused)"
        )
    if isinstance(model, str):
        name = model
        model = build_model(model, weights=weights, num_classes=num_classes)
    else:
        name = type(model).__name__
        _check_args(model, 0.25, None, None, input_size, "convert")
    with in_mode(model):  # evaluated throughout; a model passed in gets each module's own mode back
        if size:
            check_runs_at(model, size, name, "--input-size" if input_size else "the recipe's input_size")
        say(f"planning {name}")
        plan = make_plan(model, rec, input_size=size)
        result = ConversionResult(plan=plan, original=model)
        if weights == "random":
            result.notes.append("weights: random (use weights='pretrained' or a file to convert trained weights)")
        if dry_run:
            if calibrate is not None:
                result.notes.append("dry run: nothing converted, so nothing calibrated (--calibrate was not used)")
            return result
        result.model = apply_plan(model, plan)
        if calibrate is not None:
            if weights == "random":
                result.notes.append("calibrating random weights: it restores the original's function, which is random")
            say(f"calibrating on {calib_images} images of {os.fspath(calibrate)}")
            result.calibration = calibrate_model(
                result.model, model, calibrate, images=calib_images, steps=calib_steps, input_size=size,
                progress=calib_progress,
            )  # fmt: skip
            result.model = result.calibration.model
        if speed:
            say(f"measuring speed of the deployed forms: {threads} thread(s), batch 1 and {batch}")
            example = torch.randn(tuple(plan.input_shape), device=next(model.parameters(), torch.empty(0)).device)
            result.speed = speed_summary(
                deploy(model, example),
                deploy(result.model, example),
                tuple(plan.input_shape[1:]),
                threads=threads,
                batch=batch,
                names=("original", "converted"),
            )
        if out is not None:
            result.path = save(result.model, out, overwrite=force)
        return result
