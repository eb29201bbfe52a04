"""Faithfulness: every operator, on every module class it accepts in real timm / torchvision models,
equals the original layer at its "keeps everything" setting (all heads, all channels) or on an
original that is exactly representable (the channels the operator hands to something cheap already
compute that cheap thing). Inputs are the layer's own call arguments in the model's forward (RoPE,
masks and other keyword arguments included), on a non-degenerate init (random BN statistics, every
parameter perturbed: zero position-bias tables, layer scales and heads would hide a dropped part).

An operator that accepts a class and does not reproduce it fails here; so does a registered operator
with no faithful setting below.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from _helpers import nondegenerate_, rel_err
from torch import nn

import partialize  # noqa: F401  (registers the operators)
from partialize.engine._calls import capture_calls
from partialize.ops import get_operator, list_operators
from partialize.ops.partial_residual import KNOWN_BLOCKS


def _dirac_outside(conv: nn.Conv2d, n: int) -> nn.Conv2d:
    """The conv with channels n.. computing the identity: what a partial conv of width n represents."""
    c = copy.deepcopy(conv)
    depthwise = c.groups > 1
    kh, kw = c.kernel_size
    with torch.no_grad():
        c.weight[n:] = 0
        if not depthwise:
            c.weight[:n, n:] = 0
        for i in range(n, c.out_channels):
            c.weight[i, 0 if depthwise else i, kh // 2, kw // 2] = 1.0
        if c.bias is not None:
            c.bias[n:] = 0
    return c


def _conv_width(variant: str, op: nn.Module) -> int:
    return {
        "pconv": lambda: op.dim_conv,
        "patconv": lambda: op.dim_conv,
        "dpconv": lambda: op.num_conv_channels,
        "ada_pconv": lambda: min(op.widths),
    }[variant]()


def _prepare_conv(variant: str, params: dict):
    def prepare(module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Conv2d:
            return None  # a partial source (timm Partial_conv3) is covered by test_ops
        op = get_operator(variant).from_module(module, **params)
        return _dirac_outside(module, _conv_width(variant, op))

    return prepare


def _prepare_residual(params: dict):
    def prepare(block: nn.Module) -> nn.Module:
        op = get_operator("partial_residual").from_module(block, **params)
        _, _, last, last_bn, _ = KNOWN_BLOCKS[f"{type(block).__module__}.{type(block).__qualname__}"]
        b = copy.deepcopy(block)
        conv, bn = getattr(b, last), getattr(b, last_bn)
        keep = torch.zeros(bn.num_features, dtype=torch.bool)
        keep[op.offset : op.offset + op.dim_part] = True
        with torch.no_grad():  # the branch outputs exactly 0 outside the written group
            bn.weight[~keep] = 0
            bn.bias[~keep] = 0
            conv.weight[~keep] = 0
        return b

    return prepare


# variant -> (from_module parameters, how to make the original exactly representable or None)
FAITHFUL = {
    "partial_attention": ({"heads": "all"}, None),
    "partial_mlp": ({"ratio": 1.0, "hidden_ratio": 1.0}, None),
    "pat_sp": ({"identity_init": True}, None),
    "pconv": ({"ratio": 0.25}, _prepare_conv("pconv", {"ratio": 0.25})),
    "patconv": ({"ratio": 0.25, "identity_init": True}, _prepare_conv("patconv", {"ratio": 0.25})),
    "dpconv": ({"ratio": 0.25}, _prepare_conv("dpconv", {"ratio": 0.25})),
    "ada_pconv": ({}, _prepare_conv("ada_pconv", {})),
    "partial_residual": ({"ratio": 0.5}, _prepare_residual({"ratio": 0.5})),
}


def _tiny_tv_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10
    )


# small instances of real models: every attention / MLP / conv family the operators accept, and
# families they must refuse (EVA-02 RoPE attention, relative-position attention, Swin windows)
MODELS = {
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8), 32),
    "vit_qknorm": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, qk_norm=True, depth=2),
        32,
    ),
    "eva02_tiny": (lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=2), 28),
    "vit_relpos": (lambda: timm.create_model("vit_relpos_small_patch16_224", img_size=32, depth=2), 32),
    "caformer_s18": (lambda: timm.create_model("caformer_s18"), 64),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), img_size=112), 112),
    "convnext_atto": (lambda: timm.create_model("convnext_atto"), 32),
    "mobilenetv2": (lambda: timm.create_model("mobilenetv2_050"), 32),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0"), 32),
    "resnet18": (lambda: timm.create_model("resnet18"), 32),
    "resnet50": (lambda: timm.create_model("resnet50"), 32),
    "tv_mobilenet_v3": (lambda: torchvision.models.mobilenet_v3_small(), 32),
    "tv_resnet18": (lambda: torchvision.models.resnet18(), 32),
    "tv_vit": (_tiny_tv_vit, 32),
}


def _qual(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_every_registered_operator_has_a_faithful_setting():
    assert set(list_operators()) <= set(FAITHFUL), "add the new operator's faithful setting to FAITHFUL"


@pytest.fixture(scope="module")
def accepted() -> dict:
    """(model, variant) -> {class: [(layer, max relative error over its calls)]}, computed once."""
    torch.manual_seed(0)
    out = {}
    for key, (build, size) in MODELS.items():
        model = nondegenerate_(build().eval())
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        modules = dict(model.named_modules())
        for variant, (params, prepare) in FAITHFUL.items():
            cls = get_operator(variant)
            found: dict[str, list] = {}
            pairs = {}
            for name, m in modules.items():
                if not name or len(found.get(_qual(m), [])) >= 3:  # three layers per class is plenty
                    continue
                try:
                    ref = prepare(m) if prepare else m
                    if ref is None:
                        continue
                    op = cls.from_module(ref, **params).eval()
                except Exception:  # refused (any reason): not accepted
                    continue
                found.setdefault(_qual(m), []).append(name)
                pairs[name] = (ref.eval(), op)
            calls = capture_calls(model, x, list(pairs))
            errs: dict[str, list] = {}
            for name, (ref, op) in pairs.items():
                worst = 0.0
                for args, kwargs in calls[name]:
                    with torch.no_grad():
                        want = _first(ref(*args, **kwargs))
                        got = _first(op(*args, **kwargs))
                    worst = max(worst, rel_err(got, want))
                errs.setdefault(_qual(modules[name]), []).append((name, worst))
            out[(key, variant)] = errs
    return out


@pytest.mark.parametrize("model_key", list(MODELS))
def test_accepted_layers_equal_the_original(accepted, model_key):
    bad = {
        (variant, cls, name): err
        for (key, variant), per_class in accepted.items()
        if key == model_key
        for cls, layers in per_class.items()
        for name, err in layers
        if not err <= 1e-5
    }
    assert not bad, f"converted layers that do not reproduce the original: {bad}"


def _classes(accepted, variant):
    return {cls for (_, v), per_class in accepted.items() if v == variant for cls in per_class}


def test_the_accepted_classes_are_the_ones_we_verified(accepted):
    """What each block operator converts across the sweep (a new class appearing here must be a
    deliberate, tested addition), and what it must refuse."""
    attn = _classes(accepted, "partial_attention")
    assert attn == {
        "timm.layers.attention.Attention",
        "timm.models.metaformer.Attention",
        "torch.nn.modules.activation.MultiheadAttention",
    }
    # EVA-02 attention (RoPE, separate q/v biases), relative-position and Swin window attention
    refused = {"timm.models.eva.EvaAttention", "timm.models.vision_transformer_relpos.RelPosAttention"}
    assert not refused & attn and not any("swin" in c.lower() for c in attn)
    mlp = _classes(accepted, "partial_mlp")
    assert {
        "timm.layers.mlp.Mlp",
        "timm.models._efficientnet_blocks.InvertedResidual",  # with squeeze-excitation in EfficientNet
        "torchvision.models.mobilenetv3.InvertedResidual",
        "torchvision.models.vision_transformer.MLPBlock",
    } <= mlp
    assert "timm.layers.mlp.SwiGLU" not in mlp  # gated: refused until split across gate and value
    assert {"timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck"} <= _classes(accepted, "partial_residual")
    assert "torch.nn.modules.conv.Conv2d" in _classes(accepted, "pconv")


def test_eva02_rope_and_relpos_bias_are_refused_with_the_reason():
    """The two silent losses of issue 11 §5: EVA-02's RoPE / q-v biases and ViT relpos's bias table."""
    for name, kw in (("eva02_tiny_patch14_224", {"img_size": 28}), ("vit_relpos_small_patch16_224", {"img_size": 32})):
        model = timm.create_model(name, depth=1, **kw)
        plan = partialize.plan(
            model,
            {"version": 1, "rules": [{"select": {"name": "blocks.0.attn"}, "variant": "partial_attention"}]},
        )
        (entry,) = plan.entries
        assert entry.status == "skip"
        assert "partial_attention does not convert" in entry.reason and type(model.blocks[0].attn).__name__ in (
            entry.reason
        )
