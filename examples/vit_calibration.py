"""Does a ViT converted with ``auto`` keep what it knew? Issue 15's ViT-Tiny target, measured.

A timm ViT-Tiny (12 blocks, width 192, 3 heads) is trained here from scratch on
``partialize.datasets.hard_digits`` at 32 px, with the accuracy benchmark's data, teacher settings and
teacher cache (examples/bench_accuracy.py, runs/accuracy/teachers/). Patch size 8 (16 tokens) by
default: the benchmark's patch-4 ViT (64 tokens) costs about 4x more to train, hours on 2 cores.

Then, for the ``auto`` recipe (partial_attention 1/4 and partial_mlp 1/2 on every block) and
``--recipe`` alternatives: top-1 of the teacher, of the converted model, after ``partialize.calibrate``
on 512 unlabelled images (no labels, no fine-tuning; the target is >= 80% of the teacher), and after 1
epoch of KD fine-tuning; MACs (inference form) beside. Threads: ``--threads`` (2) for everything.

    .venv/bin/python examples/vit_calibration.py [--patch 8] [--epochs 15] [--json docs/vit_calibration.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_accuracy as ba  # noqa: E402  (the benchmark's data, teacher cache and helpers)

import partialize  # noqa: E402
from partialize.calibration import calibrate_model  # noqa: E402
from partialize.train import finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=8, help="ViT patch size at 32 px (default 8: 16 tokens)")
    ap.add_argument("--epochs", type=int, default=15, help="teacher epochs (default 15)")
    ap.add_argument("--recipes", default="auto", help="comma-separated recipes to compare (default auto)")
    ap.add_argument("--ft-epochs", type=int, default=1, help="KD fine-tune epochs after calibration (0: none)")
    ap.add_argument(
        "--teacher-lr",
        type=float,
        default=5e-4,
        help="teacher peak lr (default 5e-4; the CNN teachers' 2e-3 leaves a ViT at chance)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/vit_calibration.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bargs = argparse.Namespace(
        teacher_renders=8, ft_renders=4, val_renders=4, calib_images=512, seed=0, teacher_lr=args.teacher_lr,
        runs="runs/accuracy", ft_lr=5e-4, ft_batch=64,
    )  # fmt: skip
    data = ba.Data(bargs)
    name = f"vit_tiny_p{args.patch}"
    spec = {
        "model": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": args.patch},
        "epochs": args.epochs,
    }
    t0 = time.perf_counter()
    teacher, meta = ba.teacher_for(name, spec, data, bargs)
    t_acc = ba.acc(teacher, data)
    t_macs = ba.macs(teacher)
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}",
        "threads": args.threads,
        "data": data.describe(),
        "teacher": {"name": name, **spec, "val_top1": t_acc, "train_seconds": meta.get("train_seconds"),
                    "macs": t_macs},
        "rows": [],
    }  # fmt: skip
    for recipe in [r for r in args.recipes.split(",") if r]:
        converted = partialize.apply(teacher, recipe, input_size=32).eval()
        plan = converted._partialize_plan
        row = {
            "recipe": recipe,
            "converted_layers": len(plan.converted),
            "macs_ratio": ba.macs(converted) / t_macs,
            "converted_top1": ba.acc(converted, data),
        }
        ba.say(f"{recipe}: {row['converted_layers']} layers, MACs {row['macs_ratio']:.3f}x, "
               f"converted {row['converted_top1']:.2f}%")  # fmt: skip
        cal = calibrate_model(converted, teacher, data.calib, images=bargs.calib_images, seed=bargs.seed)
        row.update(
            calibrated_top1=ba.acc(cal.model, data),
            calibrate_seconds=cal.seconds,
            agreement_before=cal.before.agreement,
            agreement_after=cal.after.agreement,
        )
        row["kept_of_teacher"] = row["calibrated_top1"] / t_acc
        ba.say(f"{recipe}: calibrated {row['calibrated_top1']:.2f}% ({100 * row['kept_of_teacher']:.1f}% of the "
               f"teacher's {t_acc:.2f}%) in {cal.seconds:.0f} s")  # fmt: skip
        if args.ft_epochs:
            model = cal.model
            res = finetune(
                model, data.loader("ft", bargs.ft_batch), data.val, teacher=teacher, epochs=args.ft_epochs,
                lr=bargs.ft_lr, seed=bargs.seed, progress=False,
            )  # fmt: skip
            row["kd_top1"] = res.final_top1
            row["kd_epochs"] = args.ft_epochs
            ba.say(f"{recipe}: after {args.ft_epochs} epoch(s) of KD {res.final_top1:.2f}%")
        out["rows"].append(row)
    out["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    ba.say(f"wrote {args.json} ({out['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
