"""Does a CNN converted with ``auto`` keep what it knew? The operators ``auto`` gained in this release
(``partial_kernel`` on DenseNet's 128 -> 32 convs and the stage transitions, ``partial_residual``
coupling blocks on ResNet bottlenecks, ``partial_mlp`` on FastViT's ``ConvMlp``), measured on trained
teachers.

Each timm model is trained here from scratch on scikit-learn's digits at 32 px (1,437 train / 360
val images; ``vit_calibration.PlainDigits``, the teacher cache and settings of
examples/bench_accuracy.py under runs/accuracy/teachers/). Then ``auto``: top-1 of the teacher, of
the converted model, after ``partialize.calibrate`` on 512 unlabelled images (no labels, no
fine-tuning), and after ``--ft`` epochs of KD fine-tuning from the calibrated start; MACs (inference
form, 32 px) beside. Threads: ``--threads`` (2) for everything.

    .venv/bin/python examples/auto_calibration.py [--models densenet121,resnet50,fastvit_t8] [--json F]
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_accuracy as ba  # noqa: E402  (the benchmark's teacher cache and helpers)
from vit_calibration import PlainDigits, write_result  # noqa: E402

import partialize  # noqa: E402
from partialize.calibration import calibrate_model  # noqa: E402
from partialize.train import finetune  # noqa: E402


def run_model(model: str, args, bargs, data) -> dict:
    spec = {"model": model, "kwargs": {}, "epochs": args.epochs}
    teacher, meta = ba.teacher_for(f"{model}_digits", spec, data, bargs)
    t_acc, t_macs = ba.acc(teacher, data), ba.macs(teacher)
    converted = partialize.apply(teacher, args.recipe, input_size=32).eval()
    plan = converted._partialize_plan
    row = {
        "model": model,
        "teacher_top1": t_acc,
        "teacher_train_seconds": meta.get("train_seconds"),
        "recipe": args.recipe,
        "converted": dict(collections.Counter(e.variant for e in plan.converted)),
        "macs_ratio": ba.macs(converted) / t_macs,
        "converted_top1": ba.acc(converted, data),
    }
    ba.say(f"{model}: teacher {t_acc:.2f}%, {row['converted']}, MACs {row['macs_ratio']:.3f}x, "
           f"converted {row['converted_top1']:.2f}%")  # fmt: skip
    cal = calibrate_model(converted, teacher, data.calib, images=bargs.calib_images, seed=bargs.seed)
    row.update(
        calibrated_top1=ba.acc(cal.model, data),
        calibrate_seconds=cal.seconds,
        agreement_before=cal.before.agreement,
        agreement_after=cal.after.agreement,
        notes=cal.notes,
    )
    row["kept_of_teacher"] = row["calibrated_top1"] / t_acc
    ba.say(f"{model}: calibrated {row['calibrated_top1']:.2f}% ({100 * row['kept_of_teacher']:.1f}% of the "
           f"teacher) in {cal.seconds:.0f} s")  # fmt: skip
    row["kd"] = []
    for item in [f for f in args.ft.split(",") if f]:
        epochs, lr = int(item.split("@")[0]), float(item.split("@")[1])
        res = finetune(
            copy.deepcopy(cal.model), data.loader("ft", bargs.ft_batch), data.val, teacher=teacher, epochs=epochs,
            lr=lr, seed=bargs.seed, progress=False, log=None,
        )  # fmt: skip
        row["kd"].append({"epochs": epochs, "lr": lr, "top1": res.final_top1})
        ba.say(f"{model}: after {epochs} epoch(s) of KD at lr {lr:g}: {res.final_top1:.2f}%")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="densenet121,resnet50,fastvit_t8", help="comma-separated timm models")
    ap.add_argument("--recipe", default="auto")
    ap.add_argument("--epochs", type=int, default=15, help="teacher epochs (default 15)")
    ap.add_argument("--ft", default="1@5e-4", help="KD fine-tunes from the calibrated start, EPOCHS@LR each")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="docs/auto_calibration.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bargs = argparse.Namespace(
        teacher_renders=8, ft_renders=4, val_renders=4, calib_images=512, seed=0, teacher_lr=2e-3,
        runs="runs/accuracy", ft_lr=5e-4, ft_batch=64,
    )  # fmt: skip
    data = PlainDigits(bargs)
    t0 = time.perf_counter()
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}",
        "threads": args.threads,
        "data": data.describe(),
        "rows": [run_model(m, args, bargs, data) for m in args.models.split(",") if m],
    }
    write_result(out, args.json, t0)


if __name__ == "__main__":
    main()
