"""What deployment buys: original network vs converted (training form) vs converted (deployed), CPU.

For each case three models are timed side by side (``measure_speed`` with all three in one dict, so
their rounds interleave and share the machine's noise): the original network in inference form
(``partialize.deploy``: BN folded), the converted network as trained (eval mode, no folding) and the
converted network deployed. Latency at batch 1 and throughput at ``--batch``, fp32, NCHW, medians over
interleaved rounds. MACs are multiply-adds (partialize.macs) of each timed model at batch 1; the relative
error column is the deployed model against the eval-mode trained one on the same random input.

PartialNet has no "original": its row uses timm's FasterNet of the same tier (deployed), the network
the fasternet-to-partialnet recipe starts from.

    .venv/bin/python examples/bench_deploy.py --threads 1 --batch 16 --json docs/deploy_bench.json
"""

from __future__ import annotations

import argparse
import json

import timm
import torch

import partialize
from partialize.inference import eval_reference
from partialize.measure.flops import model_macs
from partialize.measure.opbench import machine_description
from partialize.measure.speed import measure_speed

CASES = [
    ("resnet50", "resnet50-patconv"),
    ("mobilenetv2_100", "mobilenetv2-patconv"),
    ("partialnet_t2", None),  # native; original = fasternet_t2
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def build(name: str, recipe: str | None, size: int) -> dict[str, torch.nn.Module]:
    """The three models of one case: original (deployed), converted (training form), converted (deployed)."""
    torch.manual_seed(0)
    if recipe is None:
        original = timm.create_model(name.replace("partialnet", "fasternet"), pretrained=False)
        converted = timm.create_model(name, pretrained=False)
    else:
        original = timm.create_model(name, pretrained=False)
        converted = partialize.apply(original, recipe, input_size=size)
    return {
        "original (deployed)": partialize.deploy(original.eval()),
        "converted (training form)": converted.eval(),
        "converted (deployed)": partialize.deploy(converted),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", dest="json_path", help="also write the figures as JSON")
    args = ap.parse_args()

    machine = machine_description(args.threads)
    print(f"{machine}; batch 1 latency and batch {args.batch} throughput, fp32 NCHW, {args.rounds} rounds")
    results = []
    for name, recipe in CASES:
        label = f"{name} + {recipe}" if recipe else f"{name} (original: {name.replace('partialnet', 'fasternet')})"
        print(f"\n== {label}", flush=True)
        models = build(name, recipe, args.size)
        x1 = torch.randn(1, 3, args.size, args.size)
        xb = torch.randn(4, 3, args.size, args.size)
        with torch.no_grad():
            err = _rel(models["converted (deployed)"](xb), eval_reference(models["converted (training form)"])(xb))
        macs = {n: model_macs(m, x1) / 1e9 for n, m in models.items()}
        speed = measure_speed(
            models,
            args.size,
            threads=args.threads,
            batch=args.batch,
            channels_last=False,
            rounds=args.rounds,
            progress=lambda s: print(f"  {s}", flush=True),
        )
        base = speed["models"]["original (deployed)"]
        for n, s in speed["models"].items():
            lat, thr = s["latency_ms"]["median"], s["throughput_ips"]["median"]
            print(
                f"  {n:27s} MACs {macs[n]:6.3f} G  latency {lat:8.2f} ms "
                f"(x{base['latency_ms']['median'] / lat:.2f})  throughput {thr:7.2f} img/s "
                f"(x{thr / base['throughput_ips']['median']:.2f})"
            )
        print(f"  deployed vs trained (eval) max relative error: {err:.2e}")
        results.append(
            {"case": label, "macs_G": macs, "deploy_rel_err": err, "speed": speed, "conditions": speed["conditions"]}
        )
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
        print(f"\nwrote {args.json_path}")


if __name__ == "__main__":
    main()
