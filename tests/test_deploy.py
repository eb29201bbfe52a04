"""deploy(): operators replaced by their inference forms, BN folded only where exact."""

from __future__ import annotations

import copy

import torch
import torchvision
from _helpers import randomize_bn, rel_err
from torch import nn

from partialize.inference import deploy, find_conv_bn_pairs
from partialize.ops import MergedSpatialAttention, PartialSpatialAttention, PATConv, PATConvDeploy, PConv


class BNAct(nn.BatchNorm2d):
    """A BN subclass that also applies an activation (like timm's BatchNormAct2d): never folded."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, the Sequential fallback applies inside."""

    def __init__(self, c: int):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.BatchNorm2d(c))  # BN after ReLU

    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return self.seq(x) + self.side(x)
        return self.seq(x) - self.side(x)


class Hand(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv_a = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(c)  # foldable: conv_a feeds only bn_a
        self.conv_b = nn.Conv2d(c, c, 1)
        self.bn_b = nn.BatchNorm2d(c)  # not foldable: conv_b's output is also used by the residual
        self.conv_shared = nn.Conv2d(c, c, 1)  # called twice: never folded
        self.bn_s1, self.bn_s2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv_c = nn.Conv2d(c, c, 3, padding=1)
        self.bn_c = BNAct(c)  # subclass with an activation: not folded
        self.bn_add = nn.BatchNorm2d(c)  # after an add, not a conv
        self.patconv = PATConv(c, 0.25, "ch")
        self.mlp = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.GELU())
        self.sp = PartialSpatialAttention(nn.Conv2d(2 * c, c, 1), ratio=0.5)
        self.pconv = PConv(c, 0.25)
        self.untraceable = Untraceable(c)

    def forward(self, x):
        x = self.bn_a(self.conv_a(x))
        y = self.conv_b(x)
        x = self.bn_b(y) + y
        x = self.bn_s1(self.conv_shared(x)) + self.bn_s2(self.conv_shared(x))
        x = self.bn_add(self.bn_c(self.conv_c(x)) + x)
        x = self.sp(self.mlp(self.patconv(x)))
        return self.untraceable(self.pconv(x))


def test_pairs_found_are_exactly_the_safe_ones():
    m = Hand().eval()
    pairs = set(find_conv_bn_pairs(m))
    assert pairs == {("conv_a", "bn_a"), ("mlp.0", "mlp.1"), ("untraceable.seq.0", "untraceable.seq.1")}


def test_hand_model_deploy_equals_eval_and_input_untouched():
    torch.manual_seed(0)
    m = Hand()
    randomize_bn(m, seed=3)
    with torch.no_grad():
        m.sp.gate.weight.normal_(0, 0.5)
    m.train()
    state = copy.deepcopy(m.state_dict())
    d = deploy(m)
    # input untouched: same mode, same modules, same tensors
    assert m.training and isinstance(m.bn_a, nn.BatchNorm2d) and isinstance(m.patconv, PATConv)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert not d.training and not any(p.requires_grad for p in d.parameters())
    assert isinstance(d.patconv, PATConvDeploy) and isinstance(d.sp, MergedSpatialAttention)
    assert d.pconv.forward_mode == "slicing"
    assert isinstance(d.bn_a, nn.Identity) and isinstance(d.mlp[1], nn.Identity)
    assert isinstance(d.untraceable.seq[1], nn.Identity)
    for name in ("bn_b", "bn_s1", "bn_s2", "bn_add"):
        assert type(getattr(d, name)) is nn.BatchNorm2d, name
    assert type(d.bn_c) is BNAct and type(d.untraceable.side[2]) is nn.BatchNorm2d
    m.eval()
    for sign in (1.0, -1.0):  # both branches of the untraceable module
        x = torch.randn(2, 3, 16, 16).abs() * sign
        with torch.no_grad():
            assert rel_err(d(x), m(x)) < 1e-4


def test_resnet18_deploy_equals_eval():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    randomize_bn(m, seed=3)
    m.eval()
    pairs = find_conv_bn_pairs(m)
    assert len(pairs) == 20  # bn1 + 2 per basic block x 8 + 3 downsample
    assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs and ("conv1", "bn1") in pairs
    d = deploy(m)
    assert not any(isinstance(q, nn.modules.batchnorm._BatchNorm) for q in d.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-4
    assert isinstance(m.bn1, nn.BatchNorm2d)  # input untouched


def test_bn_without_running_stats_is_not_folded():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert find_conv_bn_pairs(m) == []
    m2 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4)).eval()  # dimensionality mismatch
    assert find_conv_bn_pairs(m2) == []
