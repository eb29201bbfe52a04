"""partial_mlp on ghost bottlenecks: timm GhostNet's ``GhostBottleneck`` and RepGhost's
``RepGhostBottleneck`` with an identity shortcut.

Oracle: the original's own forward with ghost1's primary conv reading only the first n inputs, ghost2's
primary conv and the SE's squeeze reading only the first h hidden units (their other columns zeroed),
on the first n output channels; the other channels keep x. MACs against counts written here."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from _helpers import auto_deploys_and_exports, nondegenerate_, rel_err
from timm.models.ghostnet import GhostBottleneck
from timm.models.repghost import RepGhostBottleneck

from partialize.errors import OperatorError
from partialize.ops import PartialMLP

# C = 16 -> n = 8 at ratio 1/2; 48 hidden units -> h = 24 (in GhostNet: all of ghost1's primary half)
CASES = {
    "ghost": lambda: GhostBottleneck(16, 48, 16),
    "ghost_se": lambda: GhostBottleneck(16, 48, 16, se_ratio=0.25),
    "repghost": lambda: RepGhostBottleneck(16, 48, 16),
    "repghost_se": lambda: RepGhostBottleneck(16, 48, 16, se_ratio=0.25),
}


def _make(case: str, seed: int = 0):
    torch.manual_seed(seed)
    return nondegenerate_(CASES[case](), seed=seed + 1, scale=0.2).eval()


def _masked(block, n: int, h: int):
    with torch.no_grad():
        block.ghost1.primary_conv[0].weight[:, n:] = 0
        block.ghost2.primary_conv[0].weight[:, h:] = 0
        if block.se is not None:
            block.se.conv_reduce.weight[:, h:] = 0
    return block


@pytest.mark.parametrize("case", sorted(CASES))
def test_half_is_the_original_reading_only_the_kept_units(case):
    block = _make(case)
    x = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    op = PartialMLP.from_module(block, ratio=0.5).eval()
    oracle = _masked(copy.deepcopy(block), 8, 24)
    with torch.no_grad():
        full = oracle(x.clone())
        want = torch.cat((full[:, :8], x[:, 8:]), dim=1)
        got = op(x)
        assert rel_err(got, want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5
        assert rel_err(got, block(x.clone())) > 1e-3  # the dropped units really are gone


@pytest.mark.parametrize("case", sorted(CASES))
def test_keep_everything_is_the_original(case):
    block = _make(case)
    x = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    op = PartialMLP.from_module(block, **PartialMLP.faithful_params).eval()
    with torch.no_grad():
        assert rel_err(op(x), block(x.clone())) <= 1e-5


def test_ghostnet_past_the_primary_half_keeps_the_cheap_outputs_of_the_first_channels():
    """At 3/4 of 48 hidden units (36): ghost1's 24 primary channels and the cheap outputs of the first
    12; oracle: the original with ghost2 reading only hidden units [:36] (its columns beyond zeroed)."""
    block = _make("ghost_se")
    x = torch.randn(2, 16, 7, 7, generator=torch.Generator().manual_seed(2))
    op = PartialMLP.from_module(block, ratio=0.5, hidden_ratio=0.75).eval()
    oracle = _masked(copy.deepcopy(block), 8, 36)
    with torch.no_grad():
        want = torch.cat((oracle(x.clone())[:, :8], x[:, 8:]), dim=1)
        assert rel_err(op(x), want) <= 1e-5
        assert rel_err(op.deploy()(x), want) <= 1e-5


def test_a_projection_shortcut_is_refused():
    with pytest.raises(OperatorError, match="without an identity shortcut"):
        PartialMLP.from_module(GhostBottleneck(16, 48, 24))
    with pytest.raises(OperatorError, match="without an identity shortcut"):
        PartialMLP.from_module(RepGhostBottleneck(16, 48, 16, stride=2))


def test_macs_at_half_match_arithmetic():
    x = torch.randn(1, 16, 7, 7)
    # GhostNet: ghost1's primary 1x1 8 -> 24, ghost2's primary 1x1 24 -> 8, no cheap operation
    macs, _ = PartialMLP.from_module(_make("ghost"), ratio=0.5).macs(x)
    assert macs == 49 * (8 * 24 + 24 * 8)
    # RepGhost: the same 1x1s plus each module's depthwise 3x3 on its kept outputs (24, then 8)
    macs, _ = PartialMLP.from_module(_make("repghost"), ratio=0.5).macs(x)
    assert macs == 49 * (8 * 24 + 24 * 8 + 9 * 24 + 9 * 8)


@pytest.mark.parametrize("name", ["ghostnet_050", "repghostnet_050"])
def test_auto_converts_real_models_deploys_and_exports(name):
    torch.manual_seed(0)
    auto_deploys_and_exports(nondegenerate_(timm.create_model(name, num_classes=10).eval()))
