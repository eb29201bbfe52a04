"""The partial attentions of PartialNet (000): Gaussian channel attention (PAT_ch), partial
self-attention with relative position bias (PAT_sf) and spatial attention for MLP tails (PAT_sp).

Choices where the paper is ambiguous (see docs/operators.md):
- PAT_ch follows eq. 4 in order, s = BN(gate(W z)): the gate is a sigmoid by default
  (``gate="hardsigmoid"`` is available), W is a dense map from the 2C' statistics [mu, std] to C'
  gates ("a single fully connected layer"), std uses the biased 1/HW variance of eq. 3.
- PAT_sf uses sqrt(head_dim) as the softmax scale and a per-head bias table indexed by the rounded
  Euclidean distance between tokens, clamped to ``num_buckets - 1``, so any H x W works.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OperatorError
from ._export import RefuseScript, exporting
from ._utils import bn_affine, split_channels
from .base import InferenceForm, PartialOperator
from .registry import register_operator

GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def channel_mean_std(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over H*W (000 eq. 2-3, biased variance), in float32.

    Two passes (the mean, then the mean of squared deviations), like torch.var_mean, but from plain
    reductions: on CPU var_mean is 7-19x slower on channel slices (13.8 ms vs 0.7-1.9 ms for
    16x48x56x56, 1 thread). The one-pass E[x^2] - E[x]^2 is faster still but loses ~1e-3 relative
    precision when |mean| >> std, which deploy-vs-train equivalence cannot afford.
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mean = xf.mean(dim=(2, 3), keepdim=True, dtype=torch.float32)  # 000 eq. 2
    var = (xf - mean).square_().mean(dim=(2, 3))
    return mean.flatten(1), var.add_(eps).sqrt_()  # 000 eq. 3 (in place: fewer ops and buffers at batch 1)


def _as(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` in ``ref``'s dtype, without a dispatched no-op ``to`` when it already is."""
    return t if t.dtype == ref.dtype else t.to(ref.dtype)


def _gate_fn(name: str):
    try:
        return GATES[name]
    except KeyError:
        raise OperatorError(f"gate must be one of {sorted(GATES)}, got {name!r}") from None


class GaussianChannelAttention(RefuseScript, nn.Module):
    """PAT_ch attention: gate each channel by a map of its mean and std over H*W.

    mu, std per 000 eq. 2-3 (``channel_mean_std``); s = BN(gate(W [mu, std])), F~ = F * s
    per 000 eq. 4. ``mapping="dense"``: W maps all 2C statistics to C gates (a fully connected
    layer); ``"channelwise"``: each channel's gate sees only its own mean and std (W in R^{C x 2},
    the shape the paper writes), far fewer parameters for wide layers. ``identity_init`` zeroes
    the BN scale and sets its shift to 1, so s == 1 and the module starts as the identity (used
    when converting a PConv whose other channels were identity).
    """

    def __init__(
        self,
        dim: int,
        gate: str = "sigmoid",
        eps: float = 1e-5,
        identity_init: bool = False,
        mapping: str = "dense",
    ):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.gate = gate
        self.mapping = mapping
        _gate_fn(gate)
        if mapping == "dense":
            self.fc = nn.Linear(2 * dim, dim)
        elif mapping == "channelwise":
            self.fc = ChannelwiseMap(dim)
        else:
            raise OperatorError(f"PAT_ch mapping must be 'dense' or 'channelwise', got {mapping!r}")
        self.norm = nn.BatchNorm1d(dim)
        if identity_init:
            nn.init.zeros_(self.norm.weight)
            nn.init.ones_(self.norm.bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, gate={self.gate!r}, eps={self.eps}"

    def statistics(self, x: torch.Tensor) -> torch.Tensor:
        """z = [mu, std] over H*W (000 eq. 2-3), shape (B, 2C), computed in float32 for stability."""
        mean, std = channel_mean_std(x, self.eps)
        return torch.cat((mean, std), dim=1).to(x.dtype)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate s of 000 eq. 4, shape (B, C, 1, 1)."""
        s = self.norm(_gate_fn(self.gate)(self.fc(self.statistics(x))))  # 000 eq. 4
        return s[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class ChannelwiseMap(nn.Module):
    """gate_c = w_c0 * mu_c + w_c1 * std_c + b_c on z = [mu, std] of shape (B, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(dim, 2).uniform_(-0.5, 0.5))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # (B, C, 2) x (C, 2) summed over the pair: 2 MACs a gate, as a contraction the counter sees
        pairs = torch.stack((z[:, : self.dim], z[:, self.dim :]), dim=-1)
        return torch.einsum("bck,ck->bc", pairs, self.weight) + self.bias


class FusedChannelGate(RefuseScript, nn.Module):
    """Inference form of GaussianChannelAttention: the BN is an affine on the gate."""

    def __init__(self, attn: GaussianChannelAttention):
        super().__init__()
        self.eps = attn.eps
        self.gate = attn.gate
        self.fc = copy.deepcopy(attn.fc)
        a, b = bn_affine(attn.norm)
        self.register_buffer("gate_scale", a.clone())
        self.register_buffer("gate_shift", b.clone())
        self.register_buffer("out_shift", None)

    def fold_output_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Absorb a following per-channel affine (a folded BN): y = x * (scale * s) + shift."""
        self.gate_scale = self.gate_scale * scale
        self.gate_shift = self.gate_shift * scale
        self.out_shift = shift.reshape(1, -1, 1, 1).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate_values(x)
        return self.apply_gate(x, s)

    def apply_gate(self, x: torch.Tensor, s: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x * s (+ shift), written into ``out`` when given (e.g. a channel slice of the output)."""
        s = s.view(s.shape[0], s.shape[1], 1, 1)
        if self.out_shift is None:
            return torch.mul(x, s, out=out) if out is not None else x * s
        shift = _as(self.out_shift, x)
        return torch.addcmul(shift, x, s, out=out) if out is not None else torch.addcmul(shift, x, s)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate s of shape (B, C) (BN folded)."""
        z = _as(torch.cat(channel_mean_std(x, self.eps), dim=1), x)
        return torch.addcmul(_as(self.gate_shift, x), _gate_fn(self.gate)(self.fc(z)), _as(self.gate_scale, x))


def distance_index(h: int, w: int, num_buckets: int, device=None) -> torch.Tensor:
    """(HW, HW) bucket index: rounded Euclidean distance between token positions, clamped."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack((ys.flatten(), xs.flatten()), dim=1).float()
    dist = (pos[:, None] - pos[None]).square().sum(-1).sqrt().round().long()  # no cdist: it has no ONNX op
    return dist.clamp_(max=num_buckets - 1)


class PartialSelfAttention(RefuseScript, nn.Module):
    """PAT_sf attention: multi-head self-attention on a (B, C, H, W) map with a learned bias.

    000 eq. 6: s = softmax(q k^T / sqrt(d) + R), F~ = v s. Pre-LayerNorm on the channels, no qkv
    bias; R is a per-head table over rounded token distances, so it works for any H x W.
    ``residual=True`` returns x + attention (PartialNet block v2's extra shortcut around the mixer);
    ``identity_init`` adds a zero-initialised output projection and the residual, so the module
    starts as the identity (used when converting a PConv whose other channels were identity).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        num_buckets: int = 16,
        qkv_bias: bool = False,
        norm: bool = True,
        proj: bool = False,
        residual: bool = False,
        identity_init: bool = False,
    ):
        super().__init__()
        if identity_init:  # x + proj(attn(x)) with proj = 0: exactly the identity until trained
            proj, residual = True, True
        if dim % num_heads:
            # fall back to the largest head count that divides dim
            num_heads = math.gcd(dim, num_heads)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_buckets = num_buckets
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim) if proj else nn.Identity()
        self.residual = residual
        if identity_init:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, num_buckets))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        self._index_cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, num_buckets={self.num_buckets}, residual={self.residual}"

    def position_bias(self, h: int, w: int, device) -> torch.Tensor:
        """R of 000 eq. 6 as (heads, HW, HW). Without gradients (inference, a frozen deployed copy) the
        gathered table is cached, keyed by the table's version counter, so an in-place change of
        ``rel_bias`` (a state dict loaded into it) is never served stale."""
        key = (h, w, str(device))
        idx = self._index_cache.get(key)
        if idx is None:
            idx = distance_index(h, w, self.num_buckets, device)
            self._index_cache[key] = idx
        table = self.rel_bias
        if (table.requires_grad and torch.is_grad_enabled()) or torch.jit.is_tracing() or exporting():
            return table[:, idx]
        cached = getattr(self, "_bias_cache", None)
        stamp = (key, table._version, table.data_ptr(), table.dtype)
        if cached is None or cached[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                cached = (stamp, table[:, idx].clone())
            self._bias_cache = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, N, C)
        qkv = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, hd)
        bias = self.position_bias(h, w, x.device)
        bias = (bias if bias.dtype == q.dtype else bias.to(q.dtype)).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # 000 eq. 6
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + out if self.residual else out


@register_operator("pat_sp")
class PartialSpatialAttention(PartialOperator):
    """PAT_sp (000 eq. 5) at the tail of an MLP: wraps the MLP's second 1x1 conv.

    y = conv(h); the last (1 - r) * C channels of y are reweighted by a one-channel spatial map
    s = BN(hardsigmoid(W y_att)); the first r * C pass unchanged. ``deploy()`` merges W into
    ``conv`` as one extra output channel, so inference runs a single 1x1 conv.
    """

    faithful_params = {"identity_init": True}  # the gate starts at exactly 1: the wrapped conv alone

    def __init__(self, conv: nn.Conv2d, ratio: float = 0.5, identity_init: bool = False):
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise OperatorError("PAT_sp wraps a dense 1x1 nn.Conv2d (the MLP's second conv)")
        self.conv = conv
        dim = conv.out_channels
        self.dim = dim
        # ratio = share of channels left unweighted (PConv convention: the "r" part)
        self.dim_keep = split_channels(dim, ratio) if ratio < 1 else dim
        if self.dim_keep >= dim:
            raise OperatorError(f"PAT_sp ratio {ratio} leaves no channel to reweight (C={dim})")
        self.dim_attn = dim - self.dim_keep
        self.gate = nn.Conv2d(self.dim_attn, 1, 1, bias=True)
        self.gate_norm = nn.BatchNorm2d(1)
        if identity_init:
            nn.init.zeros_(self.gate_norm.weight)
            nn.init.ones_(self.gate_norm.bias)
        self.to(conv.weight.device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_keep={self.dim_keep}, dim_attn={self.dim_attn}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.conv(h)
        y1, y2 = torch.split(y, [self.dim_keep, self.dim_attn], dim=1)
        s = self.gate_norm(F.hardsigmoid(self.gate(y2)))  # 000 eq. 5
        return torch.cat((y1, y2 * s), dim=1)

    @classmethod
    def from_module(cls, original: nn.Module, ratio: float = 0.5, identity_init: bool = True, **kw):
        """Wrap an existing 1x1 conv (inherits its weights); starts as the identity by default."""
        conv = original.conv if isinstance(original, PartialSpatialAttention) else original
        return cls(copy.deepcopy(conv), ratio=ratio, identity_init=identity_init, **kw)

    def deploy(self) -> MergedSpatialAttention:
        """Inference form: the gate conv merged into ``conv`` (one 1x1 conv, C + 1 outputs)."""
        return MergedSpatialAttention(self)


class MergedSpatialAttention(InferenceForm):
    """PAT_sp with its gate folded into the MLP conv: conv' = [W2; Wg W2[att]], one conv call."""

    def __init__(self, sp: PartialSpatialAttention):
        super().__init__()
        conv = sp.conv
        self.dim, self.dim_keep = sp.dim, sp.dim_keep
        w2 = conv.weight.detach().flatten(1)  # (C, hidden)
        b2 = conv.bias.detach() if conv.bias is not None else torch.zeros(sp.dim, device=w2.device, dtype=w2.dtype)
        wg = sp.gate.weight.detach().flatten(1)  # (1, C_att)
        bg = sp.gate.bias.detach()
        w_row = wg @ w2[sp.dim_keep :]  # gate logit is linear in h: Wg (W2 h + b2) + bg
        b_row = wg @ b2[sp.dim_keep :] + bg
        self.conv = nn.Conv2d(conv.in_channels, sp.dim + 1, 1, conv.stride, conv.padding, conv.dilation, bias=True).to(
            w2.device, w2.dtype
        )  # the wrapped conv's stride and padding (a strided 1x1 kept its shape)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat((w2, w_row)).reshape(sp.dim + 1, -1, 1, 1))
            self.conv.bias.copy_(torch.cat((b2, b_row)))
        a, b = bn_affine(sp.gate_norm)
        self.register_buffer("gate_scale", a.reshape(1, 1, 1, 1).clone())
        self.register_buffer("gate_shift", b.reshape(1, 1, 1, 1).clone())
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.conv(h)
        keep, gate, rest = torch.split(y, [self.dim_keep, self.dim - self.dim_keep, 1], dim=1)
        s = torch.addcmul(self.gate_shift, F.hardsigmoid(rest), self.gate_scale)
        # out of place for exporters (see ops/_export.py), and where autograd needs y as it was
        if exporting() or (torch.is_grad_enabled() and y.requires_grad):
            return torch.cat((keep, gate * s), dim=1)
        gate.mul_(s)  # in place on the conv's own output: no copy of the kept channels
        return y[:, : self.dim]
