"""The training loop: task loss (+ distillation), DPConv complexity (000 eq. 8), Ada-PConv router
budget, AdamW with linear warm-up and cosine decay, AMP on CUDA, optional EMA, DDP under torchrun,
atomic best/last checkpoints every epoch and bit-exact resume on CPU with a fixed seed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Imported here, never lazily inside the loop: importing rich draws from Python's global random
# (which timm's augmentation uses), and a resumed process would draw at another point of the stream.
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DistributedSampler

from ..errors import CheckpointError, PartializeError
from .checkpoint import load_checkpoint, rng_preserved, rng_state, save_checkpoint, set_rng_state
from .constraints import (
    RouterBudget,
    ada_layers,
    dpconv_complexity_loss,
    dpconv_layers,
    kappa_from_theta,
    learned_ratios,
)
from .distill import DistillationLoss
from .distributed import init_distributed, world_info


class TrainingError(PartializeError):
    """Training cannot go on (non-finite loss, mismatched resume, bad settings)."""


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: per-epoch history and where things were written."""

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


def param_groups(model: nn.Module, weight_decay: float, gate_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay on weights (ndim > 1), none on biases/norms; DPConv gates apart, no decay."""
    gates = {id(m.gates) for m in dpconv_layers(model).values()}
    decay, no_decay, gate = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (gate if id(p) in gates else decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if gate:
        groups.append({"params": gate, "weight_decay": 0.0, "lr_scale": gate_lr_scale})
    return [g for g in groups if g["params"]]


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Average floating buffers (BN running statistics) over the ranks, so every rank ends an epoch
    with the same model; DDP itself only broadcasts rank 0's buffers before each forward."""
    world = torch.distributed.get_world_size()
    for b in model.buffers():
        if b.is_floating_point():
            torch.distributed.all_reduce(b)
            b.div_(world)


def set_routing(model: nn.Module, routing: str) -> None:
    """Set every Ada-PConv's routing: soft or ste while training, hard at evaluation (004)."""
    for m in ada_layers(model).values():
        m.routing = routing


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False) -> dict:
    """Top-1 (%), mean cross-entropy and, per Ada-PConv layer, the hard-routing branch histogram."""
    was = model.training
    ada = ada_layers(model)
    routing = {n: m.routing for n, m in ada.items()}  # restored afterwards, whatever it was (soft/ste/hard)
    model.eval()
    set_routing(model, "hard")
    hist = {n: torch.zeros(len(m.widths), dtype=torch.long) for n, m in ada.items()}
    correct = seen = 0
    loss_sum = 0.0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            for n, m in ada.items():
                hist[n] += m.last_histogram
    finally:
        model.train(was)
        for n, m in ada.items():
            m.routing = routing[n]
    return {
        "top1": 100.0 * correct / max(1, seen),
        "loss": loss_sum / max(1, seen),
        "images": seen,
        "branch_histogram": {n: h.tolist() for n, h in hist.items()},
    }


def freeze_dynamic(model: nn.Module) -> dict[str, dict]:
    """In place: each DPConv becomes its static slice at the learned width and each Ada-PConv its
    hard-routing form (their ``deploy()``); returns the frozen width per DPConv layer."""
    from ..engine.apply import set_module
    from ..errors import OperatorError
    from ..ops import AdaPConv, DPConv

    bad = [n for n, m in model.named_modules() if isinstance(m, DPConv) and not m.is_prefix()]
    if bad:  # what deploy() refuses: the trained function is not a static slice (nothing is changed)
        raise OperatorError(
            f"DPConv layer(s) {', '.join(repr(n) for n in bad)} have non-monotone gates, so their active "
            "channels are not a prefix and cannot be frozen to a static slice without changing what the "
            "layer computes; call enforce_monotonic_() on them (the trainer does after every step) and "
            "check the accuracy before freezing"
        )
    ratios = learned_ratios(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, (DPConv, AdaPConv)):
            set_module(model, name, m.deploy())
    return ratios


def _plan_json(model: nn.Module) -> str:
    plan = getattr(model, "_partialize_plan", None)
    return plan.to_json(indent=None) if plan is not None else ""


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        disable=not enabled,
        transient=True,
    )


# API argument -> CLI option, for messages that must name what the user typed
OPTION = {
    "epochs": "--epochs", "lr": "--lr", "weight_decay": "--weight-decay", "warmup_epochs": "--warmup-epochs",
    "min_lr": "min_lr", "label_smoothing": "--smoothing", "mixup": "--mixup", "cutmix": "--cutmix",
    "kd_temperature": "--kd-temperature", "kd_weight": "--kd-weight", "ema_decay": "--ema", "clip_grad": "--clip-grad",
    "seed": "--seed", "kappa": "--theta/--target-macs", "dp_alpha": "--dp-alpha", "dp_alpha_under": "--dp-alpha-under",
    "dp_beta": "--dp-beta", "gate_lr_scale": "--gate-lr-scale", "router_budget": "--router-budget",
    "router_weight": "--router-weight", "ada_routing": "--ada-routing", "teacher": "--teacher/--teacher-weights",
    "amp": "--amp/--no-amp", "num_classes": "the data's classes", "steps_per_epoch": "--batch-size or the data",
    "batch_size": "--batch-size", "train_images": "--data", "world_size": "the number of processes",
}  # fmt: skip


def _name(key: str) -> str:
    opt = OPTION.get(key, key)
    return key if opt == key else f"{opt} ({key}=)"


def check_settings(**kw: Any) -> None:
    """Raise a TrainingError naming the option and the fix for the first value training cannot use;
    called by :func:`finetune` and, before anything is loaded or written, by the CLI."""

    def num(key: str) -> float | None:
        v = kw.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TrainingError(f"{_name(key)} must be a finite number, got {v!r}")
        return float(v)

    rules = [  # key, test, what it must be, the fix
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
        ("gate_lr_scale", lambda v: v > 0, "> 0", "the DPConv gates' lr multiplier, e.g. 1"),
        ("dp_alpha", lambda v: v <= 0, "<= 0", "000 eq. 8 uses -0.01 (over the target, fewer channels)"),
        ("dp_alpha_under", lambda v: v >= 0, ">= 0", "0 is 000 eq. 8, 0.01 pulls narrow layers up"),
        ("dp_beta", lambda v: v >= 0, ">= 0", "000 eq. 8 uses 0.9"),
        ("router_weight", lambda v: v >= 0, ">= 0", "e.g. --router-weight 1"),
        ("kappa", lambda v: v > 0, "> 0", "a target from --theta (>= 1) or --target-macs"),
    ]
    for key, ok, what, fix in rules:
        v = num(key)
        if v is not None and not ok(v):
            raise TrainingError(f"{_name(key)} must be {what}, got {kw[key]!r}: {fix}")
    if kw.get("ada_routing") not in (None, "ste", "soft"):
        raise TrainingError(f"{_name('ada_routing')} must be 'ste' or 'soft', got {kw['ada_routing']!r}")


def _fingerprint(module: nn.Module) -> str:
    """A short hash of a module's tensors (names, dtypes, bytes): tells a resume whether the teacher changed."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{t.numel()};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def effective_warmup(warmup_epochs: float, epochs: int) -> float:
    """Warm-up capped at half the run: a 5-epoch warm-up in a 2-epoch run never reaches the peak lr."""
    return min(float(warmup_epochs), epochs / 2.0)


def finetune(
    model: nn.Module,
    train_loader,
    val_loader=None,
    *,
    teacher: nn.Module | None = None,
    epochs: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0,
    min_lr: float = 0.0,
    label_smoothing: float = 0.1,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    num_classes: int | None = None,
    kd_temperature: float = 4.0,
    kd_weight: float = 0.5,
    ema_decay: float | None = None,
    amp: bool = True,
    clip_grad: float | None = None,
    seed: int = 0,
    theta: float | None = None,
    kappa: float | None = None,
    dp_alpha: float = -0.01,
    dp_beta: float = 0.9,
    dp_alpha_under: float = 0.01,
    gate_lr_scale: float = 1.0,
    router_budget: float | None = None,
    router_weight: float = 1.0,
    ada_routing: str = "ste",
    out_dir: str | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = print,
    settings: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Train ``model`` in place and return the per-epoch history.

    Loss: ``(1 - kd_weight) * task + kd_weight * T^2 KL`` against ``teacher`` (task alone without one);
    with DPConv layers and a target (``theta`` or ``kappa``) it becomes 000 eq. 8, with gate
    monotonicity enforced after every step and each epoch at its annealing temperature (000
    Algorithm 1); with ``router_budget`` the Ada-PConv budget term is added; Ada-PConv trains with
    ``ada_routing`` ("ste", the default: hard forward as deployed, soft gradient; or "soft" mixing as
    in 004, which deploy() then warns about: hard routing is a different function). The warm-up is
    capped at half the run. ``out_dir`` receives ``last.pt``/``best.pt`` (atomic, every epoch) and
    ``log.jsonl``; ``resume=True`` continues from ``out_dir/last.pt``, bit-exact on CPU: every setting
    that shapes the run must match the checkpoint's (``settings``: more of them, e.g. the CLI's input
    size and data folder), except ``epochs``, which may grow (the schedule is recomputed and the log
    says so). Under torchrun (WORLD_SIZE > 1) the model is wrapped in DDP and rank 0 alone writes.
    """
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    batch_size = getattr(train_loader, "batch_size", None)
    check_settings(
        epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, min_lr=min_lr,
        label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, kd_temperature=kd_temperature,
        kd_weight=kd_weight, ema_decay=ema_decay, clip_grad=clip_grad, gate_lr_scale=gate_lr_scale,
        dp_alpha=dp_alpha, dp_alpha_under=dp_alpha_under, dp_beta=dp_beta, router_weight=router_weight,
        kappa=kappa, ada_routing=ada_routing, batch_size=batch_size,
    )  # fmt: skip
    distributed = init_distributed()  # a no-op when the caller (e.g. the CLI) already joined the group
    rank, world, local = world_info()
    say = log if (log is not None and rank == 0) else (lambda s: None)
    sampler = getattr(train_loader, "sampler", None)
    if distributed and isinstance(sampler, DistributedSampler) and sampler.num_replicas != world:
        raise TrainingError(
            f"the train loader's DistributedSampler was built for {sampler.num_replicas} process(es) but "
            f"{world} are training, so every rank would see the same {sampler.num_replicas}-way shard; "
            "build the loaders after joining the process group (partialize.train.distributed.init_distributed)"
        )
    if distributed and not isinstance(sampler, DistributedSampler):
        say(f"warning: the train loader has no DistributedSampler: unless its dataset is already split per "
            f"rank, each of the {world} processes trains on all of it")  # fmt: skip
    if device is None:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    use_amp = bool(amp and device.type == "cuda")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    raw = model.to(device)
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
    dp = dpconv_layers(raw)
    if kappa is None and theta is not None:
        kappa = kappa_from_theta(raw, theta)
    if kappa is not None and not dp:
        raise TrainingError("a DPConv target (theta / target MACs) was given but the model has no DPConv layers")
    if not any(p.requires_grad for p in raw.parameters()):
        raise TrainingError(
            "the model has no trainable parameters (every parameter has requires_grad=False): a deployed "
            "model (partialize.deploy, or partialize.load of a file saved with deployed=True) is a frozen "
            "inference form and cannot be fine-tuned; pass the training form instead (partialize.apply's "
            "result, or partialize.load(path, deployed=False))"
        )
    opt = torch.optim.AdamW(param_groups(raw, weight_decay, gate_lr_scale), lr=lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = ModelEmaV3(raw, decay=ema_decay) if ema_decay else None
    budget = RouterBudget(raw, router_budget, router_weight) if router_budget is not None else None

    mix = None
    if mixup > 0 or cutmix > 0:
        if num_classes is None:
            raise TrainingError("mixup/cutmix need num_classes")
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
    hard_task = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    crit_hard = DistillationLoss(hard_task, kd_temperature, kd_weight if teacher is not None else 0.0)
    crit_soft = DistillationLoss(SoftTargetCrossEntropy(), kd_temperature, kd_weight if teacher is not None else 0.0)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingError("the train loader is empty (fewer images than one batch?)")
    total = epochs * steps_per_epoch
    warm_epochs = effective_warmup(warmup_epochs, epochs)
    if warm_epochs < warmup_epochs:
        say(f"warm-up: {warmup_epochs:g} epochs is more than half of this {epochs}-epoch run (the lr would "
            f"barely reach its peak); capped to {warm_epochs:g} epochs")  # fmt: skip
    warmup = int(round(warm_epochs * steps_per_epoch))
    gen = getattr(train_loader, "generator", None)  # seeds the loader's workers: part of the saved state

    start_epoch, step, best, best_epoch = 0, 0, None, None
    history: list[dict] = []
    resumed = None
    last_path = os.path.join(out_dir, "last.pt") if out_dir else None
    best_path = os.path.join(out_dir, "best.pt") if out_dir else None
    log_path = os.path.join(out_dir, "log.jsonl") if out_dir else None
    dataset = getattr(train_loader, "dataset", None)
    kd = teacher is not None
    config = {  # everything that shapes the run: a resume must match all of it but epochs
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "min_lr": min_lr,
        "label_smoothing": label_smoothing, "mixup": mixup, "cutmix": cutmix, "num_classes": num_classes,
        "teacher": _fingerprint(teacher) if kd else None, "kd_temperature": kd_temperature if kd else None,
        "kd_weight": kd_weight if kd else None, "ema_decay": ema_decay or None, "amp": use_amp,
        "clip_grad": clip_grad or None, "seed": seed, "kappa": kappa,
        "dp_alpha": dp_alpha if kappa is not None else None,
        "dp_alpha_under": dp_alpha_under if kappa is not None else None,
        "dp_beta": dp_beta if kappa is not None else None, "gate_lr_scale": gate_lr_scale if dp else None,
        "router_budget": router_budget, "router_weight": router_weight if router_budget is not None else None,
        "ada_routing": ada_routing if ada_layers(raw) else None, "steps_per_epoch": steps_per_epoch,
        "batch_size": batch_size, "train_images": len(dataset) if hasattr(dataset, "__len__") else None,
        "world_size": world, **{f"run.{k}": v for k, v in (settings or {}).items()},
    }  # fmt: skip
    if resume:
        if not out_dir:
            raise TrainingError("resume needs out_dir (where last.pt is)")
        if os.path.isfile(last_path):
            st = load_checkpoint(last_path)
            done = int(st["epoch"]) + 1
            _check_resume(last_path, st.get("config", {}), config, done)
            try:
                raw.load_state_dict(st["model"])
            except RuntimeError as e:
                raise CheckpointError(f"{last_path!r} does not match this model: {e}") from None
            opt.load_state_dict(st["optimizer"])
            scaler.load_state_dict(st["scaler"])
            if ema is not None and st.get("ema") is not None:
                ema.module.load_state_dict(st["ema"])
            start_epoch, step = done, int(st["step"])
            best, best_epoch = st.get("best_top1"), st.get("best_epoch")
            history = list(st.get("history", []))
            set_rng_state(st["rng"])
            if gen is not None and "loader" in st["rng"]:
                gen.set_state(st["rng"]["loader"])
            resumed = start_epoch
            say(f"resumed from {last_path} after epoch {start_epoch} (step {step})")
            old_epochs = st.get("config", {}).get("epochs", epochs)
            if old_epochs != epochs:
                sched = st.get("scheduler", {})
                was = lr_at(step, sched.get("total", total), sched.get("warmup", warmup), lr, min_lr)
                say(f"--epochs {old_epochs} -> {epochs}: the warm-up + cosine schedule is recomputed for {epochs} "
                    f"epochs ({total} steps{', and the DPConv annealing temperature' if dp else ''}): the lr at step "
                    f"{step} is {lr_at(step, total, warmup, lr, min_lr):.4g} (it was {was:.4g} on the "
                    f"{old_epochs}-epoch schedule). Epochs 1-{done} followed the {old_epochs}-epoch schedule, so "
                    f"this is not the same as {epochs} epochs from the start")  # fmt: skip
        else:
            say(f"--resume: no {last_path} yet, starting from scratch")
    if rank == 0 and log_path:
        os.makedirs(out_dir, exist_ok=True)
        with open(log_path, "w") as f:  # rewritten from the checkpoint's history: no duplicates
            for rec in history:
                f.write(json.dumps(rec) + "\n")

    net: nn.Module = raw
    if distributed:
        net = nn.parallel.DistributedDataParallel(raw, device_ids=[local] if device.type == "cuda" else None)

    try:
        for epoch in range(start_epoch, epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            net.train()
            set_routing(raw, ada_routing)
            for m in ada_layers(raw).values():
                m.trained_routing = ada_routing  # what deploy() checks (SoftRoutingWarning)
            if kappa is not None:
                for m in dp.values():
                    m.anneal_(epoch + 1, epochs)  # 000 Alg. 1 line 14: this epoch's temperature, t from 1
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "task": 0.0, "n": 0, "zeta": 0.0, "router_cost": 0.0, "steps": 0}
            with rng_preserved():  # nothing outside the training itself may move its random streams
                bar = _progress(progress and rank == 0)
                bar.start()
                task_id = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, info="")
            try:
                for x, y in train_loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    cur_lr = lr_at(step, total, warmup, lr, min_lr)
                    for g in opt.param_groups:
                        g["lr"] = cur_lr * g["lr_scale"]
                    crit = crit_hard
                    if mix is not None and x.shape[0] % 2 == 0:
                        x, y = mix(x, y)
                        crit = crit_soft
                    with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                        logits = net(x)
                        t_logits = None
                        if teacher is not None:
                            with torch.no_grad():
                                t_logits = teacher(x)
                        task = crit(logits.float(), y, None if t_logits is None else t_logits.float())
                    loss = task
                    if kappa is not None:
                        loss, terms = dpconv_complexity_loss(
                            task, raw, kappa, alpha_over=dp_alpha, beta=dp_beta, alpha_under=dp_alpha_under
                        )
                        sums["zeta"] += terms.zeta
                    if budget is not None:
                        term, cost = budget.loss()
                        if term is not None:
                            loss = loss + term
                            sums["router_cost"] += cost
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"loss is {float(loss)} at epoch {epoch + 1}, step {step}: lower --lr, or turn AMP off"
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if clip_grad:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(raw.parameters(), clip_grad)
                    scaler.step(opt)
                    scaler.update()
                    for m in dp.values():
                        m.enforce_monotonic_()  # 000 Alg. 1 line 12
                    if ema is not None:
                        ema.update(raw, step=step)
                    step += 1
                    b = x.shape[0]
                    sums["loss"] += float(loss.detach()) * b
                    sums["task"] += float(task.detach()) * b
                    sums["n"] += b
                    sums["steps"] += 1
                    with rng_preserved():
                        bar.update(task_id, advance=1, info=f"loss {sums['loss'] / sums['n']:.4f} lr {cur_lr:.2e}")
            finally:
                with rng_preserved():
                    bar.stop()
            if distributed:
                sync_buffers(raw)
            rng = rng_state()  # the training's streams at the end of the epoch: what a resume continues from
            if gen is not None:
                rng["loader"] = gen.get_state()
            with rng_preserved():
                rec = _end_epoch(
                    raw, ema, val_loader, device, use_amp, dp, kappa, budget, sums, epoch, step, total, warmup,
                    lr, min_lr, t0, distributed, world,
                )  # fmt: skip
                history.append(rec)
                score = rec.get("val_top1", -rec["train_loss"])
                improved = best is None or score > best
                if improved:
                    best, best_epoch = score, epoch + 1
                if rank == 0 and out_dir:
                    state = {
                        "model": raw.state_dict(),
                        "plan": _plan_json(raw),
                        "optimizer": opt.state_dict(),
                        "scheduler": {"step": step, "total": total, "warmup": warmup, "base_lr": lr, "min_lr": min_lr},
                        "scaler": scaler.state_dict(),
                        "ema": ema.module.state_dict() if ema is not None else None,
                        "epoch": epoch,
                        "step": step,
                        "best_top1": best,
                        "best_epoch": best_epoch,
                        "history": history,
                        "config": config,
                        "rng": rng,
                    }
                    save_checkpoint(state, last_path)
                    if improved:
                        keep = ("model", "plan", "epoch", "best_top1", "config")
                        save_checkpoint({k: state[k] for k in keep}, best_path)
                    with open(log_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if distributed:
                    torch.distributed.barrier()
                say(_epoch_line(rec, epochs, len(dp)))
                if on_epoch_end is not None:
                    on_epoch_end(rec)
    finally:
        if budget is not None:
            budget.remove()
    set_routing(raw, "hard")
    last_top1 = history[-1].get("val_top1") if history else None
    ckpts = {"last": last_path, "best": best_path} if out_dir else {}
    return FinetuneResult(
        history=history,
        best_top1=best if val_loader is not None else None,
        best_epoch=best_epoch,
        final_top1=last_top1,
        ratios=learned_ratios(raw),
        checkpoints=ckpts,
        log_path=log_path,
        resumed_from_epoch=resumed,
        ema=ema.module if ema is not None else None,
    )


def _check_resume(path: str, old: dict, new: dict, done: int) -> None:
    """CheckpointError listing every setting that differs from the checkpoint's (epochs may grow)."""
    changed = [k for k in new if k != "epochs" and k in old and old[k] != new[k]]
    if changed:
        diff = "; ".join(f"{_name(k)} {old[k]!r} -> {new[k]!r}" for k in changed)
        raise CheckpointError(
            f"{path!r} was trained with other settings than this run, and resuming cannot honour a change "
            f"of them: {diff}. Resume with the checkpoint's settings, or start a new run in another --out "
            "(only --epochs may change on resume: the schedule is recomputed)"
        )
    if new["epochs"] < done:
        raise CheckpointError(
            f"{path!r} has already trained {done} epochs, more than --epochs {new['epochs']}: give --epochs >= "
            f"{done} to resume it (its weights are in {path!r}; best.pt holds the best epoch)"
        )


def _end_epoch(raw, ema, val_loader, device, use_amp, dp, kappa, budget, sums, epoch, step, total, warmup, lr,
               min_lr, t0, distributed, world) -> dict[str, Any]:  # fmt: skip
    """The epoch's log record: train loss, validation, DPConv ratios and zeta, router cost, time."""
    rec: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": step,
        "lr": lr_at(step - 1, total, warmup, lr, min_lr),
        "train_loss": sums["loss"] / max(1, sums["n"]),
        "train_task_loss": sums["task"] / max(1, sums["n"]),
        "train_images": sums["n"],  # this process's share of the epoch
    }
    if distributed:
        n = torch.tensor([sums["n"]], dtype=torch.long, device=device)
        per_rank = [torch.zeros_like(n) for _ in range(world)]
        torch.distributed.all_gather(per_rank, n)
        rec["train_images_per_rank"] = [int(v) for v in per_rank]
    if val_loader is not None:
        ev = evaluate(raw, val_loader, device, use_amp)
        rec.update(val_top1=ev["top1"], val_loss=ev["loss"])
        if ev["branch_histogram"]:
            rec["branch_histogram"] = ev["branch_histogram"]
        if ema is not None:
            rec["ema_val_top1"] = evaluate(ema.module, val_loader, device, use_amp)["top1"]
    if dp:
        rec["ratios"] = {n: r["ratio"] for n, r in learned_ratios(raw).items()}
        if kappa is not None:
            rec["zeta"] = sum(float(m.complexity().detach()) for m in dp.values())
            rec["kappa"] = kappa
    if budget is not None and sums["steps"]:
        rec["router_expected_cost"] = sums["router_cost"] / sums["steps"]
    rec["time_s"] = time.perf_counter() - t0
    return rec


def _epoch_line(rec: dict, epochs: int, n_dp: int) -> str:
    msg = f"epoch {rec['epoch']}/{epochs}: train loss {rec['train_loss']:.4f}"
    if "val_top1" in rec:
        msg += f", val top-1 {rec['val_top1']:.2f}%"
    if n_dp:
        msg += f", mean DPConv ratio {sum(rec['ratios'].values()) / n_dp:.3f}"
    if "branch_histogram" in rec:
        tot = [sum(v) for v in zip(*rec["branch_histogram"].values())]
        msg += f", branch histogram {tot}"
    return msg + f" ({rec['time_s']:.1f}s)"
