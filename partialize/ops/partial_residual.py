"""Partial residual block (``partial_residual``): a ResNet block whose residual branch updates only a
contiguous group of r*C channels; the other channels take the shortcut alone (then the block's
output activation, exactly as if the branch had output 0 there).

The branch reads all channels (``read="all"``), only its own group (``"group"``), or only the
channels it does not write (``"complement"``). With ``ratio=0.5`` and ``read="complement"``,
consecutive blocks that alternate ``offset`` 0 and 0.5 form additive coupling layers (y2 = x2 + F(x1),
then y1 = x1 + G(y2)), the structure of reversible residual networks (RevNet, Gomez et al. 2017):
every channel is still updated every second block. This is our generalisation of the
partial-channel idea from one conv (000 eq. 1: an expensive operator on part of the channels, a cheap
one, here the identity, on the rest) to a whole residual branch; it is not in papers 000-004.

Known blocks: timm and torchvision ``Bottleneck`` / ``BasicBlock`` (ResNet, ResNeXt, Wide ResNet)
and torchvision RegNet's ``ResBottleneckBlock`` (its squeeze-excitation sits inside the branch, on the
hidden channels, which the cut leaves whole); squeeze-excitation on the branch *output* is refused.
A block with a projection shortcut (``downsample`` / ``proj``: a stage's first block, strided or
changing the width) converts only with ``projection=True``: the branch writes its group, the
projection alone gives the other channels (the cheap operator is the projection the block already
has, as partial_kernel keeps a conv's centre tap), and the branch reads the same fractions of the
block's input channels as of its output channels. The block's children keep
their names, so a recipe can convert an unchanged child too (e.g. the bottleneck's 3x3 ``conv2`` to
PATConv, RegNet's grouped 3x3 ``f.b.0`` to PConv).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import OperatorError
from ._export import exporting
from ._utils import clone_module, placeholders, shares_kept_children, slice_bn, slice_conv, split_channels
from ._utils import qualname as _qualname
from .base import PartialOperator
from .partial_blocks import fold_pairs, plain_sequential
from .registry import is_partial_op, register_operator

READ_MODES = ("all", "group", "complement")

# qualified type -> (branch children in forward order, first conv, last conv, last BN, output activation);
# the convs and BN are paths (dotted inside a child: RegNet's f.a.0)
KNOWN_BLOCKS: dict[str, tuple[tuple[str, ...], str, str, str, str]] = {
    "timm.models.resnet.Bottleneck": (
        ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "drop_path"),
        "conv1",
        "conv3",
        "bn3",
        "act3",
    ),
    "timm.models.resnet.BasicBlock": (
        ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "drop_path"),
        "conv1",
        "conv2",
        "bn2",
        "act2",
    ),
    "torchvision.models.resnet.Bottleneck": (
        ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3"),
        "conv1",
        "conv3",
        "bn3",
        "relu",
    ),
    "torchvision.models.resnet.BasicBlock": (
        ("conv1", "bn1", "relu", "conv2", "bn2"),
        "conv1",
        "conv2",
        "bn2",
        "relu",
    ),
    # x + f(x), then the activation; f = a (1x1), b (grouped 3x3), se (on the hidden channels), c (1x1)
    "torchvision.models.regnet.ResBottleneckBlock": (("f",), "f.a.0", "f.c.0", "f.c.1", "activation"),
}
_SHORTCUTS = ("downsample", "proj")  # a projection shortcut under either name (converted with projection=True)


def projection_of(block: nn.Module) -> str | None:
    """The name of ``block``'s projection shortcut, None when its shortcut is the identity."""
    return next((a for a in _SHORTCUTS if getattr(block, a, None) is not None), None)


def _conv_range(conv: nn.Module, out_range: tuple[int, int] | None, in_range: tuple[int, int] | None) -> nn.Conv2d:
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise OperatorError(f"partial_residual can only slice a dense nn.Conv2d, got {type(conv).__name__}")
    return slice_conv(conv, out_range, in_range)


def _bn_range(bn: nn.Module, a: int, b: int) -> nn.Module:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise OperatorError(f"partial_residual expects a BatchNorm after the last conv, got {type(bn).__name__}")
    return slice_bn(bn, a, b)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _kept_paths(root: nn.Module, names: tuple[str, ...], changed: set[str]) -> tuple[str, ...]:
    """The children of ``root`` (or, for a child holding a changed path, its own children) that no cut
    touched: what a recipe may still convert inside the block."""
    out = []
    for name in names:
        inside = [c for c in changed if c == name or c.startswith(name + ".")]
        if not inside:
            out.append(name)
        elif name not in inside:
            subs = tuple(f"{name}.{n}" for n, _ in root.get_submodule(name).named_children())
            out.extend(_kept_paths(root, subs, changed))
    return tuple(out)


def _read_range(read: str, o: int, k: int, dim: int) -> tuple[int, int]:
    """The input channels a branch writing channels [o, o + k) of ``dim`` reads in mode ``read``."""
    if read == "all":
        return 0, dim
    if read == "group":
        return o, o + k
    return (o + k, dim) if o == 0 else (0, o)


def _input_read(read: str, o: int, k: int, dim: int, in_dim: int) -> tuple[int, int]:
    """The input channels read by a branch writing [o, o + k) of ``dim`` output channels: the same
    fractions of the ``in_dim`` inputs (the same channels when the block keeps its width)."""
    if in_dim == dim:
        return _read_range(read, o, k, dim)
    k_in = split_channels(in_dim, k / dim)
    o_in = 0 if o == 0 else in_dim - k_in if o + k == dim else min(int(round(o / dim * in_dim)), in_dim - k_in)
    return _read_range(read, o_in, k_in, in_dim)


def _act(act: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``act(t)`` without touching ``t`` (an in-place activation gets a copy)."""
    if isinstance(act, nn.ReLU):
        return torch.relu(t)
    if isinstance(act, nn.Identity):
        return t
    return act(t.clone()) if getattr(act, "inplace", False) else act(t)


@register_operator("partial_residual")
class PartialResidual(PartialOperator):
    """A residual block whose branch writes channels ``[offset, offset + dim_part)`` only."""

    PARAM_CHOICES = {"read": READ_MODES}  # values a recipe may give, checked when it is validated

    def __init__(
        self,
        children: dict[str, nn.Module],
        order: tuple[str, ...],
        out_act: str,
        dim: int,
        dim_part: int,
        offset: int,
        read: str,
        shortcut: str | None = None,
        in_dim: int | None = None,
    ) -> None:
        super().__init__()
        if read not in READ_MODES:
            raise OperatorError(f"partial_residual read must be one of {READ_MODES}, got {read!r}")
        for name, mod in children.items():
            self.add_module(name, mod)
        self.order = tuple(order)
        self.out_act = out_act
        self.dim, self.dim_part, self.offset, self.read = dim, dim_part, offset, read
        self.shortcut = shortcut  # the projection child's name, None for an identity shortcut
        self.in_dim = dim if in_dim is None else in_dim
        self.kept: tuple[str, ...] = ()  # children identical to the original's (a recipe may convert them)
        self.forward_mode = "cat"  # "write" in the deploy form

    @property
    def ratio(self) -> float:
        return self.dim_part / self.dim

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, writes=[{self.offset}:{self.offset + self.dim_part}], read={self.read!r}, "
            + (f"in_dim={self.in_dim}, shortcut={self.shortcut!r}, " if self.shortcut else "")
            + f"forward_mode={self.forward_mode!r}"
        )

    def read_range(self) -> tuple[int, int]:
        """Input channels the branch reads."""
        return _input_read(self.read, self.offset, self.dim_part, self.dim, self.in_dim)

    def convertible_children(self) -> tuple[str, ...]:
        return self.kept

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        """The block with its branch outputting exactly 0 outside the group a ratio-1/2 conversion writes."""
        spec = KNOWN_BLOCKS.get(_qualname(module))
        if spec is None:
            return None
        if projection_of(module) is not None:
            return None  # converts only with projection=True, which the contract's default check does not pass
        op = cls.from_module(module, ratio=0.5)
        block = clone_module(module)
        last, last_bn = block.get_submodule(spec[2]), block.get_submodule(spec[3])
        keep = torch.zeros(last_bn.num_features, dtype=torch.bool)
        keep[op.offset : op.offset + op.dim_part] = True
        with torch.no_grad():
            last_bn.weight[~keep] = 0
            last_bn.bias[~keep] = 0
            last.weight[~keep] = 0
        return block

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.read_range()
        y = x if (a, b) == (0, self.in_dim) else x[:, a:b]
        for name in self.order:
            y = getattr(self, name)(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, k = self.offset, self.dim_part
        y = self._branch(x)
        act = getattr(self, self.out_act)
        s = x if self.shortcut is None else getattr(self, self.shortcut)(x)
        if self.forward_mode == "write" and not exporting():  # exporters get the out-of-place form
            if self.shortcut is not None:
                return self._forward_projected(x, s, y, act)
            return self._forward_write(x, y, act)
        pieces = []
        if o > 0:
            pieces.append(_act(act, s[:, :o]))
        pieces.append(act(s[:, o : o + k] + y))
        if o + k < self.dim:
            pieces.append(_act(act, s[:, o + k :]))
        return torch.cat(pieces, dim=1)

    def _forward_projected(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """Inference with a projection: the branch adds into its group of the projection's output, in
        place (a copy first if the projection returned a view of the input), then the activation."""
        if s is x or s._is_view():  # the projection returned the input or a view of something: not ours
            s = s.clone()
        s[:, self.offset : self.offset + self.dim_part] += y
        if isinstance(act, nn.ReLU):
            return s.clamp_min_(0)
        return act(s)  # s is this call's own tensor: an in-place activation may overwrite it

    def _forward_write(self, x: torch.Tensor, y: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """Inference: every channel written once into one output, no concatenation."""
        o, k = self.offset, self.dim_part
        out = torch.empty_like(x)
        part = out[:, o : o + k]
        torch.add(x[:, o : o + k], y, out=part)
        relu = isinstance(act, nn.ReLU)
        if relu:
            part.clamp_min_(0)
        else:
            part.copy_(act(part.clone()))
        for a, b in ((0, o), (o + k, self.dim)):
            if b > a:
                if relu:
                    torch.clamp_min(x[:, a:b], 0, out=out[:, a:b])
                else:
                    out[:, a:b] = _act(act, x[:, a:b])
        return out

    @classmethod
    def from_module(
        cls, original: nn.Module, ratio: float = 0.5, offset: float = 0.0, read: str = "all", projection: bool = False
    ) -> PartialResidual:
        """Slice a known residual block: the last conv/BN to the written group, the first conv to the
        channels read. ``offset`` is where the written group starts, as a fraction of the channels.
        ``projection=True`` accepts a block with a projection shortcut (its output gives the channels
        the branch does not write)."""
        spec = KNOWN_BLOCKS.get(_qualname(original))
        if spec is None:
            known = ", ".join(sorted(KNOWN_BLOCKS))
            raise OperatorError(f"partial_residual does not know a {type(original).__name__} (known: {known})")
        if read not in READ_MODES:
            raise OperatorError(f"partial_residual read must be one of {READ_MODES}, got {read!r}")
        order, first, last, last_bn, out_act = spec
        if not isinstance(projection, bool):
            raise OperatorError(f"partial_residual projection must be true or false, got {projection!r}")
        short = projection_of(original)
        if short is not None and not projection:
            raise OperatorError(
                f"block has a projection shortcut ({short}): its untouched channels would need it too "
                "(projection: true lets the projection alone give them)"
            )
        if getattr(original, "se", None) is not None:
            raise OperatorError("block has squeeze-excitation on the branch output: not supported")
        branch = [getattr(original, n) for n in order if isinstance(getattr(original, n, None), nn.Module)]
        strided = any(c.stride != (1, 1) for b in branch for c in b.modules() if isinstance(c, nn.Conv2d))
        if short is None and strided:
            raise OperatorError("strided block: the identity shortcut needs stride 1")
        dim = original.get_submodule(last).out_channels
        in_dim = original.get_submodule(first).in_channels
        if short is None and in_dim != dim:
            raise OperatorError(f"block input has {in_dim} channels, output {dim}")
        if not 0.0 <= float(offset) < 1.0:
            raise OperatorError(f"offset must be a fraction in [0, 1), got {offset!r}")
        k = split_channels(dim, ratio)
        o = int(round(float(offset) * dim))
        if k == dim:
            raise OperatorError(f"ratio {ratio:g} lets the branch write all {dim} channels: the same block")
        if o + k > dim:
            raise OperatorError(f"offset {offset:g} + ratio {ratio:g} runs past the {dim} channels")
        if read == "complement" and 0 < o and o + k < dim:
            raise OperatorError("read='complement' needs the written group at either end (offset 0 or 1 - ratio)")
        a, b = _input_read(read, o, k, dim, in_dim)
        if b <= a:
            raise OperatorError(f"read={read!r} at ratio {ratio:g} leaves the branch none of its {in_dim} inputs")
        changed = {last, last_bn} | ({first} if (a, b) != (0, in_dim) else set())
        # the layers about to be replaced by their slices are not copied first (a copy of a large
        # block's 1x1 convs was most of the planning time of a wide network)
        memo = placeholders(original, [original.get_submodule(p) for p in changed])
        names = order + (out_act,) + ((short,) if short else ())
        if shares_kept_children():  # the planner's build: the kept children stay the original's (engine/apply.py)
            present = tuple(n for n in dict.fromkeys(names) if isinstance(getattr(original, n, None), nn.Module))
            memo |= {id(m): m for m in (original.get_submodule(p) for p in _kept_paths(original, present, changed))}
        children = {n: clone_module(getattr(original, n), memo) for n in dict.fromkeys(names)}
        children = {n: m for n, m in children.items() if m is not None}
        order = tuple(n for n in order if n in children)  # timm keeps drop_path=None when unused
        op = cls(children, order, out_act, dim, k, o, read, shortcut=short, in_dim=in_dim)
        _set(op, last, _conv_range(original.get_submodule(last), (o, o + k), None))
        _set(op, last_bn, _bn_range(original.get_submodule(last_bn), o, o + k))
        if first in changed:
            _set(op, first, _conv_range(original.get_submodule(first), None, (a, b)))
        op.kept = _kept_paths(op, tuple(children), changed)
        ref = original.get_submodule(last).weight
        return op.to(ref.device)

    def deploy(self) -> PartialResidual:
        """Inference form: inner operators deployed, each (conv, BN) pair along the branch folded,
        one output written channel group by channel group; eval mode, frozen."""
        new = clone_module(self).eval()
        inner = [n for n, m in new.named_modules() if n and is_partial_op(m) and callable(getattr(m, "deploy", None))]
        for name in [n for n in inner if not any(n.startswith(o + ".") for o in inner)]:  # outermost ones
            _set(new, name, new.get_submodule(name).eval().deploy())
        fold_pairs(new, list(new.order))
        folded = list(dict.fromkeys(new.order + ((new.shortcut,) if new.shortcut else ())))
        for seq in [m for n in folded for m in getattr(new, n).modules() if plain_sequential(m)]:
            fold_pairs(seq, [n for n, _ in seq.named_children()])  # RegNet's f.a = (conv, BN, ReLU)
        new.forward_mode = "write"
        return new.requires_grad_(False)
