"""PartialNet (000, "PartialNet Architecture"; variant table 001 Table 6), registered with timm.

Layout: 4x4/4 embedding conv + BN, four stages of PartialNet blocks, a 2x2/2 merging conv + BN
before stages 2-4, head = global average pool -> 1x1 conv to 1280 -> act -> linear.

- Block v1 (stages 1-3): x + MLP(PAT_ch(x)); MLP = 1x1 (w -> 2w), BN, act, 1x1 (2w -> w), PAT_sp.
- Block v2 (stage 4): PAT_sf mixer; residuals around the mixer and around the MLP.

Choices where the papers are ambiguous (all documented in docs/partialnet.md):
- PAT_sp is the full PATConv-style op of 001 Table 6 ("PAT_sp_1_c_1_r"): a 1x1 conv on the first
  r*C channels of the MLP output and the one-channel spatial gate (000 eq. 5) on the rest, with
  r = 1/2 (the public code's split; the table's params are reproduced with 1/2, not with 1/4).
  Stage 4 keeps PAT_sp as well (needed to reproduce the table's params).
- PAT_sf has an output projection (``proj=True``); eq. 6 shows none, but the table's params need it.
- T0 and T1 use depths (1, 2, 6, 4), not the public code's (1, 2, 8, 2). The table's stage-1 cell is
  garbled in the OCR; (1, 2, 6, 4) for T1 is the reading that gives both its 7.8 M and 0.55 G.
"""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale2d, SelectAdaptivePool2d, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ..errors import RecipeError, WeightsUnavailableError
from ..ops import DPConv, MergedSpatialAttention, PartialSpatialAttention, PATConv

__all__ = ["PartialNet", "PartialNetBlock", "PartialSpatialConv", "VARIANTS", "partialnet_train_settings"]

# 001 Table 6: embed width c, blocks per stage, activation; drop-path rate from 001 Table 7.
VARIANTS: dict[str, dict[str, Any]] = {
    "t0": dict(embed_dim=32, depths=(1, 2, 6, 4), act="gelu", drop_path_rate=0.0),
    "t1": dict(embed_dim=48, depths=(1, 2, 6, 4), act="gelu", drop_path_rate=0.02),
    "t2": dict(embed_dim=64, depths=(2, 2, 6, 4), act="relu", drop_path_rate=0.05),
    "s": dict(embed_dim=96, depths=(2, 2, 9, 4), act="relu", drop_path_rate=0.1),
    "m": dict(embed_dim=128, depths=(2, 3, 16, 4), act="relu", drop_path_rate=0.2),
    "l": dict(embed_dim=160, depths=(2, 3, 20, 4), act="relu", drop_path_rate=0.3),
}

_ACTS = {"gelu": nn.GELU, "relu": partial(nn.ReLU, inplace=True)}


def _act_layer(act: str | type[nn.Module] | Any) -> Any:
    if isinstance(act, str):
        try:
            return _ACTS[act.lower()]
        except KeyError:
            raise ValueError(f"act_layer must be one of {sorted(_ACTS)} or a module class, got {act!r}") from None
    return act


class PartialSpatialConv(PartialSpatialAttention):
    """PAT_sp as in 001 Table 6: after the MLP's second 1x1 conv, a 1x1 conv on the first r*C
    channels and the spatial gate of 000 eq. 5 on the rest (PATConv layout, 000 eq. 1).

    A subclass of the registered ``PartialSpatialAttention``, so ``partialize.deploy`` treats it as
    an operator. ``deploy()`` first composes the kept-channel 1x1 conv with the MLP conv (both are
    linear), then merges the gate as the parent does: inference runs one 1x1 conv with C + 1 outputs.
    """

    def __init__(self, conv: nn.Conv2d, ratio: float = 0.5, identity_init: bool = False):
        super().__init__(conv, ratio=ratio, identity_init=identity_init)
        self.keep_conv = nn.Conv2d(self.dim_keep, self.dim_keep, 1, bias=False).to(conv.weight.device)
        if identity_init:
            with torch.no_grad():
                self.keep_conv.weight.copy_(torch.eye(self.dim_keep).reshape(self.dim_keep, self.dim_keep, 1, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.conv(h)
        y1, y2 = torch.split(y, [self.dim_keep, self.dim_attn], dim=1)
        s = self.gate_norm(F.hardsigmoid(self.gate(y2)))  # 000 eq. 5
        return torch.cat((self.keep_conv(y1), y2 * s), dim=1)  # 000 eq. 1 layout

    def deploy(self) -> MergedSpatialAttention:
        """One 1x1 conv: rows [:keep] become Wk W2[:keep] (bias Wk b2[:keep]); the gate merges as usual."""
        conv = self.conv
        w2 = conv.weight.detach().flatten(1)
        b2 = conv.bias.detach() if conv.bias is not None else torch.zeros_like(w2[:, 0])
        wk = self.keep_conv.weight.detach().flatten(1)
        k = self.dim_keep
        merged = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True).to(w2.device, w2.dtype)
        with torch.no_grad():
            merged.weight.copy_(torch.cat((wk @ w2[:k], w2[k:])).reshape_as(merged.weight))
            merged.bias.copy_(torch.cat((wk @ b2[:k], b2[k:])))
        plain = PartialSpatialAttention(merged, ratio=k / self.dim)
        if plain.dim_keep != k:  # split_channels rounding must give back the same split
            raise RuntimeError(f"PAT_sp merge changed the split ({plain.dim_keep} != {k})")
        plain.gate = copy.deepcopy(self.gate)
        plain.gate_norm = copy.deepcopy(self.gate_norm)
        return plain.eval().deploy()


class PartialNetBlock(nn.Module):
    """PartialNet block v1 (PAT_ch mixer) or v2 (PAT_sf mixer + shortcut around it), 000 Figure 3."""

    def __init__(
        self,
        dim: int,
        self_attn: bool = False,
        mlp_ratio: float = 2.0,
        ratio: float = 0.25,
        sp_ratio: float = 0.5,
        act_layer: Any = nn.GELU,
        norm_layer: Any = nn.BatchNorm2d,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 0.0,
        dpconv: bool = False,
        ch_gate: str = "sigmoid",
        num_heads: int = 4,
        attn_proj: bool = True,
    ) -> None:
        super().__init__()
        self.self_attn = self_attn
        if self_attn:  # PAT_sf, 000 eq. 6
            self.mixer = PATConv(dim, ratio, "sf", num_heads=num_heads, proj=attn_proj)
        elif dpconv:  # learned split ratio (000 eq. 7), PAT_ch on the rest
            self.mixer = DPConv(dim, attn="ch", init_ratio=ratio, gate=ch_gate)
        else:  # PAT_ch, 000 eq. 1-4
            self.mixer = PATConv(dim, ratio, "ch", gate=ch_gate)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                fc1=nn.Conv2d(dim, hidden, 1, bias=False),
                norm=norm_layer(hidden),
                act=act_layer(),
                fc2=PartialSpatialConv(nn.Conv2d(hidden, dim, 1, bias=False), sp_ratio),  # PAT_sp
            )
        )
        ls = layer_scale_init_value
        self.ls_mlp = LayerScale2d(dim, ls) if ls > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if self_attn:
            self.ls_mixer = LayerScale2d(dim, ls) if ls > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.self_attn:  # block v2: shortcut around the mixer as well
            x = x + self.drop_path(self.ls_mixer(self.mixer(x)))
            return x + self.drop_path(self.ls_mlp(self.mlp(x)))
        return x + self.drop_path(self.ls_mlp(self.mlp(self.mixer(x))))


class PartialNetStage(nn.Module):
    """Optional 2x2 stride-2 merging conv + BN, then the stage's blocks."""

    def __init__(self, in_dim: int, dim: int, blocks: list[nn.Module], norm_layer: Any, merge: bool) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if merge:
            self.downsample = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(in_dim, dim, 2, 2, bias=False), norm=norm_layer(dim))
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class PartialNet(nn.Module):
    """PartialNet classifier / backbone with the timm model interface (see module docstring)."""

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 64,
        depths: tuple[int, ...] = (2, 2, 6, 4),
        mlp_ratio: float = 2.0,
        ratio: float = 0.25,
        sp_ratio: float = 0.5,
        feature_dim: int = 1280,
        act: str | Any = "relu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 0.0,
        dpconv: bool = False,
        ch_gate: str = "sigmoid",
        num_heads: int = 4,
        attn_proj: bool = True,
        norm_layer: Any = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        act_layer = _act_layer(act)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_stages = len(depths)
        self.stem = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(in_chans, embed_dim, 4, 4, bias=False), norm=norm_layer(embed_dim))
        )
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # linear over all blocks
        stages, self.feature_info, k = [], [], 0
        for i, depth in enumerate(depths):
            dim = embed_dim * 2**i
            last = i == self.num_stages - 1
            blocks = [
                PartialNetBlock(
                    dim,
                    self_attn=last,
                    mlp_ratio=mlp_ratio,
                    ratio=ratio,
                    sp_ratio=sp_ratio,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    drop_path=dpr[k + j],
                    layer_scale_init_value=layer_scale_init_value,
                    dpconv=dpconv,
                    ch_gate=ch_gate,
                    num_heads=num_heads,
                    attn_proj=attn_proj,
                )
                for j in range(depth)
            ]
            k += depth
            stages.append(PartialNetStage(dim // 2, dim, blocks, norm_layer, merge=i > 0))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = embed_dim * 2 ** (self.num_stages - 1)
        self.head_hidden_size = feature_dim
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.conv_head = nn.Conv2d(self.num_features, feature_dim, 1, bias=False)
        self.act = act_layer()
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        self.classifier = nn.Linear(feature_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^conv_head", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier for ``num_classes`` (0 removes it); the 1x1 head conv is kept."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
        device = self.conv_head.weight.device
        self.classifier = nn.Linear(self.head_hidden_size, num_classes).to(device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.classifier)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.flatten(self.act(self.conv_head(self.global_pool(x))))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def partialnet_train_settings(variant: str) -> dict[str, Any]:
    """The paper's ImageNet-1k training settings (001 Table 7) for ``variant`` ("t2" or "partialnet_t2").

    Returns the shipped ``recipes/train/partialnet.yaml``: the common settings merged with the
    variant's, plus ``model`` (the timm name) and ``dpconv`` (000 Algorithm 1 constants).
    """
    import importlib.resources

    import yaml

    key = variant.lower().removeprefix("partialnet_").removeprefix("partialnet-")
    text = importlib.resources.files("partialize").joinpath("recipes/train/partialnet.yaml").read_text()
    data = yaml.safe_load(text)
    if key not in data["variants"]:
        known = ", ".join(f"partialnet_{v}" for v in data["variants"])
        raise RecipeError(f"no PartialNet training settings for {variant!r}; known variants: {known}")
    settings = {**data["common"], **data["variants"][key]}
    settings.update(model=f"partialnet_{key}", dpconv=dict(data.get("dpconv") or {}), source=data["source"])
    return settings


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # test crop ratio 0.9 (001 Table 7); bicubic like timm's FasterNet (the papers do not say)
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "classifier",
        "paper_name": "PartialNet: Compute Less, Perform Better",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"partialnet_{v}": _cfg() for v in VARIANTS})


def _weights_file(kwargs: dict[str, Any]) -> str | None:
    """The local weights file given through ``pretrained_cfg_overlay=dict(file=...)`` (or pretrained_cfg)."""
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        cfg = kwargs.get(key)
        if isinstance(cfg, dict) and cfg.get("file"):
            return str(cfg["file"])
        if cfg is not None and getattr(cfg, "file", None):
            return str(cfg.file)
    return None


def _create_partialnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PartialNet:
    if pretrained:
        path = _weights_file(kwargs)
        if path is None:
            raise WeightsUnavailableError(
                f"no pretrained weights are published for {variant}; build it with pretrained=False, or "
                f"load your own file: timm.create_model({variant!r}, pretrained=True, "
                "pretrained_cfg_overlay=dict(file='PATH.safetensors|.pth'))"
            )
        if not os.path.isfile(path):
            raise WeightsUnavailableError(f"weights file {path!r} for {variant} does not exist")
    model_args = dict(VARIANTS[variant.removeprefix("partialnet_")])
    model_args.update(kwargs)
    return build_model_with_cfg(
        PartialNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **model_args,
    )


@register_model
def partialnet_t0(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-T0 (c=32, depths 1-2-6-4, GELU)."""
    return _create_partialnet("partialnet_t0", pretrained, **kwargs)


@register_model
def partialnet_t1(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-T1 (c=48, depths 1-2-6-4, GELU; see docs/partialnet.md on the stage-1 depth)."""
    return _create_partialnet("partialnet_t1", pretrained, **kwargs)


@register_model
def partialnet_t2(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-T2 (c=64, depths 2-2-6-4, ReLU)."""
    return _create_partialnet("partialnet_t2", pretrained, **kwargs)


@register_model
def partialnet_s(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-S (c=96, depths 2-2-9-4, ReLU)."""
    return _create_partialnet("partialnet_s", pretrained, **kwargs)


@register_model
def partialnet_m(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-M (c=128, depths 2-3-16-4, ReLU)."""
    return _create_partialnet("partialnet_m", pretrained, **kwargs)


@register_model
def partialnet_l(pretrained: bool = False, **kwargs: Any) -> PartialNet:
    """PartialNet-L (c=160, depths 2-3-20-4, ReLU)."""
    return _create_partialnet("partialnet_l", pretrained, **kwargs)
