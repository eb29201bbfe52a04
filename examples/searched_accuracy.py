"""Accuracy of a searched recipe on the accuracy benchmark's data (issue "Latency-aware search": the
searched ResNet-50 at 2x, calibrated and fine-tuned 1 epoch, against its teacher).

The teacher, data, calibration and KD fine-tune are exactly those of ``examples/bench_accuracy.py``
(imported from it: hard digits at 32 px, the teacher trained here and cached under runs/accuracy/, 512
unlabelled calibration images, AdamW lr 5e-4 with KD from the teacher). Rows: the recipe converted,
calibrated, and each calibrated start after the KD budgets. Torch-Pruning is not run here (see
bench_accuracy.py for that comparison); the speed-up is the search's, at 224 px, not re-measured here.

    .venv/bin/python examples/searched_accuracy.py --teacher resnet50 \\
        --recipe examples/recipes/resnet50-2x-search.yaml --epochs 1

With ``--search S`` the recipe is searched here first, on the trained teacher at the benchmark's own
32 px (speed at --batch 16, 1 thread; accuracy proxy on the calibration images) and written to
``--recipe``; ``--search-only`` stops there, so that ``bench_accuracy.py --recipe TEACHER=PATH`` can
put it against Torch-Pruning at equal measured speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_accuracy as bench  # noqa: E402

import partialize  # noqa: E402
from partialize.calibration import calibrate_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet50", choices=sorted(bench.TEACHERS))
    ap.add_argument("--recipe", required=True, help="a recipe file or shipped recipe name")
    ap.add_argument("--epochs", default="1", help="KD budgets in epochs, comma-separated (default 1)")
    ap.add_argument("--ft-lr", type=float, default=5e-4, help="peak lr of the KD fine-tune (default 5e-4)")
    ap.add_argument("--kd-weight", type=float, default=0.5, help="KD loss weight (default 0.5)")
    ap.add_argument("--calib-steps", type=int, default=200, help="distillation steps per block (default 200)")
    ap.add_argument("--calib-lr", type=float, default=1e-3, help="distillation lr (default 1e-3)")
    ap.add_argument("--search", type=float, metavar="S", help="search a recipe for S x here and write it to --recipe")
    ap.add_argument("--search-only", action="store_true", help="with --search: write the recipe and stop")
    ap.add_argument("--variants", help="with --search: only these operators, comma-separated (partialize search)")
    ap.add_argument("--json", default="runs/accuracy/searched.json")
    cli = ap.parse_args()
    if cli.search_only and cli.search is None:
        ap.error("--search-only needs --search S")
    if cli.search is not None:  # refused before the teacher is trained, not after
        taken = [f for f in (cli.recipe, os.path.splitext(cli.recipe)[0] + ".json") if os.path.exists(f)]
        if taken:
            ap.error(f"{taken[0]} exists: give --recipe a new path for the searched recipe")
    # every other setting is bench_accuracy.py's default, so the rows compare with its tables
    args = bench.parser().parse_args(["--ft-lr", str(cli.ft_lr), "--kd-weight", str(cli.kd_weight)])
    args.epochs = [int(e) for e in cli.epochs.split(",") if e]
    torch.set_num_threads(args.train_threads)
    data = bench.Data(args)
    spec = bench.TEACHERS[cli.teacher]
    torch.manual_seed(args.seed)
    teacher, tmeta = bench.teacher_for(cli.teacher, spec, data, args)
    t_acc = tmeta["val_top1_now"]
    if cli.search is not None:
        search_recipe(teacher, cli, data, args)
        if cli.search_only:
            return
    converted = partialize.apply(teacher, cli.recipe, input_size=bench.SIZE).eval()
    c_acc = bench.acc(converted, data)
    bench.say(f"teacher {t_acc:.2f}%; converted with {cli.recipe}: {c_acc:.2f}%")
    t0 = time.perf_counter()
    cal = calibrate_model(
        converted, teacher, data.calib, images=args.calib_images, seed=args.seed, steps=cli.calib_steps, lr=cli.calib_lr
    )
    cal_s = time.perf_counter() - t0
    calibrated = cal.model.eval()
    k_acc = bench.acc(calibrated, data)
    bench.say(f"calibrated in {cal_s:.1f} s: {k_acc:.2f}%")
    row = {"name": f"partialize {cli.recipe}, calibrated"}
    bench.run_finetunes(row, calibrated, teacher, data, args, cli.teacher)
    out = {
        "environment": bench.environment(args),
        "data": data.describe(),
        "teacher": {"name": cli.teacher, **{k: v for k, v in tmeta.items() if k != "history"}},
        "recipe": cli.recipe,
        "macs_ratio": bench.macs(converted) / bench.macs(teacher),
        "converted_top1": c_acc,
        "calibrated_top1": k_acc,
        "calibration_seconds": cal_s,
        "calibration_settings": {"steps": cli.calib_steps, "lr": cli.calib_lr, "images": args.calib_images},
        "finetune": row["finetune"],
        "finetune_settings": bench.ft_settings(args) | {"epochs": args.epochs},
    }
    os.makedirs(os.path.dirname(cli.json) or ".", exist_ok=True)
    with open(cli.json, "w") as f:
        json.dump(out, f, indent=1)
    for e, r in row["finetune"].items():
        bench.say(f"{e} epoch(s) KD: {r['top1']:.2f}% (teacher {t_acc:.2f}%, {r['top1'] - t_acc:+.2f} points)")
    bench.say(f"wrote {cli.json}")


def search_recipe(teacher: torch.nn.Module, cli, data, args) -> None:
    """``partialize.search`` on the trained teacher at the benchmark's input size, written to --recipe
    with the result's JSON beside it (main refuses paths that exist)."""
    from partialize.recipe_search import options_for, search

    res = search(
        teacher, cli.search, name=cli.teacher, input_size=bench.SIZE, threads=args.speed_threads,
        batch=args.batch, data=data.calib_used, options=options_for(cli.variants), progress=bench.say,
    )  # fmt: skip
    os.makedirs(os.path.dirname(cli.recipe) or ".", exist_ok=True)
    with open(cli.recipe, "w") as f:
        f.write(res.recipe_yaml())
    with open(os.path.splitext(cli.recipe)[0] + ".json", "w") as f:
        json.dump(res.to_dict(), f, indent=1, default=str)
    bench.say(
        f"searched {cli.search:g}x at {bench.SIZE} px: predicted {res.predicted_speedup:.2f}x, measured "
        f"{res.measured_speedup:.2f}x; wrote {cli.recipe}"
    )


if __name__ == "__main__":
    main()
