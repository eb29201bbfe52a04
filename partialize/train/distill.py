"""Knowledge distillation (Hinton et al. 2015): KL divergence between temperature-softened teacher
and student distributions, scaled by T^2 so its gradients keep their size as T changes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    T = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)


class DistillationLoss(nn.Module):
    """``(1 - weight) * task(student, target) + weight * kd_loss(student, teacher, T)``.

    ``task`` is any criterion taking (logits, target), e.g. cross-entropy with label smoothing or
    timm's SoftTargetCrossEntropy for mixup targets. ``weight = 0`` is the task loss alone.
    """

    def __init__(self, task: nn.Module, temperature: float = 4.0, weight: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight must be in [0, 1], got {weight}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.task, self.temperature, self.weight = task, float(temperature), float(weight)

    def forward(
        self, student_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        task = self.task(student_logits, target)
        if teacher_logits is None or self.weight == 0.0:
            return task
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        return (1.0 - self.weight) * task + self.weight * kd
