"""Partial-channel forms of whole blocks: MLPs / inverted residuals and attention.

``PartialMLP`` (``partial_mlp``): the block's hidden expansion runs on the first r*C channels
only (hidden width r*H, weights = the top-left blocks of the original layers); the other channels
pass through the block unchanged: for a residual block (inverted residual) they keep x, for a
branch that sits inside a residual (a transformer/ConvNeXt MLP) the branch outputs 0 for them.
MACs of the block scale by about r^2. timm's gated MLPs (GluMlp, SwiGLU, GatedMlp) keep the same
hidden units in their gate and value halves (``gated_mlp.py``); ghost bottlenecks are cut in
``ghost_blocks.py``.

``PartialAttention`` (``partial_attention``): multi-head self-attention on the last (1 - r)*C
channels (whole heads, q/k/v/proj inherited as sub-blocks), a cheap mixer on the first r*C
channels: identity, or a depthwise 3x3 conv on the token grid when the grid is known (feature
maps, or token sequences given ``grid=(H, W)`` with ``prefix_tokens`` leading tokens).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OperatorError
from ._chain_probe import Ref, record_forward
from ._export import exporting
from ._utils import (
    bn_remainder,
    clone_module,
    fold_bn_into_conv,
    is_foldable_bn,
    linear_from,
    slice_bn,
    slice_conv,
    split_channels,
)
from ._utils import qualname as _qualname
from .base import InferenceForm, PartialOperator
from .gated_mlp import slice_gated
from .ghost_blocks import slice_ghost
from .registry import register_operator

_PASSTHROUGH = (
    nn.Identity,
    nn.Dropout,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.Mish,
    nn.Hardsigmoid,
)


# squeeze-excitation classes: (module path, squeeze conv, excite conv); the squeeze width is kept
_SE_CLASSES = {
    "timm.models._efficientnet_blocks.SqueezeExcite": ("conv_reduce", "conv_expand"),
    "torchvision.ops.misc.SqueezeExcitation": ("fc1", "fc2"),
}


# in torch.nn.modules.activation but not element-wise: they mix (or halve) the units, so a slice would differ
_ACROSS_UNITS = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)
_METAFORMER_ACTS = ("timm.models.metaformer.StarReLU", "timm.models.metaformer.SquaredReLU")


def plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential (or subclass) that runs its children in order and nothing else: a subclass with
    its own forward may do anything between or after them."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def fold_pairs(parent: nn.Module, names: list[str]) -> None:
    """Fold each (conv, BN) pair adjacent in ``names`` (children of ``parent`` in forward order), where
    neither is used twice: the conv (or partial operator) absorbs the BN, the BN leaves its remainder."""
    for conv_name, bn_name in zip(names, names[1:]):
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        if not is_foldable_bn(bn) or names.count(conv_name) > 1 or names.count(bn_name) > 1:
            continue
        if type(conv) is nn.Conv2d and bn.num_features == conv.out_channels:
            folded = fold_bn_into_conv(conv, bn)
        elif isinstance(conv, (PartialOperator, InferenceForm)):
            folded = conv.fold_bn(bn)
        else:
            folded = None
        if folded is not None:
            setattr(parent, conv_name, folded)
            setattr(parent, bn_name, bn_remainder(bn))


def _is_channelwise(m: nn.Module) -> bool:
    """A layer that acts on each element alone, the same way for every unit: activations and dropout,
    weightless or with scalar weights only (StarReLU's s * relu(x)^2 + b, a one-parameter PReLU), which
    a slice keeps whole."""
    if type(m) in _PASSTHROUGH:  # exact types: a subclass may override forward
        return True
    if isinstance(m, _ACROSS_UNITS):
        return False
    path = type(m).__module__
    scalar = all(p.numel() == 1 for p in m.parameters()) and not any(True for _ in m.buffers())
    known = (
        path.startswith(("timm.layers.activations", "torch.nn.modules.activation")) or _qualname(m) in _METAFORMER_ACTS
    )
    return scalar and known


def _slice_se(se: nn.Module, n: int, where: str) -> nn.Module:
    """Squeeze-excitation on the first ``n`` channels: the squeeze conv reads them, the excite conv
    writes their gates; the squeeze width stays (at n = all channels it is the original SE)."""
    squeeze, excite = _SE_CLASSES[_qualname(se)]
    new = clone_module(se)
    sq, ex = getattr(se, squeeze), getattr(se, excite)
    try:
        setattr(new, squeeze, slice_conv(sq, None, (0, n)))
        setattr(new, excite, slice_conv(ex, (0, n), None))
    except OperatorError as e:
        raise OperatorError(f"{where}: {e}") from None
    return new


# per-channel scales x * gamma (gamma over the channels, first dim): cut to the kept channels
_LAYER_SCALES = (
    "timm.layers.layer_scale.LayerScale",
    "timm.layers.layer_scale.LayerScale2d",
    "timm.models.swiftformer.LayerScale2d",
)
# per-sample branch dropout (training only): the same on any width
_DROP_PATHS = ("timm.layers.drop.DropPath", "torchvision.ops.stochastic_depth.StochasticDepth")


# timm's GroupNorm classes only pick a kernel (fast_norm or F.group_norm): the same function as nn.GroupNorm
_TIMM_GROUP_NORMS = ("timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")


def _slice_group_norm(m: nn.GroupNorm, n: int, where: str) -> nn.GroupNorm:
    """A GroupNorm on the first n channels: whole groups where n is a multiple of the group size (the
    same statistics); a one-group norm (GroupNorm1) normalises the n kept channels (as a cut LayerNorm)."""
    size = m.num_channels // m.num_groups
    if n % size and m.num_groups != 1:
        raise OperatorError(f"{where}: a GroupNorm of {m.num_groups} groups of {size} cannot be cut to {n} channels")
    groups = 1 if m.num_groups == 1 else n // size
    new = nn.GroupNorm(groups, n, eps=m.eps, affine=m.affine)
    if m.affine:
        with torch.no_grad():
            new.weight.copy_(m.weight[:n])
            new.bias.copy_(m.bias[:n])
    return new.to(m.weight.device if m.weight is not None else "cpu")


_MIXED_CONV = "timm.layers.mixed_conv2d.MixedConv2d"


def _mixed_is_depthwise(m: nn.Module) -> bool:
    return all(c.groups == c.in_channels == c.out_channels for c in m.values())


def _slice_mixed(m: nn.Module, n_in: int | None, n_out: int | None, where: str) -> nn.Module:
    """MixNet's MixedConv2d (a conv per split of the channels, outputs concatenated) on its first n_in
    inputs and n_out outputs: every split cut to the part of it inside both (each output reads only its
    own split's inputs, so this is the original with the dropped inputs zeroed); splits past the end go."""
    if _mixed_is_depthwise(m):
        n_in = n_out = n_out if n_out is not None else n_in
    n_in = m.in_channels if n_in is None else n_in
    n_out = m.out_channels if n_out is None else n_out
    new = clone_module(m)
    splits, start_in, start_out = [], 0, 0
    for key, conv in list(m.items()):
        a = min(max(n_in - start_in, 0), conv.in_channels)
        b = min(max(n_out - start_out, 0), conv.out_channels)
        start_in, start_out = start_in + conv.in_channels, start_out + conv.out_channels
        if a == 0 and b == 0:
            del new[key]
            continue
        if a == 0 or b == 0:
            raise OperatorError(f"{where}: a MixedConv2d cut to {n_in} inputs and {n_out} outputs splits a group")
        new[key] = _slice_layer(conv, a, b, where)
        splits.append(a)
    new.splits, new.in_channels, new.out_channels = splits, n_in, n_out
    return new


def _slice_layer(m: nn.Module, n_in: int | None, n_out: int | None, where: str) -> nn.Module:
    """Copy of ``m`` restricted to its first ``n_in`` input and ``n_out`` output channels."""
    if _is_channelwise(m) or _qualname(m) in _DROP_PATHS or type(m) is nn.ZeroPad2d:
        return clone_module(m)
    if _qualname(m) in _LAYER_SCALES and isinstance(getattr(m, "gamma", None), nn.Parameter):
        new = clone_module(m)
        new.gamma = nn.Parameter(m.gamma.detach()[:n_out].clone())
        return new
    if _qualname(m) in _SE_CLASSES:
        return _slice_se(m, n_out, where)
    if type(m) is nn.Linear:
        return linear_from(m.weight[:n_out, :n_in], m.bias[:n_out] if m.bias is not None else None)
    if type(m) is nn.Conv2d:
        try:
            return slice_conv(m, (0, n_out if n_out is not None else n_in), (0, n_in) if n_in is not None else None)
        except OperatorError as e:
            raise OperatorError(f"{where}: {e}") from None
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return slice_bn(m, 0, n_out)
    # exact types: a subclass may add to it (LayerNormAct); timm's LayerNorm only picks a kernel
    if (type(m) is nn.LayerNorm or _qualname(m) == "timm.layers.norm.LayerNorm") and len(m.normalized_shape) == 1:
        new = nn.LayerNorm(n_out, eps=m.eps, elementwise_affine=m.elementwise_affine, bias=m.bias is not None)
        if m.elementwise_affine:
            with torch.no_grad():
                new.weight.copy_(m.weight[:n_out])
                if m.bias is not None:
                    new.bias.copy_(m.bias[:n_out])
        return new.to(m.weight.device if m.weight is not None else "cpu")
    if _qualname(m) == _MIXED_CONV:
        return _slice_mixed(m, n_in, n_out, where)
    if type(m) is nn.GroupNorm or _qualname(m) in _TIMM_GROUP_NORMS:
        return _slice_group_norm(m, n_out, where)
    if isinstance(m, nn.Sequential):
        raise OperatorError(f"{where}: nested Sequential must be flattened first")
    raise OperatorError(f"{where}: cannot slice a {type(m).__name__} to part of its channels")


def _width_change(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) widths of a channel-mixing layer, None for channel-wise ones."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.Conv2d) and not (m.groups == m.in_channels == m.out_channels and m.groups > 1):
        return m.in_channels, m.out_channels
    if _qualname(m) == _MIXED_CONV and not _mixed_is_depthwise(m):
        return m.in_channels, m.out_channels
    return None


# forward order of the timm MLPs we know (read from timm's source; checked by a ratio-1 test)
_TIMM_MLP_ORDER = {
    "timm.layers.mlp.Mlp": ("fc1", "act", "drop1", "norm", "fc2", "drop2"),
    "timm.layers.mlp.ConvMlp": ("fc1", "norm", "act", "drop", "fc2"),
}


def _require_all_consumed(block: nn.Module, seq: list[nn.Module]) -> None:
    """Refuse a block with a weighted child the slicer would silently drop."""
    used = {id(m) for m in seq}
    extra = [n for n, c in block.named_children() if id(c) not in used and any(True for _ in c.parameters())]
    if extra:
        raise OperatorError(f"partial_mlp: {type(block).__name__} has layers it does not know how to slice: {extra}")


def mlp_layers(block: nn.Module) -> tuple[list[nn.Module], bool, int] | None:
    """Flatten a known MLP-like block into (layers, residual, channel_dim) or None if unknown.

    Known: timm ``Mlp``/``ConvMlp`` (fc1, act, drop1, norm, fc2, drop2), torchvision ``MLP`` /
    ``MLPBlock`` and plain Sequentials of Linear/1x1 conv layers, any class named ``*Mlp*`` / ``*FFN*``
    whose forward is a chain of its children (``traced_chain``; FastViT, TinyViT, InceptionNeXt,
    EfficientFormer (V2), EfficientViT, SHViT, SwiftFormer, RepViT), timm ``InvertedResidual``
    (conv_pw, bn1, conv_dw, bn2, aa, se, conv_pwl, bn3, skip) and torchvision ``InvertedResidual``,
    ``MBConv`` and ``FusedMBConv``.
    """
    order = _TIMM_MLP_ORDER.get(_qualname(block))
    if order is not None:
        seq = [getattr(block, a) for a in order if isinstance(getattr(block, a, None), nn.Module)]
        _require_all_consumed(block, seq)
        ch_dim = 1 if isinstance(block.fc1, nn.Conv2d) else -1
        return seq, False, ch_dim
    if _qualname(block) == "timm.models._efficientnet_blocks.InvertedResidual":
        if not getattr(block, "has_skip", False):
            raise OperatorError(
                "inverted residual without a skip connection (stride 2 or in != out): "
                "its untouched channels would have nowhere to go"
            )
        if getattr(block, "conv_s2d", None) is not None:
            raise OperatorError("inverted residual with a space-to-depth stem is not supported")
        seq = [
            block.conv_pw,
            block.bn1,
            block.conv_dw,
            block.bn2,
            block.aa,
            block.se,
            block.conv_pwl,
            block.bn3,
        ]
        _require_all_consumed(block, seq)
        return seq, True, 1
    if _qualname(block) == "torchvision.models.maxvit.MBConv":  # res = proj(x); res + drop(layers(x))
        if not isinstance(block.proj, nn.Identity):
            raise OperatorError(
                "MaxViT MBConv with a projection shortcut (stride 2 or in != out): "
                "its untouched channels would have nowhere to go"
            )
        return _flatten(block.layers), True, 1
    if _qualname(block) in _TV_INVERTED:
        skip = getattr(block, "use_res_connect", getattr(block, "apply_residual", None))
        if skip is None:  # a torchvision version that names its skip otherwise: not known, not guessed
            return None
        if not skip:
            raise OperatorError(
                "inverted residual without a skip connection (stride 2 or in != out): "
                "its untouched channels would have nowhere to go"
            )
        return _flatten(getattr(block, _TV_INVERTED[_qualname(block)])), True, 1
    # a traced chain only for a class named an MLP / FFN: partial_mlp's zeros for the untouched channels
    # assume the branch of a residual, which is what transformer / MetaFormer blocks call by that name
    named_mlp = any(w in type(block).__name__.lower() for w in ("mlp", "ffn"))
    flat, skip = (_flatten(block), False) if plain_sequential(block) else traced_chain(block) or (None, False)
    if flat is not None and not skip and not named_mlp and not plain_sequential(block):
        flat = None  # a bare chain under another name: not known to sit in a residual
    if flat is not None:
        kinds = [m for m in flat if _width_change(m) is not None]
        if len(kinds) >= 2 and all(_width_change(a)[1] == _width_change(b)[0] for a, b in zip(kinds, kinds[1:])):
            ch_dim = _sequential_channel_dim(flat)
            if ch_dim is not None:
                return flat, skip, ch_dim
    return None


def _chain_widths(layers: list[nn.Module]) -> list[int]:
    """[C, H_1, ..., H_{k-1}, C] of a chain of k >= 2 channel-mixing layers (an MLP: two; Xception's
    separable convs: three pointwise convs), each reading the width the one before wrote."""
    mixers = [_width_change(m) for m in layers if _width_change(m) is not None]
    if len(mixers) < 2:
        raise OperatorError(f"partial_mlp expects at least two channel-mixing layers, found {len(mixers)}")
    widths = [mixers[0][0]]
    for a, b in mixers:
        if a != widths[-1]:
            raise OperatorError(f"partial_mlp: a layer reads {a} channels after one that wrote {widths[-1]}")
        widths.append(b)
    if widths[-1] != widths[0]:
        raise OperatorError("partial_mlp needs an MLP whose output width equals its input width")
    return widths


# layers _slice_layer cuts itself (timm's BatchNormAct2d is a BatchNorm with children)
_SLICEABLE = (nn.Linear, nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def traced_chain(block: nn.Module, depth: int = 0) -> tuple[list[nn.Module], bool] | None:
    """(layers, residual) of a module whose forward is exactly a chain of calls of its children (each
    output the next one's only input; timm's model-specific ``ConvMlp`` / ``NormMlp`` / ``FFN``
    classes), read by running the forward on a token with every child a recorder (``_chain_probe``)
    in eval and in train mode (the same calls in both), a child that is itself such a chain (or a
    Sequential) flattened; ``residual`` when the chain's result is added to the block's input
    (``x + f(x)``: SwiftFormer's ``ConvEncoder``, MobileNetV5's ``EdgeResidual``, a ``Residual``
    wrapper). None for anything else: an operation between the calls, a parameter or buffer read in the
    forward, a second input, a child with weights called twice (a weightless dropout may be)."""
    if depth > 3 or not any(True for _ in block.children()):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()):
        return None  # the probe does not run hooks, and a cut copy would lose them
    runs = [record_forward(block, training) for training in (False, True)]
    if runs[0] is None or runs[0] != runs[1]:
        return None
    records, out = runs[0]
    if out is None or not records:
        return None
    last = records[-1]
    residual = (
        out == Ref(len(records)) and last[0] == "call_function"
        and last[1] in (operator.add, operator.iadd, torch.add) and not last[3] and len(last[2]) == 2
        and Ref(0) in last[2] and sum(Ref(0) in r[2] for r in records) == 2
    )  # fmt: skip
    calls = records[:-1] if residual else records
    if residual:
        out = last[2][1] if last[2][0] == Ref(0) else last[2][0]
    if not calls or any(r[0] != "call_module" for r in calls):
        return None
    prev = Ref(0)
    for i, (_, _, args, kwargs) in enumerate(calls):
        if args != (prev,) or kwargs:
            return None
        prev = Ref(i + 1)
    if out != prev:
        return None
    targets = [r[1] for r in calls]
    layers: list[nn.Module] = []
    for target in targets:
        m = block.get_submodule(target)
        weighted = any(True for _ in m.parameters())
        stateful = weighted or any(True for _ in m.buffers())  # running statistics are state too
        if stateful and targets.count(target) > 1:
            return None
        inner = _expand(m, depth)
        if inner is None:
            return None
        layers.extend(inner)
    called = set(targets)
    unused = [name for name, c in block.named_children() if name not in called and any(True for _ in c.parameters())]
    if unused:  # weights the forward does not use would be lost without a word if it ever did
        raise OperatorError(
            f"partial_mlp: {type(block).__name__} has weighted children its forward never calls: {unused}"
        )
    return layers, residual


def _expand(m: nn.Module, depth: int) -> list[nn.Module] | None:
    """A chain element as layers: a Sequential's children, a weighted module with children whose forward
    is itself a chain (timm ConvNormAct: conv, bn (, aa); Xception's SeparableConv2d: depthwise,
    pointwise) as its layers, anything else itself (a leaf is for the slicer to cut or refuse); None
    when a weighted module with children is not a chain."""
    if plain_sequential(m):
        out = []
        for c in m.children():
            inner = _expand(c, depth)
            if inner is None:
                return None
            out.extend(inner)
        return out
    composite = any(True for _ in m.children()) and any(True for _ in m.parameters())  # a leaf is the slicer's
    if composite and not isinstance(m, _SLICEABLE) and _qualname(m) not in (*_SE_CLASSES, *_LAYER_SCALES, _MIXED_CONV):
        inner = traced_chain(m, depth + 1)
        if inner is None or inner[1]:  # a residual inside the chain is not a layer of it
            return None
        return inner[0]
    return [m]


def _sequential_channel_dim(flat: list[nn.Module]) -> int | None:
    """1 for a Sequential of convs / BNs, -1 for one of Linears / LayerNorms (plus channel-wise
    layers in either); None when a layer moves data between positions (a permute, a reshape, a
    spatial pooling) or the two layouts mix, which a channel slice could not follow."""
    dims = set()
    for m in flat:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or _qualname(m) in _SE_CLASSES:
            dims.add(1)
        elif type(m) is nn.ZeroPad2d or _qualname(m) == _MIXED_CONV:  # on (B, C, H, W) maps; a pad: every channel alike
            dims.add(1)
        elif isinstance(m, nn.Linear) or isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            dims.add(-1)
        elif _qualname(m) in _LAYER_SCALES:  # gamma over the channels: (C,) on tokens, (C, 1, 1) or 2d on maps
            dims.add(1 if type(m).__name__.endswith("2d") else -1)
        elif not (_is_channelwise(m) or _qualname(m) in _DROP_PATHS):
            return None
    return dims.pop() if len(dims) == 1 else None


# torchvision inverted residuals: the attribute holding the branch (MobileNetV2 ``conv``, V3 ``block``)
_TV_INVERTED = {
    "torchvision.models.mobilenetv2.InvertedResidual": "conv",
    "torchvision.models.mobilenetv3.InvertedResidual": "block",
    "torchvision.models.efficientnet.MBConv": "block",  # EfficientNet; its stochastic depth is carried
    "torchvision.models.efficientnet.FusedMBConv": "block",  # EfficientNetV2: a 3x3 expansion, then 1x1
    "torchvision.models.mnasnet._InvertedResidual": "layers",  # its skip flag is `apply_residual`
}
_OWN_DROP_PATH = (
    "timm.models._efficientnet_blocks.InvertedResidual",
    *_TV_INVERTED,
    "torchvision.models.maxvit.MBConv",
)
# a residual block's per-sample branch dropout (training only), applied to the partial branch as well
_DROP_PATH_ATTRS = ("stochastic_depth", "drop_path")


def _drop_path_of(block: nn.Module) -> nn.Module | None:
    """A copy of the block's stochastic depth / drop path module, or None; one with weights is refused."""
    drop = next((getattr(block, a) for a in _DROP_PATH_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
    if drop is not None and any(True for _ in drop.parameters()):
        raise OperatorError(f"partial_mlp: the drop path of {type(block).__name__} has weights")
    return clone_module(drop)


def _flatten(seq: nn.Module) -> list[nn.Module]:
    out = []
    for m in seq.children() if plain_sequential(seq) else [seq]:
        if plain_sequential(m):
            out.extend(_flatten(m))
        else:
            out.append(m)
    return out


@register_operator("partial_mlp")
class PartialMLP(PartialOperator):
    """Run an MLP-like block on the first r*C channels only (see module docstring)."""

    faithful_params = {"ratio": 1.0, "hidden_ratio": 1.0}  # every channel and hidden unit: the block itself

    def __init__(
        self,
        layers: list[nn.Module],
        dim: int,
        dim_part: int,
        residual: bool,
        channel_dim: int,
        drop_path: nn.Module | None = None,
    ):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.dim, self.dim_part = dim, dim_part
        self.residual = residual
        self.channel_dim = channel_dim
        if drop_path is not None and not isinstance(drop_path, nn.Identity):
            self.drop_path = drop_path  # a residual block's stochastic depth, on the partial branch

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dim_part={self.dim_part}, residual={self.residual}"

    @property
    def ratio(self) -> float:
        return self.dim_part / self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = x.narrow(self.channel_dim, 0, self.dim_part)
        return self._assemble(x, x1, self.layers(x1))

    def _assemble(self, x: torch.Tensor, x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        """The output: y1 (plus x1 in a residual block) on the first n channels, x (or 0) on the rest."""
        n = self.dim_part
        if y1.shape != x1.shape:  # never broadcast a wrong shape into place
            raise OperatorError(f"partial_mlp: the cut block returned {tuple(y1.shape)} for {n} of {tuple(x.shape)}")
        if self.residual and "drop_path" in self._modules:
            y1 = self.drop_path(y1)
        if exporting():  # out of place for exporters (see ops/_export.py)
            rest = x.narrow(self.channel_dim, n, self.dim - n)
            head = x1 + y1 if self.residual else y1
            return torch.cat((head, rest if self.residual else torch.zeros_like(rest)), dim=self.channel_dim)
        # write into one output instead of concatenating temporaries (one pass fewer)
        out = x.clone() if self.residual else torch.zeros_like(x)
        part = out.narrow(self.channel_dim, 0, n)
        if self.residual:
            part += y1
        else:
            part.copy_(y1)
        return out

    @classmethod
    def from_module(cls, original: nn.Module, ratio: float = 0.5, hidden_ratio: float | None = None) -> PartialMLP:
        """Slice a known MLP-like block (see ``mlp_layers``; timm's gated MLPs: ``gated_mlp``) to its
        first ``ratio`` of the channels and first ``hidden_ratio`` of its hidden units."""
        if _qualname(original) == "torchvision.models.convnext.CNBlock":
            return PartialCNBlock.from_cnblock(original, ratio, hidden_ratio)
        if _qualname(original) == "torchvision.models.shufflenetv2.InvertedResidual":
            return PartialShuffleUnit.from_unit(original, ratio, hidden_ratio)
        if _qualname(original) in _CUT_COPIES:
            return PartialMLPCopy.from_copy(original, ratio, hidden_ratio)
        for cut_block in (slice_ghost, slice_gated):
            cut = cut_block(original, ratio, hidden_ratio, _slice_layer)
            if cut is not None:
                return cls(cut.layers, cut.dim, cut.n, cut.residual, cut.channel_dim, cut.drop_path)
        found = mlp_layers(original)
        if found is None:
            raise OperatorError(
                f"partial_mlp does not know how to slice a {type(original).__name__} (known: timm "
                "Mlp/ConvMlp/GluMlp/SwiGLU/GatedMlp, torchvision MLP, inverted residuals with a skip, "
                "Sequential of two Linear/1x1 conv layers)"
            )
        layers, residual, ch_dim = found
        widths = _chain_widths(layers)  # C, H_1, ..., C: the width after each channel-mixing layer
        n = split_channels(widths[0], ratio)
        hr = hidden_ratio if hidden_ratio is not None else ratio
        cut = [n, *(split_channels(w, hr) for w in widths[1:-1]), n]  # the first n in and out, h_i between
        dim = widths[0]
        sliced, seen = [], 0
        for m in layers:
            if _width_change(m) is not None:
                sliced.append(_slice_layer(m, cut[seen], cut[seen + 1], type(original).__name__))
                seen += 1
            else:
                sliced.append(_slice_layer(m, cut[seen], cut[seen], type(original).__name__))
        # the blocks whose forward applies their drop path outside the layers; a traced chain holds its own
        drop = _drop_path_of(original) if residual and _qualname(original) in _OWN_DROP_PATH else None
        return cls(sliced, dim, n, residual, ch_dim, drop)

    def deploy(self) -> PartialMLP:
        """Inference form: eval mode, frozen, each (conv, BN) pair of the block folded."""
        new = clone_module(self).eval()
        fold_pairs(new.layers, [n for n, _ in new.layers.named_children()])
        return new.requires_grad_(False)


# MLPs whose forward takes more than the features (PVT v2's feat_size) and reads every width from its
# input: cut as a copy of the same class, its children in forward order (read from timm's source)
_CUT_COPIES = {"timm.models.pvt_v2.MlpWithDepthwiseConv": ("fc1", "relu", "dwconv", "act", "fc2", "drop")}


class PartialMLPCopy(PartialMLP):
    """A partial MLP held as a cut copy of the original class, called with the block's other
    arguments (PVT v2's ``MlpWithDepthwiseConv(x, feat_size)``); a branch: the other channels get 0."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x1 = x.narrow(self.channel_dim, 0, self.dim_part)
        return self._assemble(x, x1, self.layers[0](x1, *args, **kwargs))

    @classmethod
    def from_copy(cls, block: nn.Module, ratio: float, hidden_ratio: float | None) -> PartialMLPCopy:
        where = type(block).__name__
        order = _CUT_COPIES[_qualname(block)]
        if [n for n, _ in block.named_children()] != list(order):
            names = [n for n, _ in block.named_children()]
            raise OperatorError(f"partial_mlp: {where} has children {names}, expected {list(order)}")
        fc1, fc2 = block.fc1, block.fc2
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or fc2.out_features != fc1.in_features:
            raise OperatorError(f"partial_mlp: {where} needs Linear fc1: C -> H and fc2: H -> C")
        dim, hidden = fc1.in_features, fc1.out_features
        n = split_channels(dim, ratio)
        h = split_channels(hidden, hidden_ratio if hidden_ratio is not None else ratio)
        new = clone_module(block)  # the same class and attributes; every child replaced below
        widths = {"fc1": (n, h), "fc2": (h, n), "drop": (n, n)}
        for name in order:
            setattr(new, name, _slice_layer(getattr(block, name), *widths.get(name, (h, h)), where))
        return cls([new], dim, n, False, -1)


class PartialShuffleUnit(PartialMLP):
    """torchvision ShuffleNetV2's stride-1 unit, ``shuffle(cat(x1, branch2(x2)))``: ``branch2`` (1x1,
    depthwise 3x3, 1x1) runs on the first n of the x2 half and its first h hidden units; the other x2
    channels pass through unchanged, as x1 does (ShuffleNet's own split, applied once more), then the
    same channel shuffle. At ratio 1 it is the unit itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        n = self.dim_part
        out = torch.cat((x1, self.layers(x2[:, :n]), x2[:, n:]), dim=1)
        b, c, h, w = out.shape
        return out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle, 2 groups

    @classmethod
    def from_unit(cls, unit: nn.Module, ratio: float, hidden_ratio: float | None) -> PartialShuffleUnit:
        if unit.stride != 1:
            raise OperatorError("strided ShuffleNet unit: both branches read every channel, none passes through")
        _require_all_consumed(unit, [unit.branch1, unit.branch2])
        inner = PartialMLP.from_module(unit.branch2, ratio, hidden_ratio)  # a Sequential of two 1x1 convs
        return cls(list(inner.layers), inner.dim, inner.dim_part, False, 1)


class PartialCNBlock(PartialMLP):
    """torchvision ConvNeXt's ``CNBlock``, whose MLP is not a module of its own: the 7x7 depthwise conv
    and the LayerNorm run on every channel as in the original (the norm needs them all), the MLP on the
    first n channels and h hidden units; the layer scale and stochastic depth of those channels are
    kept, and the other channels' branch is 0 (the residual carries them), as ``partial_mlp`` does for
    timm ConvNeXt's ``Mlp``."""

    def __init__(self, prefix: list[nn.Module], layers: list[nn.Module], dim: int, n: int, scale, drop_path):
        super().__init__(layers, dim, n, True, -1, drop_path)
        self.prefix = nn.Sequential(*prefix)
        self.layer_scale = nn.Parameter(scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.dim_part
        t = self.prefix(x)  # (B, H, W, C) after the depthwise conv, the permute and the norm
        y = self.layers(t[..., :n]).permute(0, 3, 1, 2) * self.layer_scale
        if "drop_path" in self._modules:
            y = self.drop_path(y)
        if exporting():  # out of place for exporters (see ops/_export.py)
            return torch.cat((x[:, :n] + y, x[:, n:]), dim=1)
        out = x.clone()
        out[:, :n] += y
        return out

    @classmethod
    def from_cnblock(cls, block: nn.Module, ratio: float, hidden_ratio: float | None) -> PartialCNBlock:
        seq = list(block.block)
        kinds = [type(m).__name__ for m in seq]
        if kinds[:4] != ["Conv2d", "Permute", "LayerNorm", "Linear"] or kinds[5:] != ["Linear", "Permute"]:
            raise OperatorError(f"partial_mlp: CNBlock layers {kinds} are not torchvision ConvNeXt's")
        if not isinstance(seq[4], _PASSTHROUGH) or getattr(block, "layer_scale", None) is None:
            raise OperatorError("partial_mlp: CNBlock with an unknown activation or no layer scale")
        _require_all_consumed(block, [block.block])
        dim, hidden = seq[3].in_features, seq[3].out_features
        n = split_channels(dim, ratio)
        h = split_channels(hidden, hidden_ratio if hidden_ratio is not None else ratio)
        layers = [_slice_layer(seq[3], n, h, "CNBlock"), clone_module(seq[4]), _slice_layer(seq[5], h, n, "CNBlock")]
        prefix = [clone_module(m) for m in seq[:3]]
        return cls(prefix, layers, dim, n, block.layer_scale[:n], _drop_path_of(block)).to(seq[3].weight.device)


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)
# attention classes whose whole forward PartialAttention reproduces (tests/test_contract.py checks each)
_ATTENTION_CLASSES = ("timm.layers.attention.Attention", "timm.models.metaformer.Attention")


def _chosen_heads(kept_heads, num_heads: int, heads) -> list[int] | None:
    """``kept_heads`` checked: distinct head indices, in increasing order (their order on the channels)."""
    if kept_heads is None:
        return None
    if (
        not isinstance(kept_heads, (list, tuple))
        or not kept_heads
        or any(not isinstance(h, int) or isinstance(h, bool) or not 0 <= h < num_heads for h in kept_heads)
        or len(set(kept_heads)) != len(kept_heads)
    ):
        raise OperatorError(
            f"partial_attention kept_heads must be distinct head indices 0..{num_heads - 1}, got {kept_heads!r}"
        )
    if heads not in (None, len(kept_heads)):
        raise OperatorError(f"partial_attention: heads={heads!r} and kept_heads={list(kept_heads)} disagree")
    return sorted(kept_heads)


def _head_rows(chosen, heads: int, hd: int, lo: int) -> torch.Tensor:
    """Rows (or columns) over the attention width of the kept heads: the last ones, or ``chosen``."""
    if chosen is None:
        return torch.arange(lo, heads * hd)
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in chosen])


def _kept_heads(num_heads: int, ratio: float, heads: int | str | None) -> int:
    """Heads that keep attention: ``heads`` if given ("all" = every head), else round((1 - ratio) * H),
    at least one and, for a real saving, at most H - 1."""
    if heads == "all":
        return num_heads
    if heads is not None:
        if not isinstance(heads, int) or not 1 <= heads <= num_heads:
            raise OperatorError(f"partial_attention heads must be 1..{num_heads} or 'all', got {heads!r}")
        return heads
    keep = num_heads - split_channels(num_heads, ratio)
    return max(1, min(num_heads - 1, keep)) if num_heads > 1 else 1


@register_operator("partial_attention")
class PartialAttention(PartialOperator):
    """Self-attention on the last (1 - r)*C channels, a cheap mixer on the first r*C."""

    PARAM_CHOICES = {"mixer": ("identity", "dwconv")}  # values a recipe may give, checked when it is validated
    faithful_params = {"heads": "all"}  # every head keeps attention: the layer itself

    def __init__(
        self,
        dim: int,
        num_heads_attn: int,
        head_dim: int,
        qkv_bias: bool,
        proj_bias: bool,
        mixer: str = "identity",
        grid: tuple[int, int] | None = None,
        prefix_tokens: int = 0,
        scale: float | None = None,
        mha_api: bool = False,
        batch_first: bool = True,
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads_attn
        self.head_dim = head_dim
        self.dim_attn = num_heads_attn * head_dim
        self.dim_cheap = dim - self.dim_attn
        self.scale = scale
        # no random init: every construction inherits these weights (``_inherit``) right after
        self.qkv = torch.nn.utils.skip_init(nn.Linear, self.dim_attn, 3 * self.dim_attn, bias=qkv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        self.gate: nn.Linear | None = None
        self.proj = torch.nn.utils.skip_init(nn.Linear, self.dim_attn, self.dim_attn, bias=proj_bias)
        self.mixer_type = mixer
        self.grid = tuple(grid) if grid is not None else None
        self.prefix_tokens = prefix_tokens
        self.mha_api = mha_api
        self.batch_first = batch_first
        self.kept_heads: list[int] | None = None  # the original heads kept, when not the last ones
        if mixer == "dwconv":
            self.mixer = nn.Conv2d(self.dim_cheap, self.dim_cheap, 3, 1, 1, groups=self.dim_cheap)
            nn.init.dirac_(self.mixer.weight, groups=self.dim_cheap)
            nn.init.zeros_(self.mixer.bias)
        elif mixer == "identity":
            self.mixer = nn.Identity()
        else:
            raise OperatorError(f"partial_attention mixer must be 'identity' or 'dwconv', got {mixer!r}")

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, attn_channels={self.dim_attn} ({self.num_heads} heads), "
            f"cheap_channels={self.dim_cheap}, mixer={self.mixer_type!r}"
        )

    @property
    def ratio(self) -> float:
        return self.dim_cheap / self.dim

    def _attend(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, self.dim_attn)
        if self.gate is not None:
            out = out * self.gate(t).sigmoid()
        return self.proj(out)

    def _cheap(self, t: torch.Tensor) -> torch.Tensor:
        if self.mixer_type == "identity":
            return t
        b, n, c = t.shape
        h, w = self.grid
        pre, grid_tokens = t[:, : self.prefix_tokens], t[:, self.prefix_tokens :]
        fmap = grid_tokens.transpose(1, 2).reshape(b, c, h, w)
        return torch.cat((pre, self.mixer(fmap).flatten(2).transpose(1, 2)), dim=1)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.mha_api:
            # nn.MultiheadAttention call: (query, key, value, ...) -> (out, None); self-attention only
            call = dict(zip(_MHA_ARGS, (x, *args))) | kwargs
            if call.get("key", x) is not x or call.get("value", x) is not x:
                raise OperatorError("partial_attention replaces self-attention only (query is key is value)")
            if any(call.get(k) is not None for k in ("attn_mask", "key_padding_mask")) or call.get("is_causal"):
                raise OperatorError(
                    "partial_attention does not support attention masks (attn_mask, "
                    "key_padding_mask, is_causal); leave this attention unconverted"
                )
            t = x if self.batch_first else x.transpose(0, 1)
            out = self._tokens(t)
            return (out if self.batch_first else out.transpose(0, 1)), None
        if args or kwargs.pop("attn_mask", None) is not None or kwargs.pop("is_causal", False) or kwargs:
            raise OperatorError(
                f"partial_attention takes the token tensor only (no masks, causality or extra arguments), got "
                f"{len(args)} more positional and {sorted(kwargs) or 'a mask'}"
            )
        if x.dim() == 4:  # feature map (B, C, H, W)
            b, c, h, w = x.shape
            x1, x2 = torch.split(x, [self.dim_cheap, self.dim_attn], dim=1)
            a = self._attend(x2.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, self.dim_attn, h, w)
            cheap = self.mixer(x1) if self.mixer_type == "dwconv" else x1
            return torch.cat((cheap, a), dim=1)
        return self._tokens(x)

    def _tokens(self, t: torch.Tensor) -> torch.Tensor:
        t1, t2 = torch.split(t, [self.dim_cheap, self.dim_attn], dim=-1)
        return torch.cat((self._cheap(t1), self._attend(t2)), dim=-1)

    @classmethod
    def from_module(
        cls,
        original: nn.Module,
        ratio: float = 0.25,
        mixer: str = "identity",
        grid: tuple[int, int] | None = None,
        prefix_tokens: int | None = None,
        heads: int | str | None = None,
        kept_heads: list[int] | None = None,
    ) -> PartialAttention:
        """Build from a self-attention whose whole function this operator carries, keeping whole heads.

        Accepted: timm's ``Attention`` (ViT, DeiT...; q/k norms and the output gate are carried),
        timm MetaFormer's ``Attention`` and ``nn.MultiheadAttention`` (self-attention, no masks), and
        the window, relative-position and RoPE classes listed in ``sliced_attention.LAYOUTS`` (Swin,
        BEiT, EVA, MaxViT...), which run their own forward cut to the kept heads. Any other attention
        class is refused: it may add what this operator does not compute (talking heads, pooled or
        reduced keys). The last ``heads``
        heads keep attention with their q/k/v/proj blocks (default ``round((1 - ratio) * heads)``;
        ``"all"`` keeps every head, the faithful setting). ``kept_heads`` (timm ``Attention`` and
        MetaFormer ``Attention``): which heads, by index, in place of the last ones (calibration
        chooses them by what each adds to the output, ``data_params``).
        """
        if kept_heads is not None and _qualname(original) not in _ATTENTION_CLASSES:
            raise OperatorError(
                "partial_attention kept_heads is supported for timm Attention and MetaFormer Attention only"
            )
        if isinstance(original, nn.MultiheadAttention):
            return cls._from_mha(original, ratio, mixer, grid, prefix_tokens or 0, heads)
        kind = _qualname(original)
        from .sliced_attention import LAYOUTS, HeadSlicedAttention  # imports this module

        if kind in LAYOUTS:  # window / relative-position attention: the layer's own code, cut to its kept heads
            return HeadSlicedAttention.from_original(original, ratio, mixer, heads)
        if kind not in _ATTENTION_CLASSES:
            raise OperatorError(
                f"partial_attention does not convert {kind}: it carries the whole function of timm "
                "Attention, timm MetaFormer Attention, nn.MultiheadAttention and the window / relative-position "
                f"classes of ops/sliced_attention.py ({len(LAYOUTS)}) only, and this class may compute more "
                "(position bias, RoPE, windows, masks, extra biases) than a sliced copy would keep"
            )
        if not isinstance(getattr(original, "norm", nn.Identity()), nn.Identity):
            raise OperatorError(
                f"partial_attention: {kind} normalises the concatenated heads (scale_norm), so its output "
                "depends on every head and cannot be computed on part of them"
            )
        num_heads, hd = original.num_heads, original.head_dim
        dim = original.qkv.in_features
        if kind == "timm.layers.attention.Attention" and num_heads * hd != dim and kept_heads is None:
            from .sliced_attention import WIDE_TIMM_ATTENTION

            if mixer != "identity":
                raise OperatorError(
                    f"partial_attention on an attention {num_heads * hd} wide in a {dim}-wide model supports "
                    "mixer 'identity' only"
                )
            # each head reads and writes its own dim / heads channels: a copy cut to the kept heads
            return HeadSlicedAttention.from_original(original, ratio, mixer, heads, layout=WIDE_TIMM_ATTENTION)
        if num_heads * hd != dim or original.proj.out_features != dim:
            raise OperatorError(
                f"partial_attention needs attention width == model width (heads x head_dim = {num_heads * hd}, "
                f"input {dim}, output {original.proj.out_features})"
            )
        if grid is None and mixer == "dwconv":
            raise OperatorError("partial_attention mixer 'dwconv' on tokens needs grid: [H, W]")
        chosen = _chosen_heads(kept_heads, num_heads, heads)
        op = cls(
            dim,
            len(chosen) if chosen is not None else _kept_heads(num_heads, ratio, heads),
            hd,
            original.qkv.bias is not None,
            original.proj.bias is not None,
            mixer,
            grid,
            prefix_tokens if prefix_tokens is not None else 0,
            scale=getattr(original, "scale", None),
        )
        op._inherit(
            original.qkv.weight, original.qkv.bias, original.proj.weight, original.proj.bias, num_heads, hd, chosen
        )
        op._inherit_norms_and_gate(original, num_heads, hd, chosen)
        op.kept_heads = chosen
        return op.to(original.qkv.weight.device)

    @classmethod
    def data_params(cls, original: nn.Module, calls: list, params) -> dict:
        """timm / MetaFormer ``Attention``: keep the heads that add most to the output on the calibration
        images (as many as the recipe's ratio or ``heads`` keep), unless the recipe names them."""
        if _qualname(original) not in _ATTENTION_CLASSES or params.get("kept_heads") is not None or not calls:
            return {}
        heads = params.get("heads")
        if heads == "all":
            return {}
        from .single_head import head_output_scores

        ratio = params.get("ratio")
        n = _kept_heads(original.num_heads, 0.25 if ratio is None else ratio, heads)
        scores = head_output_scores(original, calls)
        return {"kept_heads": sorted(int(i) for i in scores.argsort(descending=True)[:n])}

    @classmethod
    def _from_mha(cls, mha: nn.MultiheadAttention, ratio, mixer, grid, prefix_tokens, heads) -> PartialAttention:
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise OperatorError("partial_attention needs nn.MultiheadAttention with equal q/k/v widths")
        if mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise OperatorError("partial_attention: bias_kv, add_zero_attn and dropout are not supported")
        num_heads, dim = mha.num_heads, mha.embed_dim
        hd = dim // num_heads
        op = cls(
            dim,
            _kept_heads(num_heads, ratio, heads),
            hd,
            mha.in_proj_bias is not None,
            mha.out_proj.bias is not None,
            mixer,
            grid,
            prefix_tokens,
            mha_api=True,
            batch_first=mha.batch_first,
        )
        op._inherit(mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias, num_heads, hd)
        return op.to(mha.in_proj_weight.device)

    def _inherit_norms_and_gate(self, original: nn.Module, num_heads: int, hd: int, chosen=None) -> None:
        """q/k norms act per head (over head_dim): copied whole. The output gate (timm ``gated``) is a
        linear map of the input: its rows for the kept heads, its columns for the attention channels."""
        for attr in ("q_norm", "k_norm"):
            norm = getattr(original, attr, None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                setattr(self, attr, clone_module(norm))
        gate = getattr(original, "gate", None)
        if gate is not None:
            lo = num_heads * hd - self.dim_attn
            rows = _head_rows(chosen, num_heads, hd, lo).to(gate.weight.device)
            self.gate = nn.Linear(self.dim_attn, self.dim_attn, bias=gate.bias is not None)
            with torch.no_grad():
                self.gate.weight.copy_(gate.weight[rows, lo:])
                if gate.bias is not None:
                    self.gate.bias.copy_(gate.bias[rows])

    def _inherit(self, w_qkv, b_qkv, w_proj, b_proj, heads: int, hd: int, chosen=None) -> None:
        dim = heads * hd
        lo = dim - self.dim_attn  # the attention channels are the last ones; the kept heads the last, or `chosen`
        head = _head_rows(chosen, heads, hd, lo).to(w_qkv.device)
        rows = torch.cat([j * dim + head for j in range(3)])
        with torch.no_grad():
            # the row gathers are new tensors: they become the weights (a copy of each was a third
            # of a wide ViT's conversion); the proj bias is a view of the original's: copied
            self.qkv.weight = nn.Parameter(w_qkv[rows, lo:])
            if b_qkv is not None:
                self.qkv.bias = nn.Parameter(b_qkv[rows])
            self.proj.weight = nn.Parameter(w_proj[lo:][:, head])
            if b_proj is not None:
                self.proj.bias.copy_(b_proj[lo:])

    def deploy(self) -> PartialAttention:
        """Inference form: eval mode, frozen."""
        return clone_module(self).eval().requires_grad_(False)
