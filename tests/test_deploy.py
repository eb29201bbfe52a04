"""deploy(): operators replaced by their inference forms, BN folded only where exact."""

from __future__ import annotations

import copy

import pytest
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
    # untraceable.seq sits below a forward fx cannot trace: kept only once running the model shows
    # that forward calls seq as a whole; without an input it is dropped, with a warning naming it
    with pytest.warns(UserWarning, match=r"BN not folded at untraceable\.seq\.0 -> untraceable\.seq\.1"):
        assert set(find_conv_bn_pairs(m)) == {("conv_a", "bn_a"), ("mlp.0", "mlp.1")}
    pairs = set(find_conv_bn_pairs(m, torch.randn(2, 3, 16, 16)))
    assert pairs == {("conv_a", "bn_a"), ("mlp.0", "mlp.1"), ("untraceable.seq.0", "untraceable.seq.1")}


class ConvBN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))


class CallsInsides(nn.Module):
    """An untraceable forward (a shape-dependent branch) that calls ``a`` as a whole but ``b``'s conv and
    BN one by one, with a ReLU between them and the conv's output used again: ``b`` must not be folded."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.a, self.b = ConvBN(c), ConvBN(c)

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        y = self.a(x)
        t = self.b.conv(y)
        return self.b.bn(torch.relu(t)) + t


class ReorderedSequential(nn.Sequential):
    """A Sequential whose own forward puts a ReLU between its conv and its BN (and cannot be traced)."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return self[1](torch.relu(self[0](x)))


def _check_deploy(m: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    randomize_bn(m, seed=5)
    m.eval()
    d = deploy(m, **kw)
    with torch.no_grad():
        assert rel_err(d(x), m(x)) < 1e-5
    return d


def test_bn_called_apart_below_an_untraceable_forward_is_never_folded():
    """Regression: the conv and BN of ``b`` were folded (the pair found inside ConvBN's own forward),
    a 41% output error; deploy now checks by running the model (or keeps every such BN)."""
    x = torch.randn(2, 8, 15, 15)
    with pytest.warns(UserWarning, match="no example input"):
        d = _check_deploy(CallsInsides(), x)
    assert type(d.a.bn) is nn.BatchNorm2d and type(d.b.bn) is nn.BatchNorm2d
    with pytest.warns(UserWarning, match=r"b\.conv -> b\.bn: .*called from elsewhere"):
        d = _check_deploy(CallsInsides(), x, example_input=x)
    assert isinstance(d.a.bn, nn.Identity) and type(d.b.bn) is nn.BatchNorm2d  # a is called whole: folded
    d = _check_deploy(ReorderedSequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)), x)  # not a plain Sequential
    assert type(d[1]) is nn.BatchNorm2d


def test_hand_model_deploy_equals_eval_and_input_untouched():
    torch.manual_seed(0)
    m = Hand()
    randomize_bn(m, seed=3)
    with torch.no_grad():
        m.sp.gate.weight.normal_(0, 0.5)
    m.train()
    state = copy.deepcopy(m.state_dict())
    d = deploy(m, example_input=torch.randn(2, 3, 16, 16))
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


def test_export_of_a_model_with_an_untraceable_forward_writes_its_function(tmp_path):
    """Regression: export_torchscript/export_onnx of a model not yet deployed checked the file against
    the deployed model only, so a wrong fold was written as verified. Now the deployed model is checked
    against the eval-mode model first, and the fold is not made."""
    from partialize.exporting import export_torchscript

    m = CallsInsides()
    randomize_bn(m, seed=5)
    m.eval()
    x = torch.randn(2, 8, 15, 15)
    with pytest.warns(UserWarning, match=r"b\.conv -> b\.bn"):
        res = export_torchscript(m, str(tmp_path / "m.ts.pt"), x)
    assert res.deploy_rel_err is not None and res.deploy_rel_err < 1e-5
    loaded = torch.jit.load(str(tmp_path / "m.ts.pt"))
    with torch.no_grad():
        assert rel_err(loaded(x), m(x)) < 1e-5


@pytest.mark.parametrize(
    "name, recipe",
    [
        ("resnet18", "examples/recipes/resnet18-partial-residual.yaml"),  # partial residual, projections
        ("resnet50", "resnet50-partial"),  # PATConv with PAT_ch, strided PConv, partial residual
        ("resnet18", "default"),  # PConv on every 3x3
    ],
)
def test_a_deployed_model_in_channels_last_computes_the_same_on_nchw_input(name, recipe):
    """What `search --channels-last` and `bench --channels-last` time: the deployed model with NHWC
    weights, given the NCHW input a user's loader gives (so every partial op sees NHWC tensors)."""
    import os

    import timm
    from _helpers import nondegenerate_

    import partialize

    torch.manual_seed(0)
    base = nondegenerate_(timm.create_model(name, num_classes=10).eval())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, recipe) if recipe.endswith(".yaml") else recipe
    x = torch.randn(2, 3, 64, 64)
    d = deploy(partialize.apply(base, path, input_size=64), x[:1])
    nhwc = copy.deepcopy(d).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, y = d(x), nhwc(x)
    assert rel_err(y, ref) < 1e-5
    assert rel_err(ref, base(x)) > 1e-3  # the conversion changed the function: this compares two real models
