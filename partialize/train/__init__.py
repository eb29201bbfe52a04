"""Fine-tuning and training: the loop (config, trainer, callbacks), distillation, checkpoints, DDP, and
the runs behind ``partialize finetune`` / ``partialize train``.

The trainer calls only the operator contract (``partialize.ops.PartialOperator``): each operator family
brings its own objective and settings (DPConv's 000 eq. 8, Ada-PConv's routing and router budget).
Nothing here is imported by ``partialize`` itself; import ``partialize.train`` to use it.
"""

from __future__ import annotations

from .callbacks import Callback
from .checkpoint import load_checkpoint, save_checkpoint
from .config import FinetuneConfig, TrainingError
from .distill import DistillationLoss, kd_loss
from .finetune import FinetuneResult, evaluate, finetune, freeze_dynamic, learned_ratios
from .loop import Trainer
from .runner import RunResult, run_finetune, run_train

__all__ = [
    "Callback",
    "DistillationLoss",
    "FinetuneConfig",
    "FinetuneResult",
    "RunResult",
    "Trainer",
    "TrainingError",
    "evaluate",
    "finetune",
    "freeze_dynamic",
    "kd_loss",
    "learned_ratios",
    "load_checkpoint",
    "run_finetune",
    "run_train",
    "save_checkpoint",
]
