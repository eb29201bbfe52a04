"""Helpers shared by the tests (imported as ``from _helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

import math

import torch
from torch import nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (relative error used throughout the tests)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def randomize_bn(model: nn.Module, seed: int = 1) -> torch.Generator:
    """Give every BatchNorm non-trivial running statistics and affine (a fresh BN is near identity
    and would hide folding bugs); returns the generator for further draws."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return g


def nondegenerate_(model: nn.Module, seed: int = 1, scale: float = 0.05) -> nn.Module:
    """In place: random BN statistics, and every floating parameter moved by N(0, scale^2) noise (on
    top of its init, so zero-initialised branches, layer scales of 1e-5, zero heads and zero position
    bias tables all become non-trivial). Equivalence checks on a fresh timm model pass trivially
    where a branch is zero; after this they cannot."""
    g = randomize_bn(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
            if name.endswith(("gamma", "layer_scale", "ls1.gamma", "ls2.gamma")) or "gamma" in name.split(".")[-1]:
                p.abs_().add_(0.1)  # layer scales well away from zero
    return model


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """An independent MAC count for models made of convs and linears only: forward hooks on every
    nn.Conv2d / nn.Linear, C_out * C_in / groups * k_h * k_w * H_out * W_out (resp. in * out per
    token), every call summed. Different code from partialize.macs (no dispatch, no aten formulas)."""
    total = [0]

    def hook(m, args, out):
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total[0] += out.numel() * (m.in_channels // m.groups) * kh * kw
        else:
            total[0] += out.numel() // m.out_features * m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def function_macs(module: nn.Module, args, kwargs) -> int:
    """Contractions seen as Python-level torch functions (a TorchFunctionMode: F.conv2d, F.linear,
    matmul / @, bmm, two-operand einsum, scaled_dot_product_attention), each by its textbook formula:
    a count that shares no code with partialize.macs, which counts aten ops below the dispatcher."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    total = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            kw = kw or {}
            out = func(*a, **kw)
            if func is F.conv2d:
                w = a[1] if len(a) > 1 else kw["weight"]
                total[0] += out.numel() * w.shape[1] * w.shape[2] * w.shape[3]  # C_in / groups * kh * kw
            elif func is F.linear:
                total[0] += out.numel() * a[0].shape[-1]
            elif func in (torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm):
                total[0] += out.numel() * a[0].shape[-1]
            elif func is torch.einsum and len(a) == 3 and isinstance(a[0], str) and "..." not in a[0]:
                # a two-operand contraction costs the product of every index's size, once
                sizes = {}
                for letters, t in zip(a[0].replace(" ", "").split("->")[0].split(","), a[1:]):
                    sizes.update(zip(letters, t.shape))
                total[0] += math.prod(sizes.values())
            elif func is F.scaled_dot_product_attention:
                q, k, v = a[:3]
                total[0] += q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            return out

    with torch.no_grad(), Count():
        module.eval()  # not chained: some timm layers (EfficientFormer, LeViT) return None from train()
        module(*args, **kwargs)
    return total[0]


def tiny_tv_swin(v2: bool = False) -> nn.Module:
    """torchvision's SwinTransformer (V1, or V2 with its blocks and patch merging) at a test size: two
    stages at 32 x 32 input (an 8 x 8 grid of 4 x 4 windows, shifted in every other block; the second
    stage's 4 x 4 grid is one window, where torchvision drops the shift)."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10, **kw
    )


def tiny_tv_maxvit() -> nn.Module:
    """torchvision's MaxVit at 64 x 64: two one-block stages, 4 x 4 windows and grids, 16-wide heads."""
    from torchvision.models import MaxVit

    return MaxVit(
        input_size=(64, 64),
        stem_channels=16,
        partition_size=4,
        block_channels=[32, 64],
        block_layers=[1, 1],
        head_dim=16,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


def tiny_timm(name: str) -> nn.Module:
    """Small instances of timm's window and relative-position attention models (two blocks or stages)."""
    import timm

    small = {
        "swin": (
            "swin_tiny_patch4_window7_224",
            {"depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32, "img_size": 56},
        ),
        "swinv2": (
            "swinv2_tiny_window8_256",
            {"depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32, "img_size": 64, "window_size": 8},
        ),
        "beit": (
            "beit_base_patch16_224",
            {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4},
        ),
        "beit_shared": (
            "beit_base_patch16_224",
            {
                "img_size": 32,
                "patch_size": 8,
                "depth": 2,
                "embed_dim": 64,
                "num_heads": 4,
                "use_rel_pos_bias": False,
                "use_shared_rel_pos_bias": True,
            },
        ),
        "davit": ("davit_tiny", {"depths": (1, 1), "num_heads": (2, 4), "embed_dims": (32, 64)}),
        "xcit": ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4}),
        "edgenext": ("edgenext_xx_small", {}),
        "sam": (
            "samvit_base_patch16",
            {
                "img_size": 64,
                "depth": 2,
                "embed_dim": 64,
                "num_heads": 4,
                "global_attn_indexes": (1,),
                "window_size": 2,
            },
        ),
        "twins": (
            "twins_svt_small",
            {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)},
        ),
        "eva": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),  # RoPE, q/v biases
        "eva_unfused": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2, "qkv_fused": False}),
        "vit_rope": ("vit_base_patch16_rope_224", {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4}),
        "vit_rope_mixed": (  # per-head RoPE frequencies
            "vit_base_patch16_rope_mixed_224",
            {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4},
        ),
        "tnt": ("tnt_s_patch16_224", {"img_size": 32, "depth": 2}),
        "convit": ("convit_tiny", {"img_size": 32, "depth": 3, "local_up_to_layer": 2}),  # GPSA, then MHSA
        "vit_relpos": ("vit_relpos_small_patch16_224", {"img_size": 32, "depth": 2}),  # bias MLP per layer
        "vit_srelpos": ("vit_srelpos_small_patch16_224", {"img_size": 32, "depth": 2}),  # one shared bias
        "maxvit_rw": ("maxvit_nano_rw_256", {"img_size": 64}),  # RelPosBias, q/k/v rows per head
        "maxvit_tf": ("maxvit_tiny_tf_224", {"img_size": 64, "depths": (1, 1, 1, 1)}),  # RelPosBiasTf
        "cait": (  # talking heads
            "cait_xxs24_224",
            {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4, "depth_token_only": 1},
        ),
        "pvt_v2": ("pvt_v2_b0", {"depths": (1, 1, 1, 1)}),  # spatial reduction (refused) but in the last stage
        "twins_gsa": (  # global sub-sampled attention in every block, no reduction in the last stage
            "twins_pcpvt_small",
            {"depths": (1, 1, 1, 1), "embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)},
        ),
        "nextvit": ("nextvit_small", {"depths": (1, 1, 5, 1)}),  # per-channel pooled keys + BatchNorm
        "hiera": ("hiera_tiny_224", {"img_size": 64, "embed_dim": 32, "num_heads": 2, "stages": (1, 2, 1, 1)}),
        "hieradet": (
            "hieradet_small",
            {"embed_dim": 32, "num_heads": 2, "stages": (1, 2, 1, 1), "global_att_blocks": (2,)},
        ),
        "visformer": (  # 1x1 convs on maps; stage 1 (on here) has an attention width of half its channels
            "visformer_tiny",
            {"img_size": 64, "attn_stage": "111", "depth": (1, 1, 1)},
        ),
        # LeViT-style: q/k/v rows per head with key width != value width, a per-head bias table with a cache
        "efficientformer": ("efficientformer_l1", {"depths": (1, 1, 1, 2)}),  # 224 px: the table is 7 x 7
        "tiny_vit": ("tiny_vit_5m_224", {"depths": (1, 1, 1, 1)}),  # a LayerNorm over every channel first
        "levit": ("levit_128", {"img_size": 64, "depth": (1, 1, 1)}),  # Linear + BatchNorm projections
        "levit_conv": ("levit_conv_128", {"img_size": 64, "depth": (1, 1, 1)}),  # 1x1 conv + BatchNorm, on maps
        "swinv2_cr": (
            "swinv2_cr_tiny_224",
            {"img_size": 64, "depths": (2, 2), "num_heads": (2, 4), "embed_dim": 32, "window_size": 4},
        ),
    }
    if name == "gcvit":  # local and global (query from the block) window attention; the factories fix depths
        from timm.models.gcvit import GlobalContextVit

        return GlobalContextVit(img_size=64, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16), embed_dim=32, num_classes=10)
    if name == "volo":  # its factories fix the widths: the class itself, one block per stage
        from timm.models.volo import VOLO

        return VOLO(
            layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64), num_heads=(1, 4, 4, 4), num_classes=10
        )
    spec, kw = small[name]
    return timm.create_model(spec, num_classes=10, **kw)


def auto_deploys_and_exports(model: nn.Module, size: int = 64, mlp_at_least: int = 8, macs_below: float = 0.8):
    """Convert ``model`` with ``auto``; check that partial_mlp took at least ``mlp_at_least`` blocks, the
    MACs fell below ``macs_below`` of the original's, deploy == eval and the deployed model's ONNX
    export (onnxruntime) == the deployed model, within 1e-4."""
    import io
    import warnings

    import onnxruntime as ort

    import partialize

    net = partialize.apply(model, "auto", input_size=size)
    plan = net._partialize_plan
    assert sum(e.variant == "partial_mlp" for e in plan.converted) >= mlp_at_least
    assert plan.macs_after < macs_below * plan.macs_before
    dep = partialize.deploy(net)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        want = dep(x)
        assert rel_err(want, net.eval()(x)) <= 1e-4
        f = io.BytesIO()
        torch.onnx.export(dep, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    assert rel_err(torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]), want) <= 1e-4


def record_copies(monkeypatch, *importers: str) -> list[int]:
    """The ids of the modules ``ops._utils.clone_module`` copies from now on (its own recursion, and the
    modules named in ``importers`` that imported it by name); a module a memo maps (a placeholder, or
    one shared on purpose) is not a copy."""
    import importlib

    import partialize.ops._utils as utils

    copied, real = [], utils.clone_module

    def spy(obj, memo=None):
        if memo is None or id(obj) not in memo:
            copied.append(id(obj))
        return real(obj, memo)

    for name in ("partialize.ops._utils", *importers):
        monkeypatch.setattr(importlib.import_module(name), "clone_module", spy)
    return copied
