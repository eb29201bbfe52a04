"""The shipped ``auto`` recipe on a handful of models: what it converts per node kind, the MACs ratio,
and deploy(model) == model in eval (within 1e-4), after a non-degenerate initialisation (random BN
statistics, every parameter moved off its init, layer scales away from zero: on a fresh timm model
zero-initialised branches make the check pass trivially). Random weights, one thread.

    OMP_NUM_THREADS=1 .venv/bin/python examples/auto_recipe.py [--size 224] [--models resnet18 vit_tiny_patch16_224]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import time

import timm
import torch

import partialize
from partialize.measure.speed import machine_description

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from _helpers import nondegenerate_, rel_err  # noqa: E402  (the tests' own initialisation)

MODELS = [
    "resnet18",
    "mobilenetv2_100",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
]


def measure(name: str, size: int) -> dict:
    torch.manual_seed(0)  # the timm init draws from the global RNG
    model = nondegenerate_(timm.create_model(name, pretrained=False).eval())
    t0 = time.perf_counter()
    converted = partialize.apply(model, "auto", input_size=size)  # plan + swap
    seconds = time.perf_counter() - t0
    plan = converted._partialize_plan
    nondegenerate_(converted, seed=2)  # also the parts the operators initialised (mixers, gates)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = rel_err(partialize.deploy(converted)(x), converted.eval()(x))
    return {
        "model": name,
        "converted": dict(collections.Counter(e.variant for e in plan.converted)),
        "skipped": len(plan.skipped),
        "macs_before": plan.macs_before,
        "macs_ratio": plan.macs_after / plan.macs_before,
        "deploy_rel_err": err,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", nargs="+", default=MODELS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine_description(1)}; input {args.size}x{args.size}, random weights")
    cols = ["model", "converted", "skipped", "MACs before", "MACs after / before", "deploy vs eval (max rel. err.)"]
    print("| " + " | ".join(cols + ["convert (s)"]) + " |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.size)
        conv = ", ".join(f"{v} {k}" for k, v in sorted(r["converted"].items())) or "nothing"
        print(
            f"| {name} | {conv} | {r['skipped']} | {r['macs_before'] / 1e9:.3f} G | {r['macs_ratio']:.3f}x | "
            f"{r['deploy_rel_err']:.1e} | {r['seconds']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
