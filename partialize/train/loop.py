"""The training loop (:class:`Trainer`): AdamW with linear warm-up and cosine decay, AMP on CUDA, DDP
under torchrun, mixup/CutMix and label smoothing; everything else (operator objectives, EMA,
distillation, checkpoints and resume, logs, progress) is a callback (``callbacks.py``).

Bit-exact resume on CPU with a fixed seed: the loop seeds every generator itself, checkpoints the
random streams at each epoch's end, and runs everything that is not training inside
``rng_preserved()``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DistributedSampler

from ..measure.flops import macs_breakdown
from ..ops.base import TrainingError, TrainingObjective
from ..ops.registry import operators_in
from .callbacks import (
    EMA,
    Callback,
    Checkpoint,
    Distillation,
    EpochLine,
    JsonLog,
    OnEpochEnd,
    OperatorObjectives,
    ProgressBar,
)
from .checkpoint import rng_preserved, rng_state
from .config import FinetuneConfig
from .distributed import init_distributed, world_info
from .operators import check_targets, evaluate, has_structure_parameters, learned_ratios, param_groups, set_routing


@dataclass
class FinetuneResult:
    """What :func:`~partialize.train.finetune` did: per-epoch history and where things were written."""

    history: list[dict]
    best_top1: float | None
    best_epoch: int | None
    final_top1: float | None
    ratios: dict[str, dict]
    checkpoints: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None
    resumed_from_epoch: int | None = None
    ema: nn.Module | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("ema")
        return d


def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``min_lr``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def effective_warmup(warmup_epochs: float, epochs: int) -> float:
    """Warm-up capped at half the run: a 5-epoch warm-up in a 2-epoch run never reaches the peak lr."""
    return min(float(warmup_epochs), epochs / 2.0)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Average floating buffers (BN running statistics) over the ranks, so every rank ends an epoch
    with the same model; DDP itself only broadcasts rank 0's buffers before each forward."""
    world = torch.distributed.get_world_size()
    for b in model.buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(world)


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's tensors (names, dtypes, bytes): tells a resume whether the teacher changed."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{t.numel()};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Trainer:
    """One fine-tuning run of ``model`` (in place) with ``config``; :meth:`run` trains and returns a
    :class:`FinetuneResult`. Callbacks read and write its state (``raw`` the model, ``net`` the
    DDP-wrapped one, ``opt``, ``scaler``, ``step``, ``history``, ``best``, ``objectives``...)."""

    def __init__(self, model: nn.Module, train_loader, val_loader=None, teacher=None, *, config: FinetuneConfig):
        self.model, self.train_loader, self.val_loader, self.teacher, self.cfg = (
            model, train_loader, val_loader, teacher, config,
        )  # fmt: skip
        self.objectives: list[TrainingObjective] = []
        self.start_epoch, self.step, self.best, self.best_epoch, self.resumed = 0, 0, None, None, None
        self.history: list[dict] = []
        self.improved = False
        self.teacher_state: tuple[bool, list] | None = None  # the caller's teacher: mode, requires_grad flags

    # --- setup ------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        classes = {type(op) for op in operators_in(self.model).values()}
        cfg.validate(getattr(self.train_loader, "batch_size", None), classes)
        self.operator_settings = cfg.resolved_operator_settings(classes)
        self._join()
        device = cfg.device or (f"cuda:{self.local}" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.raw = self.model.to(self.device)
        if self.teacher is not None:  # frozen for the run; run() gives the caller's flags and mode back
            self.teacher_state = (self.teacher.training, [(p, p.requires_grad) for p in self.teacher.parameters()])
            self.teacher = self.teacher.to(self.device).eval().requires_grad_(False)
        check_targets(self.raw, cfg.operator_settings)
        if not any(p.requires_grad for p in self.raw.parameters()):
            raise TrainingError(
                "the model has no trainable parameters (every parameter has requires_grad=False): a deployed "
                "model (partialize.deploy, or partialize.load of a file saved with deployed=True) is a frozen "
                "inference form and cannot be fine-tuned; pass the training form instead (partialize.apply's "
                "result, or partialize.load(path, deployed=False))"
            )
        frozen = [n for n, p in self.raw.named_parameters() if not p.requires_grad]
        if frozen:  # e.g. a model converted from a frozen teacher: its inherited weights would not train
            self.say(f"note: {len(frozen)} parameter tensor(s) have requires_grad=False and will not train "
                     f"({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''})")  # fmt: skip
        # a training model's submodules that its owner put in eval mode (a frozen BN, say) stay there:
        # the epochs' train() would otherwise update their running statistics
        self.kept_eval = [n for n, m in self.raw.named_modules() if not m.training] if self.raw.training else []
        if self.kept_eval:
            self.say(f"note: {len(self.kept_eval)} module(s) are in eval mode in a training model and stay so "
                     f"({', '.join(self.kept_eval[:3])}{', ...' if len(self.kept_eval) > 3 else ''})")  # fmt: skip
        groups = param_groups(self.raw, cfg.weight_decay, cfg.gate_lr_scale)
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.callbacks = self._callbacks()
        self._criteria()
        self._schedule()
        self.gen = getattr(self.train_loader, "generator", None)  # seeds the loader's workers: saved state

    def _give_teacher_back(self) -> None:
        """The teacher's requires_grad flags and train/eval mode as the caller had them."""
        if self.teacher_state is not None:
            training, flags = self.teacher_state
            for p, flag in flags:
                p.requires_grad_(flag)
            self.teacher.train(training)

    def _join(self) -> None:
        """Join the process group under torchrun and check the train loader is sharded for it."""
        self.distributed = init_distributed()  # a no-op when the caller (e.g. the CLI) already joined the group
        self.rank, self.world, self.local = world_info()
        log = self.cfg.log
        self.say = log if (log is not None and self.rank == 0) else (lambda s: None)
        sampler = getattr(self.train_loader, "sampler", None)
        if self.distributed and isinstance(sampler, DistributedSampler) and sampler.num_replicas != self.world:
            raise TrainingError(
                f"the train loader's DistributedSampler was built for {sampler.num_replicas} process(es) but "
                f"{self.world} are training, so every rank would see the same {sampler.num_replicas}-way shard; "
                "build the loaders after joining the process group (partialize.train.distributed.init_distributed)"
            )
        if self.distributed and not isinstance(sampler, DistributedSampler):
            self.say(f"warning: the train loader has no DistributedSampler: unless its dataset is already split "
                     f"per rank, each of the {self.world} processes trains on all of it")  # fmt: skip
        self.sampler = sampler

    def _callbacks(self) -> list[Callback]:
        """The loop's parts, in the order their hooks run (operators before EMA: the average is taken of
        the projected gates; EMA before the objectives hook in: its copy must not carry their hooks)."""
        cfg = self.cfg
        cbs: list[Callback] = [OperatorObjectives()]
        if cfg.ema_decay:
            cbs.append(EMA(self.raw, cfg.ema_decay))
        if self.teacher is not None:
            cbs.append(Distillation(self.teacher, cfg.kd_temperature, cfg.kd_weight))
        if cfg.progress and self.rank == 0:
            cbs.append(ProgressBar())
        if cfg.out_dir:
            cbs += [Checkpoint(cfg.out_dir, cfg.resume), JsonLog(cfg.out_dir)]
        elif cfg.resume:
            raise TrainingError("resume needs out_dir (where last.pt is)")
        cbs.append(EpochLine())
        if cfg.on_epoch_end is not None:
            cbs.append(OnEpochEnd(cfg.on_epoch_end))
        return cbs + list(cfg.callbacks)

    def _criteria(self) -> None:
        cfg = self.cfg
        self.mix = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            if cfg.num_classes is None:
                raise TrainingError("mixup/cutmix need num_classes")
            self.mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                             num_classes=cfg.num_classes)  # fmt: skip
        self.crit_hard = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.crit_soft = SoftTargetCrossEntropy()

    def _schedule(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise TrainingError("the train loader is empty (fewer images than one batch?)")
        self.total = cfg.epochs * self.steps_per_epoch
        warm_epochs = effective_warmup(cfg.warmup_epochs, cfg.epochs)
        if warm_epochs < cfg.warmup_epochs:
            self.say(f"warm-up: {cfg.warmup_epochs:g} epochs is more than half of this {cfg.epochs}-epoch run (the "
                     f"lr would barely reach its peak); capped to {warm_epochs:g} epochs")  # fmt: skip
        self.warmup = int(round(warm_epochs * self.steps_per_epoch))

    # --- what callbacks ask -------------------------------------------------------------------------
    @property
    def input_size(self) -> int | tuple[int, ...] | None:
        """The training resolution: the config's, else the size the plan was made at."""
        if self.cfg.input_size:
            return self.cfg.input_size
        shape = tuple(getattr(getattr(self.raw, "_partialize_plan", None), "input_shape", ()) or ())
        return tuple(int(v) for v in shape[1:]) if len(shape) == 4 else None

    def count_macs(self) -> dict:
        """The model's MAC breakdown at the training resolution (for objectives with a compute target)."""
        if self.input_size is None:
            raise TrainingError("a MAC target needs the training resolution: finetune(..., input_size=N)")
        return macs_breakdown(self.raw, self.input_size, crosscheck=False)

    def plan_json(self) -> str:
        plan = getattr(self.raw, "_partialize_plan", None)
        return plan.to_json(indent=None) if plan is not None else ""

    def describe_run(self) -> dict[str, Any]:
        """Everything that shapes the run: a resume must match all of it but epochs."""
        cfg, kd = self.cfg, self.teacher is not None
        dataset = getattr(self.train_loader, "dataset", None)
        config = {
            "epochs": cfg.epochs, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs,
            "min_lr": cfg.min_lr, "label_smoothing": cfg.label_smoothing, "mixup": cfg.mixup, "cutmix": cfg.cutmix,
            "num_classes": cfg.num_classes, "teacher": fingerprint(self.teacher) if kd else None,
            "kd_temperature": cfg.kd_temperature if kd else None, "kd_weight": cfg.kd_weight if kd else None,
            "ema_decay": cfg.ema_decay or None, "amp": self.use_amp, "clip_grad": cfg.clip_grad or None,
            "seed": cfg.seed, "gate_lr_scale": cfg.gate_lr_scale if has_structure_parameters(self.raw) else None,
        }  # fmt: skip
        for obj in self.objectives:
            config.update(obj.run_settings())
        config.update(
            steps_per_epoch=self.steps_per_epoch, batch_size=getattr(self.train_loader, "batch_size", None),
            train_images=len(dataset) if hasattr(dataset, "__len__") else None, world_size=self.world,
            input_size=self.cfg.input_size,
        )  # fmt: skip
        return {**config, **{f"run.{k}": v for k, v in self.cfg.run_settings.items()}}

    def schedule_change(self, old_epochs: int, sched: dict) -> str:
        """What a resume with another number of epochs does to the schedule (said in the log)."""
        cfg, step, total, done = self.cfg, self.step, self.total, self.start_epoch
        was = lr_at(step, sched.get("total", total), sched.get("warmup", self.warmup), cfg.lr, cfg.min_lr)
        learned = has_structure_parameters(self.raw)
        anneal = ", and the learned structure's per-epoch schedule (annealing)" if learned else ""
        return (
            f"--epochs {old_epochs} -> {cfg.epochs}: the warm-up + cosine schedule is recomputed for {cfg.epochs} "
            f"epochs ({total} steps{anneal}): the lr at step {step} is "
            f"{lr_at(step, total, self.warmup, cfg.lr, cfg.min_lr):.4g} (it was {was:.4g} on the {old_epochs}-epoch "
            f"schedule). Epochs 1-{done} followed the {old_epochs}-epoch schedule, so this is not the same as "
            f"{cfg.epochs} epochs from the start"
        )

    # --- the run ------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        try:
            self._setup()
        except BaseException:
            self._give_teacher_back()
            raise
        try:
            for cb in self.callbacks:
                cb.on_train_start(self)
            self.net: nn.Module = self.raw
            if self.distributed:
                ids = [self.local] if self.device.type == "cuda" else None
                self.net = nn.parallel.DistributedDataParallel(self.raw, device_ids=ids)
            for epoch in range(self.start_epoch, self.cfg.epochs):
                self._epoch(epoch)
        finally:
            for cb in self.callbacks:
                cb.on_train_end(self)
            self._give_teacher_back()
        set_routing(self.raw, "hard")
        return self._result()

    def _epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.net.train()
        for name in self.kept_eval:
            self.raw.get_submodule(name).eval()
        self.t0 = time.perf_counter()
        self.sums = {"loss": 0.0, "task": 0.0, "n": 0}
        for cb in self.callbacks:
            cb.on_epoch_start(self, epoch)
        try:
            for x, y in self.train_loader:
                self._step(x, y, epoch)
        finally:
            for cb in self.callbacks:
                cb.on_epoch_stop(self)
        if self.distributed:
            sync_buffers(self.raw)
        for op in operators_in(self.raw).values():
            op.after_epoch(epoch + 1, self.cfg.epochs)
        self.epoch_rng = rng_state()  # the training's streams at the end of the epoch: what a resume continues from
        if self.gen is not None:
            self.epoch_rng["loader"] = self.gen.get_state()
        with rng_preserved():
            rec = self._record(epoch)
            self.history.append(rec)
            score = rec.get("val_top1", -rec["train_loss"])
            self.improved = self.best is None or score > self.best
            if self.improved:
                self.best, self.best_epoch = score, epoch + 1
            for cb in self.callbacks:
                cb.on_epoch_end(self, rec)

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        cfg, dev = self.cfg, self.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        self.cur_lr = lr_at(self.step, self.total, self.warmup, cfg.lr, cfg.min_lr)
        for g in self.opt.param_groups:
            g["lr"] = self.cur_lr * g["lr_scale"]
        crit = self.crit_hard
        if self.mix is not None and x.shape[0] % 2 == 0:
            x, y = self.mix(x, y)
            crit = self.crit_soft
        with torch.autocast(dev.type, dtype=torch.float16, enabled=self.use_amp):
            logits = self.net(x)
            label = crit(logits.float(), y)  # logged as the task loss, whatever distillation mixes in
            task = label
            for cb in self.callbacks:
                task = cb.on_task_loss(self, x, logits, task)
        loss = task
        for cb in self.callbacks:
            loss = cb.on_loss(self, loss)
        if not torch.isfinite(loss):
            where = f"at epoch {epoch + 1}, step {self.step}"
            raise TrainingError(f"loss is {float(loss)} {where}: lower --lr, or turn AMP off")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad:
            self.scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.clip_grad)
        self.scaler.step(self.opt)
        self.scaler.update()
        b = x.shape[0]
        self.sums["loss"] += float(loss.detach()) * b
        self.sums["task"] += float(label.detach()) * b
        self.sums["n"] += b
        for cb in self.callbacks:
            cb.on_step_end(self)
        self.step += 1

    def _record(self, epoch: int) -> dict[str, Any]:
        """The epoch's log record: train loss, validation (the deployed function), callbacks' entries, time."""
        s, cfg = self.sums, self.cfg
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": lr_at(self.step - 1, self.total, self.warmup, cfg.lr, cfg.min_lr),
            "train_loss": s["loss"] / max(1, s["n"]),
            "train_task_loss": s["task"] / max(1, s["n"]),
            "train_images": s["n"],  # this process's share of the epoch
        }
        if self.distributed:
            n = torch.tensor([s["n"]], dtype=torch.long, device=self.device)
            per_rank = [torch.zeros_like(n) for _ in range(self.world)]
            torch.distributed.all_gather(per_rank, n)
            rec["train_images_per_rank"] = [int(v) for v in per_rank]
        if self.val_loader is not None:
            ev = evaluate(self.raw, self.val_loader, self.device, self.use_amp)
            rec.update(val_top1=ev["top1"], val_loss=ev["loss"])
            if ev["branch_histogram"]:
                rec["branch_histogram"] = ev["branch_histogram"]
        for cb in self.callbacks:
            rec.update(cb.epoch_record(self))
        rec["time_s"] = time.perf_counter() - self.t0
        return rec

    def _result(self) -> FinetuneResult:
        out = self.cfg.out_dir
        ema = next((cb.ema.module for cb in self.callbacks if isinstance(cb, EMA)), None)
        return FinetuneResult(
            history=self.history,
            best_top1=self.best if self.val_loader is not None else None,
            best_epoch=self.best_epoch,
            final_top1=self.history[-1].get("val_top1") if self.history else None,
            ratios=learned_ratios(self.raw),
            checkpoints={"last": os.path.join(out, "last.pt"), "best": os.path.join(out, "best.pt")} if out else {},
            log_path=os.path.join(out, "log.jsonl") if out else None,
            resumed_from_epoch=self.resumed,
            ema=ema,
        )
