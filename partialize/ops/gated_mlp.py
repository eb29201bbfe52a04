"""Gated MLPs for ``partial_mlp``: timm ``GluMlp`` (``SwiGLUPacked`` too), ``SwiGLU`` and ``GatedMlp``.

A gated MLP multiplies two halves of its expansion, ``act(a) * b`` (or ``a * act(b)``), hidden unit by
hidden unit. Sliced like a plain ``Mlp`` (first r*C input and output channels, first h hidden units),
the same h hidden units are kept in *both* halves, so each kept unit still meets its own gate:
GluMlp's fc1 keeps rows ``[:h]`` and ``[H/2 : H/2 + h]`` in one layer (chunked in two, as timm does),
SwiGLU keeps rows ``[:h]`` of ``fc1_g`` and of ``fc1_x``, GatedMlp (gMLP) keeps them in each half its
``SpatialGatingUnit`` splits, whose norm is sliced like the block's and whose token projection (it
mixes positions, not channels) is copied whole. Everything else (biases, the activation, drop layers,
the norm, chunk order, which half is the gate) is carried; anything else is refused with the reason.

The caller (``partial_blocks.PartialMLP``) passes its own slicer for the ordinary layers, so a norm or
an activation is handled here exactly as in a plain ``Mlp``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..errors import OperatorError
from ._utils import conv1x1_from, linear_from, split_channels

GLU_MLP = "timm.layers.mlp.GluMlp"
SWIGLU = "timm.layers.mlp.SwiGLU"
GATED_MLP = "timm.layers.mlp.GatedMlp"
SPATIAL_GATING_UNIT = "timm.models.mlp_mixer.SpatialGatingUnit"
GATED_CLASSES = (GLU_MLP, SWIGLU, GATED_MLP)

# every child each class has, in forward order (read from timm's source; checked by tests/test_gated_mlp.py)
_CHILDREN = {
    GLU_MLP: ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    SWIGLU: ("fc1_g", "fc1_x", "act", "drop1", "norm", "fc2", "drop2"),
    GATED_MLP: ("fc1", "act", "drop1", "gate", "norm", "fc2", "drop2"),
}

Slicer = Callable[[nn.Module, "int | None", "int | None", str], nn.Module]


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
        return linear_from(fc.weight[rows][:, :n_in], fc.bias[rows] if fc.bias is not None else None)
    if type(fc) is nn.Conv2d and fc.kernel_size == (1, 1) and fc.groups == 1 and fc.stride == (1, 1):
        if fc.padding not in ((0, 0), "valid"):
            raise OperatorError(f"{where}: a 1x1 conv with padding changes the size; cannot slice it")
        return conv1x1_from(fc.weight[rows][:, :n_in], fc.bias[rows] if fc.bias is not None else None)
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


def _glu(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> tuple[list[nn.Module], int, int, int]:
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
    return [expand, *_tail(block, h, n, where, slicer)], dim, n, ch_dim


def _swiglu(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> tuple[list[nn.Module], int, int, int]:
    """SwiGLU: ``act(fc1_g(x)) * fc1_x(x)``: the same rows of both."""
    where = type(block).__name__
    dim, units = _widths(block.fc1_g)
    if _widths(block.fc1_x) != (dim, units) or _widths(block.fc2) != (units, dim):
        raise OperatorError(f"partial_mlp: {where} needs fc1_g, fc1_x: C -> H and fc2: H -> C")
    n, h = _split(dim, units, ratio, hidden_ratio)
    rows = torch.arange(h)
    fc_g, fc_x = (_fc_rows(fc, rows, n, where) for fc in (block.fc1_g, block.fc1_x))
    expand = GatedExpand(fc_g, _act(block, h, where, slicer), act_first=True, channel_dim=-1, fc_b=fc_x)
    return [expand, *_tail(block, h, n, where, slicer)], dim, n, -1


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
    new = copy.deepcopy(gate)
    new.norm = slicer(gate.norm, h, h, f"{where}.gate")
    return new


def _gated(block: nn.Module, ratio, hidden_ratio, slicer: Slicer) -> tuple[list[nn.Module], int, int, int]:
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
    return head + tail, dim, n, -1


_SLICERS = {GLU_MLP: _glu, SWIGLU: _swiglu, GATED_MLP: _gated}


def slice_gated(
    block: nn.Module, ratio: float, hidden_ratio: float | None, slicer: Slicer
) -> tuple[list[nn.Module], int, int, int] | None:
    """(sliced layers in forward order, C, n, channel dim) for a timm gated MLP, None for any other class.

    ``n = round(ratio * C)`` input/output channels; ``h = round(hidden_ratio * H)`` gated hidden units
    (H: the width fc2 reads; ``hidden_ratio`` defaults to ``ratio``), the first h of each half."""
    kind = f"{type(block).__module__}.{type(block).__qualname__}"
    if kind not in _SLICERS:
        return None
    _check_children(block, kind)
    return _SLICERS[kind](block, ratio, hidden_ratio, slicer)
