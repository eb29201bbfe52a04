"""Does any change to the 1-epoch KD fine-tune separate partialize from Torch-Pruning at equal speed?

The accuracy benchmark (examples/bench_accuracy.py) gives every row the same fine-tune. This script
takes its ResNet-18 teacher and two of its rows, partialize's calibrated
``examples/recipes/resnet18-partial-residual.yaml`` and Torch-Pruning (magnitude) at the same measured
speed, and fine-tunes both for 1 epoch under variants of that fine-tune, each with several data
orders (``--seeds``), so that a difference can be told from noise:

- the peak lr, from the same grid for both (each contender's best is what a user would pick);
- feature distillation at the block outputs (relative squared error to the teacher's block output,
  added to the loss with weight 1): partialize's blocks keep the teacher's shapes, so the teacher's
  features are direct targets; the pruned blocks are thinner and get a 1x1 adapter each (FitNets),
  started by least squares on the calibration images and trained with the model;
- BN statistics frozen during the fine-tune (the calibrated model's were set by calibration);
- 600 distillation steps per block in calibration instead of 200.

Not timed: the two models' speeds are the benchmark's (``--pruned-ratio`` is its equal-speed ratio).
Writes ``--json``. 2 threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_accuracy as bench  # noqa: E402  (the benchmark's data, teacher cache and settings)

import partialize  # noqa: E402
from partialize.calibration import calibrate_model  # noqa: E402
from partialize.measure.pruning import prune_to_ratio  # noqa: E402
from partialize.train import finetune  # noqa: E402
from partialize.train.callbacks import Callback  # noqa: E402

RECIPE = "examples/recipes/resnet18-partial-residual.yaml"
BLOCKS = [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]


def _hook(store: dict, name: str, detach: bool):
    def fn(_m, _i, out):
        store[name] = out.detach() if detach else out

    return fn


class FeatureKD(Callback):
    """Adds ``weight * mean over blocks of ||a(s) - t||^2 / ||t||^2`` to the training loss, where ``s``
    and ``t`` are the student's and the teacher's block outputs and ``a`` the student's adapter for
    that block (``model.feature_adapters``, identity when the model has none)."""

    def __init__(self, teacher: nn.Module, names: list[str], weight: float) -> None:
        self.teacher, self.names, self.weight = teacher, names, weight
        self.s: dict = {}
        self.t: dict = {}
        self.handles: list = []

    def on_train_start(self, t) -> None:
        for n in self.names:
            self.handles.append(t.raw.get_submodule(n).register_forward_hook(_hook(self.s, n, False)))
            self.handles.append(self.teacher.get_submodule(n).register_forward_hook(_hook(self.t, n, True)))

    def on_task_loss(self, t, x, logits, task):
        if not t.raw.training:
            return task
        adapters = getattr(t.raw, "feature_adapters", None)
        loss = 0.0
        for n in self.names:
            s = adapters[n.replace(".", "_")](self.s[n]) if adapters is not None else self.s[n]
            loss = loss + ((s - self.t[n]) ** 2).mean() / (self.t[n] ** 2).mean().clamp_min(1e-8)
        return task + self.weight * loss / len(self.names)

    def on_train_end(self, t) -> None:
        for h in self.handles:
            h.remove()


def add_adapters(student: nn.Module, teacher: nn.Module, names: list[str], images: torch.Tensor) -> None:
    """FitNets adapters: a 1x1 conv per block from the student's channels to the teacher's, started at
    the least-squares fit of the teacher's block output on the student's over ``images``."""
    fs: dict = {}
    ft: dict = {}
    hs = [student.get_submodule(n).register_forward_hook(_hook(fs, n, True)) for n in names]
    hs += [teacher.get_submodule(n).register_forward_hook(_hook(ft, n, True)) for n in names]
    with torch.no_grad():
        student.eval()(images)
        teacher.eval()(images)
    for h in hs:
        h.remove()
    adapters = nn.ModuleDict()
    for n in names:
        s, t = fs[n], ft[n]
        x = s.permute(0, 2, 3, 1).reshape(-1, s.shape[1])
        y = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
        w = torch.linalg.lstsq(torch.cat([x, torch.ones(x.shape[0], 1)], 1), y).solution
        conv = nn.Conv2d(s.shape[1], t.shape[1], 1)
        with torch.no_grad():
            conv.weight.copy_(w[:-1].T.reshape(t.shape[1], s.shape[1], 1, 1))
            conv.bias.copy_(w[-1])
        adapters[n.replace(".", "_")] = conv
    student.add_module("feature_adapters", adapters)


class FreezeBN(Callback):
    """BN layers in eval mode while training: running statistics stay as calibration left them."""

    def on_epoch_start(self, t, epoch: int) -> None:
        for m in t.raw.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4, help="data orders per variant (default 4)")
    ap.add_argument("--lrs", default="1e-4,2e-4,5e-4,1e-3", help="the peak-lr grid, both contenders")
    ap.add_argument("--pruned-ratio", type=float, default=None,
                    help="Torch-Pruning channel ratio at equal speed (default: read from --bench-json)")  # fmt: skip
    ap.add_argument("--bench-json", default="docs/bench_accuracy_r18_pr_seeds.json")
    ap.add_argument("--json", default="docs/kd_variants.json")
    cli = ap.parse_args()
    args = bench.parser().parse_args([])
    data, teacher, meta = bench.resnet18_setup(args)
    ratio, round_to = cli.pruned_ratio, 8
    if ratio is None:
        with open(cli.bench_json) as f:
            rows = json.load(f)["teachers"]["resnet18"]["rows"]
        chosen = next(r for r in rows if r.get("point") == "equal speed")["speed_search"]["chosen"]
        ratio, round_to = chosen["ratio"], chosen["round_to"]
    converted = partialize.apply(teacher, RECIPE, input_size=bench.SIZE).eval()
    calibrated = calibrate_model(converted, teacher, data.calib, images=args.calib_images, seed=args.seed).model.eval()
    pruned, _ = prune_to_ratio(teacher, ratio, bench.SIZE, importance="magnitude", images=data.calib_used,
                               round_to=round_to)  # fmt: skip
    out = {"teacher_top1": meta["val_top1_now"], "recipe": RECIPE, "pruned_ratio": ratio, "round_to": round_to,
           "calibrated_top1": bench.acc(calibrated, data), "pruned_top1": bench.acc(pruned.eval(), data),
           "threads": args.train_threads, "seeds": list(range(cli.seeds)), "variants": {}}  # fmt: skip
    bench.say(f"teacher {out['teacher_top1']:.2f}%, calibrated {out['calibrated_top1']:.2f}%, "
              f"pruned {out['pruned_top1']:.2f}%")  # fmt: skip
    s = bench.ft_settings(args)
    keys = ("lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "kd_weight", "kd_temperature")

    def run(name: str, start: nn.Module, callbacks=lambda model: [], prepare=None, **over) -> None:
        top1 = []
        for seed in range(cli.seeds):
            model = copy.deepcopy(start)
            if prepare is not None:
                prepare(model)
            res = finetune(model.train(), data.loader("ft", args.ft_batch, seed), data.val, teacher=teacher,
                           epochs=1, progress=False, log=None, seed=seed, callbacks=callbacks(model),
                           **({k: s[k] for k in keys} | over))  # fmt: skip
            top1.append(res.final_top1)
        out["variants"][name] = {"top1": top1, "mean": statistics.mean(top1), "std": statistics.stdev(top1)}
        bench.say(f"{name}: {statistics.mean(top1):.2f} +- {statistics.stdev(top1):.2f} ({top1})")
        with open(cli.json, "w") as f:
            json.dump(out, f, indent=1)

    for lr in (float(v) for v in cli.lrs.split(",")):
        run(f"calibrated, lr {lr:g}", calibrated, lr=lr)
        run(f"pruned, lr {lr:g}", pruned, lr=lr)
    run("calibrated, feature KD 1", calibrated, lambda m: [FeatureKD(teacher, BLOCKS, 1.0)])
    run("pruned, FitNets adapters + feature KD 1", pruned, lambda m: [FeatureKD(teacher, BLOCKS, 1.0)],
        prepare=lambda m: add_adapters(m, teacher, BLOCKS, data.calib_used))  # fmt: skip
    run("calibrated, BN frozen", calibrated, lambda m: [FreezeBN()])
    t0 = time.perf_counter()
    longer = calibrate_model(converted, teacher, data.calib, images=args.calib_images, seed=args.seed, steps=600)
    out["calibrated_600_steps_top1"] = bench.acc(longer.model.eval(), data)
    out["calibrated_600_steps_seconds"] = time.perf_counter() - t0
    run("calibrated with 600 distillation steps", longer.model.eval())


if __name__ == "__main__":
    main()
