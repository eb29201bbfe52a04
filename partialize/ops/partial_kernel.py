"""Partial kernel (``partial_kernel``): a k x k conv keeps its full kernel on the first r*C_in input
channels only; the other input channels keep the kernel's centre tap, a 1x1 conv (same stride);
the two are summed into every output channel. A grouped conv is split the same way inside every
group (the first r of each group's inputs keep the kernel), so both parts stay grouped convs.

This is our generalisation of 000 eq. 1 (the expensive operator on part of the channels, something
cheap on the rest) to the convs PConv cannot represent: when the output width differs from the
input width (DenseNet's 128 -> 32, Inception's branches) or the conv is strided, the untouched
channels have no output channel of their own to pass through to, so they get the cheapest thing that
still reaches every output: the centre of their own kernel. It is not in papers 000-004.

MACs per output position: r*C_in*k*k + (1 - r)*C_in instead of C_in*k*k (r = 1/4, 3x3: 0.33x).
The centre tap of a conv with size-keeping padding reads the input position the window is centred
on, so a 1x1 conv of the same stride and no padding reads exactly it: on a conv whose other channels
already have only a centre tap the layer is the original (``ratio=1`` is refused: the same layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OperatorError
from ._export import exporting
from ._utils import bn_affine, clone_module, keeps_spatial_size, split_channels
from .base import PartialOperator
from .registry import register_operator


def _check(conv: nn.Module) -> None:
    """OperatorError with every reason ``conv`` cannot become a partial kernel."""
    name = type(conv).__name__
    if type(conv) is not nn.Conv2d:
        raise OperatorError(
            f"partial_kernel converts plain nn.Conv2d layers, got {type(conv).__module__}.{name}"
            + (" (a subclass may transform its weight in forward)" if isinstance(conv, nn.Conv2d) else "")
        )
    reasons = []
    if conv.groups != 1 and conv.in_channels // conv.groups < 2:
        reasons.append(f"groups={conv.groups}: a depthwise conv has one input per group, nothing to split")
    if all(k == 1 for k in conv.kernel_size):
        reasons.append("a 1x1 conv has no spatial kernel to cut")
    if any(k % 2 == 0 for k in conv.kernel_size) or not keeps_spatial_size(conv):
        reasons.append(
            f"kernel {tuple(conv.kernel_size)} with padding {conv.padding!r}: the window has no centre tap "
            "that a 1x1 conv reads (needs an odd kernel and size-keeping padding)"
        )
    if conv.in_channels < 2:
        reasons.append(f"{conv.in_channels} input channel: nothing to split")
    if conv.groups != 1 and conv.padding_mode != "zeros":
        reasons.append(f"a grouped conv with padding_mode={conv.padding_mode!r}")
    if reasons:
        raise OperatorError(f"partial_kernel cannot represent this {name}: " + "; ".join(reasons))


@register_operator("partial_kernel")
class PartialKernel(PartialOperator):
    """``conv(x[:, :n]) + point(x[:, n:])``: the full kernel on n input channels, its centre on the rest
    (in a grouped conv: on the first n / groups inputs of every group, and the rest of every group)."""

    def __init__(self, conv: nn.Conv2d, point: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.point = conv, point  # k x k on the first dim_conv inputs; 1x1 on the rest
        self.dim, self.dim_conv = conv.in_channels + point.in_channels, conv.in_channels
        self.groups = conv.groups

    @property
    def ratio(self) -> float:
        return self.dim_conv / self.dim

    def extra_repr(self) -> str:
        k = "x".join(map(str, self.conv.kernel_size))
        return (
            f"in={self.dim}, out={self.conv.out_channels}, kernel {k} on {self.dim_conv}, centre tap on "
            f"{self.dim - self.dim_conv}, stride={self.conv.stride[0]}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            n = self.dim_conv
            y = self.conv(x[:, :n])
            rest = self.point(x[:, n:])
        else:  # (B, groups, inputs per group, H, W): the first inputs of every group, then the others
            b, _, h, w = x.shape
            g = x.reshape(b, self.groups, self.dim // self.groups, h, w)
            n = self.dim_conv // self.groups
            y = self.conv(g[:, :, :n].reshape(b, self.dim_conv, h, w))
            rest = self.point(g[:, :, n:].reshape(b, self.dim - self.dim_conv, h, w))
        if exporting():  # out of place for exporters (see ops/_export.py)
            return y + rest
        return y.add_(rest)  # the conv's fresh output: its backward does not read it

    @classmethod
    def from_module(cls, original: nn.Module, ratio: float | None = 0.25, **params) -> PartialKernel:
        """Split a dense conv with an odd kernel and size-keeping padding (any stride, any widths): the
        first ``ratio`` of its input channels keep the kernel, the others its centre tap."""
        if params:
            raise OperatorError(f"partial_kernel takes no parameters beyond ratio, got {sorted(params)}")
        _check(original)
        if isinstance(ratio, str) or ratio is None:
            if ratio is not None:
                raise OperatorError(f"partial_kernel takes a number in (0, 1] as its ratio, got {ratio!r}")
            ratio = 0.25
        groups = original.groups
        c_in = original.in_channels // groups  # inputs per group (all of them in a dense conv)
        n = split_channels(c_in, float(ratio))
        if n == c_in:
            raise OperatorError(f"ratio {ratio:g} keeps all {c_in} input channels in the kernel: the same layer")
        w = original.weight.detach()  # (out, inputs per group, kh, kw)
        kh, kw = original.kernel_size
        dev, dt = w.device, w.dtype
        conv = nn.utils.skip_init(  # no random init: overwritten below
            nn.Conv2d, n * groups, original.out_channels, original.kernel_size, original.stride, original.padding,
            original.dilation, groups=groups, bias=original.bias is not None, padding_mode=original.padding_mode,
            device=dev, dtype=dt,
        )  # fmt: skip
        point = nn.utils.skip_init(
            nn.Conv2d, (c_in - n) * groups, original.out_channels, 1, original.stride, 0, groups=groups, bias=False,
            device=dev, dtype=dt,
        )  # fmt: skip
        with torch.no_grad():
            conv.weight.copy_(w[:, :n])
            if original.bias is not None:
                conv.bias.copy_(original.bias)
            point.weight.copy_(w[:, n:, kh // 2 : kh // 2 + 1, kw // 2 : kw // 2 + 1])
        return cls(conv, point)

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        """The conv with every off-centre tap of its input channels n.. zeroed (n at the default 1/4):
        what the centre-tap 1x1 computes for them."""
        if type(module) is not nn.Conv2d or module.in_channels // module.groups < 2:
            return None
        n = split_channels(module.in_channels // module.groups, 0.25)  # of each group's inputs
        c = clone_module(module)
        kh, kw = c.kernel_size
        with torch.no_grad():
            centre = c.weight[:, n:, kh // 2, kw // 2].clone()
            c.weight[:, n:] = 0
            c.weight[:, n:, kh // 2, kw // 2] = centre
        return c

    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> PartialKernel | None:
        """``bn(self(x))`` as one partial kernel: both convs' output rows scaled, the shift the bias."""
        if bn.num_features != self.conv.out_channels:
            return None
        scale, shift = bn_affine(bn)
        new = clone_module(self)
        with torch.no_grad():
            new.conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            new.point.weight.mul_(scale.reshape(-1, 1, 1, 1))
            bias = shift if self.conv.bias is None else self.conv.bias.detach() * scale + shift
            new.conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return new.eval().requires_grad_(False)
