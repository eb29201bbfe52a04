"""Helpers shared by the tests (imported as ``from _helpers import ...``; pytest puts tests/ on the path)."""

from __future__ import annotations

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
