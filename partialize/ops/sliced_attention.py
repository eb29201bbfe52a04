"""Partial attention for attention classes that compute more than q/k/v/proj: window attention with a
relative position bias (timm and torchvision Swin, Swin V2's cosine attention and continuous bias MLP,
window masks and shifts), BEiT's separate q/v biases and position tables, RoPE (EVA, RoPE ViTs),
position-bias modules (relative-position ViTs, MaxViT) and the others listed in ``LAYOUTS``.

Instead of re-implementing each class, the operator keeps a copy of the layer itself, cut down to its
kept heads: the q/k/v rows and the proj block of those heads, and every tensor with a head axis (bias
tables, logit scales, the bias MLP's output rows) sliced along it. The copy runs the class's own forward
on the attention channels, so windows, shifts, masks and biases are the original code's, not ours; the
other channels take the cheap path (identity), as in :class:`PartialAttention`.

Each class is listed with its layout: which tensors have a head axis, which are over the attention width,
and which are shared by all heads. A parameter the layout does not name refuses the layer (a new timm
release that adds a per-head tensor cannot be sliced silently wrong).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OperatorError
from ._utils import clone_module, conv1x1_from, linear_from, placeholders, select_bn, slice_bn
from .base import PartialOperator
from .partial_blocks import PartialAttention, _kept_heads, _qualname


@dataclass(frozen=True)
class HeadLayout:
    """Where a class keeps its per-head state (attribute paths relative to the layer)."""

    per_head: tuple[tuple[str, int], ...] = ()  # parameters / buffers with a head axis: (path, axis)
    per_channel: tuple[str, ...] = ()  # 1-D tensors over the attention width (q_bias, k_bias, v_bias)
    input_bns: tuple[str, ...] = ()  # BatchNorms over the input channels (on the keys' input): cut with them
    head_rows: tuple[str, ...] = ()  # nn.Linear layers whose outputs are the heads (a bias MLP's last layer)
    shared: tuple[str, ...] = ()  # parameter prefixes every head uses unchanged (the bias MLP's hidden layer)
    head_kwargs: tuple[tuple[str, int], ...] = ()  # call arguments with a head axis (name, axis), cut where present
    kwargs: tuple[str, ...] = ()  # call arguments passed through unchanged (a window mask, same for all heads)
    positional: int = 0  # positional arguments after the input passed through unchanged (Twins' grid size)
    # input projections: (attribute, blocks), a Linear whose outputs are `blocks` stacked head-major
    # blocks of the attention width (q|k|v: 3; -1: as many as the rows hold, GCViT's k|v beside its q|k|v);
    # blocks 0: the rows are grouped per head, of any widths
    # (LeViT's [q_h; k_h; v_h] with key and value widths that differ); absent ones (None) are skipped,
    # one must be there
    projections: tuple[tuple[str, int], ...] = (("qkv", 3),)
    head_attrs: tuple[str, ...] = ()  # int attributes besides `heads` that count heads: set to the kept heads
    # int attributes that grow with the heads (the attention width, a key width): scaled to the kept heads
    width_attrs: tuple[str, ...] = ("dim",)
    caches: tuple[str, ...] = ()  # dict attributes caching tensors of the uncut layer: emptied in the copy
    broadcast_kwargs: tuple[str, ...] = ()  # call arguments allowed only when they broadcast over the heads
    # position-bias modules (timm's RelPosBias / RelPosMlp / RelPosBiasTf) whose get_bias() is
    # (1, heads, N, N): kept whole and their bias narrowed to the kept heads (KeptHeadsBias)
    bias_modules: tuple[str, ...] = ()
    head_first_attr: str | None = None  # when this attribute is true, qkv rows are [q_h; k_h; v_h] per head
    # Linear(heads, heads) layers that mix the heads (CaiT's talking heads): cut to kept x kept
    head_mixers: tuple[str, ...] = ()
    # (attribute, reason): the layer is refused when the attribute is set (a spatial-reduction conv
    # that mixes every channel before the keys): what the layout cannot cut, named with why
    refuse: tuple[tuple[str, str], ...] = ()
    channel_axis: int = -1  # where the channels are: -1 for tokens / (B, H, W, C), 1 for (B, C, H, W) maps
    conv_attr: str | None = None  # when this attribute is true, the layer works on (B, C, H, W) maps (axis 1)
    # a norm over every input channel applied first inside the layer (TinyViT): run on the whole input,
    # the copy then starts from the normalised attention channels
    input_norm: str | None = None
    # call arguments (positions after the input, or keyword names) over the attention width on their last
    # axis (GCViT's global query): narrowed to the kept heads' channels
    channel_args: tuple[int | str, ...] = ()
    proj: str = "proj"  # path of the output projection (a Linear, or a 1x1 conv, over the attention width)
    heads: str = "num_heads"  # the attribute holding the head count


_SR_REASON = (
    "its keys and values come from a strided conv and a LayerNorm over every channel (spatial reduction), "
    "which a copy cut to the attention channels would not compute"
)
_SWIN_V2_BIAS = {"head_rows": ("cpb_mlp.2",), "shared": ("cpb_mlp.0",)}
LAYOUTS: dict[str, HeadLayout] = {
    "timm.models.swin_transformer.WindowAttention": HeadLayout(
        per_head=(("relative_position_bias_table", 1),), kwargs=("mask",)
    ),
    "timm.models.swin_transformer_v2.WindowAttention": HeadLayout(
        per_head=(("logit_scale", 0),), per_channel=("q_bias", "k_bias", "v_bias"), kwargs=("mask",), **_SWIN_V2_BIAS
    ),
    "torchvision.models.swin_transformer.ShiftedWindowAttention": HeadLayout(
        per_head=(("relative_position_bias_table", 1),)
    ),
    "torchvision.models.swin_transformer.ShiftedWindowAttentionV2": HeadLayout(
        per_head=(("logit_scale", 0),), **_SWIN_V2_BIAS
    ),
    "timm.models.swin_transformer_v2_cr.WindowMultiHeadAttention": HeadLayout(
        per_head=(("logit_scale", 0),), head_rows=("meta_mlp.fc2",), shared=("meta_mlp.fc1",), kwargs=("mask",)
    ),
    # timm relative-position ViT and MaxViT: a position-bias module, narrowed to the kept heads
    "timm.models.vision_transformer_relpos.RelPosAttention": HeadLayout(
        shared=("q_norm", "k_norm"), bias_modules=("rel_pos",), head_kwargs=(("shared_rel_pos", -3),)
    ),
    "timm.models.maxxvit.AttentionCl": HeadLayout(
        bias_modules=("rel_pos",), head_kwargs=(("shared_rel_pos", -3),), head_first_attr="head_first"
    ),
    "torchvision.models.maxvit.RelativePositionalMultiHeadAttention": HeadLayout(
        projections=(("to_qkv", 3),),
        per_head=(("relative_position_bias_table", 1),),
        proj="merge",
        heads="n_heads",
    ),
    # rotary position embedding: the same rotation for every head, passed in by the block
    "timm.models.eva.EvaAttention": HeadLayout(
        projections=(("qkv", 3), ("q_proj", 1), ("k_proj", 1), ("v_proj", 1)),
        per_channel=("q_bias", "k_bias", "v_bias"),
        shared=("q_norm", "k_norm"),
        kwargs=("is_causal",),
        head_kwargs=(("rope", -3),),
        broadcast_kwargs=("attn_mask",),
    ),
    "timm.layers.attention.AttentionRope": HeadLayout(
        projections=(("qkv", 3), ("q_proj", 1), ("k_proj", 1), ("v_proj", 1), ("gate", 1)),
        shared=("q_norm", "k_norm"),
        head_attrs=("num_kv_heads",),
        width_attrs=("attn_dim", "kv_dim"),
        kwargs=("is_causal",),
        head_kwargs=(("rope", -3),),
        broadcast_kwargs=("attn_mask",),
    ),
    # ConViT: GPSA mixes a positional and a content attention per head, with a gate per head
    "timm.models.convit.GPSA": HeadLayout(
        projections=(("qk", 2), ("v", 1)), per_head=(("gating_param", 0),), head_rows=("pos_proj",)
    ),
    "timm.models.convit.MHSA": HeadLayout(),
    "timm.models.tnt.Attention": HeadLayout(projections=(("qk", 2), ("v", 1))),
    # per-head attention with nothing more than q/k/v/proj: the class's own reshapes, windows and token layout
    "timm.models.davit.WindowAttention": HeadLayout(),
    "timm.models.davit.ChannelAttention": HeadLayout(),  # attention over each head's channels
    "timm.models.volo.Attention": HeadLayout(),
    "timm.models.twins.LocallyGroupedAttn": HeadLayout(positional=1),
    # cross-covariance attention: a learned temperature per head
    "timm.models.xcit.XCA": HeadLayout(per_head=(("temperature", 0),)),
    "timm.models.edgenext.CrossCovarianceAttn": HeadLayout(per_head=(("temperature", 0),)),
    # SAM's decomposed relative position: tables over head_dim, the same for every head
    "timm.models.vision_transformer_sam.Attention": HeadLayout(shared=("rel_pos_h", "rel_pos_w")),
    # CaiT: the heads' logits are mixed before and after the softmax (talking heads)
    "timm.models.cait.TalkingHeadAttn": HeadLayout(head_mixers=("proj_l", "proj_w")),
    # q and k/v from separate Linears; keys and values from a strided conv + LayerNorm over every channel
    # in the early stages (refused), from the tokens themselves where sr_ratio is 1
    "timm.models.pvt_v2.Attention": HeadLayout(
        projections=(("q", 1), ("kv", 2)), positional=1, refuse=(("sr", _SR_REASON),)
    ),
    "timm.models.twins.GlobalSubSampleAttn": HeadLayout(
        projections=(("q", 1), ("kv", 2)), positional=1, refuse=(("sr", _SR_REASON),)
    ),
    # NextViT: keys and values average-pooled per channel, then a BatchNorm (per channel: cut with them)
    "timm.models.nextvit.EfficientAttention": HeadLayout(
        projections=(("q", 1), ("k", 1), ("v", 1)),
        input_bns=("norm",),
        width_attrs=("dim", "out_dim"),
    ),
    # TinyViT: a LayerNorm over every channel first, then LeViT-style q/k/v and a per-head bias table
    "timm.models.tiny_vit.Attention": HeadLayout(
        input_norm="norm",
        projections=(("qkv", 0),),
        per_head=(("attention_biases", 0),),
        width_attrs=("out_dim",),
        caches=("attention_bias_cache",),
    ),
    # GCViT: local layers q|k|v; global layers k|v, their query (one per image) given by the block
    "timm.models.gcvit.WindowAttentionGlobal": HeadLayout(
        projections=(("qkv", -1),), bias_modules=("rel_pos",), positional=1, channel_args=(0,)
    ),
    # Hiera (mask-unit windows; q pooling only where the width changes, which is refused) and SAM2's HieraDet
    "timm.models.hiera.MaskUnitAttention": HeadLayout(heads="heads", width_attrs=("dim", "dim_out")),
    "timm.models.hieradet_sam2.MultiScaleAttention": HeadLayout(width_attrs=("dim", "dim_out")),
    # LeViT-style attention: q/k/v rows grouped per head with key width != value width, a bias table per head
    "timm.models.efficientformer.Attention": HeadLayout(
        projections=(("qkv", 0),),
        per_head=(("attention_biases", 0),),
        width_attrs=("key_attn_dim", "val_attn_dim"),
        caches=("attention_bias_cache",),
    ),
    "timm.models.levit.Attention": HeadLayout(  # q/k/v and proj are Linear (or 1x1 conv) + BatchNorm
        projections=(("qkv", 0),),
        per_head=(("attention_biases", 0),),
        width_attrs=("key_attn_dim", "val_attn_dim"),
        caches=("attention_bias_cache",),
        proj="proj.ln",
        conv_attr="use_conv",
    ),
    # Visformer: 1x1 convs on (B, C, H, W) maps; an attention width of half the channels in its factories
    "timm.models.visformer.Attention": HeadLayout(channel_axis=1, width_attrs=()),
    "timm.models.beit.Attention": HeadLayout(
        per_head=(("relative_position_bias_table", 1),),
        per_channel=("q_bias", "k_bias", "v_bias"),
        head_kwargs=(("shared_rel_pos_bias", -3),),
    ),
}


# timm's plain Attention whose attention width (heads x head_dim) differs from the model width
# (CSATv2: 256 on 168): not in LAYOUTS (PartialAttention rebuilds the usual ones, with kept_heads and
# the dwconv mixer), cut as a copy like the classes above when the widths differ
WIDE_TIMM_ATTENTION = HeadLayout(
    projections=(("qkv", 3), ("gate", 1)),
    shared=("q_norm", "k_norm"),
    width_attrs=("attn_dim",),
    kwargs=("is_causal",),
    broadcast_kwargs=("attn_mask",),
)


def _get(module: nn.Module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _set(module: nn.Module, path: str, value: torch.Tensor) -> None:
    *parents, leaf = path.split(".")
    owner = module
    for part in parents:
        owner = getattr(owner, part)
    if isinstance(getattr(owner, leaf), nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value.clone(), requires_grad=getattr(owner, leaf).requires_grad))
    else:  # a buffer (timm's k_bias) stays a buffer, persistent or not as it was
        owner._buffers[leaf] = value.clone()


def _check_layout(original: nn.Module, layout: HeadLayout, kind: str) -> None:
    known = [a + "." for a, _ in layout.projections] + [layout.proj + "."] + [p for p, _ in layout.per_head]
    known += list(layout.per_channel) + [b + "." for b in layout.input_bns]
    known += [r + "." for r in layout.head_rows] + list(layout.shared) + list(layout.bias_modules)
    known += [m + "." for m in layout.head_mixers] + ([layout.input_norm + "."] if layout.input_norm else [])
    for attr, reason in layout.refuse:
        if _present(getattr(original, attr, None)):
            raise OperatorError(f"partial_attention: {kind} is not converted: {reason}")
    for name, _ in original.named_parameters():
        if not any(name == k or name.startswith(k + "." if not k.endswith(".") else k) for k in known):
            raise OperatorError(
                f"partial_attention: {kind} has parameter {name!r}, which its head layout does not place "
                "(per head, per channel or shared), so a copy cut to fewer heads could be wrong; left unconverted"
            )


class HeadSlicedAttention(PartialAttention):
    """The layer's own class, cut to its last ``num_heads`` heads, on the last channels; identity on the first.

    ``attn`` is the cut copy. Channels are on the layout's ``channel_axis``: the last for tokens (B, N, C),
    windows (B*nW, N, C) and (B, H, W, C) maps, 1 for Visformer's (B, C, H, W). Each head reads and writes
    dim / heads channels; its inner width (heads x head_dim, the proj's input) may differ from that.
    """

    def __init__(self, attn: nn.Module, layout: HeadLayout, dim: int, num_heads: int, kept: int, head_dim: int):
        PartialOperator.__init__(self)
        self.attn = attn
        self.layout = layout
        self.channel_axis = 1 if layout.conv_attr and getattr(attn, layout.conv_attr, False) else layout.channel_axis
        self.dim = dim
        self.num_heads = kept
        self.num_heads_original = num_heads
        self.head_dim = head_dim
        self.inner_lo = 0  # where the kept heads start in the attention width (set by from_original)
        self.input_norm = None
        self.dim_attn = kept * head_dim
        self.dim_cheap = dim - self.dim_attn
        self.mixer_type = "identity"
        self.mixer = nn.Identity()
        self.kind = _qualname(attn)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, attn_channels={self.dim_attn} ({self.num_heads} of {self.num_heads_original} heads "
            f"of {self.kind.rsplit('.', 1)[-1]}), cheap_channels={self.dim_cheap}, mixer='identity'"
        )

    def forward(self, x: torch.Tensor, *args, **kwargs):
        layout = self.layout
        unknown = set(kwargs) - set(layout.kwargs) - {n for n, _ in layout.head_kwargs} - set(layout.broadcast_kwargs)
        if len(args) > layout.positional or unknown:
            raise OperatorError(
                f"partial_attention ({self.kind}): unexpected call arguments "
                f"({len(args)} positional after the input, keywords {sorted(unknown)})"
            )
        for name in layout.broadcast_kwargs:
            t = kwargs.get(name)
            if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-3] != 1:
                raise OperatorError(
                    f"partial_attention ({self.kind}): {name} of shape {tuple(t.shape)} may differ per head; "
                    "only masks that broadcast over the heads are supported"
                )
        drop = self.num_heads_original - self.num_heads
        for name, axis in self.layout.head_kwargs:
            t = kwargs.get(name)
            # the kept (last) heads, where the argument has a head axis (mixed RoPE: per-head frequencies;
            # the plain rotation, shared by every head, has none and passes unchanged)
            if isinstance(t, torch.Tensor) and drop and t.dim() >= -axis and t.shape[axis] == self.num_heads_original:
                kwargs[name] = t.narrow(axis, drop, self.num_heads)
        if self.inner_lo and layout.channel_args:  # the kept heads' channels of a query given from outside
            args = list(args)
            for key in layout.channel_args:
                box = args if isinstance(key, int) else kwargs
                given = key < len(box) if isinstance(key, int) else key in box
                if given and isinstance(box[key], torch.Tensor):
                    box[key] = box[key][..., self.inner_lo :]
        axis = self.channel_axis
        if not self.dim_cheap:
            return self.attn(x if self.input_norm is None else self.input_norm(x), *args, **kwargs)
        x1, x2 = torch.split(x, [self.dim_cheap, self.dim_attn], dim=axis)
        if self.input_norm is not None:  # the layer's own first norm, over every channel
            x2 = self.input_norm(x).narrow(axis, self.dim_cheap, self.dim_attn)
        return torch.cat((x1, self.attn(x2, *args, **kwargs)), dim=axis)

    @classmethod
    def from_original(
        cls, original: nn.Module, ratio: float, mixer: str, heads, layout: HeadLayout | None = None
    ) -> HeadSlicedAttention:
        kind = _qualname(original)
        layout = layout or LAYOUTS[kind]
        if mixer != "identity":
            raise OperatorError(f"partial_attention on {kind} supports mixer 'identity' only (windows have no grid)")
        _check_layout(original, layout, kind)
        projs = [
            (a, b, getattr(original, a)) for a, b in layout.projections if _is_projection(getattr(original, a, None))
        ]
        proj, num_heads = _get(original, layout.proj), getattr(original, layout.heads)
        if not _is_projection(proj):
            raise OperatorError(f"partial_attention: {kind}.{layout.proj} is {type(proj).__name__}, not a Linear")
        # model width D (the channels read and written) and attention width A (heads x head width); the
        # kept heads read and write the last D / H channels each
        dim, width = _width(proj)[::-1]
        widths = {a: _width(p) for a, _, p in projs}
        if (
            not projs
            or any(not _rows_fit(p, b, dim, width, num_heads) for _, b, p in projs)
            or width % num_heads
            or dim % num_heads
        ):
            raise OperatorError(
                f"partial_attention needs every head to read and write its own share of the channels in {kind} "
                f"(projections {widths}, proj {width} -> {dim}, {num_heads} heads)"
            )
        if getattr(original, "num_kv_heads", num_heads) != num_heads:
            raise OperatorError(f"partial_attention: {kind} shares keys and values between heads (grouped-query)")
        hd, step = width // num_heads, dim // num_heads
        kept = _kept_heads(num_heads, ratio, heads)
        drop = num_heads - kept
        lo, inner_lo = drop * step, drop * hd  # the kept heads are the last ones, on the last channels
        inner = clone_module(original, placeholders(original, _replaced(original, layout, projs, proj)))
        head_first = bool(layout.head_first_attr and getattr(original, layout.head_first_attr, False))
        with torch.no_grad():
            for attr, blocks, layer in projs:
                if not blocks:  # rows grouped per head, of any widths: the kept heads' groups
                    per = _width(layer)[1] // num_heads
                    rows = torch.arange(drop * per, num_heads * per)
                elif head_first:  # each head's q, k and v rows together: the kept heads' blocks
                    rows = torch.arange(drop * blocks * hd, blocks * width)
                else:  # q | k | v, each head-major
                    blocks = blocks if blocks > 0 else _width(layer)[1] // width
                    rows = torch.cat([torch.arange(j * width + inner_lo, (j + 1) * width) for j in range(blocks)])
                setattr(inner, attr, _cut_linear(layer, rows, lo))
            _set_module(inner, layout.proj, _cut_linear(proj, torch.arange(lo, dim), inner_lo))
            for path in layout.head_mixers:  # kept heads mix with kept heads only
                layer = _get(original, path)
                if layer is not None:
                    if not isinstance(layer, nn.Linear) or layer.in_features != num_heads:
                        raise OperatorError(f"partial_attention: {kind}.{path} is not a Linear over the heads")
                    _set_module(inner, path, _cut_linear(layer, torch.arange(drop, num_heads), drop))
            for path, axis in layout.per_head:
                t = _get(original, path)
                if t is not None:
                    _set(inner, path, t.narrow(axis, drop, kept))
            for path in layout.per_channel:
                t = _get(original, path)
                if t is not None:
                    _set(inner, path, t[inner_lo:])
            for path in layout.input_bns:
                bn = _get(original, path)
                if bn is not None:
                    _set_module(inner, path, slice_bn(bn, lo, dim))
            for path in layout.head_rows:
                layer = _get(original, path)
                _set_module(inner, path, _cut_linear(layer, torch.arange(drop, layer.out_features)))
        for path in layout.bias_modules:
            bias = getattr(original, path, None)
            if bias is not None:
                if _qualname(bias) not in BIAS_CLASSES:
                    raise OperatorError(
                        f"partial_attention: {kind}'s position bias {_qualname(bias)} is not one whose bias "
                        f"partialize knows to cut by heads ({', '.join(c.rsplit('.', 1)[-1] for c in BIAS_CLASSES)})"
                    )
                setattr(inner, path, KeptHeadsBias(clone_module(bias), drop, kept))
        for attr in dict.fromkeys((layout.heads, *layout.head_attrs)):
            if isinstance(getattr(inner, attr, None), int):
                setattr(inner, attr, kept)
        for attr in layout.width_attrs:
            value = getattr(inner, attr, None)
            if isinstance(value, int):
                if value % num_heads:
                    raise OperatorError(f"partial_attention: {kind}.{attr} = {value} is not a multiple of the heads")
                setattr(inner, attr, value // num_heads * kept)
        for attr in layout.caches:  # computed from the uncut tensors: rebuilt by the copy on its first call
            if isinstance(getattr(inner, attr, None), dict):
                setattr(inner, attr, {})
        norm = None
        if layout.input_norm and _present(_get(original, layout.input_norm)):
            norm = clone_module(_get(original, layout.input_norm))
            _set_module(inner, layout.input_norm, nn.Identity())
        op = cls(inner, layout, dim, num_heads, kept, step)
        op.inner_lo, op.input_norm = inner_lo, norm
        return op


def _replaced(original: nn.Module, layout: HeadLayout, projs, proj) -> list:
    """The layers ``from_original`` replaces by their cuts: left out of its copy of the attention
    (most of an attention's weights were copied, then thrown away)."""
    out = [layer for _, _, layer in projs] + [proj, *(getattr(original, p, None) for p in layout.bias_modules)]
    out += [_get(original, p) for p in (*layout.head_mixers, *layout.input_bns, *layout.head_rows)]
    if layout.input_norm and _present(_get(original, layout.input_norm)):
        out.append(_get(original, layout.input_norm))
    return out


# position-bias modules whose forward is attn + get_bias() and get_bias() is (1, heads, N, N)
BIAS_CLASSES = (
    "timm.layers.pos_embed_rel.RelPosBias",
    "timm.layers.pos_embed_rel.RelPosMlp",
    "timm.layers.pos_embed_rel.RelPosBiasTf",
)


class KeptHeadsBias(nn.Module):
    """A position-bias module kept whole (its table or MLP computes every head's bias, as trained),
    its bias narrowed to the kept (last) heads."""

    def __init__(self, bias: nn.Module, drop: int, kept: int):
        super().__init__()
        self.bias = bias
        self.drop, self.kept = drop, kept

    def get_bias(self) -> torch.Tensor:
        return self.bias.get_bias().narrow(-3, self.drop, self.kept)

    def forward(self, attn: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        return attn + self.get_bias()  # what each listed class's forward computes


# a Linear / 1x1 conv (``linear``) followed by a BatchNorm over its outputs (``bn``): LeViT's
NORMED_PROJECTIONS = ("timm.models.levit.LinearNorm", "timm.models.levit.ConvNorm")


def _present(value) -> bool:
    return value is not None and value is not False


def _is_projection(layer) -> bool:
    """A Linear, a 1x1 dense conv (Visformer's q/k/v on maps), or one of those with a BatchNorm after it."""
    if isinstance(layer, nn.Linear):
        return True
    if _qualname(layer) in NORMED_PROJECTIONS:
        bn = getattr(layer, "bn", None)
        return _is_projection(getattr(layer, "linear", None)) and isinstance(bn, nn.modules.batchnorm._BatchNorm)
    return (
        isinstance(layer, nn.Conv2d)
        and tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.stride) == (1, 1)
        and tuple(layer.padding) == (0, 0)
        and layer.groups == 1
    )


def _rows_fit(layer: nn.Module, blocks: int, dim: int, width: int, heads: int) -> bool:
    """The projection reads the model width and its rows are ``blocks`` blocks of the attention width
    (-1: any whole number of them; 0: any rows, grouped per head)."""
    n_in, n_out = _width(layer)
    if n_in != dim:
        return False
    if blocks > 0:
        return n_out == blocks * width
    return n_out % (width if blocks < 0 else heads) == 0 and n_out > 0


def _width(layer: nn.Module) -> tuple[int, int]:
    """(in, out) channels of a projection."""
    if _qualname(layer) in NORMED_PROJECTIONS:
        return _width(layer.linear)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _set_module(module: nn.Module, path: str, value: nn.Module) -> None:
    *parents, leaf = path.split(".")
    setattr(_get(module, ".".join(parents)) if parents else module, leaf, value)


def _cut_linear(layer: nn.Module, rows: torch.Tensor, col_lo: int = 0) -> nn.Module:
    """A copy of ``layer`` (a Linear or a 1x1 conv) keeping output ``rows`` and the input columns from ``col_lo``."""
    if _qualname(layer) in NORMED_PROJECTIONS:  # the projection's rows and its BatchNorm's channels
        out = copy.copy(layer)
        out._modules = dict(layer._modules)
        out.linear = _cut_linear(layer.linear, rows, col_lo)
        out.bn = select_bn(layer.bn, rows.to(layer.linear.weight.device), len(rows))
        return out
    rows = rows.to(layer.weight.device)
    bias = layer.bias[rows] if layer.bias is not None else None
    make = linear_from if isinstance(layer, nn.Linear) else conv1x1_from
    return make(layer.weight[rows, col_lo:], bias)
