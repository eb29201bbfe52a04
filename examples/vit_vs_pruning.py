"""The ViT-Tiny row of the accuracy benchmark: partialize against Torch-Pruning at equal measured speed.

examples/bench_accuracy.py's protocol (calibrated partialize; Torch-Pruning magnitude and Taylor at
equal MACs and at equal measured speed, 1 thread, batch 16, deployed; the same KD fine-tune for every
row) for the ViT-Tiny that trains here: examples/vit_calibration.py's teacher (timm
``vit_tiny_patch16_224`` at 32 px, patch 8, trained 30 epochs on scikit-learn's digits, cached under
runs/accuracy/teachers/), converted with ``auto``. On ``hard_digits``, the CNN rows' data, this ViT
stays at chance, so its rows use the plain digits (1,437 train / 360 val images: one image = 0.28
points). Torch-Pruning prunes each attention's head dims (every head kept) and the MLPs' hidden
channels. The fine-tune lr is a grid (``--ft-lrs``): a ViT fine-tune at the CNN rows' 5e-4 destroyed
what calibration recovered (docs/calibration.md), and each contender gets its best.

    .venv/bin/python examples/vit_vs_pruning.py --ft-seeds 2 --json docs/bench_accuracy_vit.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_accuracy as ba  # noqa: E402  (the benchmark's protocol, teacher cache and helpers)
from vit_calibration import PlainDigits  # noqa: E402

NAME = "vit_tiny_p8_digits"  # vit_calibration.py's cache name for this teacher
SPEC = {"model": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8}, "epochs": 30, "recipe": "auto"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="auto")
    ap.add_argument("--epochs", default="1,5", help="KD fine-tune budgets in epochs (default 1,5)")
    ap.add_argument("--ft-lrs", default="1e-4,5e-4", help="peak lrs, each run for every row (default 1e-4,5e-4)")
    ap.add_argument("--ft-seeds", type=int, default=2)
    ap.add_argument("--json", default="docs/bench_accuracy_vit.json")
    ap.add_argument("--md", default="docs/bench_accuracy_vit.md")
    cli = ap.parse_args()
    args = ba.parser().parse_args(["--teacher-lr", "3e-4", "--ft-seeds", str(cli.ft_seeds), "--epochs", cli.epochs])
    args.epochs = [int(e) for e in args.epochs.split(",") if e]
    lrs = [float(v) for v in cli.ft_lrs.split(",") if v]
    ba.TEACHERS[NAME] = dict(SPEC, recipe=cli.recipe)
    one_lr = ba.run_finetunes

    def every_lr(row, start_model, teacher, data, args, name) -> None:
        """``run_finetunes`` once per lr of the grid; ``finetune_by_lr`` keeps each."""
        row["finetune_by_lr"] = {}
        for lr in lrs:
            args.ft_lr = lr
            one_lr(row, start_model, teacher, data, args, f"{name} lr {lr:g}")
            row["finetune_by_lr"][f"{lr:g}"] = row.pop("finetune")

    ba.run_finetunes = every_lr
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(args.seed)
    data = PlainDigits(args)
    t0 = time.perf_counter()
    result = ba.run_teacher(NAME, data, args)
    result["finetune_settings"]["lr"] = lrs
    doc = {"environment": ba.environment(args), "data": data.describe(), "teacher": NAME, "result": result,
           "wall_s": time.perf_counter() - t0}  # fmt: skip
    with open(cli.json, "w") as f:
        json.dump(doc, f, indent=1, default=float)
    with open(cli.md, "w") as f:
        f.write(render(doc, args.epochs, lrs))


def render(doc: dict, epochs: list[int], lrs: list[float]) -> str:
    res, env = doc["result"], doc["environment"]
    t = res["teacher"]
    lines = [
        "# ViT-Tiny against Torch-Pruning at equal measured speed (examples/vit_vs_pruning.py)",
        "",
        f"Teacher {t['name']}: {t['val_top1_now']:.2f}% on {doc['data']['val_images']} val images. "
        f"Speed: {env.get('machine', '')}, {env.get('speed_threads', 1)} thread, batch {env.get('batch', 16)}, "
        "deployed, side by side. Fine-tunes: 2 threads; KD cells: mean +- std over the seeds.",
        "",
        "| row | MACs | throughput | no fine-tune | "
        + " | ".join(f"KD {e} ep, lr {lr:g}" for lr in lrs for e in epochs)
        + " |",
        "|---" * (4 + len(lrs) * len(epochs)) + "|",
    ]
    for row in res["rows"]:
        cells = [ba.ft_cell(row["finetune_by_lr"][f"{lr:g}"][str(e)]) for lr in lrs for e in epochs]
        lines.append(f"| {row['name']} | {row['macs_ratio']:.3f}x | {row['throughput_ratio']:.2f}x | "
                     f"{row['start_top1']:.2f}% | " + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
