"""Fine-tuning and training: the loop, distillation, DPConv/Ada-PConv constraints, checkpoints, DDP.

Nothing here is imported by ``partialize`` itself; import ``partialize.train`` to use it.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .constraints import (
    dpconv_complexity_loss,
    dpconv_layers,
    kappa_from_target_macs,
    kappa_from_theta,
    learned_ratios,
    router_budget_loss,
)
from .distill import DistillationLoss, kd_loss
from .finetune import FinetuneResult, finetune, freeze_dynamic

__all__ = [
    "DistillationLoss",
    "FinetuneResult",
    "dpconv_complexity_loss",
    "dpconv_layers",
    "finetune",
    "freeze_dynamic",
    "kappa_from_target_macs",
    "kappa_from_theta",
    "kd_loss",
    "learned_ratios",
    "load_checkpoint",
    "router_budget_loss",
    "save_checkpoint",
]
