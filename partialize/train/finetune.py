"""``finetune()``: the training loop's front door, a thin wrapper over :class:`FinetuneConfig` and
:class:`~partialize.train.loop.Trainer`.

Task loss (+ distillation), each operator family's objective (DPConv: 000 eq. 8; Ada-PConv: routing and
router budget), AdamW with linear warm-up and cosine decay, AMP on CUDA, optional EMA, DDP under
torchrun, atomic best/last checkpoints every epoch and bit-exact resume on CPU with a fixed seed.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import OPTION, FinetuneConfig, TrainingError, check_settings
from .loop import FinetuneResult, Trainer, effective_warmup, lr_at, sync_buffers
from .operators import evaluate, freeze_dynamic, learned_ratios, param_groups, set_routing

__all__ = [
    "OPTION",
    "FinetuneConfig",
    "FinetuneResult",
    "TrainingError",
    "check_settings",
    "effective_warmup",
    "evaluate",
    "finetune",
    "freeze_dynamic",
    "learned_ratios",
    "lr_at",
    "param_groups",
    "set_routing",
    "sync_buffers",
]


def finetune(model: nn.Module, train_loader, val_loader=None, *, teacher: nn.Module | None = None, **settings: Any):
    """Train ``model`` in place and return a :class:`FinetuneResult` with the per-epoch history.

    ``settings`` are :class:`FinetuneConfig`'s fields (``epochs`` and ``lr`` required) and the operator
    families' declared settings (``PartialOperator.training_settings``: ``theta``/``kappa``/
    ``target_macs``, ``dp_alpha``, ``dp_alpha_under``, ``dp_beta`` for DPConv's 000 eq. 8;
    ``router_budget``, ``router_weight``, ``ada_routing`` for Ada-PConv); anything else is a
    TrainingError naming the known ones.

    Loss: ``(1 - kd_weight) * task + kd_weight * T^2 KL`` against ``teacher`` (task alone without one),
    then each operator family's objective (e.g. eq. 8 with gate monotonicity after every step and
    annealing per epoch, 000 Algorithm 1; the router budget). Ada-PConv trains with ``ada_routing``
    ("ste", the default: hard forward as deployed, soft gradient; or "soft" mixing as in 004, which
    deploy() then warns about) and every evaluation measures the deployed function (hard routing).
    The warm-up is capped at half the run. ``out_dir`` receives ``last.pt``/``best.pt`` (atomic, every
    epoch) and ``log.jsonl``; ``resume=True`` continues from ``out_dir/last.pt``, bit-exact on CPU:
    every setting that shapes the run must match the checkpoint's (``run_settings``: more of them),
    except ``epochs``, which may grow (the schedule is recomputed and the log says so). Under torchrun
    (WORLD_SIZE > 1) the model is wrapped in DDP and rank 0 alone writes.
    """
    return Trainer(model, train_loader, val_loader, teacher, config=FinetuneConfig.from_settings(**settings)).run()
