"""DPConv really learns its ratio (000 Algorithm 1): the straight-through gradient reaches gates at
+-1, set_ratio() staggers the gates so they flip one at a time, annealing does not compound, a
layer started too wide or too narrow ends within one reachable width step of the target on real
data, and freeze_dynamic() refuses non-monotone gates like deploy() does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from partialize.errors import OperatorError
from partialize.ops import DPConv
from partialize.train import finetune, freeze_dynamic
from partialize.train.data import digits_tensors, make_train_loader


def test_gates_at_plus_minus_one_get_the_straight_through_gradient():
    op = DPConv(16)
    with torch.no_grad():
        op.gates.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))  # monotone; what the clamps produce
    zeta = op.complexity()
    assert float(zeta) == 4.0**2  # two zero gates -> n = 2^2 = 4, zeta = n^2
    zeta.backward()
    # zeta = 2^{2 sum(1 - g)}: d zeta / d g_k = -2 ln 2 * zeta for every gate (identity STE, 000 eq. 8)
    expect = torch.full((4,), -2.0 * math.log(2.0) * 16.0)
    torch.testing.assert_close(op.gates.grad, expect)


def _widths_under_a_uniform_push(op: DPConv, direction: float, step: float = 0.01) -> list[int]:
    """Move every gate by the same amount per step (what Adam does with same-signed gradients) and
    record each width the layer passes through."""
    seen = [op.num_conv_channels]
    for _ in range(int(2.5 / step)):
        with torch.no_grad():
            op.gates.add_(direction * step).clamp_(-1.0, 1.0)
        n = op.num_conv_channels
        if n != seen[-1]:
            seen.append(n)
    return seen


@pytest.mark.parametrize("dim", [64, 48])
def test_set_ratio_gates_flip_one_at_a_time(dim):
    op = DPConv(dim, init_ratio=1.0)
    assert op.num_conv_channels == dim
    # shrinking: every reachable width is visited, halving each time (never 64 -> 1 in one step)
    reachable = [dim] + [2**k for k in range(math.ceil(math.log2(dim)) - 1, -1, -1)]
    assert _widths_under_a_uniform_push(op, +1.0) == reachable
    op.set_ratio(1 / dim)  # the narrowest: n = 1
    assert op.num_conv_channels == 1
    assert _widths_under_a_uniform_push(op, -1.0) == reachable[::-1]
    op.set_ratio(0.25)
    assert op.num_conv_channels == 16  # 64 / 4; 48 / 4 = 12 -> the nearest power of two on the log scale
    assert op.is_prefix() and float(op.penalty()) == 0.0
    g = op.gates.detach()
    assert bool((g[:-1] > g[1:]).all()) and float(g.abs().max()) <= 1.0  # strictly decreasing, in range


def test_annealing_does_not_compound():
    """000 Alg. 1 line 14, g~ <- g~ / sqrt(t/T) with t the current epoch: the tempered gates at
    epoch t are the learned gates over sqrt(t/T), whatever happened in the epochs before."""
    op = DPConv(64, init_ratio=0.25)
    learned = op.gates.detach().clone()
    T = 300
    for t in range(1, 4):
        op.anneal_(t, T)
        torch.testing.assert_close(op.tempered_gates().detach(), learned / math.sqrt(t / T))
    assert op.num_conv_channels == 16  # Sign is scale-free: the width is the learned one
    op.anneal_(T, T)
    torch.testing.assert_close(op.tempered_gates().detach(), learned)
    # the surrogate's slope is 1/tau: d zeta / d g_k = -2 ln 2 zeta / sqrt(t/T)
    op.anneal_(75, T)
    op.complexity().backward()
    expect = torch.full_like(learned, -2.0 * math.log(2.0) * 16.0**2 / math.sqrt(75 / T))
    torch.testing.assert_close(op.gates.grad, expect)


def test_freeze_dynamic_refuses_non_monotone_gates():
    net = nn.Sequential(nn.Conv2d(3, 16, 1), DPConv(16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[1].gates.copy_(torch.tensor([-0.5, 0.5, 0.5, 0.5]))  # the active channels are not a prefix
    before = net[1].gates.detach().clone()
    with pytest.raises(OperatorError, match=r"'1'.*monotone"):
        freeze_dynamic(net)
    assert isinstance(net[1], DPConv) and torch.equal(net[1].gates.detach(), before)  # nothing changed
    with pytest.raises(OperatorError, match="monotone"):
        net[1].deploy()  # the same refusal


# --- learning the ratio on real data (sklearn digits) -----------------------------------------


def _digits_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        DPConv(width), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits8():
    xt, yt, xv, yv = digits_tensors(size=8)
    return make_train_loader(TensorDataset(xt, yt), 64, seed=0), DataLoader(TensorDataset(xv, yv), batch_size=360)


@pytest.mark.parametrize("start", [1.0, 1 / 64], ids=["too-wide", "too-narrow"])
def test_dpconv_learns_its_width_from_either_side(digits8, start):
    """From scratch (000 Alg. 1), a 64-channel DPConv with target theta = 4 (width 16) started at 64
    or at 1 ends at 8, 16 or 32, passing through one reachable width per change (no 64 -> 1 jump)."""
    train, val = digits8
    torch.manual_seed(0)
    net = _digits_net(64)
    dp = net[3]
    dp.set_ratio(start)
    seen = [dp.num_conv_channels]
    dp.gates.register_hook(lambda _: seen.append(dp.num_conv_channels) if dp.num_conv_channels != seen[-1] else None)
    theta = 4.0  # 000 eq. 8: kappa = (C / theta)^2, target width 64 / 4 = 16
    r = finetune(net, train, val, epochs=6, lr=3e-3, theta=theta, gate_lr_scale=10.0, label_smoothing=0.0,
                 weight_decay=0.0, progress=False, log=None)  # fmt: skip
    seen.append(dp.num_conv_channels)
    target = 64 / theta
    assert target / 2 <= dp.num_conv_channels <= target * 2, seen  # within one reachable step
    assert all(max(a, b) == 2 * min(a, b) for a, b in zip(seen, seen[1:]) if a != b), seen  # one step at a time
    assert int(r.history[-1]["ratios"]["3"] * 64) == dp.num_conv_channels and dp.is_prefix()
    assert r.history[-1]["val_top1"] > 50.0  # the network learned the task meanwhile
