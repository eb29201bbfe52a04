"""Gated MLPs for ``partial_mlp``: timm ``GluMlp`` (``SwiGLUPacked`` too), ``SwiGLU`` and ``GatedMlp``, and
two residual blocks whose expansion is gated: StarNet's ``Block`` (the star operation) and MambaOut's
``GatedConvBlock``.

A gated MLP multiplies two halves of its expansion, ``act(a) * b`` (or ``a * act(b)``), hidden unit by
hidden unit. Sliced like a plain ``Mlp`` (first r*C input and output channels, first h hidden units),
the same h hidden units are kept in *both* halves, so each kept unit still meets its own gate:
GluMlp's fc1 keeps rows ``[:h]`` and ``[H/2 : H/2 + h]`` in one layer (chunked in two, as timm does),
SwiGLU keeps rows ``[:h]`` of ``fc1_g`` and of ``fc1_x``, GatedMlp (gMLP) keeps them in each half its
``SpatialGatingUnit`` splits, whose norm is sliced like the block's and whose token projection (it
mixes positions, not channels) is copied whole. Everything else (biases, the activation, drop layers,
the norm, chunk order, which half is the gate) is carried; anything else is refused with the reason.

StarNet's ``Block`` is ``x + dwconv2(g(act(f1(dwconv(x))) * f2(dwconv(x))))``: its depthwise convs, g's BN
and the output take the first n channels, f1 and f2 the same first h hidden rows. MambaOut's
``GatedConvBlock`` is ``x + ls(fc2(act(g) * cat(i, conv(c))))`` with ``g, i, c`` split from
``fc1(norm(x))`` (c: the hidden units its depthwise conv reads): the first h of its hidden units are
taken as the first of the i part and the first of the c part, in the same proportion, so the gate rows
follow both, and the depthwise conv keeps its first channels. Its LayerNorm normalises the n kept
channels (our choice, as for TinyViT's NormMlp: the partial block reads only them).

The caller (``partial_blocks.PartialMLP``) passes its own slicer for the ordinary layers, so a norm or
an activation is handled here exactly as in a plain ``Mlp``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..errors import OperatorError
from ._utils import clone_module, conv1x1_from, linear_from, slice_conv, split_channels
from ._utils import qualname as _qualname

GLU_MLP = "timm.layers.mlp.GluMlp"
SWIGLU = "timm.layers.mlp.SwiGLU"
GATED_MLP = "timm.layers.mlp.GatedMlp"
SPATIAL_GATING_UNIT = "timm.models.mlp_mixer.SpatialGatingUnit"
STARNET_BLOCK = "timm.models.starnet.Block"
STARNET_CONV_BN = "timm.models.starnet.ConvBN"
MAMBAOUT_BLOCK = "timm.models.mambaout.GatedConvBlock"
GATED_CLASSES = (GLU_MLP, SWIGLU, GATED_MLP, STARNET_BLOCK, MAMBAOUT_BLOCK)

# every child each class has, in forward order (read from timm's source; checked by tests/test_gated_mlp.py)
_CHILDREN = {
    GLU_MLP: ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    SWIGLU: ("fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2"),
    GATED_MLP: ("fc1", "act", "drop1", "gate", "norm", "fc2", "drop2"),
    STARNET_BLOCK: ("dwconv", "f1", "f2", "g", "dwconv2", "act", "drop_path"),
    MAMBAOUT_BLOCK: ("norm", "fc1", "act", "conv", "fc2", "ls", "drop_path"),
}

Slicer = Callable[[nn.Module, "int | None", "int | None", str], nn.Module]


class Gated(NamedTuple):
    """What ``slice_gated`` returns: the sliced layers in forward order, the block's width C, the kept n,
    the channel dim, whether the block adds its input (a residual block) and its drop path if so."""

    layers: list[nn.Module]
    dim: int
    n: int
    channel_dim: int
    residual: bool = False
    drop_path: nn.Module | None = None


class GatedExpand(nn.Module):
    """The expansion of a gated MLP on its kept hidden units: ``act(a) * b`` (``act_first``) or
    ``a * act(b)``; ``a`` and ``b`` are the two halves of one layer's output chunked along
    ``channel_dim`` (GluMlp's fc1), or the outputs of ``fc`` and ``fc_b`` (SwiGLU's fc1_g, fc1_x)."""

    def __init__(self, fc: nn.Module, act: nn.Module, act_first: bool, channel_dim: int, fc_b: nn.Module | None = None):
        super().__init__()
        self.fc, self.fc_b, self.act = fc, fc_b, act
        self.act_first, self.channel_dim = act_first, channel_dim

    def extra_repr(self) -> str:
        return f"act_first={self.act_first}, channel_dim={self.channel_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_b is None:
            a, b = self.fc(x).chunk(2, dim=self.channel_dim)
        else:
            a, b = self.fc(x), self.fc_b(x)
        return self.act(a) * b if self.act_first else a * self.act(b)


def _fc_rows(fc: nn.Module, rows: torch.Tensor, n_in: int, where: str) -> nn.Module:
    """Copy of a Linear / 1x1 conv keeping output rows ``rows`` (in that order) and inputs ``[:n_in]``."""
    if type(fc) is nn.Linear:
        return linear_from(fc.weight[rows, :n_in], fc.bias[rows] if fc.bias is not None else None)
    if type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1 and fc.stride == (1, 1):
        if fc.padding not in ((0, 0), "valid"):
            raise OperatorError(f"{where}: a 1x1 conv with padding changes the size; cannot slice it")
        return conv1x1_from(fc.weight[rows, :n_in], fc.bias[rows] if fc.bias is not None else None)
    raise OperatorError(f"{where}: cannot slice a {type(fc).__name__} expansion (Linear or plain 1x1 conv)")


def _widths(fc: nn.Module) -> tuple[int, int]:
    if isinstance(fc, nn.Linear):
        return fc.in_features, fc.out_features
    if isinstance(fc, nn.Conv2d):
        return fc.in_channels, fc.out_channels
    raise OperatorError(f"partial_mlp: a gated MLP's {type(fc).__name__} layer is not a Linear or 1x1 conv")


def _check_children(block: nn.Module, kind: str) -> None:
    extra = [n for n, _ in block.named_children() if n not in _CHILDREN[kind]]
    if extra:
        raise OperatorError(f"partial_mlp: {type(block).__name__} has layers it does not know how to slice: {extra}")


def _act(block: nn.Module, h: int, where: str, slicer: Slicer) -> nn.Module:
    """The activation, which must act on each element alone (it is applied to the sliced halves)."""
    if any(True for _ in block.act.parameters()) or any(True for _ in block.act.buffers()):
        raise OperatorError(f"{where}: its activation {type(block.act).__name__} has weights; cannot slice it")
    return slicer(block.act, h, h, where)


def _split(dim: int, units: int, ratio: float, hidden_ratio: float | None) -> tuple[int, int]:
    return split_channels(dim, ratio), split_channels(units, hidden_ratio if hidden_ratio is not None else ratio)


def _halves(units: int, h: int) -> torch.Tensor:
    """Rows of an expansion whose output is chunked in two halves of ``units``: the first h of each."""
    return torch.cat((torch.arange(h), torch.arange(units, units + h)))


def _tail(block: nn.Module, h: int, n: int, where: str, slicer: Slicer) -> list[nn.Module]:
    """drop1, norm (over the h kept hidden units), fc2 (h -> n), drop2: as in a plain Mlp."""
    return [
        slicer(block.drop1, h, h, where),
        slicer(block.norm, h, h, where),
        slicer(block.fc2, h, n, where),
        slicer(block.drop2, n, n, where),
    ]


def _glu(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> Gated:
    """GluMlp: ``x1, x2 = fc1(x).chunk(2)``, then ``x1 * act(x2)`` (gate_last) or ``act(x1) * x2``."""
    where = type(block).__name__
    dim, width = _widths(block.fc1)
    units = width // 2
    if width % 2 or _widths(block.fc2) != (units, dim):
        got = f"fc1 width {width}, fc2 {_widths(block.fc2)}"
        raise OperatorError(f"partial_mlp: {where} needs fc1: C -> 2H and fc2: H -> C, got {got}")
    ch_dim = block.chunk_dim
    if (ch_dim == 1) != isinstance(block.fc1, nn.Conv2d) or ch_dim not in (1, -1):
        raise OperatorError(f"partial_mlp: {where} chunks along dim {ch_dim}, not its channel dimension")
    n, h = _split(dim, units, ratio, hidden_ratio)
    fc = _fc_rows(block.fc1, _halves(units, h), n, where)
    expand = GatedExpand(fc, _act(block, h, where, slicer), act_first=not block.gate_last, channel_dim=ch_dim)
    return Gated([expand, *_tail(block, h, n, where, slicer)], dim, n, ch_dim)


def _swiglu(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> Gated:
    """SwiGLU: ``act(fc1_g(x)) * fc1_x(x)``: the same rows of both."""
    where = type(block).__name__
    dim, units = _widths(block.fc1_g)
    if _widths(block.fc1_x) != (dim, units) or _widths(block.fc2) != (units, dim):
        raise OperatorError(f"partial_mlp: {where} needs fc1_g, fc1_x: C -> H and fc2: H -> C")
    n, h = _split(dim, units, ratio, hidden_ratio)
    rows = torch.arange(h)
    fc_g, fc_x = (_fc_rows(fc, rows, n, where) for fc in (block.fc1_g, block.fc1_x))
    expand = GatedExpand(fc_g, _act(block, h, where, slicer), act_first=True, channel_dim=-1, fc_b=fc_x)
    return Gated([expand, *_tail(block, h, n, where, slicer)], dim, n, -1)


def _spatial_gate(gate: nn.Module, h: int, where: str, slicer: Slicer) -> nn.Module:
    """gMLP's SpatialGatingUnit on the kept units: ``u, v = x.chunk(2)``, ``u * proj(norm(v)^T)^T``; the
    norm (over the v half) is sliced like the block's norm, the token projection copied whole."""
    if type(gate) is nn.Identity:
        return nn.Identity()
    qual = f"{type(gate).__module__}.{type(gate).__qualname__}"
    if qual != SPATIAL_GATING_UNIT or {n for n, _ in gate.named_children()} != {"norm", "proj"}:
        raise OperatorError(
            f"partial_mlp: {where} has a gate_layer {type(gate).__name__} it cannot carry (known: timm "
            "SpatialGatingUnit); leave this MLP unconverted"
        )
    if type(gate.proj) is not nn.Linear:
        proj = type(gate.proj).__name__
        raise OperatorError(f"partial_mlp: {where}'s SpatialGatingUnit projects tokens with a {proj}, not a Linear")
    new = clone_module(gate)
    new.norm = slicer(gate.norm, h, h, f"{where}.gate")
    return new


def _gated(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> Gated:
    """GatedMlp: fc1, act, drop1, gate (identity or a SpatialGatingUnit that halves the width), norm, fc2."""
    where = type(block).__name__
    if type(block.fc1) is not nn.Linear:
        raise OperatorError(f"partial_mlp: {where}'s fc1 is a {type(block.fc1).__name__}, not a Linear")
    dim, width = _widths(block.fc1)
    gated = type(block.gate) is not nn.Identity
    units = width // 2 if gated else width
    if (gated and width % 2) or _widths(block.fc2) != (units, dim):
        raise OperatorError(f"partial_mlp: {where} needs fc2: {units} -> {dim}, got {_widths(block.fc2)}")
    n, h = _split(dim, units, ratio, hidden_ratio)
    rows = _halves(units, h) if gated else torch.arange(h)
    k = rows.numel()  # what fc1, act and drop1 carry: both halves when the gate splits them
    head = [
        _fc_rows(block.fc1, rows, n, where),
        _act(block, k, where, slicer),
        slicer(block.drop1, k, k, where),
        _spatial_gate(block.gate, h, where, slicer),
    ]
    tail = [slicer(block.norm, h, h, where), slicer(block.fc2, h, n, where), slicer(block.drop2, n, n, where)]
    return Gated(head + tail, dim, n, -1)


def _conv_bn(seq: nn.Module, where: str) -> list[nn.Module]:
    """StarNet's ConvBN (a Sequential: conv, then an optional BN) as its layers."""
    names = [n for n, _ in seq.named_children()]
    if _qualname(seq) != STARNET_CONV_BN or names not in (["conv"], ["conv", "bn"]):
        raise OperatorError(f"partial_mlp: {where} has a {type(seq).__name__} ({names}) where a ConvBN was expected")
    return [seq.conv] + ([seq.bn] if names == ["conv", "bn"] else [])


def _starnet(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> Gated:
    """StarNet Block: ``x + dwconv2(g(act(f1(y)) * f2(y)))``, ``y = dwconv(x)`` (the star operation)."""
    where = "StarNet Block"
    dw, f1, f2, g, dw2 = (_conv_bn(getattr(block, a), where) for a in ("dwconv", "f1", "f2", "g", "dwconv2"))
    if len(f1) != 1 or len(f2) != 1:
        raise OperatorError(f"partial_mlp: {where} has a BN after f1 / f2; only their plain 1x1 convs are known")
    dim, units = _widths(f1[0])
    if _widths(f2[0]) != (dim, units) or _widths(g[0]) != (units, dim):
        raise OperatorError(f"partial_mlp: {where} needs f1, f2: C -> H and g: H -> C")
    for conv in (dw[0], dw2[0]):
        if not conv.groups == conv.in_channels == conv.out_channels == dim:
            raise OperatorError(f"partial_mlp: {where}'s {conv} is not a depthwise conv over its {dim} channels")
    n, h = _split(dim, units, ratio, hidden_ratio)
    rows = torch.arange(h)
    fc_a, fc_b = (_fc_rows(f[0], rows, n, where) for f in (f1, f2))
    expand = GatedExpand(fc_a, _act(block, h, where, slicer), act_first=True, channel_dim=1, fc_b=fc_b)
    head = [slicer(m, n, n, where) for m in dw]
    tail = [slicer(g[0], h, n, where), *(slicer(m, n, n, where) for m in g[1:]), slicer(dw2[0], n, n, where)]
    return Gated([*head, expand, *tail], dim, n, 1, residual=True, drop_path=block.drop_path)


class GatedConvMix(nn.Module):
    """MambaOut's gated expansion on its kept units: ``g, i, c = split(fc1(x))`` (channels last),
    ``c`` through the depthwise ``conv`` (channels first), then ``act(g) * cat(i, c)``."""

    def __init__(self, fc1: nn.Linear, conv: nn.Conv2d, act: nn.Module, splits: tuple[int, int, int]):
        super().__init__()
        self.fc1, self.conv, self.act = fc1, conv, act
        self.splits = tuple(int(s) for s in splits)

    def extra_repr(self) -> str:
        return f"splits={self.splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.fc1(x), self.splits, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.act(g) * torch.cat((i, c), dim=-1)


def _part(units: int, ratio: float) -> int:
    return split_channels(units, ratio) if units else 0


def _mambaout(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> Gated:
    """MambaOut GatedConvBlock: ``x + ls(fc2(act(g) * cat(i, conv(c))))``, ``g, i, c = split(fc1(norm(x)))``."""
    where = "MambaOut GatedConvBlock"
    hidden, plain, conv_units = (int(s) for s in block.split_indices)
    fc1, fc2, conv = block.fc1, block.fc2, block.conv
    if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or type(conv) is not nn.Conv2d:
        raise OperatorError(f"partial_mlp: {where} needs Linear fc1 / fc2 and a Conv2d conv")
    dim = fc1.in_features
    shapes_ok = fc1.out_features == 2 * hidden and (fc2.in_features, fc2.out_features) == (hidden, dim)
    if not shapes_ok or plain + conv_units != hidden or plain < 0:
        raise OperatorError(f"partial_mlp: {where}'s split {block.split_indices} does not match fc1 / fc2")
    if conv_units and not conv.groups == conv.in_channels == conv.out_channels == conv_units:
        raise OperatorError(f"partial_mlp: {where}'s conv is not depthwise over its {conv_units} channels")
    r = hidden_ratio if hidden_ratio is not None else ratio
    n, hp, hc = split_channels(dim, ratio), _part(plain, r), _part(conv_units, r)
    kept = torch.cat((torch.arange(hp), plain + torch.arange(hc)))  # kept hidden units, in cat(i, c) order
    rows = torch.cat((kept, hidden + torch.arange(hp), hidden + plain + torch.arange(hc)))  # g, i, c rows
    new_fc1 = linear_from(fc1.weight[rows, :n], fc1.bias[rows] if fc1.bias is not None else None)
    new_conv = slice_conv(conv, (0, hc)) if hc else clone_module(conv)
    mix = GatedConvMix(new_fc1, new_conv, _act(block, hp + hc, where, slicer), (hp + hc, hp, hc))
    new_fc2 = linear_from(fc2.weight[:n][:, kept], fc2.bias[:n] if fc2.bias is not None else None)
    layers = [slicer(block.norm, n, n, where), mix, new_fc2, slicer(block.ls, n, n, where)]
    return Gated(layers, dim, n, -1, residual=True, drop_path=block.drop_path)


_SLICERS = {GLU_MLP: _glu, SWIGLU: _swiglu, GATED_MLP: _gated, STARNET_BLOCK: _starnet, MAMBAOUT_BLOCK: _mambaout}


def slice_gated(block: nn.Module, ratio: float, hidden_ratio: float | None, slicer: Slicer) -> Gated | None:
    """The sliced layers (``Gated``) of a timm gated MLP or gated residual block, None for any other class.

    ``n = round(ratio * C)`` input/output channels; ``h = round(hidden_ratio * H)`` gated hidden units
    (H: the width fc2 reads; ``hidden_ratio`` defaults to ``ratio``), the first h of each half."""
    kind = _qualname(block)
    if kind not in _SLICERS:
        return None
    _check_children(block, kind)
    return _SLICERS[kind](block, ratio, hidden_ratio, slicer)
