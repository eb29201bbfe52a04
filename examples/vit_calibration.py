"""Does a ViT converted with ``auto`` keep what it knew? Issue 15's ViT-Tiny target, measured.

A timm ViT-Tiny (12 blocks, width 192, 3 heads) is trained here from scratch at 32 px, with the
accuracy benchmark's teacher settings and cache (examples/bench_accuracy.py, runs/accuracy/teachers/).
Patch size 8 (16 tokens) by default: the benchmark's patch-4 ViT (64 tokens) costs about 4x more to
train, hours on 2 cores. ``--dataset digits`` (the default): scikit-learn's digits upscaled to 32 px
(1,437 train / 360 val images). On ``hard_digits``, the CNN teachers' data, the ViT stayed at chance
(train loss 2.30 after 3 epochs at lr 5e-4 and 2e-3, and after 360 steps at 2e-4), so it is not the
default here.

Then, for the ``auto`` recipe (partial_attention 1/4 and partial_mlp 1/2 on every block) and
``--recipe`` alternatives: top-1 of the teacher, of the converted model, after ``partialize.calibrate``
on 512 unlabelled images (no labels, no fine-tuning; the target is >= 80% of the teacher), and after 1
epoch of KD fine-tuning (``--ft``: epochs and lr of each, from the calibrated start); MACs (inference
form) beside. Threads: ``--threads`` (2) for everything.

    .venv/bin/python examples/vit_calibration.py [--patch 8] [--epochs 15] [--json docs/vit_calibration.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_accuracy as ba  # noqa: E402  (the benchmark's data, teacher cache and helpers)

import partialize  # noqa: E402
from partialize.calibration import DEFAULT_STEPS, calibrate_model  # noqa: E402
from partialize.train import finetune  # noqa: E402

#: recipes by name besides the shipped ones: every attention to one head (single_head_attention 1/4),
#: the MLPs as in auto
RECIPES = {
    "single-head": {
        "version": 1,
        "name": "single-head",
        "strict": False,
        "rules": [
            {"select": {"type": "Attention"}, "variant": "single_head_attention", "ratio": 0.25},
            {"select": {"type": "Mlp"}, "variant": "partial_mlp", "ratio": 0.5},
        ],
    }
}


class PlainDigits(ba.Data):
    """scikit-learn's digits at 32 px (partialize.train.data.digits_tensors, seed 0) in the benchmark's
    ``Data``: teacher and fine-tune sets are the train split (512 + 64 unlabelled calibration images
    drawn from it), the held-out split is val."""

    DATASET = "scikit-learn digits (partialize.train.data.digits_tensors), 32x32, seed 0"

    def tensors(self, args) -> tuple:
        from partialize.train.data import digits_tensors

        xt, yt, xv, yv = digits_tensors(size=32)
        return (xt, yt), (xt, yt), (xv, yv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=8, help="ViT patch size at 32 px (default 8: 16 tokens)")
    ap.add_argument("--epochs", type=int, default=30, help="teacher epochs (default 30)")
    ap.add_argument("--recipes", default="auto,single-head", help="comma-separated recipes (default auto,single-head)")
    ap.add_argument(
        "--ft",
        default="1@5e-4,1@1e-4,5@1e-4",
        help="KD fine-tunes from the calibrated start, EPOCHS@LR each (default 1@5e-4,1@1e-4,5@1e-4; '' for none)",
    )
    ap.add_argument(
        "--teacher-lr",
        type=float,
        default=3e-4,
        help="teacher peak lr (default 3e-4; the CNN teachers' 2e-3, and 1e-3, leave a ViT at chance)",
    )
    ap.add_argument("--dataset", choices=("digits", "hard_digits"), default="digits")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/vit_calibration.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bargs = argparse.Namespace(
        teacher_renders=8, ft_renders=4, val_renders=4, calib_images=512, seed=0, teacher_lr=args.teacher_lr,
        runs="runs/accuracy", ft_lr=5e-4, ft_batch=64,
    )  # fmt: skip
    data = ba.Data(bargs) if args.dataset == "hard_digits" else PlainDigits(bargs)
    name = f"vit_tiny_p{args.patch}" + ("" if args.dataset == "hard_digits" else "_digits")
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
        converted = partialize.apply(teacher, RECIPES.get(recipe, recipe), input_size=32).eval()
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
        heads = calibrate_model(
            converted, teacher, data.calib, images=bargs.calib_images, seed=bargs.seed, use=(*DEFAULT_STEPS, "heads")
        )  # the opt-in head choice from data, for comparison
        row["calibrated_with_head_choice_top1"] = ba.acc(heads.model, data)
        row.update(
            calibrated_top1=ba.acc(cal.model, data),
            calibrate_seconds=cal.seconds,
            agreement_before=cal.before.agreement,
            agreement_after=cal.after.agreement,
        )
        row["kept_of_teacher"] = row["calibrated_top1"] / t_acc
        ba.say(f"{recipe}: calibrated {row['calibrated_top1']:.2f}% ({100 * row['kept_of_teacher']:.1f}% of the "
               f"teacher's {t_acc:.2f}%) in {cal.seconds:.0f} s; with the head choice from data "
               f"{row['calibrated_with_head_choice_top1']:.2f}%")  # fmt: skip
        row["kd"] = []
        for item in [f for f in args.ft.split(",") if f]:
            epochs, lr = int(item.split("@")[0]), float(item.split("@")[1])
            model = copy.deepcopy(cal.model)
            res = finetune(
                model, data.loader("ft", bargs.ft_batch), data.val, teacher=teacher, epochs=epochs, lr=lr,
                seed=bargs.seed, progress=False, log=None,
            )  # fmt: skip
            row["kd"].append({"epochs": epochs, "lr": lr, "top1": res.final_top1})
            ba.say(f"{recipe}: after {epochs} epoch(s) of KD at lr {lr:g}: {res.final_top1:.2f}%")
        out["rows"].append(row)
    write_result(out, args.json, t0)


def write_result(out: dict, path: str, t0: float) -> None:
    """``out`` with its wall time since ``t0`` as JSON at ``path`` (folders made), and a line saying so."""
    out["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    ba.say(f"wrote {path} ({out['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
