"""PATConv (000 eq. 1): a conv on the first r*C channels in parallel with an attention on the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OperatorError
from ._export import exporting
from ._utils import bn_affine, clone_module, copy_top_left, split_channels
from .attention import GATES, FusedChannelGate, GaussianChannelAttention, PartialSelfAttention
from .base import InferenceForm, PartialOperator
from .pconv import PConv, conv_source, dirac_outside, is_partial_source, resolve_ratio
from .registry import register_operator

ATTENTIONS = ("ch", "sf")


def build_attention(attn: str, dim: int, identity_init: bool = False, **params) -> nn.Module:
    """The attention branch for ``attn='ch'`` (PAT_ch) or ``'sf'`` (PAT_sf) on ``dim`` channels."""
    if attn == "ch":
        return GaussianChannelAttention(dim, identity_init=identity_init, **params)
    if attn == "sf":
        return PartialSelfAttention(dim, identity_init=identity_init, **params)
    raise OperatorError(f"PATConv attn must be one of {ATTENTIONS}, got {attn!r}")


@register_operator("patconv")
class PATConv(PartialOperator):
    """O = cat(C(F[:, :rC]), A(F[:, rC:])) per 000 eq. 1, with A = PAT_ch or PAT_sf."""

    PARAM_CHOICES = {"attn": ATTENTIONS, "gate": tuple(GATES), "mapping": ("dense", "channelwise")}  # recipes
    ratio_words = {"dynamic": ("dpconv", {"attn": "ch"}), "inherit": ("patconv", {})}
    faithful_params = {"identity_init": True}  # with faithful_original: the attention starts as the identity
    # what **attn_params passes on to the attention (GaussianChannelAttention / PartialSelfAttention)
    EXTRA_PARAMS = ("gate", "eps", "mapping", "num_heads", "num_buckets", "qkv_bias", "norm", "proj", "residual")

    def __init__(
        self,
        dim: int,
        ratio: float = 0.25,
        attn: str = "ch",
        kernel_size: int | tuple[int, int] = 3,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        identity_init: bool = False,
        depthwise: bool = False,
        **attn_params,
    ) -> None:
        super().__init__()
        self.pconv = PConv(dim, ratio, kernel_size, dilation, bias, depthwise=depthwise)  # conv part
        self.dim = dim
        self.dim_conv = self.pconv.dim_conv
        self.dim_attn = dim - self.dim_conv
        self.attn_type = attn
        if self.dim_attn == 0:
            raise OperatorError(f"PATConv ratio {ratio} leaves no channel for attention (C={dim})")
        self.attn = build_attention(attn, self.dim_attn, identity_init=identity_init, **attn_params)

    @property
    def conv(self) -> nn.Conv2d:
        return self.pconv.conv

    @property
    def ratio(self) -> float:
        return self.dim_conv / self.dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_conv={self.dim_conv}, attn={self.attn_type!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_attn], dim=1)
        return torch.cat((self.conv(x1), self.attn(x2)), dim=1)  # 000 eq. 1

    @classmethod
    def from_module(cls, original: nn.Module, ratio: float | None = 0.25, attn: str = "ch", **params) -> PATConv:
        """Build from a size-keeping dense conv or a PConv: the conv part keeps the top-left block.

        From a PConv (e.g. timm FasterNet's partial conv) the attention starts as the identity, so
        the converted network computes what the original did until it is fine-tuned.
        """
        src, dim = conv_source(original, "PATConv", allow_depthwise=True)
        params.setdefault("depthwise", src.groups > 1)
        if is_partial_source(original):
            params.setdefault("identity_init", True)
        ratio = resolve_ratio(original, src, dim, ratio)
        op = cls(dim, ratio, attn, src.kernel_size, src.dilation, src.bias is not None, **params)
        copy_top_left(op.conv, src)
        return op.to(src.weight.device)

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        return dirac_outside(module, split_channels(module.in_channels, 0.25)) if type(module) is nn.Conv2d else None

    def deploy(self) -> PATConvDeploy:
        """Inference form: the channel attention's BN folded into an affine gate."""
        return PATConvDeploy(self)


class PATConvDeploy(InferenceForm):
    """Eval-only PATConv: the same conv, attention with BN folded; no parameters train."""

    def __init__(self, op: PATConv):
        super().__init__()
        self.dim, self.dim_conv, self.dim_attn = op.dim, op.dim_conv, op.dim_attn
        self.conv = clone_module(op.conv)
        if isinstance(op.attn, GaussianChannelAttention):
            self.attn = FusedChannelGate(op.attn)
        else:
            self.attn = clone_module(op.attn)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_attn], dim=1)
        if not isinstance(self.attn, FusedChannelGate) or exporting():
            return torch.cat((self.conv(x1), self.attn(x2)), dim=1)
        # gate written straight into the output: one pass over the attention channels, no cat
        y1 = self.conv(x1)
        out = torch.empty_like(x)
        out[:, : self.dim_conv] = y1
        self.attn.apply_gate(x2, self.attn.gate_values(x2), out=out[:, self.dim_conv :])
        return out

    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> PATConvDeploy | None:
        """``bn(self(x))`` in one module: BN[:n] folded into the conv, BN[n:] into the gate (PAT_ch)
        or applied as an affine after the attention (PAT_sf)."""
        if bn.num_features != self.dim:
            return None
        n = self.dim_conv
        new = clone_module(self)
        scale, shift = bn_affine(bn)
        w = self.conv.weight.detach() * scale[:n].reshape(-1, 1, 1, 1)
        b = shift[:n] if self.conv.bias is None else self.conv.bias.detach() * scale[:n] + shift[:n]
        new.conv.weight = nn.Parameter(w, requires_grad=False)
        new.conv.bias = nn.Parameter(b, requires_grad=False)
        if isinstance(new.attn, FusedChannelGate):
            new.attn.fold_output_affine(scale[n:], shift[n:])
        else:
            new.attn = nn.Sequential(new.attn, ChannelAffine(scale[n:], shift[n:]))
        return new


class ChannelAffine(nn.Module):
    """y = scale * x + shift per channel of a (B, C, H, W) map (a folded eval BN)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
