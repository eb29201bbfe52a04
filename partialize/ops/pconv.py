"""PConv (FasterNet): a k x k conv on the first r*C channels, identity on the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from ..errors import OperatorError
from ._export import exporting
from ._utils import (
    bn_affine,
    check_same_size_conv,
    clone_module,
    conv_padding,
    copy_top_left,
    fold_bn_into_conv,
    slice_bn,
    split_channels,
)
from .base import InferenceForm, PartialOperator
from .registry import register_operator

FORWARD_MODES = ("split_cat", "slicing")


@register_operator("pconv")
class PConv(PartialOperator):
    """Partial convolution: ``conv`` on channels ``[:dim_conv]``, identity on ``[dim_conv:]``.

    ``forward_mode="split_cat"`` (training) splits and concatenates; ``"slicing"`` (inference)
    writes the conv result into a clone of the input. The conv reads the original input, not the
    clone, so the in-place write is also safe under autograd.

    Two generalisations (docs/operators.md): ``depthwise=True`` keeps a depthwise conv on the first
    channels; ``stride > 1`` downsamples the untouched channels with an average pool of the same
    stride (``ceil_mode``), so a strided size-keeping-padding conv can be partial too.
    """

    PARAM_CHOICES = {"stride_mode": ("refuse", "pool"), "forward_mode": FORWARD_MODES}  # checked by recipes
    ratio_words = {"dynamic": ("dpconv", {}), "adaptive": ("ada_pconv", {}), "inherit": ("pconv", {})}

    def __init__(
        self,
        dim: int,
        ratio: float = 0.25,
        kernel_size: int | tuple[int, int] = 3,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        forward_mode: str = "split_cat",
        stride: int = 1,
        depthwise: bool = False,
        groups: int = 1,
        *,
        _uninitialised_on: torch.device | None = None,
    ) -> None:
        super().__init__()
        if forward_mode not in FORWARD_MODES:
            raise OperatorError(f"forward_mode must be one of {FORWARD_MODES}, got {forward_mode!r}")
        self.dim = dim
        # a grouped (not depthwise) conv keeps whole groups: the first round(r * groups) of them
        self.group_width = 0 if depthwise or groups == 1 else dim // groups
        if self.group_width and dim % groups:
            raise OperatorError(f"PConv: {dim} channels do not split into {groups} groups")
        self.dim_conv = part_width(dim, ratio, 1 if depthwise else groups)
        self.dim_untouched = dim - self.dim_conv
        self.forward_mode = forward_mode
        self.stride = int(nn.modules.utils._pair(stride)[0])
        self.depthwise = depthwise
        ks = nn.modules.utils._pair(kernel_size)
        dl = nn.modules.utils._pair(dilation)
        pad = tuple(d * (k - 1) // 2 for k, d in zip(ks, dl))
        if any(k % 2 == 0 for k in ks):
            raise OperatorError(f"PConv needs an odd kernel to keep the spatial size, got {ks}")
        conv_groups = self.dim_conv if depthwise else (self.dim_conv // self.group_width if self.group_width else 1)
        conv_args = (self.dim_conv, self.dim_conv, ks, self.stride, pad, dl)
        if _uninitialised_on is None:
            self.conv = nn.Conv2d(*conv_args, groups=conv_groups, bias=bias)
        else:  # from_module overwrites every weight: no random init (0.4 s of RegNet-Y 128GF's plan)
            self.conv = skip_init(nn.Conv2d, *conv_args, groups=conv_groups, bias=bias, device=_uninitialised_on)

    @property
    def ratio(self) -> float:
        return self.dim_conv / self.dim

    def extra_repr(self) -> str:
        extra = f", stride={self.stride}" if self.stride > 1 else ""
        extra += ", depthwise=True" if self.depthwise else ""
        extra += f", groups={self.conv.groups} of width {self.group_width}" if self.group_width else ""
        return f"dim={self.dim}, dim_conv={self.dim_conv}, forward_mode={self.forward_mode!r}{extra}"

    def _untouched(self, x2: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x2
        return F.avg_pool2d(x2, self.stride, self.stride, ceil_mode=True, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_mode == "slicing" and self.stride == 1:
            return self._forward_slicing(x)
        x1, x2 = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        return torch.cat((self.conv(x1), self._untouched(x2)), dim=1)

    def _forward_slicing(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():  # the same function without the in-place write (see ops/_export.py)
            return torch.cat((self.conv(x[:, : self.dim_conv]), x[:, self.dim_conv :]), dim=1)
        out = x.clone()
        out[:, : self.dim_conv] = self.conv(x[:, : self.dim_conv])
        return out

    @classmethod
    def from_module(
        cls, original: nn.Module, ratio: float | None = 0.25, stride_mode: str = "refuse", **kwargs
    ) -> PConv:
        """Build from a conv (or another PConv), keeping the top-left block of its weight.

        Dense, depthwise and grouped convs with equal in/out widths and size-keeping padding convert
        (a grouped one keeps its first ``round(ratio * groups)`` whole groups, so the conv part is the
        same grouped conv on fewer groups). A strided one converts only with ``stride_mode="pool"``
        (untouched channels are average pooled); otherwise, and for in != out, OperatorError says why.
        """
        if stride_mode not in ("refuse", "pool"):
            raise OperatorError(f"stride_mode must be 'refuse' or 'pool', got {stride_mode!r}")
        src, dim = conv_source(
            original, "PConv", allow_stride=stride_mode == "pool", allow_depthwise=True, allow_grouped=True
        )
        ratio = resolve_ratio(original, src, dim, ratio)
        depthwise = isinstance(src, nn.Conv2d) and src.groups > 1 and src.groups == src.in_channels
        if isinstance(original, PConv):  # a grouped PConv keeps its group width over its whole width
            groups = dim // original.group_width if original.group_width else 1
        else:
            groups = 1 if depthwise else src.groups
        op = cls(
            dim,
            ratio=ratio,
            kernel_size=src.kernel_size,
            dilation=src.dilation,
            bias=src.bias is not None,
            stride=src.stride[0],
            depthwise=depthwise,
            groups=groups,
            **kwargs,
            _uninitialised_on=src.weight.device,
        )
        if tuple(conv_padding(src)) != tuple(op.conv.padding):
            raise OperatorError(f"source padding {src.padding} does not keep the spatial size")
        if op.dim_conv == dim and not is_partial_source(original):
            raise OperatorError(
                f"ratio {ratio:g} keeps all {dim} channels in the conv: the result would be the same layer"
            )
        copy_top_left(op.conv, src)
        return op.to(src.weight.device)

    @classmethod
    def recognizes(cls, module: nn.Module) -> bool:
        return is_timm_partial_conv(module)

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Conv2d:
            return None
        depthwise = module.groups == module.in_channels
        return dirac_outside(module, part_width(module.in_channels, 0.25, 1 if depthwise else module.groups))

    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> PConvBN:
        """Inference form of ``bn(self(x))``: BN folded into the conv and an affine on the rest."""
        return PConvBN(self, bn) if bn.num_features == self.dim else None

    def deploy(self) -> PConv:
        """Inference form: the same weights with the in-place slicing forward, in eval mode."""
        op = clone_module(self).eval()
        op.forward_mode = "slicing"
        for p in op.parameters():
            p.requires_grad_(False)
        return op


class PConvBN(InferenceForm):
    """Eval-only ``BN(PConv(x))``: BN[:n] folded into the conv, BN[n:] an affine on the untouched
    channels, written in one pass (addcmul into the output) instead of a copy plus a BN pass."""

    def __init__(self, op: PConv, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.num_features != op.dim:
            raise OperatorError(f"BN has {bn.num_features} channels, PConv {op.dim}")
        n = op.dim_conv
        self.dim, self.dim_conv, self.stride = op.dim, n, op.stride
        scale, shift = bn_affine(bn)
        self.conv = fold_bn_into_conv(op.conv, slice_bn(bn, 0, n))
        self.register_buffer("scale", scale[n:].reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", shift[n:].reshape(1, -1, 1, 1).clone())
        if self.stride > 1:  # pool + affine as one depthwise s x s conv (used when H, W divide by s)
            s = self.stride
            w = (scale[n:] / (s * s)).reshape(-1, 1, 1, 1).expand(-1, 1, s, s)
            self.register_buffer("pool_weight", w.clone())
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.dim_conv], x[:, self.dim_conv :]
        y1 = self.conv(x1)
        if self.stride > 1 and x.shape[-2] % self.stride == 0 and x.shape[-1] % self.stride == 0:
            # no partial windows: the average pool and the BN affine are one depthwise conv
            # (oneDNN runs it 1.3-6x faster than avg_pool2d + addcmul; 3-6x in NCHW)
            w = self.pool_weight.to(x.dtype)
            y2 = F.conv2d(x2, w, self.shift.reshape(-1).to(x.dtype), self.stride, groups=w.shape[0])
            return torch.cat((y1, y2), dim=1)
        if self.stride > 1:
            x2 = F.avg_pool2d(x2, self.stride, self.stride, ceil_mode=True, count_include_pad=False)
        if exporting():  # out of place for exporters (see ops/_export.py)
            return torch.cat((y1, torch.addcmul(self.shift.to(x.dtype), x2, self.scale.to(x.dtype))), dim=1)
        out = torch.empty(
            (x.shape[0], self.dim, *y1.shape[2:]),
            dtype=y1.dtype,
            device=y1.device,
            memory_format=_memory_format(x),
        )
        out[:, : self.dim_conv] = y1
        torch.addcmul(self.shift.to(x.dtype), x2, self.scale.to(x.dtype), out=out[:, self.dim_conv :])
        return out


def dirac_outside(conv: nn.Conv2d, n: int) -> nn.Conv2d:
    """A copy of ``conv`` whose channels n.. compute the identity (their rows and the other rows'
    columns n.. zeroed, a centre tap of 1): exactly what a partial conv of width n represents."""
    c = clone_module(conv)
    group_in = c.in_channels // c.groups  # C (dense), 1 (depthwise), C / groups (grouped; n whole groups)
    kh, kw = c.kernel_size
    with torch.no_grad():
        c.weight[n:] = 0
        if c.groups == 1:
            c.weight[:n, n:] = 0
        for i in range(n, c.out_channels):
            c.weight[i, i % group_in, kh // 2, kw // 2] = 1.0
        if c.bias is not None:
            c.bias[n:] = 0
    return c


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )


def part_width(dim: int, ratio: float, groups: int = 1) -> int:
    """Channels of the conv part: round(ratio * C) (000's r), or for a grouped conv (groups > 1,
    not depthwise) whole groups, round(ratio * groups) of them; at least one."""
    if groups == 1:
        return split_channels(dim, ratio)
    return split_channels(groups, ratio) * (dim // groups)


def conv_source(
    original: nn.Module, op: str, allow_stride: bool = False, allow_depthwise: bool = False, allow_grouped: bool = False
) -> tuple[nn.Conv2d, int]:
    """(conv whose top-left block a partial op inherits, channel count) for ``original``.

    Accepts a size-keeping dense conv, a PConv, or timm FasterNet's ``Partial_conv3``; anything
    else raises OperatorError with the reason.
    """
    if isinstance(original, PConv):
        if original.depthwise and not allow_depthwise:
            raise OperatorError(f"{op} cannot be built from a depthwise PConv (its conv part is depthwise)")
        if original.group_width and not allow_grouped:
            raise OperatorError(f"{op} cannot be built from a grouped PConv (its conv part keeps whole groups)")
        if original.stride > 1 and not allow_stride:
            raise OperatorError(f"{op} cannot be built from a strided PConv (stride {original.stride})")
        return original.conv, original.dim
    if is_timm_partial_conv(original):
        return original.partial_conv3, original.dim_conv3 + original.dim_untouched
    check_same_size_conv(
        original, op, allow_stride=allow_stride, allow_depthwise=allow_depthwise, allow_grouped=allow_grouped
    )
    return original, original.in_channels


def resolve_ratio(original: nn.Module, src: nn.Conv2d, dim: int, ratio) -> float:
    """``ratio=None`` or ``"inherit"``: a partial source keeps its own ratio, a dense conv gets 1/4."""
    if ratio in (None, "inherit"):
        return src.in_channels / dim if is_partial_source(original) else 0.25
    if isinstance(ratio, str):
        raise OperatorError(f"ratio must be a number in (0, 1] or 'inherit', got {ratio!r}")
    return float(ratio)


def is_partial_source(original: nn.Module) -> bool:
    """True when ``original`` is already a partial conv (its other channels were identity)."""
    return isinstance(original, PConv) or is_timm_partial_conv(original)


def is_timm_partial_conv(m: nn.Module) -> bool:
    """timm's FasterNet Partial_conv3 (attributes partial_conv3, dim_conv3, dim_untouched)."""
    return all(hasattr(m, a) for a in ("partial_conv3", "dim_conv3", "dim_untouched"))
