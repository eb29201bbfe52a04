"""NCHW against channels_last (NHWC) for the original and a converted model, all four timed side by side.

    .venv/bin/python examples/layout_speed.py --model resnet50 --recipe examples/recipes/resnet50-2x-search.yaml

The speed-up a search or a bench reports is over the original *in the same layout*. A layout that
speeds the original up more than the converted model lowers that ratio, and one that speeds the
original less raises it, so this script also gives each model's speed-up over the original in its
fastest layout: the figure a deployment engineer compares against. Deployed forms (BN folded), eval
and inference mode, the input made NCHW by the loader (the NHWC models get it in NHWC, as
``partialize bench --channels-last`` gives it), interleaved rounds, medians with IQR.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_overhead  # noqa: E402  (its model set-up)

import partialize  # noqa: E402
from partialize.macs import count_macs  # noqa: E402
from partialize.measure.allocator import ALLOCATORS  # noqa: E402
from partialize.measure.speed import machine_description, time_side_by_side  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--recipe", required=True, help="a shipped recipe's name or a YAML path")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--allocator", choices=ALLOCATORS, default="reuse")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    base, x, converted = profile_overhead.setup(args)
    deployed = {"original": partialize.deploy(base, x[:1]), "converted": partialize.deploy(converted, x[:1])}
    macs = {n: count_macs(m, x[:1]).total for n, m in deployed.items()}
    cl = torch.channels_last
    xl = x.contiguous(memory_format=cl)
    fns = {}
    for (n, m), trained in zip(deployed.items(), (base, converted)):
        fns[f"{n}, NCHW"] = lambda m=m: m(x)
        nhwc = partialize.deploy(trained, x[:1]).to(memory_format=cl)  # a deployed copy of its own
        fns[f"{n}, NHWC"] = lambda m=nhwc: m(xl)
    t = time_side_by_side(fns, rounds=args.rounds, min_round_s=0.2)
    best = min(t["original, NCHW"].median_s, t["original, NHWC"].median_s)
    print(f"{machine_description(args.threads)}; batch {args.batch}, {args.size} px, deployed, allocator "
          f"{args.allocator}, {args.rounds} rounds; {args.model}, recipe {args.recipe}\n")  # fmt: skip
    print("| model, layout | MACs | ms / batch (IQR) | over the original, same layout | over the fastest original |")
    print("|---|---|---|---|---|")
    for k, v in t.items():
        name, layout = k.split(", ")
        same = t[f"original, {layout}"].median_s / v.median_s
        print(f"| {k} | {macs[name] / macs['original']:.3f}x | {v.median_s * 1e3:.1f} ({v.iqr_s / v.median_s:.0%}) "
              f"| {same:.2f}x | {best / v.median_s:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
