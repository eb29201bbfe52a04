"""partial_kernel: the full k x k kernel on the first r*C_in input channels, the kernel's centre tap
(a 1x1 conv of the same stride) on the others, summed. Checked against a single conv whose weight
keeps only the centre of the other channels (a different computation), MACs against the arithmetic
count, its refusals, its BN fold, and the recipe predicate ``keeps_shape`` that routes shape-changing
convs to it in ``auto``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _helpers import nondegenerate_, rel_err
from torch import nn

import partialize
from partialize.errors import OperatorError
from partialize.ops import PartialKernel


def _centre_only(w: torch.Tensor, n: int) -> torch.Tensor:
    """The weight with every off-centre tap of input channels n.. zeroed (by index arithmetic)."""
    kh, kw = w.shape[-2:]
    mask = torch.zeros_like(w)
    mask[:, :n] = 1
    mask[:, n:, kh // 2, kw // 2] = 1
    return w * mask


CASES = [  # (in, out, kernel, stride, dilation, input size): DenseNet-like, transition, 5x5, dilated, 1x7
    (32, 8, 3, 1, 1, 12),
    (16, 32, 3, 2, 1, 13),
    (24, 24, 5, 2, 1, 11),
    (20, 12, 3, 1, 2, 10),
    (16, 24, (1, 7), 1, 1, 9),
]


@pytest.mark.parametrize("cin,cout,k,s,d,size", CASES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_equals_the_conv_with_centre_taps_only_on_the_other_channels(cin, cout, k, s, d, size, ratio):
    torch.manual_seed(0)
    ks = nn.modules.utils._pair(k)
    conv = nn.Conv2d(cin, cout, ks, s, tuple(d * (a - 1) // 2 for a in ks), d, bias=True)
    op = PartialKernel.from_module(conv, ratio=ratio)
    n = int(ratio * cin + 0.5)
    assert op.dim_conv == n and op.conv.in_channels == n and op.point.in_channels == cin - n
    x = torch.randn(2, cin, size, size + 1)
    with torch.no_grad():
        want = F.conv2d(x, _centre_only(conv.weight, n), conv.bias, s, conv.padding, d)
        got = op(x)
        assert got.shape == conv(x).shape
        assert rel_err(got, want) < 1e-5
        assert rel_err(got, conv(x)) > 0.05  # the other channels' spatial taps are really gone
        assert rel_err(op.deploy()(x), want) < 1e-5


def test_macs_equal_the_arithmetic_count():
    conv = nn.Conv2d(64, 32, 3, 1, 1, bias=False)
    op = PartialKernel.from_module(conv)  # 16 inputs keep the 3x3, 48 the centre tap
    x = torch.randn(1, 64, 14, 14)
    pixels = 14 * 14
    macs, basis = op.macs(x)
    assert macs == (9 * 16 * 32 + 48 * 32) * pixels == 1_204_224
    assert macs / (9 * 64 * 32 * pixels) == pytest.approx(1 / 3)  # (r k^2 + 1 - r) / k^2 at 1/4, 3x3
    assert partialize.macs.count_macs(op, x).total == macs
    assert sum(p.numel() for p in op.parameters()) == 9 * 16 * 32 + 48 * 32


@pytest.mark.parametrize("cin,cout,groups,stride", [(64, 128, 2, 1), (32, 32, 4, 2), (48, 24, 3, 1)])
def test_grouped_conv_keeps_the_kernel_on_the_first_inputs_of_every_group(cin, cout, groups, stride):
    """A grouped conv (ResNeSt's radix 2, ResNeXt's strided 3x3): the same split inside each group;
    oracle: the grouped conv with every off-centre tap of each group's inputs n.. zeroed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=True)
    op = PartialKernel.from_module(conv, ratio=0.25)
    per_group = cin // groups
    n = int(0.25 * per_group + 0.5)
    assert op.conv.groups == op.point.groups == groups and op.dim_conv == n * groups
    x = torch.randn(2, cin, 9, 10)
    with torch.no_grad():
        want = F.conv2d(x, _centre_only(conv.weight, n), conv.bias, stride, 1, 1, groups)
        assert rel_err(op(x), want) < 1e-5
        assert rel_err(op(x), conv(x)) > 0.05
        assert rel_err(op.deploy()(x), want) < 1e-5
        faithful = PartialKernel.faithful_original(conv)
        assert rel_err(faithful(x), want) < 1e-5  # the contract's oracle at the default 1/4
    out_pixels = op(x).shape[-1] * op(x).shape[-2]
    macs, _ = op.macs(x[:1])
    assert macs == out_pixels * cout * (9 * n + (per_group - n))  # each output reads its own group


@pytest.mark.parametrize(
    "conv,reason",
    [
        (nn.Conv2d(32, 32, 3, padding=1, groups=32), "groups=32"),
        (nn.Conv2d(32, 16, 1), "1x1 conv has no spatial kernel"),
        (nn.Conv2d(32, 16, 2, padding=1), "no centre tap"),
        (nn.Conv2d(32, 16, 3, padding=0), "no centre tap"),
        (nn.Conv2d(1, 16, 3, padding=1), "nothing to split"),
        (nn.Linear(8, 8), "plain nn.Conv2d"),
    ],
)
def test_refuses_what_it_cannot_represent_with_the_reason(conv, reason):
    with pytest.raises(OperatorError, match=reason):
        PartialKernel.from_module(conv)


def test_refuses_a_weight_transforming_subclass_and_a_ratio_that_keeps_everything():
    class StdConv(nn.Conv2d):  # weight standardisation in forward, as NFNet's convs
        def forward(self, x):
            w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / self.weight.std((1, 2, 3), keepdim=True)
            return F.conv2d(x, w, self.bias, self.stride, self.padding)

    with pytest.raises(OperatorError, match="weight in forward"):
        PartialKernel.from_module(StdConv(16, 8, 3, padding=1))
    with pytest.raises(OperatorError, match="the same layer"):
        PartialKernel.from_module(nn.Conv2d(16, 8, 3, padding=1), ratio=1.0)


def test_fold_bn_equals_bn_after_the_layer():
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 40, 3, 2, 1, bias=False)
    bn = nondegenerate_(nn.BatchNorm2d(40)).eval()
    op = PartialKernel.from_module(conv).eval()
    x = torch.randn(3, 24, 15, 15)
    with torch.no_grad():
        assert rel_err(op.fold_bn(bn)(x), bn(op(x))) < 1e-5
    assert op.fold_bn(nn.BatchNorm2d(24)) is None  # not this layer's output width


def _tiny_densenet() -> nn.Module:
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=4)


def test_keeps_shape_routes_shape_changing_convs():
    """``keeps_shape: false`` selects the DenseNet 3x3 convs (32 -> 8), ``true`` none of them; the
    ``auto`` recipe turns exactly those (and no 1x1, no RGB stem) into partial_kernel, and the MACs it
    saves equal the count by hand."""
    model = nondegenerate_(_tiny_densenet().eval())

    def recipe(keeps: bool) -> dict:
        rule = {"select": {"type": "Conv2d", "kernel": 3, "keeps_shape": keeps}, "variant": "partial_kernel"}
        return {"version": 1, "strict": False, "rules": [rule]}

    plans = {keeps: partialize.plan(model, recipe(keeps), input_size=32) for keeps in (True, False)}
    assert not plans[True].entries
    dense3 = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert sorted(e.layer for e in plans[False].converted) == sorted(dense3) and len(dense3) == 4
    plan = partialize.plan(model, "auto", input_size=32)
    converted = {e.layer: e.variant for e in plan.converted}
    assert converted == dict.fromkeys(dense3, "partial_kernel")  # the 7x7 stem reads 3 channels: left alone
    # each 3x3 reads 32 channels (bn_size 4 x growth 8) and writes 8: 8 keep the kernel, 24 the centre tap
    sizes = {"features.denseblock1": 8 * 8, "features.denseblock2": 4 * 4}  # 32 px: stem /2, pool /2, transition /2
    saved = sum((9 * 32 * 8 - (9 * 8 * 8 + 24 * 8)) * sizes[n.rsplit(".", 2)[0]] for n in dense3)
    assert plan.macs_before - plan.macs_after == saved
    net = partialize.apply(model, plan.recipe, input_size=32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(partialize.deploy(net)(x), net.eval()(x)) < 1e-4
