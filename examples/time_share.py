"""How much of a model's CPU time sits in the layers a recipe converts, and the speed-up bound that
implies (if the converted layers cost nothing): a better ceiling than 1 / MACs ratio on CPU, where
3x3 convs run at more MACs per second than 1x1 convs. Also measures the actual speed-up of the
deployed converted model against the deployed original (alternating calls, medians).

    .venv/bin/python examples/time_share.py resnet50 resnet50-patconv --batch 16 --threads 1 [--channels-last]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import partialize


def time_share(model_name: str, recipe: str, batch: int, channels_last: bool, reps: int = 3) -> dict:
    model = timm.create_model(model_name, pretrained=False).eval()
    plan = partialize.plan(model, recipe)
    original = partialize.deploy(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    original = original.to(memory_format=fmt)
    spent, start = [0.0], {}

    def pre(mod, inp):
        start[id(mod)] = time.perf_counter()

    def post(mod, inp, out):
        spent[0] += time.perf_counter() - start[id(mod)]

    for e in plan.converted_outermost:
        mod = original.get_submodule(e.layer)
        mod.register_forward_pre_hook(pre)
        mod.register_forward_hook(post)
    x = torch.randn(batch, *plan.input_shape[1:]).contiguous(memory_format=fmt)
    with torch.inference_mode():
        original(x)  # warm-up
        spent[0], total = 0.0, 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            original(x)
            total += time.perf_counter() - t0
    share = spent[0] / total
    converted = partialize.deploy(partialize.apply(model, recipe)).to(memory_format=fmt)
    plain = partialize.deploy(model).to(memory_format=fmt)
    with torch.inference_mode():  # steady state, alternating calls, medians
        plain(x), converted(x)
        ta, tb = [], []
        for _ in range(reps + 2):
            for mod, out in ((plain, ta), (converted, tb)):
                t0 = time.perf_counter()
                mod(x)
                out.append(time.perf_counter() - t0)
    return {
        "time_share": share,
        "macs_share": plan.converted_macs_share(),
        "bound": 1 / (1 - share),
        "macs_limit": plan.macs_before / plan.macs_after,
        "orig_s": statistics.median(ta),
        "conv_s": statistics.median(tb),
        "speedup": statistics.median(ta) / statistics.median(tb),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = time_share(args.model, args.recipe, args.batch, args.channels_last)
    layout = "NHWC" if args.channels_last else "NCHW"
    print(
        f"{args.model} / {args.recipe}, batch {args.batch}, {args.threads} thread(s), {layout}: converted layers hold "
        f"{r['macs_share']:.1%} of the MACs and {r['time_share']:.1%} of the time (deployed original); "
        f"speed-up bound if they cost nothing {r['bound']:.2f}x (1 / MACs ratio would say {r['macs_limit']:.2f}x); "
        f"measured (deployed, alternating calls, medians): {r['orig_s']:.3f} s -> {r['conv_s']:.3f} s per batch, "
        f"{r['speedup']:.2f}x = {r['speedup'] / r['bound']:.0%} of that bound"
    )


if __name__ == "__main__":
    main()
