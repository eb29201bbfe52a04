"""What a fine-tuning run is told: :class:`FinetuneConfig` (validated), the checks every setting goes
through, and the names messages give them (the CLI option and the API keyword, as the user typed one).

Settings come in two kinds. The trainer's own (epochs, lr, distillation, EMA, ...) are fields of
:class:`FinetuneConfig`; the operator families' (``--theta``, ``--target-macs``, ``--router-budget``,
``--ada-routing``...) are declared by the operators (``PartialOperator.training_settings``) and travel
in ``FinetuneConfig.operator_settings``, checked against the declarations and passed to each family's
``training_objective``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..ops.base import PartialOperator, TrainingError, TrainingSetting
from ..ops.registry import get_operator, list_operators

__all__ = ["OPTION", "FinetuneConfig", "TrainingError", "check_settings", "declared_settings", "option_name"]

# the trainer's settings -> CLI option, for messages that must name what the user typed
OPTION = {
    "epochs": "--epochs", "lr": "--lr", "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
    "min_lr": "min_lr", "label_smoothing": "--smoothing", "mixup": "--mixup", "cutmix": "--cutmix",
    "kd_temperature": "--kd-temperature", "kd_weight": "--kd-weight", "ema_decay": "--ema", "clip_grad": "--clip-grad",
    "seed": "--seed", "gate_lr_scale": "--gate-lr-scale", "teacher": "--teacher/--teacher-weights",
    "amp": "--amp/--no-amp", "num_classes": "the data's classes", "steps_per_epoch": "--batch-size or the data",
    "batch_size": "--batch-size", "train_images": "--data", "world_size": "the number of processes",
    "input_size": "--input-size", "workers": "--workers", "threads": "--threads",
}  # fmt: skip

# key, test, what it must be, the fix (numbers: finite, not bool, checked first)
_RULES: list[tuple[str, Callable[[float], bool], str, str]] = [
    ("epochs", lambda v: v >= 1 and v == int(v), "an integer >= 1", "e.g. --epochs 30"),
    ("batch_size", lambda v: v >= 1 and v == int(v), "an integer >= 1", "e.g. --batch-size 64"),
    ("lr", lambda v: v > 0, "> 0", "give the peak learning rate, e.g. --lr 1e-3"),
    ("weight_decay", lambda v: v >= 0, ">= 0", "e.g. --weight-decay 0.05 (0 turns it off)"),
    ("warmup_epochs", lambda v: v >= 0, ">= 0", "e.g. --warmup-epochs 1 (0 turns it off)"),
    ("min_lr", lambda v: v >= 0, ">= 0", "the lr the cosine decays to, e.g. 0"),
    ("label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)", "e.g. --smoothing 0.1"),
    ("mixup", lambda v: v >= 0, ">= 0", "the Beta alpha, 0 = off"),
    ("cutmix", lambda v: v >= 0, ">= 0", "the Beta alpha, 0 = off"),
    ("kd_temperature", lambda v: v > 0, "> 0", "the distillation temperature T, e.g. --kd-temperature 4"),
    ("kd_weight", lambda v: 0 <= v <= 1, "in [0, 1]", "loss = (1-w) task + w KD, e.g. --kd-weight 0.5"),
    ("ema_decay", lambda v: 0 < v < 1, "in (0, 1)", "e.g. --ema 0.9998, or leave it out"),
    ("clip_grad", lambda v: v > 0, "> 0", "a gradient-norm bound, e.g. --clip-grad 5, or leave it out"),
    ("gate_lr_scale", lambda v: v > 0, "> 0", "the lr multiplier of structure parameters (DPConv gates), e.g. 1"),
    ("input_size", lambda v: v >= 1 and v == int(v), "an integer >= 1", "e.g. --input-size 224"),
    ("workers", lambda v: v >= 0 and v == int(v), "an integer >= 0", "DataLoader workers per process, e.g. 4"),
    ("threads", lambda v: v >= 1 and v == int(v), "an integer >= 1", "CPU threads for the report's timing"),
]  # fmt: skip


def declared_settings(classes: Iterable[type[PartialOperator]] = ()) -> dict[str, TrainingSetting]:
    """Every training setting the registered operators (and ``classes``, e.g. a model's unregistered ones)
    declare, by key; the first declaration of a key wins."""
    out: dict[str, TrainingSetting] = {}
    for cls in [get_operator(n) for n in list_operators()] + list(classes):
        for key, setting in cls.training_settings.items():
            out.setdefault(key, setting)
    return out


def option_name(key: str, declared: Mapping[str, TrainingSetting] | None = None) -> str:
    """How a message names setting ``key``: ``--option (key=)``, or the key alone when it has no option."""
    declared = declared_settings() if declared is None else declared
    if key in declared:
        return declared[key].name(key)
    opt = OPTION.get(key, key)
    return key if opt == key else f"{opt} ({key}=)"


def _number(key: str, v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TrainingError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def check_settings(classes: Iterable[type[PartialOperator]] = (), **kw: Any) -> None:
    """Raise a TrainingError naming the option and the fix for the first value training cannot use.

    Checks the trainer's settings and every operator-declared one given in ``kw`` (None: not given);
    run by :func:`~partialize.train.finetune` and, before anything is read or written, by the run
    functions behind the CLI."""
    declared = declared_settings(classes)
    for key, ok, what, fix in _RULES:
        if kw.get(key) is not None and not ok(_number(key, kw[key], option_name(key, declared))):
            raise TrainingError(f"{option_name(key, declared)} must be {what}, got {kw[key]!r}: {fix}")
    for key, s in declared.items():
        v = kw.get(key)
        if v is None or s.check is None:
            continue
        if s.value_type in (int, float):
            v = _number(key, v, s.name(key))
        if not s.check(v):
            raise TrainingError(f"{s.name(key)} must be {s.must_be}, got {kw[key]!r}: {s.fix}")


@dataclass
class FinetuneConfig:
    """Every setting of :func:`~partialize.train.finetune`, validated by :meth:`validate`.

    Training: ``epochs``, ``lr`` (peak, after a linear warm-up of ``warmup_epochs``, capped at half the
    run, then cosine to ``min_lr``), AdamW ``weight_decay`` (weights only), ``label_smoothing``,
    ``mixup``/``cutmix`` (Beta alphas; need ``num_classes``), distillation ``kd_temperature`` and
    ``kd_weight`` (with a teacher), ``ema_decay``, ``amp`` (CUDA only), ``clip_grad``, ``seed``,
    ``gate_lr_scale`` (lr multiplier of the operators' ``structure_parameters()``), ``input_size`` (the
    training resolution, for settings that count MACs; default the plan's).
    Run: ``out_dir`` (checkpoints, log), ``resume``, ``device``, ``progress``, ``log`` (a line printer,
    rank 0; None for silence), ``on_epoch_end(record)``, ``callbacks`` (more
    :class:`~partialize.train.callbacks.Callback` objects), ``run_settings`` (more values a resume must
    match, recorded as ``run.<key>``). ``operator_settings``: the operator families' settings.
    """

    epochs: int | None = None
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    num_classes: int | None = None
    kd_temperature: float = 4.0
    kd_weight: float = 0.5
    ema_decay: float | None = None
    amp: bool = True
    clip_grad: float | None = None
    seed: int = 0
    gate_lr_scale: float = 1.0
    input_size: int | None = None
    out_dir: str | None = None
    resume: bool = False
    device: str | torch.device | None = None
    progress: bool = True
    log: Callable[[str], None] | None = print
    on_epoch_end: Callable[[dict], None] | None = None
    callbacks: list = field(default_factory=list)
    run_settings: dict[str, Any] = field(default_factory=dict)
    operator_settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, **settings: Any) -> FinetuneConfig:
        """The trainer's keys become fields, every other key ``operator_settings`` (:meth:`validate`
        refuses one that no operator declares)."""
        if "settings" in settings and "run_settings" not in settings:  # its name before FinetuneConfig
            settings["run_settings"] = settings.pop("settings") or {}
        own = {f.name for f in fields(cls)} - {"operator_settings"}
        ops = {k: v for k, v in settings.items() if k not in own}
        return cls(**{k: v for k, v in settings.items() if k in own}, operator_settings=ops)

    def validate(self, batch_size: int | None = None, classes: Iterable[type[PartialOperator]] = ()) -> None:
        """TrainingError for the first setting training cannot use (``classes``: the model's operators)."""
        declared = declared_settings(classes)
        unknown = sorted(k for k in self.operator_settings if k not in declared)
        if unknown:
            own = sorted(f.name for f in fields(self) if f.name != "operator_settings")
            raise TrainingError(
                f"unknown training setting(s) {', '.join(map(repr, unknown))}; the trainer's are {', '.join(own)}, "
                f"the operators' {', '.join(sorted(declared))}"
            )
        for key in ("epochs", "lr"):
            if getattr(self, key) is None:
                raise TrainingError(f"{option_name(key)} is required, e.g. finetune(model, loader, epochs=10, lr=1e-3)")
        mine = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "operator_settings"}
        check_settings(classes, **mine, **self.operator_settings, batch_size=batch_size)

    def resolved_operator_settings(self, classes: Iterable[type[PartialOperator]] = ()) -> dict[str, Any]:
        """Every declared operator setting: the given value, else its default."""
        declared = declared_settings(classes)
        given = self.operator_settings
        return {k: given[k] if given.get(k) is not None else s.default for k, s in declared.items()}
