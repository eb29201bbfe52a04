"""`partialize bench ops`: each operator vs a dense 3x3 and a depthwise 3x3 conv, side by side."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.registry import get_operator
from .speed import machine_description, time_side_by_side  # noqa: F401  (re-exported)


@dataclass
class OpBenchRow:
    channels: int
    size: int
    batch: int
    op: str
    ms: float
    spread_ms: float
    vs_dense: float
    vs_dw: float


def _candidates(c: int, size: int, seed: int = 0) -> dict[str, nn.Module]:
    """Every operator built from the registry by name (``from_module`` on a dense 3x3 conv, or on the
    1x1 MLP conv PAT_sp wraps), in its training and inference forms."""
    torch.manual_seed(seed)
    dense = nn.Conv2d(c, c, 3, 1, 1, bias=False)
    op = lambda name, module, **kw: get_operator(name).from_module(module, **kw)  # noqa: E731
    pconv = op("pconv", dense, ratio=0.25)
    cands: dict[str, nn.Module] = {
        "dense3x3": dense,
        "dw3x3": nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
        "pconv(split_cat)": pconv,
        "pconv(slicing)": pconv.deploy(),
        "patconv_ch": op("patconv", dense, ratio=0.25, attn="ch").eval().deploy(),
    }
    if size <= 28:  # quadratic in H*W: the paper uses PAT_sf only at the last stage (7x7)
        cands["patconv_sf"] = op("patconv", dense, ratio=0.25, attn="sf").eval().deploy()
    dp = op("dpconv", dense, ratio=0.25)
    cands["dpconv(train form)"] = dp.eval()
    cands["dpconv(deployed)"] = dp.deploy()
    ada = op("ada_pconv", dense)
    with torch.no_grad():  # route everything to the 1/4 branch so hard routing has one group
        ada.router.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    ada.set_routing("soft")
    cands["ada_pconv(soft)"] = ada.eval()
    cands["ada_pconv(hard)"] = ada.deploy()
    # PAT_sp cost is relative to the MLP conv it wraps (2C -> C 1x1)
    mlp2 = nn.Conv2d(2 * c, c, 1, bias=False)
    sp = op("pat_sp", mlp2, ratio=0.5).eval()
    cands["mlp_conv1x1"] = mlp2
    cands["pat_sp(train form)"] = sp
    cands["pat_sp(merged)"] = sp.deploy()
    return {k: m.eval() for k, m in cands.items()}


def bench_ops(
    channels=(64, 128, 256),
    sizes=(56, 28, 14),
    batches=(1, 16),
    threads: int = 1,
    rounds: int = 5,
    progress=None,
) -> list[OpBenchRow]:
    """Time every operator at each (C, H=W, batch); ratios are against dense/depthwise 3x3.

    Runs with ``threads`` torch threads and puts the caller's thread count back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_grid(channels, sizes, batches, rounds, progress)
    finally:
        torch.set_num_threads(before)


def _bench_grid(channels, sizes, batches, rounds: int, progress) -> list[OpBenchRow]:
    rows: list[OpBenchRow] = []
    grid = list(itertools.product(channels, sizes, batches))
    for c, size, batch in grid:
        cands = _candidates(c, size)
        x = torch.randn(batch, c, size, size)
        x2 = torch.randn(batch, 2 * c, size, size)
        fns = {}
        for name, mod in cands.items():
            inp = x2 if name.startswith(("mlp_", "pat_sp")) else x
            fns[name] = (lambda m, i: lambda: m(i))(mod, inp)
        t = time_side_by_side(fns, rounds=rounds, min_round_s=0.03, max_calls=50)
        dense, dw = t["dense3x3"].median_s, t["dw3x3"].median_s
        for name, tm in t.items():
            rows.append(
                OpBenchRow(
                    c,
                    size,
                    batch,
                    name,
                    tm.median_s * 1e3,
                    tm.iqr_s * 1e3,
                    tm.median_s / dense,
                    tm.median_s / dw,
                )
            )
        if progress is not None:
            progress()
    return rows
