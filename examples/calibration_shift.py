"""BN statistics in calibration, re-estimated ("bn") or matched to the original's ("bn_match"), when
the calibration images are not drawn like the training images.

The accuracy benchmark's ResNet-18 teacher (examples/bench_accuracy.py, cached under runs/) and its
calibration images, as they are and shifted as another camera would shift them (contrast x0.6,
brightness +0.5 in normalised units, a 3x3 box blur), two recipes, each calibrated with the default
steps (channel choice, BN, 200 distillation steps per block) and 512 images, either BN step. Top-1 on
the benchmark's 1,440 unshifted validation images. One seed: one image is 0.07 points. 2 threads.

    .venv/bin/python examples/calibration_shift.py --json docs/calibration_shift.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_accuracy as bench  # noqa: E402  (the benchmark's data, teacher cache and settings)

import partialize  # noqa: E402
from partialize.calibration import calibrate_model  # noqa: E402

RECIPES = ("examples/recipes/resnet18-partial-residual.yaml", "default")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="docs/calibration_shift.json")
    cli = ap.parse_args()
    args = bench.parser().parse_args([])
    data, teacher, meta = bench.resnet18_setup(args)
    x = data.calib
    shifts = {"as trained": x, "contrast x0.6": 0.6 * x, "brightness +0.5": x + 0.5,
              "3x3 blur": F.avg_pool2d(x, 3, 1, 1)}  # fmt: skip
    out = {"teacher_top1": meta["val_top1_now"], "threads": args.train_threads, "images": args.calib_images,
           "rows": []}  # fmt: skip
    for recipe in RECIPES:
        converted = partialize.apply(teacher, recipe, input_size=bench.SIZE).eval()
        for shift, images in shifts.items():
            for bn in ("bn", "bn_match"):
                res = calibrate_model(converted, teacher, images, images=args.calib_images,
                                      use=("channels", bn, "distil"), seed=args.seed)  # fmt: skip
                top1 = bench.acc(res.model.eval(), data)
                out["rows"].append({"recipe": recipe, "images": shift, "bn": bn, "top1": top1,
                                    "seconds": res.seconds})  # fmt: skip
                bench.say(f"{recipe} | {shift} | {bn}: {top1:.2f}% ({res.seconds:.0f} s)")
    with open(cli.json, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
