"""Ghost bottlenecks for ``partial_mlp``: timm GhostNet's ``GhostBottleneck`` and RepGhost's
``RepGhostBottleneck``, with an identity shortcut (stride 1, in == out).

Both are ``x + ghost2(se(ghost1(x)))``. Cut like any partial MLP: the first n channels in and out, the
first h hidden units.

- A GhostNet ``GhostModule`` writes ``cat(x1, cheap(x1))[:out]``, x1 its primary conv's output. Its
  first h outputs, for h up to x1's width, are x1's first h channels alone, so the cut keeps the first
  h rows of ghost1's primary conv and no cheap operation. ghost2's first n outputs are likewise the
  first n rows of its primary conv, which reads the h kept hidden units.
- A ``RepGhostModule`` writes ``relu(cheap(x1) + bn(x1))``, where cheap is a depthwise conv and bn a
  BatchNorm: channel by channel after its primary conv, so its first h outputs need the primary
  conv's first h rows and the first h channels of the rest. It is held as a cut copy of its class.
- The SE on the hidden units is cut with them, as in an inverted residual.

Past the primary half (a ratio above 1/2) a GhostNet module also keeps the cheap outputs of its first
primary channels (``GhostCut``). At the keep-everything setting both bottlenecks are the original.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import OperatorError
from ._utils import clone_module, split_channels
from ._utils import qualname as _qualname
from .gated_mlp import Gated

GHOST_BOTTLENECK = "timm.models.ghostnet.GhostBottleneck"
GHOST_MODULE = "timm.models.ghostnet.GhostModule"
REPGHOST_BOTTLENECK = "timm.models.repghost.RepGhostBottleneck"
REPGHOST_MODULE = "timm.models.repghost.RepGhostModule"
_BOTTLENECK_CHILDREN = {"ghost1", "conv_dw", "bn_dw", "se", "ghost2", "shortcut"}
_REPGHOST_CHILDREN = ["primary_conv", "fusion_conv", "fusion_bn", "cheap_operation", "relu"]

Slicer = Callable[[nn.Module, "int | None", "int | None", str], nn.Module]


def _cut_seq(seq: nn.Module, n_in: int, n_out: int, where: str, slicer: Slicer) -> list[nn.Module]:
    """A Sequential (conv, then layers over its outputs) cut to n_in inputs and n_out outputs."""
    if type(seq) is not nn.Sequential or len(seq) == 0 or not isinstance(seq[0], nn.Conv2d):
        raise OperatorError(f"partial_mlp: {where} has a {type(seq).__name__} where conv, BN, act was expected")
    return [slicer(seq[0], n_in, n_out, where), *(slicer(m, n_out, n_out, where) for m in seq[1:])]


class GhostCut(nn.Module):
    """The first p + q outputs of a GhostModule: the first p of its primary conv (conv, BN, act), then
    its cheap operation (depthwise, one output per primary channel) on the first q of them."""

    def __init__(self, primary: list[nn.Module], cheap: list[nn.Module]):
        super().__init__()
        self.primary, self.cheap = nn.Sequential(*primary), nn.Sequential(*cheap)
        self.cheap_in = cheap[0].in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat((x1, self.cheap(x1[:, : self.cheap_in])), dim=1)


def _ghost(module: nn.Module, n_in: int, n_out: int, where: str, slicer: Slicer) -> list[nn.Module]:
    """The first n_out outputs of a GhostModule, ``cat(x1, cheap(x1))[:out]``: x1's first rows and, past
    x1's width, the cheap outputs of x1's first channels."""
    if _qualname(module) != GHOST_MODULE:
        raise OperatorError(f"partial_mlp: {where} has a {type(module).__name__}; only GhostModule is known")
    width = module.primary_conv[0].out_channels
    if n_out <= width:  # the primary conv alone: a plain chain (BN folds at deploy)
        return _cut_seq(module.primary_conv, n_in, n_out, where, slicer)
    cheap, q = module.cheap_operation, n_out - width
    if not (isinstance(cheap[0], nn.Conv2d) and cheap[0].groups == cheap[0].in_channels == cheap[0].out_channels):
        raise OperatorError(f"partial_mlp: {where}'s cheap operation is not one depthwise output per channel")
    primary = _cut_seq(module.primary_conv, n_in, width, where, slicer)
    return [GhostCut(primary, _cut_seq(cheap, q, q, where, slicer))]


def _repghost(module: nn.Module, n_in: int, n_out: int, where: str, slicer: Slicer) -> nn.Module:
    """A cut copy of a RepGhostModule: every child over its first n_out channels (n_in into the conv)."""
    names = [n for n, _ in module.named_children()]
    if _qualname(module) != REPGHOST_MODULE or names != _REPGHOST_CHILDREN:
        raise OperatorError(f"partial_mlp: {where} has a {type(module).__name__} with children {names}")
    if not all(type(m) is nn.Identity for m in module.fusion_conv):
        raise OperatorError(f"partial_mlp: {where}'s fusion_conv holds more than identities")
    new = clone_module(module)
    new.primary_conv = nn.Sequential(*_cut_seq(module.primary_conv, n_in, n_out, where, slicer))
    new.fusion_bn = nn.Sequential(*(slicer(m, n_out, n_out, where) for m in module.fusion_bn))
    new.cheap_operation = nn.Sequential(*_cut_seq(module.cheap_operation, n_out, n_out, where, slicer))
    new.out_chs = n_out
    return new


def slice_ghost(block: nn.Module, ratio: float, hidden_ratio: float | None, slicer: Slicer) -> Gated | None:
    """The cut layers (``Gated``: a residual block, channels first) of a ghost bottleneck with an
    identity shortcut, None for any other class."""
    kind = _qualname(block)
    if kind not in (GHOST_BOTTLENECK, REPGHOST_BOTTLENECK):
        return None
    where = type(block).__name__
    extra = [n for n, _ in block.named_children() if n not in _BOTTLENECK_CHILDREN]
    if extra:
        raise OperatorError(f"partial_mlp: {where} has layers it does not know how to slice: {extra}")
    shortcut = getattr(block, "shortcut", None)
    if getattr(block, "conv_dw", None) is not None or type(shortcut) is not nn.Sequential or len(shortcut):
        raise OperatorError(
            f"partial_mlp: {where} without an identity shortcut (stride 2 or in != out): its untouched "
            "channels would have nowhere to go"
        )
    first = block.ghost1.primary_conv[0]
    dim, mid = first.in_channels, block.ghost1.out_chs
    n = split_channels(dim, ratio)
    h = split_channels(mid, hidden_ratio if hidden_ratio is not None else ratio)
    w1, w2 = f"{where}.ghost1", f"{where}.ghost2"
    if kind == GHOST_BOTTLENECK:
        head, tail = _ghost(block.ghost1, n, h, w1, slicer), _ghost(block.ghost2, h, n, w2, slicer)
    else:
        head, tail = [_repghost(block.ghost1, n, h, w1, slicer)], [_repghost(block.ghost2, h, n, w2, slicer)]
    se = [slicer(block.se, h, h, where)] if block.se is not None else []
    return Gated([*head, *se, *tail], dim, n, 1, residual=True)
