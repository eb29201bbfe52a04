"""DPConv (000, "Learnable Dynamic Partial Convolution"): the split ratio is learned per layer.

K = ceil(log2 C) gates g~_k in [-1, 1] are binarised by g_k = step(g~_k) with a straight-through
estimator. The conv gets n = min(C, 2^{sum_k (1 - g_k)}) channels, i.e. r_p = n / C (000, the r_p
formula after eq. 6). The channel mask is the Kronecker product of the K vectors [1, 1 - g_k]
(000 Figure 4); with non-increasing gates it is a prefix of length n, so the trained layer is
exactly "conv on the first n channels, attention/identity on the rest" and deploys as a static
PConv/PATConv slice.

Choices (docs/operators.md): the paper writes zeta = sum 2^{2 sum g} but r_p with (1 - g); we take
zeta_l = (r_p C_l)^2, the squared conv width, which is what kappa = sum (C_l / theta)^2 bounds
(theta = 4 <=> FasterNet's 1/4). Channel counts that are not powers of two use K = ceil(log2 C) and
truncate the mask to C, so reachable widths are the powers of two below C, and C itself.

Training (the operator contract's family objective, :class:`ComplexityObjective`): 000 eq. 8
``L = L_task * (kappa / zeta)^alpha + beta * psi`` over every DPConv layer of the model, with
``zeta = sum_l complexity()``, ``kappa = sum_l (C_l / theta)^2`` (or solved from a MAC target),
``alpha = alpha_over`` (-0.01) above kappa, ``alpha_under`` below it (our two-sided choice, 0 in the
paper, docs/training.md), ``psi = sum_l penalty()``; each epoch at its annealing temperature.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OperatorError
from ._utils import copy_top_left
from .attention import GATES, GaussianChannelAttention, channel_mean_std
from .base import PartialOperator, TrainingContext, TrainingError, TrainingObjective, TrainingSetting
from .patconv import PATConv
from .pconv import PConv, conv_source, dirac_outside, is_partial_source
from .registry import register_operator

DP_ATTENTIONS = ("identity", "ch")


def binarize_ste(g_tilde: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """g = 1[g~ > 0] forward; straight-through gradient 1/temperature where |g~| <= 1, ends included.

    The gates live in [-1, 1] (000: g~_k in [-1, 1]; the trainer clamps them there), and the clamps
    put them *on* +-1, so the window must include its ends: ``clamp(-1, 1)``'s gradient is 0 at +-1,
    which would freeze every gate that reached the boundary for good.
    """
    inside = g_tilde.detach().abs() <= 1.0
    soft = torch.where(inside, g_tilde, g_tilde.detach()) / float(temperature)
    hard = (g_tilde > 0).to(g_tilde.dtype)
    return hard + (soft - soft.detach())


@register_operator("dpconv")
class DPConv(PartialOperator):
    """Conv on a learned prefix of the channels, identity or PAT_ch attention on the rest."""

    PARAM_CHOICES = {"attn": DP_ATTENTIONS, "gate": tuple(GATES), "mapping": ("dense", "channelwise")}  # recipes
    ratio_words = {"dynamic": ("dpconv", {}), "inherit": ("dpconv", {})}
    gap = 0.5  # enforce_monotonic_()'s spacing, as a share of 1/K (set_ratio() spaces gates by 1/K)
    training_settings = {  # read by training_objective (000 eq. 8); finetune(**settings) keys, CLI options
        "theta": TrainingSetting(
            None, "DPConv target: kappa = sum (C_l/theta)^2 (000 eq. 8); 4 ~ 1/4.", lambda v: v >= 1, ">= 1",
            "kappa = sum (C_l/theta)^2 (000 eq. 8), e.g. --theta 4 for about 1/4 of the channels",
            flag="--theta", needs_layers=True,
        ),
        "target_macs": TrainingSetting(
            None, "DPConv target as whole-model MACs per image (e.g. 1.2e9).", lambda v: v > 0, "> 0",
            "whole-model MACs per image, e.g. --target-macs 1.2e9", flag="--target-macs", needs_layers=True,
        ),
        "kappa": TrainingSetting(
            None, "", lambda v: v > 0, "> 0", "a target from --theta (>= 1) or --target-macs",
            label="--theta/--target-macs", needs_layers=True,
        ),
        "dp_alpha": TrainingSetting(
            -0.01, "alpha when zeta > kappa (000 eq. 8).", lambda v: v <= 0, "<= 0",
            "000 eq. 8 uses -0.01 (over the target, fewer channels)", flag="--dp-alpha",
        ),
        "dp_alpha_under": TrainingSetting(
            0.01, "alpha when zeta < kappa (000 eq. 8 has 0: kappa only caps; >0 pulls narrow layers up to it).",
            lambda v: v >= 0, ">= 0", "0 is 000 eq. 8, 0.01 pulls narrow layers up", flag="--dp-alpha-under",
        ),
        "dp_beta": TrainingSetting(
            0.9, "Weight of the gate monotonicity term psi.", lambda v: v >= 0, ">= 0", "000 eq. 8 uses 0.9",
            flag="--dp-beta",
        ),
    }  # fmt: skip

    def __init__(
        self,
        dim: int,
        kernel_size: int | tuple[int, int] = 3,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        attn: str = "identity",
        init_ratio: float | None = None,
        identity_init: bool = False,
        gate: str = "sigmoid",
        mapping: str = "dense",
    ) -> None:
        super().__init__()
        if attn not in DP_ATTENTIONS:
            raise OperatorError(f"DPConv attn must be one of {DP_ATTENTIONS}, got {attn!r}")
        if dim < 2:
            raise OperatorError("DPConv needs at least 2 channels")
        self.dim = dim
        self.num_gates = max(1, math.ceil(math.log2(dim)))
        ks = nn.modules.utils._pair(kernel_size)
        dl = nn.modules.utils._pair(dilation)
        if any(k % 2 == 0 for k in ks):
            raise OperatorError(f"DPConv needs an odd kernel to keep the spatial size, got {ks}")
        pad = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl))
        self.conv = nn.Conv2d(dim, dim, ks, 1, pad, dl, bias=bias)
        self.gates = nn.Parameter(torch.empty(self.num_gates).uniform_(-1.0, 1.0))  # 000 Alg. 1 init
        self.temperature = 1.0  # set per epoch by anneal_() (000 Alg. 1 line 14); not a learned value
        self.attn_type = attn
        if attn == "ch":
            self.attn = GaussianChannelAttention(dim, gate=gate, identity_init=identity_init, mapping=mapping)
        else:
            self.attn = None
        if init_ratio is not None:
            self.set_ratio(init_ratio)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gates={self.num_gates}, attn={self.attn_type!r}, ratio={self.ratio:.4f}"

    # --- gates -------------------------------------------------------------------------------
    def tempered_gates(self) -> torch.Tensor:
        """g~ / tau: the gates at this epoch's temperature (000 Alg. 1 line 14), same signs as g~."""
        return self.gates / self.temperature

    def binary_gates(self) -> torch.Tensor:
        """g_k in {0, 1} (with straight-through gradient, scaled by 1 / temperature)."""
        return binarize_ste(self.gates, self.temperature)

    def mask(self) -> torch.Tensor:
        """Channel mask m in {0,1}^C: Kronecker product of [1, 1 - g_k] (000 Figure 4), truncated."""
        g = self.binary_gates()
        one = torch.ones_like(g[0])
        factors = [torch.stack((one, 1.0 - gk)) for gk in g]
        return functools.reduce(torch.kron, factors)[: self.dim]

    @property
    def num_conv_channels(self) -> int:
        """n = min(C, 2^{sum(1 - g_k)}) for the current gates (000: r_p = 2^{sum(1-g_k)}/C)."""
        zeros = int((self.gates.detach() <= 0).sum())
        return min(self.dim, 2**zeros)

    @property
    def ratio(self) -> float:
        return self.num_conv_channels / self.dim

    def set_ratio(self, ratio: float, spacing: float | None = None) -> None:
        """Set monotone gates giving the power-of-two width nearest to ratio * C (on the log scale).

        The gates are staggered, ``+-spacing * j`` for the j-th gate from the on/off boundary
        (default spacing 1/K, so all lie in [-1, 1]): gates of equal magnitude all cross zero in the
        same optimiser step (Adam moves each by about the same amount), jumping e.g. from 64 channels
        straight to 1; staggered, the nearest gate crosses first and the width changes by one
        reachable step at a time.
        """
        target = max(1.0, min(float(self.dim), ratio * self.dim))
        zeros = min(self.num_gates, max(0, round(math.log2(target))))
        ones = self.num_gates - zeros
        step = 1.0 / self.num_gates if spacing is None else float(spacing)
        values = [step * (ones - k) for k in range(ones)] + [-step * (j + 1) for j in range(zeros)]
        with torch.no_grad():
            self.gates.copy_(torch.tensor(values, dtype=self.gates.dtype).clamp(-1.0, 1.0))

    def complexity(self) -> torch.Tensor:
        """zeta_l = n^2 = 2^{2 sum(1 - g_k)}, capped at C^2; differentiable through the STE.

        The cap is applied straight-through (value capped, gradient kept): a clamp would give a
        layer at full width (every power-of-two C with all gates off) no push from eq. 8 at all.
        """
        raw = torch.pow(2.0, 2.0 * (1.0 - self.binary_gates()).sum())
        return raw - (raw - float(self.dim) ** 2).clamp(min=0.0).detach()

    def penalty(self) -> torch.Tensor:
        """psi_l = sum_i max(0, g~_{i+1} - g~_i): gates should not increase (000, after eq. 8)."""
        return F.relu(self.gates[1:] - self.gates[:-1]).sum()

    @torch.no_grad()
    def enforce_monotonic_(self, eps: float | None = None) -> None:
        """g~_k <- max(g~_k, g~_{k+1} + eps), last to first (000 Alg. 1 line 12), within [-1, 1].

        ``eps`` (default ``DPConv.gap / K``) is the smallest spacing kept between neighbours; a tiny
        eps bunches gates that meet into one, and a bunch crosses zero in a single step (width
        16 -> 1). Where the clamp at +1 would tie the first gates, a second pass, first to last,
        moves the later ones down to keep the spacing.
        """
        gap = self.gap / self.num_gates if eps is None else float(eps)
        g = self.gates
        for k in range(self.num_gates - 2, -1, -1):
            g[k] = torch.maximum(g[k], g[k + 1] + gap)
        g.clamp_(-1.0, 1.0)
        for k in range(1, self.num_gates):
            g[k] = torch.minimum(g[k], g[k - 1] - gap)
        g.clamp_(-1.0, 1.0)

    def anneal_(self, epoch: int, total_epochs: int) -> None:
        """Temperature for epoch t of T: tau = sqrt(t/T), so the tempered gates are g~ / sqrt(t/T)
        (000 Alg. 1 line 14; t counts from 1). Set from (t, T) alone, never applied on top of the
        previous epoch's: dividing the stored gates in place compounds (x17 after epoch 1 of 300,
        then clamped onto +-1, which also erases the staggering). Sign(g~ / tau) = Sign(g~), so the
        width is unchanged; tau scales the straight-through gradient (docs/operators.md)."""
        t = max(1, min(int(epoch), int(total_epochs)))
        self.temperature = math.sqrt(t / int(total_epochs))

    def is_prefix(self) -> bool:
        """True when the active channels are exactly the first n (monotone gates)."""
        m = self.mask().detach()
        n = int(m.sum())
        return bool(m[:n].all()) and n == self.num_conv_channels

    # --- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask().to(x.dtype).reshape(1, -1, 1, 1)
        conv = self.conv(x * m) * m  # 000 eq. 7, conv part: W masked to the active block
        if self.attn is None:
            rest = x
        else:
            rest = self._masked_attention(x, 1.0 - m)
        return conv + (1.0 - m) * rest

    def _masked_attention(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """PAT_ch over the inactive channels only: their statistics are the only inputs."""
        a = self.attn
        keep = keep.reshape(1, -1)
        mean, std = channel_mean_std(x, a.eps)
        z = torch.cat((mean * keep, std * keep), dim=1).to(x.dtype)
        s = a.norm(GATES[a.gate](a.fc(z)))
        return x * s[:, :, None, None]

    # --- conversion / deploy ----------------------------------------------------------------
    @classmethod
    def from_module(cls, original: nn.Module, ratio=None, attn: str = "identity", **params) -> DPConv:
        """Build from a size-keeping dense conv or a PConv with its weights; gates start at ``ratio``.

        ``ratio=None``/"dynamic" starts a partial source at its own width and a dense conv at 1/4.
        """
        src, dim = conv_source(original, "DPConv")
        if ratio in (None, "dynamic", "inherit"):
            ratio = src.in_channels / dim if is_partial_source(original) else 0.25
        if is_partial_source(original):
            params.setdefault("identity_init", True)
        op = cls(dim, src.kernel_size, src.dilation, src.bias is not None, attn=attn, **params)
        copy_top_left(op.conv, src)
        op.set_ratio(float(ratio))
        return op.to(src.weight.device)

    # --- the operator contract: training hooks, report, faithful setting --------------------------
    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Conv2d:
            return None
        return dirac_outside(module, cls.from_module(module).num_conv_channels)

    def structure_parameters(self) -> list[nn.Parameter]:
        return [self.gates]

    def after_step(self) -> None:
        self.enforce_monotonic_()  # 000 Alg. 1 line 12

    # no after_epoch: the temperature of epoch t is set before it, by ComplexityObjective.epoch_start (000
    # Alg. 1 line 14), and only when eq. 8 has a target, as the gates then train against it

    def freeze(self) -> nn.Module:
        """The static slice at the learned width, still trainable: a PConv (identity) or PATConv (ch) on the
        first n channels, or the dense conv when n = C (refused while the gates are not monotone)."""
        return self._static_slice()

    @classmethod
    def training_objective(
        cls, layers: Mapping[str, PartialOperator], settings: Mapping[str, Any], context: TrainingContext
    ) -> ComplexityObjective:
        """000 eq. 8 over ``layers`` (every DPConv of the model) against the target from ``kappa``,
        ``theta`` or ``target_macs`` (at most one); without a target only the learned ratios are logged."""
        kappa = _resolve_kappa(layers, settings, context)
        return ComplexityObjective(
            layers, kappa, alpha_over=settings["dp_alpha"], alpha_under=settings["dp_alpha_under"],
            beta=settings["dp_beta"],
        )  # fmt: skip

    def describe(self) -> dict:
        n, c = self.num_conv_channels, self.dim
        return {"kind": "learned width", "width": n, "channels": c, "realised_ratio": n / c}

    def deploy(self) -> nn.Module:
        """Static inference form at the learned width: PConv (identity) or PATConv (ch) slice."""
        form = self._static_slice()
        if isinstance(form, nn.Conv2d):
            return form.eval().requires_grad_(False)
        return form.eval().deploy()

    def _static_slice(self) -> nn.Module:
        """The trainable static operator at the learned width (what freeze() returns, deploy() deploys)."""
        if not self.is_prefix():
            raise OperatorError(
                "DPConv gates are not monotone, so the active channels are not a prefix and the layer cannot "
                "become a static slice without changing what it computes; call enforce_monotonic_() (the trainer "
                "does after every step) and check the accuracy before deploying or freezing"
            )
        n = self.num_conv_channels
        w = self.conv.weight
        if n == self.dim:
            return copy.deepcopy(self.conv).train(self.training)
        if self.attn is None:
            op = PConv(self.dim, n / self.dim, self.conv.kernel_size, self.conv.dilation, self.conv.bias is not None)
            op = op.to(w.device, w.dtype).train(self.training)
            copy_top_left(op.conv, self.conv)
            return op
        op = PATConv(
            self.dim,
            n / self.dim,
            "ch",
            self.conv.kernel_size,
            self.conv.dilation,
            self.conv.bias is not None,
            gate=self.attn.gate,
            eps=self.attn.eps,
            mapping=self.attn.mapping,
        ).to(self.conv.weight.device, self.conv.weight.dtype)
        copy_top_left(op.conv, self.conv)
        a, b = self.attn, op.attn
        C = self.dim
        with torch.no_grad():
            if isinstance(a.fc, nn.Linear):
                b.fc.weight.copy_(torch.cat((a.fc.weight[n:, n:C], a.fc.weight[n:, C + n :]), dim=1))
            else:  # channelwise map: each channel's own two weights
                b.fc.weight.copy_(a.fc.weight[n:])
            b.fc.bias.copy_(a.fc.bias[n:])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(b.norm, name).copy_(getattr(a.norm, name)[n:])
        return op.train(self.training)


# --- training: 000 eq. 8 over the model's DPConv layers (the family objective) -----------------------


def dpconv_layers(model: nn.Module) -> dict[str, DPConv]:
    """Qualified name -> DPConv module of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DPConv)}


def kappa_from_theta(layers: Iterable[DPConv], theta: float) -> float:
    """kappa = sum_l (C_l / theta)^2 over the DPConv layers (000, text before eq. 8)."""
    if not theta >= 1:
        raise TrainingError(f"--theta must be >= 1 (000 eq. 8), got {theta}")
    layers = list(layers)
    if not layers:
        raise TrainingError("the model has no DPConv layers: --theta/--target-macs need ratio='dynamic'")
    return float(sum((m.dim / theta) ** 2 for m in layers))


def kappa_from_target_macs(layers: Mapping[str, DPConv], target_macs: float, breakdown: Mapping[str, Any]) -> dict:
    """The kappa that ``target_macs`` (whole model, per image) asks for, from the model's MAC ``breakdown``
    (``partialize.measure.flops.macs_breakdown``: its ``total`` and per-layer ``dynamic`` entries).

    The DPConv convs cost ``k^2 H_l W_l n_l^2`` MACs; everything else is fixed. Solving
    ``fixed + sum_l k^2 H_l W_l (C_l / theta)^2 = target`` for one theta shared by all layers and
    returning ``kappa = sum_l (C_l / theta)^2`` keeps eq. 8's form (000) while hitting the budget when
    every layer takes the same ratio; learned per-layer ratios trade width between layers, so the
    realised MACs land near, not exactly on, the target. PAT_ch's small map is counted as fixed.
    """
    dyn = {k: v for k, v in breakdown["dynamic"].items() if k in layers}
    if not dyn:
        raise TrainingError("the model has no DPConv layers: --target-macs needs ratio='dynamic'")
    # k^2 H_l W_l: the conv MACs per squared channel (a k x k conv at stride 1 keeps H x W)
    unit = {k: math.prod(layers[k].conv.kernel_size) * math.prod(v["input_hw"]) for k, v in dyn.items()}
    fixed = breakdown["total"] - sum(unit[k] * v["width"] ** 2 for k, v in dyn.items())
    full = sum(unit[k] * dyn[k]["channels"] ** 2 for k in dyn)
    budget = target_macs - fixed
    if budget <= 0:
        raise TrainingError(
            f"--target-macs {target_macs:.4g} is below the {fixed:.4g} MACs the model spends outside "
            "its DPConv layers; no ratio can reach it"
        )
    inv_theta2 = min(1.0, budget / full)
    return {
        "kappa": float(sum(v["channels"] ** 2 * inv_theta2 for v in dyn.values())),
        "theta": float(inv_theta2**-0.5),
        "fixed_macs": float(fixed),
        "dpconv_dense_macs": float(full),
    }


def _resolve_kappa(layers: Mapping[str, DPConv], settings: Mapping[str, Any], context: TrainingContext) -> float | None:
    """The eq. 8 target from whichever of kappa, theta, target_macs was given (None: no target)."""
    given = [k for k in ("kappa", "theta", "target_macs") if settings.get(k) is not None]
    if len(given) > 1:
        names = " and ".join(DPConv.training_settings[k].name(k) for k in given)
        raise TrainingError(f"give one DPConv target, not {names}: --theta or --target-macs (kappa= from Python)")
    if not given:
        return None
    if given[0] == "kappa":
        return float(settings["kappa"])
    if given[0] == "theta":
        return kappa_from_theta(layers.values(), settings["theta"])
    target = settings["target_macs"]
    k = kappa_from_target_macs(layers, target, context.count_macs())
    context.log(f"--target-macs {target:.4g}: kappa {k['kappa']:.1f} (uniform theta {k['theta']:.2f})")
    return k["kappa"]


@dataclass
class ComplexityTerms:
    """What eq. 8 computed for one step (floats, for the log)."""

    zeta: float
    kappa: float
    alpha: float
    psi: float
    factor: float
    extra: dict = field(default_factory=dict)


def _eq8_parts(
    layers: Iterable[DPConv], kappa: float, alpha_over: float, alpha_under: float
) -> tuple[torch.Tensor, torch.Tensor, ComplexityTerms]:
    """(kappa / zeta)^alpha and psi of 000 eq. 8 over ``layers``, with the step's terms as floats."""
    layers = list(layers)
    zeta = torch.stack([m.complexity() for m in layers]).sum()  # 000 Alg. 1 line 6
    psi = torch.stack([m.penalty() for m in layers]).sum()  # 000 eq. 8, psi_l
    z = float(zeta.detach())
    alpha = alpha_over if z > kappa else alpha_under if z < kappa else 0.0  # 000 Alg. 1 line 7 (under: 0)
    factor = (kappa / zeta) ** alpha
    return factor, psi, ComplexityTerms(z, kappa, alpha, float(psi.detach()), float(factor.detach()))


def complexity_loss(
    task_loss: torch.Tensor,
    layers: Iterable[DPConv],
    kappa: float,
    *,
    alpha_over: float = -0.01,
    beta: float = 0.9,
    alpha_under: float = 0.0,
) -> tuple[torch.Tensor, ComplexityTerms]:
    """``task * (kappa / zeta)^alpha + beta * psi`` (000 eq. 8 / Algorithm 1 line 8) over ``layers``."""
    layers = list(layers)
    if not layers:
        return task_loss, ComplexityTerms(0.0, kappa, 0.0, 0.0, 1.0)
    factor, psi, terms = _eq8_parts(layers, kappa, alpha_over, alpha_under)
    return task_loss * factor + beta * psi, terms  # 000 eq. 8


class ComplexityObjective(TrainingObjective):
    """The DPConv family's part of a run: 000 eq. 8 against ``kappa`` (the task loss reweighted by
    ``(kappa / zeta)^alpha``, ``beta * psi`` added) and each epoch t of T at the temperature sqrt(t/T)
    (Algorithm 1 line 14). Without a target (``kappa`` None) the loss is left alone and only the learned
    ratios are logged. Gate monotonicity after every step is each layer's ``after_step()``."""

    def __init__(
        self, layers: Mapping[str, DPConv], kappa: float | None, *, alpha_over: float, alpha_under: float, beta: float
    ) -> None:
        super().__init__(layers)
        self.kappa, self.alpha_over, self.alpha_under, self.beta = kappa, alpha_over, alpha_under, beta

    def run_settings(self) -> dict[str, Any]:
        on = self.kappa is not None
        return {
            "kappa": self.kappa,
            "dp_alpha": self.alpha_over if on else None,
            "dp_alpha_under": self.alpha_under if on else None,
            "dp_beta": self.beta if on else None,
        }

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        if self.kappa is not None:
            for m in self.layers.values():
                m.anneal_(epoch, total_epochs)  # 000 Alg. 1 line 14: this epoch's temperature, t from 1

    def __call__(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kappa is None:
            return loss, {}
        factor, psi, _ = _eq8_parts(self.layers.values(), self.kappa, self.alpha_over, self.alpha_under)
        return loss * factor, {"dpconv_psi": self.beta * psi}  # 000 eq. 8: L_task (kappa/zeta)^alpha + beta psi

    def epoch_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"ratios": {n: m.ratio for n, m in self.layers.items()}}
        if self.kappa is not None:
            rec["zeta"] = sum(float(m.complexity().detach()) for m in self.layers.values())
            rec["kappa"] = self.kappa
        return rec

    def epoch_summary(self, record: Mapping[str, Any]) -> str | None:
        ratios = record.get("ratios") or {}
        return f"mean DPConv ratio {sum(ratios.values()) / len(ratios):.3f}" if ratios else None
