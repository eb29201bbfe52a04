"""What the two shipped ResNet50 recipes cost in accuracy on a small task that runs here.

torchvision ResNet50 (random init, 10 classes) is trained on scikit-learn's digits (8x8 upsampled to
32x32), converted with ``resnet50-patconv`` (000 Table 4) and with ``resnet50-partial`` (Table 4 plus
partial residual blocks), and each converted copy is fine-tuned with distillation from the original
for the same epochs. A toy proxy, not ImageNet: it says whether the weights inherited by each recipe
fine-tune back, not what either would score on ImageNet.

    .venv/bin/python examples/digits_resnet50_recipes.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import partialize
from partialize.train import finetune
from partialize.train.data import digits_tensors, make_train_loader
from partialize.train.finetune import evaluate


def accuracy(model: torch.nn.Module, val: DataLoader) -> float:
    return evaluate(model, val, torch.device("cpu"))["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs-teacher", type=int, default=15)
    ap.add_argument("--epochs-finetune", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    xt, yt, xv, yv = digits_tensors(size=args.size, seed=args.seed)
    print(f"digits {args.size}x{args.size}: {len(yt)} train / {len(yv)} val; {args.threads} threads")
    train = make_train_loader(TensorDataset(xt, yt), 64, args.seed)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256)
    common = dict(progress=False, log=None, seed=args.seed, label_smoothing=0.1, weight_decay=0.05, warmup_epochs=1)

    torch.manual_seed(args.seed)
    teacher = torchvision.models.resnet50(num_classes=10)
    t0 = time.perf_counter()
    finetune(teacher, train, val, epochs=args.epochs_teacher, lr=2e-3, **common)
    teacher.eval()
    acc_t = accuracy(teacher, val)
    print(f"teacher: {args.epochs_teacher} epochs in {time.perf_counter() - t0:.0f}s, top-1 {acc_t:.2f}%")
    rows = [("original", 1.0, acc_t, acc_t)]
    for recipe in ("resnet50-patconv", "resnet50-partial"):
        conv = partialize.apply(teacher, recipe, input_size=args.size)
        plan = conv._partialize_plan
        before = accuracy(conv, val)
        t0 = time.perf_counter()
        finetune(conv, train, val, teacher=teacher, epochs=args.epochs_finetune, lr=1e-3, kd_temperature=4.0,
                 kd_weight=0.5, **common)  # fmt: skip
        after = accuracy(conv, val)
        ratio = plan.macs_after / plan.macs_before
        print(f"{recipe}: MACs {ratio:.3f}x, top-1 {before:.2f}% -> {after:.2f}% after {args.epochs_finetune} "
              f"epochs of KD fine-tuning ({time.perf_counter() - t0:.0f}s)")  # fmt: skip
        rows.append((recipe, ratio, before, after))
    print(f"\n| model | MACs ratio | top-1 before fine-tuning | after {args.epochs_finetune} epochs KD |")
    print("|---|---|---|---|")
    for name, ratio, before, after in rows:
        print(f"| {name} | {ratio:.3f} | {before:.2f}% | {after:.2f}% |")
    print(f"({len(yv)} validation images: one image = {100 / len(yv):.2f} points; seed {args.seed})")


if __name__ == "__main__":
    main()
