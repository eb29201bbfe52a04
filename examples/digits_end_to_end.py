"""End to end on real data: scikit-learn's bundled handwritten digits (1797 8x8 images, upsampled).

Part 1: train a small ResNet teacher, convert it with a recipe (PConv 1/2 on every eligible 3x3
conv), fine-tune the converted model with distillation from the teacher, and print accuracy, MACs
and CPU speed before vs after. Target: at most 1 point of accuracy lost at no more than 0.6x MACs.

Part 2: the shape of the Ada-FasterNet experiment (004): a tiny FasterNet-style model with PConv 1/4
vs Ada-PConv {1/8, 1/4, 1/2} (and Ada-PConv with a router compute budget), same init, data and
epochs, trained from scratch; accuracy and the MACs each really spends at inference (hard routing).

    .venv/bin/python examples/digits_end_to_end.py [--threads 2] [--epochs-teacher 15] ...
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import partialize
from partialize.measure.flops import macs_breakdown
from partialize.measure.report import build_report
from partialize.train import finetune, freeze_dynamic
from partialize.train.data import digits_tensors, make_train_loader

RECIPE = {
    "version": 1,
    "name": "digits-resnet-pconv-half",
    "description": "every eligible 3x3 conv -> PConv 1/2",
    "defaults": {"variant": "pconv", "ratio": 0.5},
    "rules": [{"select": {"type": "Conv2d", "kernel": 3, "groups": "dense"}}],
    "strict": False,
}


class Basic(nn.Module):
    """ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


def small_resnet(widths=(16, 32, 64), blocks: int = 2, num_classes: int = 10) -> nn.Module:
    layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(Basic(cin, w, 2 if (i > 0 and b == 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


class FasterBlock(nn.Module):
    """FasterNet block: spatial mixer (3x3 conv, to be made partial) -> 1x1 expand, BN, ReLU -> 1x1."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mixer = nn.Conv2d(dim, dim, 3, 1, 1, bias=False)
        self.mlp = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 1, bias=False),
            nn.BatchNorm2d(2 * dim),
            nn.ReLU(),
            nn.Conv2d(2 * dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.mixer(x))


def tiny_fasternet(dims=(32, 64, 128), depth: int = 2, num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 2, 2, bias=False), nn.BatchNorm2d(dims[0])]
    for i, d in enumerate(dims):
        if i:
            layers += [nn.Conv2d(dims[i - 1], d, 2, 2, bias=False), nn.BatchNorm2d(d)]
        layers += [FasterBlock(d) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dims[-1], num_classes)]
    return nn.Sequential(*layers)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs-teacher", type=int, default=15)
    ap.add_argument("--epochs-finetune", type=int, default=10)
    ap.add_argument("--epochs-ada", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ada", action="store_true")
    ap.add_argument("--only-ada", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xt, yt, xv, yv = digits_tensors(size=args.size, seed=args.seed)
    print(f"digits {args.size}x{args.size}: {len(yt)} train / {len(yv)} val; {args.threads} threads")
    train = make_train_loader(TensorDataset(xt, yt), 64, args.seed)
    val = DataLoader(TensorDataset(xv, yv), batch_size=512)
    common = dict(progress=False, log=None, seed=args.seed, label_smoothing=0.1)
    chw = (3, args.size, args.size)

    if not args.only_ada:
        part1(args, train, val, xv, yv, common, chw)
    if not args.skip_ada:
        part2(args, train, val, xv, yv, common, chw)


def part1(args, train, val, xv, yv, common, chw) -> None:
    """Teacher -> convert -> fine-tune with distillation, before vs after."""
    torch.manual_seed(args.seed)
    teacher = small_resnet()
    t0 = time.perf_counter()
    finetune(teacher, train, val, epochs=args.epochs_teacher, lr=3e-3, warmup_epochs=1, weight_decay=0.05, **common)
    print(f"teacher: {args.epochs_teacher} epochs in {time.perf_counter() - t0:.0f}s")
    teacher.eval()
    converted = partialize.apply(teacher, RECIPE, input_size=args.size)
    plan = converted._partialize_plan
    acc_teacher = accuracy(teacher, xv, yv)
    acc_converted = accuracy(converted, xv, yv)
    t0 = time.perf_counter()
    finetune(converted, train, val, teacher=teacher, epochs=args.epochs_finetune, lr=1e-3, warmup_epochs=1,
             kd_temperature=4.0, kd_weight=0.5, weight_decay=0.05, **common)  # fmt: skip
    print(f"fine-tune (KD from the teacher): {args.epochs_finetune} epochs in {time.perf_counter() - t0:.0f}s")
    acc_ft = accuracy(converted, xv, yv)
    frozen = copy.deepcopy(converted).eval()
    freeze_dynamic(frozen)
    rep = build_report(frozen, name="converted+finetuned", input_size=chw, baseline=teacher,
                       baseline_name="teacher", speed=True, threads=1, batch=64)  # fmt: skip
    b, m = rep.baseline, rep.model
    print(f"\nconverted {len(plan.converted)} of {len(plan.entries)} matched 3x3 convs (PConv 1/2)")
    print(f"{'':24s}{'top-1 %':>9s}{'MACs':>12s}{'params':>10s}{'latency ms':>12s}{'img/s':>9s}")
    for name, acc, mm in (("teacher", acc_teacher, b), ("converted, fine-tuned", acc_ft, m)):
        lat, thr = mm.speed["latency_ms"]["median"], mm.speed["throughput_ips"]["median"]
        print(f"{name:24s}{acc:9.2f}{mm.macs:12,.0f}{mm.params_total:10,d}{lat:12.3f}{thr:9.0f}")
    print(f"converted, before fine-tuning: top-1 {acc_converted:.2f}%")
    lost, ratio = acc_teacher - acc_ft, m.macs / b.macs
    verdict = "MET" if lost <= 1.0 and ratio <= 0.6 else "NOT MET"
    print(f"accuracy lost {lost:+.2f} points at {ratio:.3f}x the MACs (target: <= 1 point at <= 0.6x): {verdict}")
    sp = rep.ratios.get("converted+finetuned", rep.ratios)
    print(f"speed vs teacher (1 thread; latency batch 1, throughput batch 64): {sp}")


def part2(args, train, val, xv, yv, common, chw) -> None:
    """PConv vs Ada-PConv on a tiny FasterNet-style model (004's experiment shape)."""
    print("\nAda-FasterNet shape (004): same init, data and epochs; AdamW lr 1e-3, wd 1e-2, batch 64")
    torch.manual_seed(args.seed + 1)
    base = tiny_fasternet()
    runs = {
        "PConv 1/4": partialize.apply(base, ratio=0.25, input_size=args.size),
        "Ada-PConv {1/8,1/4,1/2}": partialize.apply(base, ratio="adaptive", input_size=args.size),
        "Ada-PConv + budget 0.25": partialize.apply(base, ratio="adaptive", input_size=args.size),
        "Ada-PConv, ste routing": partialize.apply(base, ratio="adaptive", input_size=args.size),
        "Ada-PConv, ste + budget 0.25": partialize.apply(base, ratio="adaptive", input_size=args.size),
    }
    dense_macs = macs_breakdown(base, chw, crosscheck=False)["total"]
    print(f"dense tiny model: {dense_macs:,.0f} MACs")
    for name, model in runs.items():
        t0 = time.perf_counter()
        budget = 0.25 if "budget" in name else None
        routing = "ste" if "ste" in name else "soft"
        r = finetune(model, train, val, epochs=args.epochs_ada, lr=1e-3, weight_decay=1e-2, warmup_epochs=0,
                     router_budget=budget, ada_routing=routing, **common)  # fmt: skip
        secs = time.perf_counter() - t0
        model.eval()
        inf = copy.deepcopy(model)
        freeze_dynamic(inf)  # Ada-PConv -> hard routing
        mb = macs_breakdown(inf, chw, calibration=xv, crosscheck=False)  # routed on the real val images
        hist = r.history[-1].get("branch_histogram")
        tot = [sum(v) for v in zip(*hist.values())] if hist else None
        print(f"{name:30s} top-1 {accuracy(inf, xv, yv):6.2f}%  inference MACs {mb['total']:12,.0f} "
              f"({mb['total'] / dense_macs:.3f}x dense)  train {secs:5.0f}s"
              + (f"  val branch histogram (all layers) {tot}" if tot else ""))  # fmt: skip


if __name__ == "__main__":
    main()
