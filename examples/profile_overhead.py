"""Where a converted model loses time against a pruned one at equal MACs: a torch.profiler breakdown by
op of the deployed original, the deployed converted model and the Torch-Pruning model pruned to the
same MACs, on one CPU thread.

    .venv/bin/python examples/profile_overhead.py --model resnet50 --recipe resnet50-partial --batch 16

Prints, per model: MACs, time per batch (median of interleaved rounds), the share of the
MACs-proportional limit reached (speed-up / (original MACs / MACs)), and self CPU time per aten op
(top ops), so "copies", "cat", "pooling", "statistics" can be read off; ``--md`` writes it as Markdown.
"""

from __future__ import annotations

import argparse
import collections

import timm
import torch

import partialize
from partialize.macs import count_macs
from partialize.measure.allocator import ALLOCATORS, use_allocator
from partialize.measure.pruning import prune_to_macs
from partialize.measure.speed import machine_description, op_self_times, time_side_by_side

GROUPS = {
    "conv": ("convolution", "mkldnn_convolution", "conv2d", "_convolution"),
    "matmul/linear": ("addmm", "mm", "linear", "matmul"),
    "copy (slice writes, clones)": ("copy_", "clone", "empty_like", "empty", "contiguous"),
    "cat / split": ("cat", "split", "narrow", "slice", "unsafe_split"),
    "elementwise (add, relu, mul, affine)": (
        "add",
        "add_",
        "relu",
        "relu_",
        "clamp_min",
        "clamp_min_",
        "mul",
        "mul_",
        "addcmul",
        "sigmoid",
        "hardsigmoid",
        "where",
    ),  # fmt: skip
    "pooling": ("avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "max_pool2d_with_indices", "mean"),
    "reductions (PAT_ch statistics)": ("sum", "var_mean", "square", "sqrt", "sub"),
}


def _group(op: str) -> str:
    name = op.split("::")[-1]
    for g, names in GROUPS.items():
        if name in names:
            return g
    return "other"


def profile_model(model: torch.nn.Module, x: torch.Tensor, iters: int = 5) -> dict[str, float]:
    """Self CPU time (ms per call) per op group, over ``iters`` calls after a warm-up."""
    per: dict[str, float] = collections.defaultdict(float)
    for op, ms in op_self_times(model, x, iters).items():
        per[_group(op)] += ms
    return dict(per)


def setup(args) -> tuple[torch.nn.Module, torch.Tensor, torch.nn.Module]:
    """(the timm model, a batch of input, the model converted with ``args.recipe``), with the allocator,
    threads and seed set for timing."""
    use_allocator(args.allocator)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    return base, x, partialize.apply(base, args.recipe, input_size=args.size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--recipe", default="resnet50-partial")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="system",
        help="reuse: keep freed memory in the heap for every model (partialize.measure.allocator)",
    )
    ap.add_argument(
        "--layout",
        choices=("nchw", "channels_last"),
        default="nchw",
        help="channels_last: every deployed model's weights in NHWC (the input stays NCHW, as a user gives it)",
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-profile", action="store_true", help="times only, no per-op breakdown")
    ap.add_argument("--md", help="write the tables as Markdown here")
    args = ap.parse_args()
    base, x, converted = setup(args)
    macs = {
        "original": count_macs(base, x[:1]).total,
        "converted": count_macs(partialize.deploy(converted), x[:1]).total,
    }
    pruned, _ = prune_to_macs(base, macs["converted"], args.size)
    macs["pruned"] = count_macs(pruned, x[:1]).total
    models = {"original": partialize.deploy(base), "converted": partialize.deploy(converted),
              "pruned": partialize.deploy(pruned)}  # fmt: skip
    if args.layout == "channels_last":
        models = {n: m.to(memory_format=torch.channels_last) for n, m in models.items()}
    t = time_side_by_side({n: (lambda m=m: m(x)) for n, m in models.items()}, rounds=args.rounds, min_round_s=0.2)
    prof = {} if args.no_profile else {n: profile_model(m, x) for n, m in models.items()}
    lines = [f"{machine_description(args.threads)}; batch {args.batch}, {args.size} px, deployed forms, "
             f"allocator {args.allocator}, layout {args.layout}, {args.rounds} rounds", ""]  # fmt: skip
    lines += ["| model | MACs (G) | ms / batch (IQR) | speed-up | MACs limit | reached |", "|---|---|---|---|---|---|"]
    for n in models:
        sp = t["original"].median_s / t[n].median_s
        limit = macs["original"] / macs[n]
        lines.append(f"| {n} | {macs[n] / 1e9:.3f} | {t[n].median_s * 1e3:.1f} ({t[n].iqr_s / t[n].median_s:.0%}) | "
                     f"{sp:.2f}x | {limit:.2f}x | {sp / limit:.0%} |")  # fmt: skip
    if prof:
        groups = sorted({g for p in prof.values() for g in p}, key=lambda g: -prof["converted"].get(g, 0))
        lines += ["", "| self CPU ms per batch | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        for g in groups:
            lines.append(f"| {g} | " + " | ".join(f"{prof[n].get(g, 0):.1f}" for n in models) + " |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
