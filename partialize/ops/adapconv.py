"""Ada-PConv (004): a router picks, per input, how many channels the conv processes.

Router (004 eq. 2): alpha = softmax(W_r GAP(X)) over the ratios (default 1/8, 1/4, 1/2).
``routing="soft"`` (training) returns sum_i alpha_i PConv_i(X) (004 soft fusion);
``routing="hard"`` (inference) runs, per sample, only the arg-max branch: the batch is grouped by
branch, so an input costs the router plus one branch.
``routing="ste"`` (training, our addition): the forward value is the hard routing's, the router's
gradient is the soft mixture's (straight-through). Training then sees the function that is
deployed; soft training evaluated with hard routing computes a different function.

Training (the operator contract's family objective, :class:`RouterObjective`): every epoch trains with
the ``ada_routing`` setting ("ste" by default), and an optional compute budget on the router
(:class:`RouterBudget`) keeps soft training from collapsing onto the widest branch.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OperatorError
from ..macs import count_macs
from ._export import exporting
from ._utils import copy_top_left, split_channels
from .base import PartialOperator, TrainingContext, TrainingError, TrainingObjective, TrainingSetting
from .pconv import conv_source, dirac_outside
from .registry import register_operator

ROUTINGS = ("soft", "hard", "ste")


class SoftRoutingWarning(UserWarning):
    """An Ada-PConv trained with soft routing is deployed with hard routing: a different function."""


@register_operator("ada_pconv")
class AdaPConv(PartialOperator):
    """Input-adaptive partial conv with one conv per ratio and a GAP -> linear -> softmax router."""

    PARAM_CHOICES = {"routing": ROUTINGS}  # values a recipe may give, checked when it is validated
    ratio_words = {"adaptive": ("ada_pconv", {})}
    data_dependent = True  # hard routing: each input pays for its chosen branch
    training_settings = {  # read by training_objective; finetune(**settings) keys, CLI options
        "router_budget": TrainingSetting(
            None, "Ada-PConv: mean branch cost / widest branch cap.", lambda v: 0 < v <= 1, "in (0, 1]",
            "the expected branch MACs as a share of the widest branch's, e.g. --router-budget 0.3",
            flag="--router-budget", needs_layers=True,
        ),
        "router_weight": TrainingSetting(
            1.0, "Weight of the router budget term.", lambda v: v >= 0, ">= 0", "e.g. --router-weight 1",
            flag="--router-weight",
        ),
        "ada_routing": TrainingSetting(
            "ste", "Ada-PConv training routing: ste (hard forward as deployed, soft gradient) or soft mixing "
            "(004; deployed hard routing is then a different function).", lambda v: v in ("ste", "soft"),
            "'ste' or 'soft'", "ste trains the deployed function", flag="--ada-routing", value_type=str,
            choices=("ste", "soft"),
        ),
    }  # fmt: skip

    def __init__(
        self,
        dim: int,
        ratios: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2),
        kernel_size: int | tuple[int, int] = 3,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        routing: str = "soft",
    ) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise OperatorError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if len(ratios) < 2:
            raise OperatorError("Ada-PConv needs at least two ratios to choose from")
        self.dim = dim
        self.ratios = tuple(float(r) for r in ratios)
        self.widths = [split_channels(dim, r) for r in self.ratios]
        self.routing = routing
        ks = nn.modules.utils._pair(kernel_size)
        dl = nn.modules.utils._pair(dilation)
        if any(k % 2 == 0 for k in ks):
            raise OperatorError(f"Ada-PConv needs an odd kernel to keep the spatial size, got {ks}")
        pad = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl))
        self.branches = nn.ModuleList(nn.Conv2d(n, n, ks, 1, pad, dl, bias=bias) for n in self.widths)
        self.router = nn.Linear(dim, len(self.ratios))
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.last_choice: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        self.trained_routing: str | None = None  # set by the trainer; deploy() warns after "soft"

    def extra_repr(self) -> str:
        return f"dim={self.dim}, widths={self.widths}, routing={self.routing!r}"

    @property
    def last_histogram(self) -> torch.Tensor:
        """Samples per branch in the last forward (zeros before the first)."""
        if self.last_choice is None:
            return torch.zeros(len(self.widths), dtype=torch.long)
        return torch.bincount(self.last_choice.cpu(), minlength=len(self.widths))

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """alpha = softmax(W_r GAP(x)) per 004 eq. 2, shape (B, branches)."""
        return F.softmax(self.router(x.mean(dim=(2, 3))), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.route(x)
        self.last_probs = probs.detach()
        self.last_choice = probs.detach().argmax(dim=1)
        if self.routing == "soft":
            return self._soft(x, probs)
        if self.routing == "ste":
            one_hot = torch.nn.functional.one_hot(self.last_choice, len(self.widths)).to(probs.dtype)
            return self._soft(x, one_hot + probs - probs.detach())  # value: hard; gradient: soft
        return self._hard(x, self.last_choice)

    def _soft(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        # sum_i a_i cat(conv_i(x[:n_i]), x[n_i:]) = x + sum_i a_i pad(conv_i(x[:n_i]) - x[:n_i])
        # because the a_i sum to one (004 soft fusion).
        out = x
        for i, (conv, n) in enumerate(zip(self.branches, self.widths)):
            x1 = x[:, :n]
            delta = (conv(x1) - x1) * probs[:, i].to(x.dtype).reshape(-1, 1, 1, 1)
            out = out + F.pad(delta, (0, 0, 0, 0, 0, self.dim - n))
        return out

    def _hard(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        if exporting():
            return self._select(x, choice)
        out = x.clone()
        for i, (conv, n) in enumerate(zip(self.branches, self.widths)):
            idx = (choice == i).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            if idx.numel() == x.shape[0]:
                out[:, :n] = conv(x[:, :n])
            else:
                out[idx, :n] = conv(x[idx, :n])
        return out

    def _select(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Hard routing without data-dependent shapes, for exporters: every branch runs on the whole
        batch and each sample takes its chosen branch's output (``torch.where``). The same function
        per sample, at the cost of all branches; a traced or exported graph cannot group the batch."""
        choice = choice.reshape(-1, 1, 1, 1)
        out = x
        for i, (conv, n) in enumerate(zip(self.branches, self.widths)):
            y = torch.cat((conv(x[:, :n]), x[:, n:]), dim=1)
            out = torch.where(choice == i, y, out)
        return out

    @classmethod
    def from_module(
        cls, original: nn.Module, ratios=(1 / 8, 1 / 4, 1 / 2), ratio: float | str | None = None, **params
    ) -> AdaPConv:
        """Each branch inherits the top-left block of ``original`` (Dirac beyond a PConv's width).

        A numeric ``ratio`` r (e.g. from a recipe's defaults) centres the branches on it:
        (r/2, r, min(1, 2r)); ``"adaptive"`` or None keeps ``ratios``.
        """
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            ratios = (ratio / 2, ratio, min(1.0, 2 * ratio))
        elif ratio not in (None, "adaptive"):
            raise OperatorError(f"Ada-PConv ratio must be a number or 'adaptive', got {ratio!r}")
        src, dim = conv_source(original, "Ada-PConv")
        op = cls(dim, tuple(ratios), src.kernel_size, src.dilation, src.bias is not None, **params)
        for conv in op.branches:
            copy_top_left(conv, src)
        return op.to(src.weight.device)

    # --- the operator contract ------------------------------------------------------------------
    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Conv2d:
            return None
        return dirac_outside(module, min(cls.from_module(module).widths))  # every branch then agrees

    def macs(self, *args, **kwargs) -> tuple[int, str]:
        """The bound the plan quotes: router + the widest branch (hard routing is data-dependent; reports
        count the real average over calibration images)."""
        widest = max(range(len(self.widths)), key=lambda i: self.widths[i])
        op = self.deploy()
        with torch.no_grad():
            op.router.weight.zero_()
            op.router.bias.fill_(-1e4)
            op.router.bias[widest] = 1e4
        return count_macs(
            op, *args, **kwargs
        ).total, "upper bound: router + widest branch (hard routing is data-dependent)"

    def reference(self) -> nn.Module:
        """The deployed function: hard routing (soft/ste mixing is the training relaxation)."""
        ref = copy.deepcopy(self).eval()
        ref.routing = "hard"
        return ref

    def set_routing(self, routing: str) -> str | None:
        if routing not in ROUTINGS:
            raise OperatorError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        before, self.routing = self.routing, routing
        return before

    def freeze(self) -> AdaPConv:
        """The deployed routing (hard), still trainable; warns like deploy() after soft training."""
        self._warn_if_soft_trained()
        op = copy.deepcopy(self)
        op.routing = "hard"
        return op

    @classmethod
    def training_objective(
        cls, layers: Mapping[str, PartialOperator], settings: Mapping[str, Any], context: TrainingContext
    ) -> RouterObjective:
        """Train every Ada-PConv with ``ada_routing``; with ``router_budget`` add the router's compute budget."""
        return RouterObjective(layers, settings["ada_routing"], settings["router_budget"], settings["router_weight"])

    def export_note(self) -> str | None:
        return (
            "Ada-PConv: the exported graph routes per sample like the eager model (arg-max of the router) but "
            "computes every branch and selects with torch.where, so it costs the sum of all branch convs; eager "
            "partialize.deploy() runs only the chosen branch"
        )

    def describe(self) -> dict:
        hist = self.last_histogram.tolist()
        seen = sum(hist)
        return {
            "kind": "input-adaptive width",
            "widths": list(self.widths),
            "channels": self.dim,
            "routing": self.routing,
            "histogram": hist,
            "realised_ratio": sum(c * n for c, n in zip(hist, self.widths)) / seen / self.dim if seen else None,
        }

    def deploy(self) -> AdaPConv:
        """Inference form: hard routing, eval mode, frozen weights.

        Warns (:class:`SoftRoutingWarning`) when the trainer recorded soft routing: soft mixing
        trains ``sum_i a_i PConv_i(x)`` while this form runs only the arg-max branch, a different
        function on the same weights (tens of % apart on digits, docs/training.md).
        """
        self._warn_if_soft_trained()
        op = copy.deepcopy(self).eval()
        op.routing = "hard"
        op.last_choice = op.last_probs = None
        return op.requires_grad_(False)

    def _warn_if_soft_trained(self) -> None:
        if self.trained_routing == "soft":
            warnings.warn(
                "this Ada-PConv was trained with soft routing (sum of all branches) but is deployed with "
                "hard routing (one branch per input): a different function on the same weights, so expect "
                "lower accuracy than measured while training; fine-tune with --ada-routing ste "
                "(finetune(ada_routing='ste'), the default) to train the function that is deployed",
                SoftRoutingWarning,
                stacklevel=3,
            )


# --- training: routing and the router's compute budget (the family objective) ------------------------


class RouterBudget:
    """Ada-PConv compute budget: ``weight * mean_l relu(E[cost_l] - budget)``, where
    ``cost_l = sum_i p_i (n_i / n_max)^2`` is the expected branch MACs relative to the widest branch
    under the router's probabilities p (004 eq. 2), averaged over the batch.

    Forward hooks on ``layers`` recompute the router's probabilities with gradient (the operator keeps
    only a detached copy); the router is a pooled linear layer, so this costs next to nothing.
    """

    def __init__(self, layers: Mapping[str, AdaPConv], budget: float, weight: float = 1.0) -> None:
        if not 0.0 < budget <= 1.0:
            raise TrainingError(f"--router-budget must be in (0, 1] (share of the widest branch), got {budget}")
        self.budget, self.weight = float(budget), float(weight)
        self.layers = dict(layers)
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
        self._hooks = []


def router_budget_loss(model: nn.Module, x: torch.Tensor, budget: float, weight: float = 1.0) -> torch.Tensor:
    """One-shot form of :class:`RouterBudget` over every Ada-PConv of ``model``: run ``model(x)`` and
    return only the budget term."""
    rb = RouterBudget({n: m for n, m in model.named_modules() if isinstance(m, AdaPConv)}, budget, weight)
    try:
        model(x)
        term, _ = rb.loss()
    finally:
        rb.remove()
    return term if term is not None else torch.zeros(())


class RouterObjective(TrainingObjective):
    """The Ada-PConv family's part of a run: each epoch trains with ``routing`` (and marks the layers, so
    deploy() can warn after soft training); with a ``budget``, the :class:`RouterBudget` term is added
    and the epoch's mean expected branch cost logged (``router_expected_cost``)."""

    def __init__(self, layers: Mapping[str, AdaPConv], routing: str, budget: float | None, weight: float) -> None:
        super().__init__(layers)
        self.routing, self.budget, self.weight = routing, budget, weight
        self._rb = RouterBudget(self.layers, budget, weight) if budget is not None else None
        self._cost, self._steps = 0.0, 0

    def run_settings(self) -> dict[str, Any]:
        on = self.budget is not None
        return {"router_budget": self.budget, "router_weight": self.weight if on else None, "ada_routing": self.routing}

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        self._cost, self._steps = 0.0, 0
        for m in self.layers.values():
            m.set_routing(self.routing)
            m.trained_routing = self.routing  # what deploy() checks (SoftRoutingWarning)

    def __call__(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._steps += 1
        if self._rb is None:
            return loss, {}
        term, cost = self._rb.loss()
        if term is None:
            return loss, {}
        self._cost += cost
        return loss, {"router_budget": term}

    def epoch_record(self) -> dict[str, Any]:
        if self._rb is None or not self._steps:
            return {}
        return {"router_expected_cost": self._cost / self._steps}

    def close(self) -> None:
        if self._rb is not None:
            self._rb.remove()
