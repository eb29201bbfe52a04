"""The runs behind ``partialize finetune`` and ``partialize train``: from files and an ImageFolder to a
trained model, its frozen form, ``result.json`` and a report. The CLI parses arguments, calls
:func:`run_finetune` / :func:`run_train` and prints the :class:`RunResult`.

Every option is checked before anything is read or written; under torchrun the process group is
joined before the loaders are built (each rank's ``DistributedSampler`` takes its share) and rank 0
alone writes the outputs. ``log`` receives progress lines, ``warn`` warnings (rank 0).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm.data
import torch
from torch import nn

from .._modes import in_mode
from ..base_model import build_model
from ..engine.planner import make_plan
from ..errors import CheckpointError, PartializeError
from ..measure.report import accuracy_with_notes, build_report, report_markdown
from ..models.partialnet import partialnet_train_settings
from ..serialization import load, read_plan, save
from . import memory
from .config import TrainingError, check_settings
from .data import check_data_dir, image_folder_loaders
from .distributed import init_distributed
from .finetune import finetune
from .loop import FinetuneResult
from .operators import freeze_dynamic

__all__ = ["FINETUNE_DEFAULTS", "TRAIN_DEFAULTS", "RunResult", "interrupted_message", "run_finetune", "run_train"]

# what a setting left at None becomes
FINETUNE_DEFAULTS = dict(
    epochs=30, lr=1e-3, batch_size=64, weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1, mixup=0.0,
    cutmix=0.0, clip_grad=None,
)  # fmt: skip
TRAIN_DEFAULTS = dict(
    epochs=100, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1, mixup=0.0,
    cutmix=0.0, clip_grad=None,
)  # fmt: skip
Printer = Callable[[str], None]


def _stderr_warning(msg: str) -> None:
    sys.stderr.write(f"warning: {msg}\n")


@dataclass
class RunResult:
    """What a run did. ``written`` is False on ranks other than 0 (they write nothing); then the paths
    are None. ``frozen``: each layer's learned structure as frozen into ``frozen`` form (``describe()``:
    DPConv's width, channels, realised ratio)."""

    result: FinetuneResult
    written: bool
    out_dir: str
    model_path: str | None = None
    result_path: str | None = None
    report_paths: list[str] = field(default_factory=list)
    frozen: dict[str, dict] = field(default_factory=dict)


@dataclass
class _Run:
    """The options every run shares (the CLI's common options)."""

    data: str
    out_dir: str = "runs/partialize"
    input_size: int | None = None
    workers: int = 0
    device: str | None = None
    resume: bool = False
    force: bool = False
    report: bool = True
    speed: bool = True
    threads: int = 1
    train_threads: int | None = None  # torch CPU threads while training (None: torch's default)
    log: Printer = print
    warn: Printer = _stderr_warning

    def warning(self, msg: str) -> None:
        if int(os.environ.get("RANK", 0)) == 0:
            self.warn(msg)


def _filled(defaults: dict, settings: dict) -> dict:
    return {**settings, **{k: (settings[k] if settings.get(k) is not None else v) for k, v in defaults.items()}}


# what a run writes into its --out folder
RUN_FILES = ("last.pt", "best.pt", "final.safetensors", "log.jsonl", "result.json", "report.json", "report.md")


def _check(run: _Run, settings: dict) -> None:
    """Every option checked before any file is read or written (a TrainingError naming it). A folder
    holding an earlier run needs ``resume`` (continue it) or ``force`` (its files removed first, so no
    report of the old run stays next to the new model)."""
    check_settings(**settings, input_size=run.input_size, workers=run.workers, threads=run.threads)
    held = [f for f in RUN_FILES if os.path.exists(os.path.join(run.out_dir, f))]
    if not held or run.resume:
        return
    if not run.force:
        raise TrainingError(
            f"--out {run.out_dir!r} already holds a run ({', '.join(held)}): --resume continues it, --force "
            "replaces it, or give another --out"
        )
    if int(os.environ.get("RANK", 0)) == 0:
        for f in held:
            os.remove(os.path.join(run.out_dir, f))


def _leave_group(distributed: bool) -> None:
    if distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def plan_input_size(model: nn.Module, given: int | None) -> tuple[int | None, str]:
    """The training resolution: ``given``, else the size the plan was made at, else the model's (None)."""
    if given:
        return given, "--input-size"
    plan = getattr(model, "_partialize_plan", None)
    shape = tuple(getattr(plan, "input_shape", ()) or ())
    if len(shape) == 4 and shape[-1] == shape[-2]:
        return int(shape[-1]), "the size the model was converted at; --input-size to change"
    return None, "the model's default; --input-size to change"


def _num_outputs(model: nn.Module, size: int) -> int:
    with in_mode(model), torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device)).shape[1])


def _load_trainable(converted: str) -> nn.Module:
    model = load(converted)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError(
            f"{converted!r} is marked deployed, so it loads as the frozen inference form (BN folded, no "
            "trainable parameters), which cannot be fine-tuned; pass the training-form file written by "
            "`partialize convert --out` (or partialize.save(model) without deployed=True)"
        )
    return model


def resolve_teacher(
    teacher: str, teacher_weights: str | None, student: nn.Module, num_classes: int, warn: Printer = _stderr_warning
) -> tuple[nn.Module | None, str]:
    """The distillation teacher and a sentence saying what it is (or why there is none).

    ``original`` rebuilds the base model the converted one came from (its plan records how) and
    needs ``teacher_weights``: the converted file holds only the converted weights, and a teacher
    with random weights would teach noise, so without them distillation is switched off.
    """
    if teacher == "none":
        return None, "distillation off (--teacher none)"
    if teacher == "original":
        plan = getattr(student, "_partialize_plan", None)
        spec = plan.model if plan is not None else None
        if not spec:
            return None, "distillation off: the converted model does not record its base model"
        if not teacher_weights:
            warn(
                "--teacher original: the original's trained weights are not stored in the converted file; "
                "pass --teacher-weights PATH (a state_dict of the unconverted model) to distil from it. "
                "Distillation is OFF for this run (a random-weight teacher would only add noise)."
            )
            return None, "distillation off: original model's weights not given (--teacher-weights)"
        t = build_model(spec["spec"], weights=teacher_weights, **spec.get("kwargs", {}))
        return t, f"original {spec['spec']} with weights {teacher_weights}"
    if os.path.exists(teacher):
        try:
            read_plan(teacher)
        except CheckpointError:
            raise CheckpointError(
                f"--teacher {teacher!r} is not a partialize model file; for a plain state_dict give the "
                "architecture: --teacher MODEL --teacher-weights PATH"
            ) from None
        return load(teacher), f"converted model {teacher}"
    weights = teacher_weights or "random"
    if weights == "random":
        warn(f"--teacher {teacher}: no --teacher-weights, so it would have random weights; distillation is OFF.")
        return None, f"distillation off: {teacher} has no weights (--teacher-weights PATH or pretrained)"
    t = build_model(teacher, weights=weights, num_classes=num_classes)
    return t, f"{teacher} with weights {weights}"


def _train(model, loaders, run: _Run, settings: dict, *, teacher=None, run_settings=None) -> FinetuneResult:
    """finetune() on the loaders with the run's outputs, device and logging."""
    settings = {k: v for k, v in settings.items() if k != "batch_size"}
    return finetune(
        model, loaders.train, loaders.val, teacher=teacher, num_classes=loaders.num_classes, out_dir=run.out_dir,
        resume=run.resume, device=run.device, input_size=loaders.input_size, log=run.log,
        run_settings=run_settings or {}, **settings,
    )  # fmt: skip


def run_finetune(
    converted: str,
    data: str,
    *,
    teacher: str = "original",
    teacher_weights: str | None = None,
    log: Printer = print,
    warn: Printer = _stderr_warning,
    **options: Any,
) -> RunResult:
    """Fine-tune the partialize model file ``converted`` on the ImageFolder ``data`` (``partialize finetune``).

    ``options``: the run's (``out_dir``, ``input_size``, ``workers``, ``device``, ``resume``, ``report``,
    ``speed``, ``threads``) and the training settings of :func:`~partialize.train.finetune` plus
    ``batch_size``; a setting that is None takes :data:`FINETUNE_DEFAULTS`. Distils from ``teacher``
    (``original`` with ``teacher_weights``, a model name, a model file, or ``none``).
    """
    run, settings = _split(data, log, warn, options)
    settings = _filled(FINETUNE_DEFAULTS, settings)
    _check(run, settings)  # before anything is read or written
    check_data_dir(data)
    distributed = init_distributed()  # before any loader: the DistributedSampler reads the world size
    model = _load_trainable(converted)
    size, why = plan_input_size(model, run.input_size)
    loaders = image_folder_loaders(
        data, model, batch_size=settings["batch_size"], input_size=size, seed=settings.get("seed") or 0,
        workers=run.workers,
    )  # fmt: skip
    log(f"resolution: {loaders.input_size}x{loaders.input_size} ({why})")
    n_out = _num_outputs(model, loaders.input_size)
    if n_out != loaders.num_classes:
        raise PartializeError(
            f"{converted!r} has {n_out} outputs but {data!r} has {loaders.num_classes} classes; convert with "
            f"--num-classes {loaders.num_classes}"
        )
    t, about = resolve_teacher(teacher, teacher_weights, model, loaders.num_classes, run.warning)
    log(f"data: {loaders.description}\nteacher: {about}")
    result = _train(model, loaders, run, settings, teacher=t)
    _leave_group(distributed)
    if int(os.environ.get("RANK", 0)) != 0:
        return RunResult(result, written=False, out_dir=run.out_dir)
    baseline = t if teacher == "original" else None
    spec = model._partialize_plan.model
    if baseline is None and spec:
        baseline = build_model(spec["spec"], weights="random", **spec.get("kwargs", {}))
    name = f"{os.path.basename(converted)} fine-tuned"
    return _finish(model, result, run, loaders.input_size, name, baseline, t is not None and teacher == "original")


def _split(data: str, log: Printer, warn: Printer, options: dict) -> tuple[_Run, dict]:
    """The run's own options and the training settings."""
    own = {k: options.pop(k) for k in list(options) if k in _Run.__dataclass_fields__ and k not in ("log", "warn")}
    own = {k: v for k, v in own.items() if v is not None}
    run = _Run(data=data, log=log, warn=warn, **own)
    if run.train_threads is not None:
        if not (isinstance(run.train_threads, int) and run.train_threads >= 1):
            raise TrainingError(f"--train-threads (train_threads=) must be an integer >= 1, got {run.train_threads!r}")
        torch.set_num_threads(run.train_threads)
    return run, options


def _finish(model, result, run: _Run, input_size: int, name: str, baseline, baseline_weighted: bool) -> RunResult:
    """Rank 0: the final model file, its frozen form's learned structure in result.json, the report."""
    model = model.cpu()
    path = save(model, os.path.join(run.out_dir, "final.safetensors"), overwrite=True)  # a rerun replaces it
    frozen = copy.deepcopy(model)
    ratios = freeze_dynamic(frozen)
    result_path = os.path.join(run.out_dir, "result.json")
    with open(result_path, "w") as f:
        json.dump({**result.to_dict(), "frozen_ratios": ratios}, f, indent=2)
    out = RunResult(result, True, run.out_dir, model_path=path, result_path=result_path, frozen=ratios)
    if run.report:
        out.report_paths = _report(frozen, run, input_size, name, baseline, baseline_weighted)
    return out


def _report(frozen, run: _Run, input_size: int, name: str, baseline, weighted: bool) -> list[str]:
    """report.json and report.md: the frozen model against ``baseline`` (its accuracy only when ``weighted``)."""
    both = baseline is not None and weighted
    has_val = os.path.isdir(os.path.join(run.data, "val"))  # without it there is nothing held out to score
    rep = build_report(
        frozen, name=name, input_size=input_size, baseline=baseline.cpu().eval() if baseline is not None else None,
        baseline_name="original", speed=run.speed, threads=run.threads,
        data=run.data if has_val and (both or baseline is None) else None, progress=run.log,
    )  # fmt: skip
    if not has_val:
        for m in rep.entries():
            m.notes = [n for n in m.notes if not n.startswith("accuracy")]
            m.notes.append(f"accuracy not measured: {run.data!r} has no val/ folder")
    elif baseline is not None and not both:
        rep.model.accuracy, said = accuracy_with_notes(frozen, run.data, input_size=input_size)
        rep.model.notes = [n for n in rep.model.notes if not n.startswith("accuracy")] + said
        rep.baseline.notes.append("accuracy not measured: the original's trained weights were not given")
    paths = [os.path.join(run.out_dir, "report.json"), os.path.join(run.out_dir, "report.md")]
    rep.to_json(paths[0])
    with open(paths[1], "w") as f:
        f.write(report_markdown(rep))
    return paths


def interrupted_message(out_dir: str) -> str:
    """What an interrupted run leaves: the last epoch's checkpoint (written atomically) and how to go on."""
    last, log = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(last):
        return f"no epoch had finished, so nothing was saved in {out_dir!r}; rerun the same command to start over"
    epoch = "the last finished epoch"
    try:
        with open(log) as f:
            lines = [line for line in f if line.strip()]
        epoch = f"epoch {json.loads(lines[-1])['epoch']}"
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return (
        f"the checkpoint {last!r} ({epoch}) is kept; run the same command with --resume to continue from it "
        "(the interrupted epoch is trained again)"
    )


# --- partialize train: a model from scratch ---------------------------------------------------------


def _train_defaults(model_spec: str, settings: dict, log: Printer) -> tuple[dict, dict, str | None, str]:
    """Defaults for ``model_spec``: 001 Table 7 for the native family (said, with what the user overrode),
    else :data:`TRAIN_DEFAULTS`. Returns (defaults, model kwargs, RandAugment, where the batch came from)."""
    defaults = dict(TRAIN_DEFAULTS)
    if not model_spec.startswith("partialnet_"):
        return defaults, {}, None, "the default"
    s = partialnet_train_settings(model_spec)
    defaults.update(
        epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"], weight_decay=s["weight_decay"],
        warmup_epochs=s["warmup_epochs"], label_smoothing=s["label_smoothing"], mixup=s["mixup_alpha"] or 0.0,
        cutmix=s["cutmix_alpha"] or 0.0, clip_grad=s["clip_grad"],
    )  # fmt: skip
    extra = {"drop_path_rate": s["drop_path_rate"]}
    given = {k for k in defaults if settings.get(k) is not None}
    log(
        f"defaults from {s['source']} for {s['model']}: "
        + ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in given)
        + f", drop_path_rate={s['drop_path_rate']}, rand_augment={s['rand_augment']}"
        + (f"; overridden: {', '.join(sorted(given))}" if given else "")
    )
    log(
        "not reproduced: multi-resolution training (one size per run here), repeated 300-epoch ImageNet "
        "schedule is yours to choose; lr is not rescaled when you change --batch-size"
    )
    return defaults, extra, s["rand_augment"], f"{s['source']}, a global batch over many GPUs"


def fit_batch(model: nn.Module, wanted: int, given: bool, size: int, run: _Run, n_images: int, source: str) -> int:
    """The per-process batch: ``wanted`` when it fits this machine's memory (estimated, see
    partialize.train.memory); otherwise, when it was a default, the largest power of two that fits,
    said in the log; a batch given explicitly is kept, with a warning."""
    dev = run.device or ("cuda" if torch.cuda.is_available() else "cpu")
    want = min(wanted, n_images)  # the loader cannot make a larger batch than the data
    avail = memory.available_bytes(dev)
    if torch.device(dev).type == "cpu":  # processes on one machine share its memory (torchrun sets this)
        avail //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    batch, info = memory.fit_batch_size(model.to(dev), size, want, avail, dev)
    if batch == want:
        return wanted
    if given:
        run.warning(f"--batch-size {wanted} may not fit in memory at {size}x{size}: {memory.describe(info)}; at "
                    f"most about {max(1, info['fits'])} images per step would")  # fmt: skip
        return wanted
    if batch == 0:
        raise TrainingError(
            f"not even one image fits in memory at {size}x{size} for training: {memory.describe(info)}; "
            "lower --input-size or free memory"
        )
    run.log(f"batch: {batch} per process, not {wanted} ({source}): {min(wanted, n_images)} would not fit this "
            f"machine's memory at {size}x{size}: {memory.describe(info)}. --batch-size overrides; lr is not "
            "rescaled (--lr to change)")  # fmt: skip
    return batch


def native_plan(model: nn.Module, size: int) -> None:
    """Attach a plan with no conversions to a natively built model, so the run writes a partialize
    model file (loadable by load/export/report): the plan names how to rebuild it."""
    recipe = {"version": 1, "name": "native", "description": "trained as built: nothing converted",
              "strict": False, "rules": [{"select": {"name": "__nothing__"}, "variant": "skip"}]}  # fmt: skip
    with in_mode(model):
        model._partialize_plan = make_plan(model, recipe, input_size=size)


def run_train(
    model_spec: str, data: str, *, log: Printer = print, warn: Printer = _stderr_warning, **options: Any
) -> RunResult:
    """Train ``model_spec`` from scratch on the ImageFolder ``data`` (``partialize train``): the
    native family with 001 Table 7's settings, other models with :data:`TRAIN_DEFAULTS`, a batch that
    fits memory when it was not given; writes a partialize model file. ``options`` as :func:`run_finetune`."""
    from torchvision import datasets

    run, settings = _split(data, log, warn, options)
    defaults, extra, rand_augment, source = _train_defaults(model_spec, settings, log)
    given_batch = settings.get("batch_size") is not None
    settings = _filled(defaults, settings)
    _check(run, settings)  # before anything is read or written
    check_data_dir(data)
    distributed = init_distributed()  # before any loader: the DistributedSampler reads the world size
    train_folder = datasets.ImageFolder(os.path.join(data, "train"))
    torch.manual_seed(settings.get("seed") or 0)  # the seed also fixes the initial weights
    model = build_model(model_spec, weights="random", num_classes=len(train_folder.classes), **extra)
    size, why = plan_input_size(model, run.input_size)
    if size is None:
        size = int(timm.data.resolve_data_config({}, model=model)["input_size"][-1])
    settings["batch_size"] = fit_batch(model, settings["batch_size"], given_batch, size, run, len(train_folder), source)
    native_plan(model.cpu(), size)
    loaders = image_folder_loaders(
        data, model, batch_size=settings["batch_size"], input_size=size, seed=settings.get("seed") or 0,
        workers=run.workers, rand_augment=rand_augment,
    )  # fmt: skip
    log(f"resolution: {loaders.input_size}x{loaders.input_size} ({why})\ndata: {loaders.description}")
    run_settings = {"model": model_spec, "rand_augment": rand_augment, **extra}
    result = _train(model, loaders, run, settings, run_settings=run_settings)
    _leave_group(distributed)
    if int(os.environ.get("RANK", 0)) != 0:
        return RunResult(result, written=False, out_dir=run.out_dir)
    return _finish(model, result, run, loaders.input_size, model_spec, None, False)
