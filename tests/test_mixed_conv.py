"""MixNet's MixedConv2d (a conv per split of the channels, outputs concatenated) cut with a partial
MLP: every split keeps the part of it inside the kept inputs and outputs. Oracle: the original with
the dropped input channels zeroed, on the kept outputs (each output reads only its own split)."""

from __future__ import annotations

import pytest
import timm
import torch
from _helpers import auto_deploys_and_exports, nondegenerate_, rel_err
from timm.layers import MixedConv2d

from partialize.errors import OperatorError
from partialize.ops.partial_blocks import _slice_layer


@pytest.mark.parametrize("n_in,n_out", [(12, 36), (8, 24), (20, 50)])
def test_dense_mixed_conv_is_the_original_on_the_kept_channels(n_in, n_out):
    torch.manual_seed(0)
    conv = MixedConv2d(24, 72, kernel_size=[1, 1, 1])  # three 8 -> 24 splits
    x = torch.randn(2, 24, 5, 5)
    cut = _slice_layer(conv, n_in, n_out, "t")
    zeroed = x.clone()
    zeroed[:, n_in:] = 0
    with torch.no_grad():
        assert rel_err(cut(x[:, :n_in]), conv(zeroed)[:, :n_out]) <= 1e-6
    assert sum(cut.splits) == n_in and cut.out_channels == n_out


def test_depthwise_mixed_conv_keeps_each_kernel_on_its_channels():
    torch.manual_seed(0)
    conv = MixedConv2d(30, 30, kernel_size=[3, 5, 7], depthwise=True)  # 10 channels per kernel size
    x = torch.randn(2, 30, 9, 9)
    cut = _slice_layer(conv, 15, 15, "t")
    assert [c.kernel_size for c in cut.values()] == [(3, 3), (5, 5)] and cut.splits == [10, 5]
    with torch.no_grad():
        assert rel_err(cut(x[:, :15]), conv(x)[:, :15]) <= 1e-6


def test_a_cut_that_leaves_a_split_without_inputs_or_outputs_is_refused():
    conv = MixedConv2d(24, 72, kernel_size=[1, 1, 1])
    with pytest.raises(OperatorError, match="splits a group"):
        _slice_layer(conv, 8, 48, "t")  # outputs of the second split with none of its inputs
    with pytest.raises(OperatorError, match="splits a group"):
        _slice_layer(conv, 16, 24, "t")  # inputs of the second split feeding no kept output


def test_mixnet_converts_with_auto_deploys_and_exports():
    torch.manual_seed(0)
    auto_deploys_and_exports(nondegenerate_(timm.create_model("mixnet_s", num_classes=10).eval()))
