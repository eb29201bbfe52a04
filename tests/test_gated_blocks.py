"""partial_mlp on residual blocks whose expansion is gated: StarNet's ``Block`` (the star operation,
``act(f1(y)) * f2(y)``) and MambaOut's ``GatedConvBlock`` (``act(g) * cat(i, conv(c))``).

Oracles: at the keep-everything setting the converted block is the original; at ratio 1/2 it equals the
original's own forward with the dropped input channels and hidden units zeroed, on the kept channels,
while the other channels keep x (the residual carries them). MACs against counts written here."""

from __future__ import annotations

import io
import warnings

import pytest
import timm
import torch
from _helpers import nondegenerate_, rel_err
from timm.models.mambaout import GatedConvBlock
from timm.models.starnet import Block as StarBlock
from torch import nn

import partialize
from partialize.errors import OperatorError
from partialize.ops import PartialMLP


def _make(build, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nondegenerate_(build(), seed=seed + 1, scale=0.2).eval()


def _star() -> nn.Module:
    return StarBlock(16, mlp_ratio=3)  # C = 16, H = 48


def _mamba(norm: type = nn.LayerNorm) -> nn.Module:
    # C = 12, hidden 32 = 20 plain units (i) + 12 conv units (c); channels-last input
    return GatedConvBlock(12, expansion_ratio=8 / 3, kernel_size=3, ls_init_value=0.5, norm_layer=norm)


def _mamba_no_norm() -> nn.Module:
    return _mamba(nn.Identity)  # nn.Identity takes (and ignores) any arguments


CASES = {
    "starnet": (_star, (2, 16, 6, 6), 1),
    "mambaout": (_mamba, (2, 5, 5, 12), -1),
    "mambaout_no_norm": (_mamba_no_norm, (2, 5, 5, 12), -1),
}


def _input(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_everything_is_the_original(case):
    build, shape, _ = CASES[case]
    block, x = _make(build), _input(shape)
    op = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
    with torch.no_grad():
        want = block(x)
        assert (want - x).abs().max() > 1e-2  # the branch is not degenerate
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5


def _star_zeroed(block: nn.Module, n: int, h: int) -> nn.Module:
    """StarNet Block with inputs [n:] of f1 / f2 and hidden units [h:] zeroed (f1 rows and biases:
    ReLU6(0) = 0 removes them from the product)."""
    with torch.no_grad():
        for f in (block.f1.conv, block.f2.conv):
            f.weight[:, n:] = 0
        block.f1.conv.weight[h:] = 0
        block.f1.conv.bias[h:] = 0
    return block


def _mamba_zeroed(block: nn.Module, n: int, kept_plain: int, kept_conv: int) -> nn.Module:
    """GatedConvBlock with fc1's inputs [n:] zeroed and the gate rows of the dropped hidden units
    zeroed (GELU(0) = 0 removes them from the product): plain units [kept_plain:], conv units [kept_conv:]."""
    hidden, plain, _ = block.split_indices
    with torch.no_grad():
        block.fc1.weight[:, n:] = 0
        for lo, hi in ((kept_plain, plain), (plain + kept_conv, hidden)):
            block.fc1.weight[lo:hi] = 0
            block.fc1.bias[lo:hi] = 0
    return block


@pytest.mark.parametrize("case", ["starnet", "mambaout_no_norm"])
def test_half_is_the_original_with_the_dropped_units_zeroed(case):
    build, shape, dim = CASES[case]
    block, x = _make(build), _input(shape)
    op = PartialMLP.from_module(block, ratio=0.5).eval()
    if case == "starnet":
        n, oracle = 8, _star_zeroed(_make(build), 8, 24)
    else:
        n, oracle = 6, _mamba_zeroed(_make(build), 6, 10, 6)
    with torch.no_grad():
        full = oracle(x)
        want = torch.cat((full.narrow(dim, 0, n), x.narrow(dim, n, x.shape[dim] - n)), dim=dim)
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5


def test_mambaout_norm_reads_only_the_kept_channels():
    """With its LayerNorm, the cut block equals the norm-free oracle fed the kept channels normalised
    over themselves (our documented choice, as for TinyViT's NormMlp)."""
    block, x = _make(_mamba), _input((2, 5, 5, 12))
    op = PartialMLP.from_module(block, ratio=0.5).eval()
    bare = _make(_mamba_no_norm)
    bare.load_state_dict({k: v for k, v in block.state_dict().items() if not k.startswith("norm.")})
    oracle = _mamba_zeroed(bare, 6, 10, 6)
    ln = block.norm
    with torch.no_grad():
        kept = nn.functional.layer_norm(x[..., :6], (6,), ln.weight[:6], ln.bias[:6], ln.eps)
        z = torch.cat((kept, torch.zeros_like(x[..., 6:])), dim=-1)
        branch = oracle(z) - z
        want = torch.cat((x[..., :6] + branch[..., :6], x[..., 6:]), dim=-1)
        assert rel_err(op(x), want) <= 1e-5


def test_macs_at_half_match_arithmetic():
    # StarNet, C = 16 -> n = 8, H = 48 -> h = 24, 6 x 6 pixels: two depthwise 7x7 on 8 channels,
    # f1 and f2 (8 -> 24), g (24 -> 8)
    op = PartialMLP.from_module(_make(_star), ratio=0.5)
    macs, _ = op.macs(_input((1, 16, 6, 6)))
    assert macs == 36 * (2 * 8 * 49 + 2 * 8 * 24 + 24 * 8)
    # MambaOut, C = 12 -> n = 6, kept 10 plain + 6 conv units (16 of 32), 25 pixels: fc1 reads 6 and
    # writes 32 rows (the gate of all 16 kept units, 10 i, 6 c), the 3x3 depthwise on 6, fc2 16 -> 6
    op = PartialMLP.from_module(_make(_mamba_no_norm), ratio=0.5)
    macs, _ = op.macs(_input((1, 5, 5, 12)))
    assert macs == 25 * (6 * 32 + 6 * 9 + 16 * 6)


def test_a_starnet_block_with_an_unknown_child_is_refused():
    block = _star()
    block.extra = nn.Conv2d(16, 16, 1)
    with pytest.raises(OperatorError, match="does not know how to slice"):
        PartialMLP.from_module(block)


REAL = {
    "starnet": lambda: timm.create_model("starnet_s050", num_classes=10),
    "mambaout": lambda: timm.create_model("mambaout_femto", num_classes=10, depths=(1, 1, 2, 1)),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_auto_converts_real_models_and_deploy_equals_eval(name):
    torch.manual_seed(0)
    model = nondegenerate_(REAL[name]().eval())
    cls = StarBlock if name == "starnet" else GatedConvBlock
    count = sum(type(m) is cls for m in model.modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net = partialize.apply(model, "auto", input_size=64)
    plan = net._partialize_plan
    assert sum(e.variant == "partial_mlp" for e in plan.converted) == count >= 2
    assert plan.macs_after < 0.6 * plan.macs_before
    with torch.no_grad():
        assert rel_err(partialize.deploy(net)(x), net.eval()(x)) <= 1e-4


@pytest.mark.parametrize("name", sorted(REAL))
def test_deployed_gated_blocks_export_equal_eager(name):
    import onnxruntime as ort

    torch.manual_seed(0)
    net = partialize.deploy(partialize.apply(nondegenerate_(REAL[name]().eval()), "auto", input_size=64))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        f = io.BytesIO()
        torch.onnx.export(net, (x,), f, dynamo=False, input_names=["input"], output_names=["output"])
        want = net(x)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert rel_err(got, want) <= 1e-4
