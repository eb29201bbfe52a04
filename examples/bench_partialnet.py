"""Side-by-side CPU benchmark: PartialNet vs timm's FasterNet of the same tier, both in deploy form.

For each tier (t0 ... l) both models are built with random weights, put in inference form with
``partialize.deploy`` (BN folded into convs for both; PartialNet's PAT_ch BN folded into its
gate and PAT_sp merged into the MLP conv) and FasterNet is built with ``pconv_fw_type="slicing"``,
its own inference forward. Then, at 224x224:

- latency: batch 1, ``torch.set_num_threads(1)``;
- throughput: batch 16, ``torch.set_num_threads(--threads)``;

each timed with ``partialize.measure.speed.time_side_by_side`` (the two models interleaved round by
round, medians). Params (training form) and MACs (partialize.macs, deploy form) are printed alongside.

    python examples/bench_partialnet.py --rounds 7 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import sys

import timm
import torch

import partialize  # noqa: F401  (registers partialnet_*)
from partialize.inference import deploy, find_conv_bn_pairs
from partialize.measure.flops import count_params, model_macs
from partialize.measure.opbench import machine_description
from partialize.measure.speed import time_side_by_side

TIERS = ("t0", "t1", "t2", "s", "m", "l")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def bench_tier(tier: str, rounds: int, threads: int, batch: int) -> dict:
    """Measure one tier; returns a dict of counts and timings for both models."""
    torch.manual_seed(0)
    models = {
        "partialnet": timm.create_model(f"partialnet_{tier}", pretrained=False),
        "fasternet": timm.create_model(f"fasternet_{tier}", pretrained=False, pconv_fw_type="slicing"),
    }
    row: dict = {"tier": tier}
    deployed = {}
    x1 = torch.randn(1, 3, 224, 224)
    for name, m in models.items():
        m.eval()
        d = deploy(m)
        with torch.inference_mode():
            err = _rel(d(x1), m(x1))
        deployed[name] = d
        row[name] = {
            "params_M": count_params(m) / 1e6,
            "macs_G_deploy": model_macs(d, x1) / 1e9,
            "bn_folded": len(find_conv_bn_pairs(m)),
            "deploy_rel_err": err,
        }
    xb = torch.randn(batch, 3, 224, 224)
    torch.set_num_threads(1)
    lat = time_side_by_side(
        {n: (lambda d=d: d(x1)) for n, d in deployed.items()}, rounds=rounds, warmup=2, min_round_s=0.3
    )
    torch.set_num_threads(threads)
    thr = time_side_by_side(
        {n: (lambda d=d: d(xb)) for n, d in deployed.items()}, rounds=rounds, warmup=1, min_round_s=0.0
    )
    for n in deployed:
        row[n]["latency_ms_b1_1thread"] = lat[n].median_s * 1e3
        row[n]["latency_iqr_ms"] = lat[n].iqr_s * 1e3
        row[n][f"throughput_img_s_b{batch}_{threads}threads"] = batch / thr[n].median_s
        row[n]["throughput_iqr_s_per_batch"] = thr[n].iqr_s
    row["latency_ratio_pn_over_fn"] = lat["partialnet"].median_s / lat["fasternet"].median_s
    row["throughput_ratio_pn_over_fn"] = thr["fasternet"].median_s / thr["partialnet"].median_s
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for the batch throughput run (1: robust on a shared machine)",
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rows = []
    print(f"# machine: {machine_description(1)} (latency) / {args.threads} threads (throughput)")
    for tier in args.tiers:
        row = bench_tier(tier, args.rounds, args.threads, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    tk = f"throughput_img_s_b{args.batch}_{args.threads}threads"
    print()
    print(
        "| tier | model | params (M) | MACs (G, deploy) | latency b1 1 thr (ms) | "
        f"throughput b{args.batch} {args.threads} thr (img/s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        for n in ("partialnet", "fasternet"):
            d = r[n]
            print(
                f"| {r['tier']} | {n}_{r['tier']} | {d['params_M']:.2f} | {d['macs_G_deploy']:.3f} | "
                f"{d['latency_ms_b1_1thread']:.1f} | {d[tk]:.1f} |"
            )
        print(
            f"| {r['tier']} | ratio PN/FN | | | {r['latency_ratio_pn_over_fn']:.2f}x latency | "
            f"{r['throughput_ratio_pn_over_fn']:.2f}x throughput |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"machine": machine_description(1), "threads_throughput": args.threads, "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
