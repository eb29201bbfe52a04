"""Training-time constraints of the dynamic operators.

- DPConv (000 eq. 8, Algorithm 1): ``L = L_task * (kappa / zeta)^alpha + beta * psi`` with
  ``zeta = sum_l DPConv.complexity()`` (n_l^2, the squared conv width), ``kappa = sum_l (C_l / theta)^2``,
  ``alpha = 0`` when ``zeta <= kappa`` else ``alpha_over`` (-0.01), ``psi = sum_l DPConv.penalty()``.
- Ada-PConv: a compute-budget hinge on the router's expected branch cost, so soft training does not
  collapse onto the widest (most accurate, most expensive) branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PartializeError
from ..ops import AdaPConv, DPConv


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def dpconv_layers(model: nn.Module) -> dict[str, DPConv]:
    """Qualified name -> DPConv module."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, DPConv)}


def ada_layers(model: nn.Module) -> dict[str, AdaPConv]:
    """Qualified name -> Ada-PConv module."""
    return {n: m for n, m in _unwrap(model).named_modules() if isinstance(m, AdaPConv)}


def kappa_from_theta(model: nn.Module, theta: float) -> float:
    """kappa = sum_l (C_l / theta)^2 over the DPConv layers (000, text before eq. 8)."""
    if theta < 1:
        raise PartializeError(f"--theta must be >= 1 (000 eq. 8), got {theta}")
    layers = dpconv_layers(model)
    if not layers:
        raise PartializeError("the model has no DPConv layers: --theta/--target-macs need ratio='dynamic'")
    return float(sum((m.dim / theta) ** 2 for m in layers.values()))


def kappa_from_target_macs(model: nn.Module, target_macs: float, input_size: int | tuple[int, int, int]) -> dict:
    """The kappa that ``target_macs`` (whole model, per image) asks for.

    The DPConv convs cost ``k^2 H_l W_l n_l^2`` MACs; everything else is fixed. Solving
    ``fixed + sum_l k^2 H_l W_l (C_l / theta)^2 = target`` for one theta shared by all layers and
    returning ``kappa = sum_l (C_l / theta)^2`` keeps eq. 8's form (000) while hitting the budget when
    every layer takes the same ratio; learned per-layer ratios trade width between layers, so the
    realised MACs land near, not exactly on, the target. PAT_ch's small map is counted as fixed.
    """
    from ..measure.flops import macs_breakdown

    mb = macs_breakdown(model, input_size, crosscheck=False)
    layers = dpconv_layers(model)
    dyn = {k: v for k, v in mb["dynamic"].items() if k in layers}
    if not dyn:
        raise PartializeError("the model has no DPConv layers: --target-macs needs ratio='dynamic'")
    # k^2 H_l W_l: the conv MACs per squared channel (a k x k conv at stride 1 keeps H x W)
    unit = {k: math.prod(layers[k].conv.kernel_size) * math.prod(v["input_hw"]) for k, v in dyn.items()}
    fixed = mb["total"] - sum(unit[k] * v["width"] ** 2 for k, v in dyn.items())
    full = sum(unit[k] * dyn[k]["channels"] ** 2 for k in dyn)
    budget = target_macs - fixed
    if budget <= 0:
        raise PartializeError(
            f"--target-macs {target_macs:.4g} is below the {fixed:.4g} MACs the model spends outside "
            "its DPConv layers; no ratio can reach it"
        )
    inv_theta2 = min(1.0, budget / full)
    theta = inv_theta2**-0.5
    return {
        "kappa": float(sum(v["channels"] ** 2 * inv_theta2 for v in dyn.values())),
        "theta": float(theta),
        "fixed_macs": float(fixed),
        "dpconv_dense_macs": float(full),
    }


@dataclass
class ComplexityTerms:
    """What eq. 8 computed for one step (floats, for the log)."""

    zeta: float
    kappa: float
    alpha: float
    psi: float
    factor: float
    extra: dict = field(default_factory=dict)


def dpconv_complexity_loss(
    task_loss: torch.Tensor,
    model: nn.Module,
    kappa: float,
    *,
    alpha_over: float = -0.01,
    beta: float = 0.9,
    alpha_under: float = 0.0,
) -> tuple[torch.Tensor, ComplexityTerms]:
    """``task * (kappa / zeta)^alpha + beta * psi`` (000 eq. 8 / Algorithm 1 line 8)."""
    layers = list(dpconv_layers(model).values())
    if not layers:
        return task_loss, ComplexityTerms(0.0, kappa, 0.0, 0.0, 1.0)
    zeta = torch.stack([m.complexity() for m in layers]).sum()  # 000 Alg. 1 line 6
    psi = torch.stack([m.penalty() for m in layers]).sum()  # 000 eq. 8, psi_l
    z = float(zeta.detach())
    alpha = alpha_over if z > kappa else alpha_under if z < kappa else 0.0  # 000 Alg. 1 line 7 (under: 0)
    factor = (kappa / zeta) ** alpha
    loss = task_loss * factor + beta * psi  # 000 eq. 8
    return loss, ComplexityTerms(float(zeta.detach()), kappa, alpha, float(psi.detach()), float(factor.detach()))


def learned_ratios(model: nn.Module) -> dict[str, dict]:
    """Per DPConv layer: channels, learned conv width n and ratio n / C."""
    return {
        n: {"channels": m.dim, "width": m.num_conv_channels, "ratio": m.ratio} for n, m in dpconv_layers(model).items()
    }


class RouterBudget:
    """Ada-PConv compute budget: ``weight * mean_l relu(E[cost_l] - budget)``, where
    ``cost_l = sum_i p_i (n_i / n_max)^2`` is the expected branch MACs relative to the widest branch
    under the router's probabilities p (004 eq. 2), averaged over the batch.

    Forward hooks recompute the router's probabilities with gradient (the operator keeps only a
    detached copy); the router is a pooled linear layer, so this costs next to nothing.
    """

    def __init__(self, model: nn.Module, budget: float, weight: float = 1.0) -> None:
        if not 0.0 < budget <= 1.0:
            raise PartializeError(f"--router-budget must be in (0, 1] (share of the widest branch), got {budget}")
        self.budget, self.weight = float(budget), float(weight)
        self.layers = ada_layers(model)
        self._costs: list[torch.Tensor] = []
        self._hooks = [m.register_forward_hook(self._hook) for m in self.layers.values()]

    def _hook(self, mod: AdaPConv, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if not mod.training or not torch.is_grad_enabled():
            return
        probs = mod.route(inp[0])
        w = torch.tensor([float(n) for n in mod.widths], device=probs.device)
        rel = (w / w.max()) ** 2
        self._costs.append((probs.float() * rel).sum(dim=1).mean())

    def loss(self) -> tuple[torch.Tensor | None, float]:
        """The budget term for the forward(s) since the last call, and the mean expected cost."""
        if not self._costs:
            return None, float("nan")
        costs = torch.stack(self._costs)
        self._costs = []
        return self.weight * torch.relu(costs - self.budget).mean(), float(costs.detach().mean())

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def router_budget_loss(model: nn.Module, x: torch.Tensor, budget: float, weight: float = 1.0) -> torch.Tensor:
    """One-shot form of :class:`RouterBudget`: run ``model(x)`` and return only the budget term."""
    rb = RouterBudget(model, budget, weight)
    try:
        model(x)
        term, _ = rb.loss()
    finally:
        rb.remove()
    return term if term is not None else torch.zeros(())
