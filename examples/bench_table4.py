"""Benchmark the shipped 000 Table 4 recipes (and resnet50-partial, which goes beyond Table 4) on
CPU: MACs ratio, throughput (batch 16) and latency (batch 1) ratios against the original, and the
share of the MACs-proportional limit reached.

Both sides are in inference form (``partialize.deploy``: BN folded, operators deployed) and are
timed side by side (interleaved rounds, medians). Also times conversion (trace + plan + apply) of
resnet50, cold (first call in the process) and warm.

    .venv/bin/python examples/bench_table4.py --threads 1 --md docs/bench_table4.md
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import partialize
from partialize.inference import deploy
from partialize.measure.flops import model_macs
from partialize.measure.opbench import machine_description
from partialize.measure.speed import measure_speed

CASES = [
    ("resnet50", "resnet50-patconv"),
    ("resnet50", "resnet50-pconv-only"),
    ("resnet50", "resnet50-partial"),
    ("mobilenetv2_100", "mobilenetv2-patconv"),
    ("convnext_tiny", "convnext_tiny-patconv"),
]


def pconv_only_resnet50():
    """resnet50-patconv without the attention: PConv everywhere (to price PAT_ch)."""
    rec = partialize.recipe.load_recipe("resnet50-patconv").model_dump(mode="json", exclude_none=True)
    rec["name"] = "resnet50-pconv-only"
    rec["defaults"]["variant"] = "pconv"
    rec["rules"][0]["params"] = {}
    return rec


def conversion_time(reps: int = 5) -> dict:
    model = timm.create_model("resnet50", pretrained=False).eval()
    t0 = time.perf_counter()
    partialize.apply(model, "resnet50-patconv")
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        partialize.apply(model, "resnet50-patconv")
        warm.append(time.perf_counter() - t0)
    return {"cold_s": cold, "warm_median_s": statistics.median(warm), "warm_min_s": min(warm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--md", help="write a Markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    conv_t = conversion_time()
    print(
        f"conversion of resnet50 (trace + plan + apply): cold {conv_t['cold_s']:.2f} s, "
        f"warm median {conv_t['warm_median_s']:.3f} s"
    )
    rows = []
    for model_name, recipe in CASES:
        base = timm.create_model(model_name, pretrained=False).eval()
        rec = pconv_only_resnet50() if recipe == "resnet50-pconv-only" else recipe
        converted = partialize.apply(base, rec)
        a, b = deploy(base), deploy(converted)
        x = torch.randn(1, 3, 224, 224)
        macs_a, macs_b = model_macs(a, x), model_macs(b, x)
        mac_ratio = macs_b / macs_a
        limit = 1 / mac_ratio
        for channels_last in (False, True):
            r = measure_speed(
                {"original": a, "converted": b},
                224,
                threads=args.threads,
                batch=args.batch,
                rounds=args.rounds,
                channels_last=channels_last,
                min_round_s=0.05,
            )
            o, c = r["models"]["original"], r["models"]["converted"]
            row = {
                "model": model_name,
                "recipe": recipe,
                "layout": "NHWC" if channels_last else "NCHW",
                "macs_orig_g": macs_a / 1e9,
                "macs_conv_g": macs_b / 1e9,
                "mac_ratio": mac_ratio,
                "thr_orig": o["throughput_ips"]["median"],
                "thr_conv": c["throughput_ips"]["median"],
                "lat_orig": o["latency_ms"]["median"],
                "lat_conv": c["latency_ms"]["median"],
            }
            row["thr_ratio"] = row["thr_conv"] / row["thr_orig"]
            row["lat_speedup"] = row["lat_orig"] / row["lat_conv"]
            row["limit_share"] = row["thr_ratio"] / limit
            rows.append(row)
            r = row
            print(
                f"{model_name:16s} {recipe:22s} {r['layout']} MACs {r['macs_orig_g']:.3f} -> "
                f"{r['macs_conv_g']:.3f} G ({mac_ratio:.3f}x) | throughput b{args.batch} "
                f"{r['thr_orig']:.1f} -> {r['thr_conv']:.1f} img/s ({r['thr_ratio']:.2f}x, "
                f"{r['limit_share']:.0%} of the {limit:.2f}x limit) | latency b1 {r['lat_orig']:.1f} -> "
                f"{r['lat_conv']:.1f} ms ({r['lat_speedup']:.2f}x)",
                flush=True,
            )
    if args.md:
        machine = machine_description(args.threads)
        lines = [
            f"Machine: {machine}. Both models in inference form (BN folded, operators deployed), fp32, "
            "NCHW and channels_last (NHWC) layouts, "
            f"timed side by side in {args.rounds} interleaved rounds (medians). MACs = multiply-accumulates "
            "per image at 224x224 (partialize.macs). Limit = 1 / MACs ratio.",
            "",
            f"Conversion time of resnet50 with resnet50-patconv (trace + plan + apply, 224x224): "
            f"first call in a fresh process {conv_t['cold_s']:.2f} s, later calls median "
            f"{conv_t['warm_median_s']:.3f} s (min {conv_t['warm_min_s']:.3f} s).",
            "",
            f"| model | recipe | layout | GMACs orig -> conv | MACs ratio | throughput b{args.batch} (img/s) "
            "| ratio | share of limit | latency b1 (ms) | speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['recipe']} | {r['layout']} | {r['macs_orig_g']:.3f} -> "
                f"{r['macs_conv_g']:.3f} | "
                f"{r['mac_ratio']:.3f} | {r['thr_orig']:.1f} -> {r['thr_conv']:.1f} | {r['thr_ratio']:.2f}x | "
                f"{r['limit_share']:.0%} | {r['lat_orig']:.1f} -> {r['lat_conv']:.1f} | {r['lat_speedup']:.2f}x |"
            )
        with open(args.md, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
