"""Accuracy at equal measured speed: partialize against Torch-Pruning, on real data, one command.

For each teacher (timm resnet18, resnet50, mobilenetv2_100, optionally a ViT-Tiny), trained here from
scratch on ``partialize.datasets.hard_digits`` at 32 px (weights cached under runs/accuracy/teachers/):

- partialize: the recipe applied (a) as converted and (b) calibrated on 512 unlabelled train images;
- Torch-Pruning (one shot, uniform channel ratio, channels rounded to multiples of 8, classifier kept),
  magnitude and group-Taylor importance (Taylor: gradients of the cross-entropy against the teacher's
  argmax on the same 512 unlabelled images), (i) at the partialize model's MACs and (ii) at its
  *measured* speed (throughput ratio within +-3%, pruning ratio searched, every candidate timed side
  by side with the teacher); calibration-free start (the accuracy after BN re-estimation on the same
  512 images is reported beside it, not fine-tuned from);
- every row right after conversion/pruning and after the same KD fine-tune from the teacher (1 and 5
  epochs; same lr, schedule, batch, data and seed for every contender);
- MACs (``macs_breakdown``, inference form), throughput ratio (batch 16, 1 thread, deployed forms,
  every contender interleaved with the teacher in one final timing run), top-1 on the 1,440 held-out
  images (360 digits never seen in training, 4 renders each), calibration time;
- ``--ablation`` (also part of the full run): what each calibration step buys on resnet18 + default.

Training, calibration and fine-tuning use ``--train-threads`` (2); every speed figure 1 thread.
Writes docs/bench_accuracy.json and docs/bench_accuracy.md; per-teacher results are also kept under
runs/accuracy/results/ so ``--resume`` continues a run that stopped.

    .venv/bin/python examples/bench_accuracy.py                      # everything (about 2-3 h on 2 cores)
    .venv/bin/python examples/bench_accuracy.py --teachers resnet18  # one teacher
    .venv/bin/python examples/bench_accuracy.py --ablation-only
    .venv/bin/python examples/bench_accuracy.py --render-only        # rewrite the .md from the .json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import partialize
from partialize.calibration import calibrate_model
from partialize.calibration.steps import recalibrate_bn
from partialize.datasets import hard_digits
from partialize.measure.flops import macs_breakdown
from partialize.measure.pruning import prune_to_ratio, torch_pruning_version
from partialize.measure.speed import machine_description, measure_speed, op_self_times
from partialize.train import finetune
from partialize.train.data import make_train_loader
from partialize.train.operators import evaluate

VIT_RECIPE = {
    "version": 1,
    "name": "vit-partial",
    "strict": False,
    "rules": [
        {"select": {"type": "Attention"}, "variant": "partial_attention", "ratio": 0.5},
        {"select": {"type": "Mlp"}, "variant": "partial_mlp", "ratio": 0.5},
    ],
}

#: name -> timm model, its keyword arguments, the partialize recipe, and how the teacher is trained
TEACHERS = {
    "resnet18": {"model": "resnet18", "kwargs": {}, "recipe": "default", "epochs": 10},
    "mobilenetv2_100": {"model": "mobilenetv2_100", "kwargs": {}, "recipe": "mobilenetv2-patconv", "epochs": 15},
    "resnet50": {"model": "resnet50", "kwargs": {}, "recipe": "resnet50-partial", "epochs": 8},
    "vit_tiny": {
        "model": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 32, "patch_size": 4},
        "recipe": VIT_RECIPE,
        "epochs": 20,
    },
}
ABLATION_USES = [
    ("bn",),
    ("bn", "refit"),
    ("channels", "bn"),
    ("bn", "distil"),
    ("channels", "bn", "distil"),
    ("channels", "bn", "refit", "distil"),
]
SIZE = 32
T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f}s] {msg}", flush=True)


# --- data, teachers -------------------------------------------------------------------------------


class Data:
    """The benchmark's tensors: teacher training set, fine-tune set (its first renders), held-out val,
    and the 512 (+64 held out by calibrate for its fidelity check) unlabelled calibration images."""

    DATASET = "partialize.datasets.hard_digits (scikit-learn digits made harder), 32x32, seed 0"

    def __init__(self, args) -> None:
        (self.x_teacher, self.y_teacher), (self.x_ft, self.y_ft), (self.x_val, self.y_val) = self.tensors(args)
        g = torch.Generator().manual_seed(args.seed)
        pick = torch.randperm(self.x_ft.shape[0], generator=g)[: args.calib_images + max(16, args.calib_images // 8)]
        self.calib = self.x_ft[pick].contiguous()  # calibrate_model holds the last 64 out for fidelity
        self.calib_used = self.calib[: args.calib_images]  # what it calibrates on; Taylor and BN use the same
        self.val = DataLoader(TensorDataset(self.x_val, self.y_val), batch_size=256, shuffle=False)
        self.seed = args.seed

    def tensors(self, args) -> tuple:
        """((x, y) of the teacher set, of the fine-tune set, of val)."""
        return (
            hard_digits("train", renders=args.teacher_renders, seed=0, size=SIZE),
            hard_digits("train", renders=args.ft_renders, seed=0, size=SIZE),
            hard_digits("val", renders=args.val_renders, seed=0, size=SIZE),
        )

    def loader(self, which: str, batch: int, seed: int | None = None) -> DataLoader:
        """A shuffled loader; ``seed`` (default the run's) sets its order, a fine-tune's only randomness."""
        x, y = (self.x_teacher, self.y_teacher) if which == "teacher" else (self.x_ft, self.y_ft)
        return make_train_loader(TensorDataset(x, y), batch, self.seed if seed is None else seed)

    def describe(self) -> dict:
        return {
            "dataset": self.DATASET,
            "teacher_train_images": int(self.x_teacher.shape[0]),
            "finetune_train_images": int(self.x_ft.shape[0]),
            "val_images": int(self.x_val.shape[0]),
            "calibration_images": int(self.calib_used.shape[0]),
            "calibration_images_held_out_by_calibrate": int(self.calib.shape[0] - self.calib_used.shape[0]),
        }


def acc(model, data: Data) -> float:
    return evaluate(model, data.val, torch.device("cpu"))["top1"]


def build(spec: dict) -> torch.nn.Module:
    return timm.create_model(spec["model"], pretrained=False, num_classes=10, **spec["kwargs"])


def teacher_for(name: str, spec: dict, data: Data, args) -> tuple[torch.nn.Module, dict]:
    """The trained teacher: from runs/accuracy/teachers/ when its settings match, else trained now."""
    settings = {
        "model": spec["model"], "kwargs": spec["kwargs"], "epochs": spec["epochs"], "lr": args.teacher_lr,
        "weight_decay": 0.05, "warmup_epochs": 1, "label_smoothing": 0.1, "batch_size": 64,
        "renders": args.teacher_renders, "seed": args.seed, "augmentation": "none (each digit rendered N times)",
    }  # fmt: skip
    folder = os.path.join(args.runs, "teachers")
    os.makedirs(folder, exist_ok=True)
    wpath, mpath = os.path.join(folder, f"{name}.pt"), os.path.join(folder, f"{name}.json")
    model = build(spec)
    if os.path.exists(wpath) and os.path.exists(mpath):
        with open(mpath) as f:
            meta = json.load(f)
        if meta.get("settings") == settings:
            model.load_state_dict(torch.load(wpath, map_location="cpu", weights_only=True))
            model.eval()
            meta["cached"] = True
            meta["val_top1_now"] = acc(model, data)
            say(f"{name}: cached teacher, val top-1 {meta['val_top1_now']:.2f}%")
            return model, meta
        say(f"{name}: cached teacher was trained with other settings; training again")
    say(f"{name}: training the teacher ({spec['epochs']} epochs on {data.x_teacher.shape[0]} images)")
    t0 = time.perf_counter()
    res = finetune(
        model, data.loader("teacher", 64), data.val, teacher=None, epochs=spec["epochs"], lr=args.teacher_lr,
        weight_decay=0.05, warmup_epochs=1, label_smoothing=0.1, seed=args.seed, progress=False,
        log=lambda s: say(f"{name} teacher: {s}"),
    )  # fmt: skip
    model.eval()
    meta = {
        "settings": settings,
        "train_seconds": time.perf_counter() - t0,
        "val_top1": res.final_top1,
        "history": [{k: r[k] for k in ("epoch", "train_loss", "val_top1", "time_s") if k in r} for r in res.history],
    }
    torch.save(model.state_dict(), wpath)
    with open(mpath, "w") as f:
        json.dump(meta, f, indent=1)
    meta["cached"] = False
    meta["val_top1_now"] = acc(model, data)
    return model, meta


def resnet18_setup(args) -> tuple[Data, torch.nn.Module, dict]:
    """(data, the ResNet-18 teacher, its metadata) at ``args.train_threads``: what the scripts that
    study this benchmark's ResNet-18 rows start from."""
    torch.set_num_threads(args.train_threads)
    data = Data(args)
    teacher, meta = teacher_for("resnet18", TEACHERS["resnet18"], data, args)
    return data, teacher, meta


# --- measuring ------------------------------------------------------------------------------------


def macs(model) -> float:
    return float(macs_breakdown(model, SIZE, crosscheck=False)["total"])


def time_models(models: dict, args, rounds: int) -> dict[str, float]:
    """Throughput (images/s, batch ``args.batch``, 1 thread) of each deployed model, interleaved."""
    r = measure_speed(
        models, SIZE, threads=args.speed_threads, batch=args.batch, rounds=rounds, latency=False, min_round_s=0.2
    )
    return {n: v["throughput_ips"]["median"] for n, v in r["models"].items()} | {
        f"{n}_iqr_ms": v["throughput_ips"]["batch_time_ms"]["iqr"] for n, v in r["models"].items()
    }


def pair_ratio(teacher_dep, model_dep, args) -> float:
    t = time_models({"teacher": teacher_dep, "candidate": model_dep}, args, args.search_rounds)
    return t["candidate"] / t["teacher"]


def match_macs(teacher, target: float, base_macs: float) -> tuple[float, int | None, float]:
    """The pruning ratio whose MACs are closest to ``target`` (bisection; channels rounded to 8, unrounded
    when rounding cannot come within 1.5%): (ratio, round_to, reached MACs)."""
    best = None
    for round_to in (8, None):
        lo, hi = 0.0, 0.95
        for _ in range(14):
            mid = (lo + hi) / 2
            p, info = prune_to_ratio(teacher, mid, SIZE, round_to=round_to)
            m = info["reached_macs"]
            if best is None or abs(m - target) < abs(best[2] - target):
                best = (mid, round_to, m)
            lo, hi = (mid, hi) if m > target else (lo, mid)
        if abs(best[2] / target - 1) <= 0.015:
            break
    return best


def search_speed(teacher, teacher_dep, target: float, start: float, args) -> dict:
    """The pruning ratio whose measured throughput ratio to the teacher is within ``args.tolerance`` of
    ``target``: bracketing + interpolation in log(speed), each candidate timed side by side with the
    teacher; channels rounded to 8 first, unrounded if no rounded ratio lands within the tolerance."""
    tried = []

    def trial(r: float, round_to):
        p, info = prune_to_ratio(teacher, r, SIZE, round_to=round_to)
        ratio = pair_ratio(teacher_dep, partialize.deploy(p), args)
        rec = {"ratio": r, "round_to": round_to, "throughput_ratio": ratio, "macs": info["reached_macs"]}
        tried.append(rec)
        say(f"    speed search: ratio {r:.4f} round_to {round_to} -> {ratio:.3f}x (target {target:.3f}x), "
            f"MACs {info['reached_macs'] / 1e6:.2f} M")  # fmt: skip
        return ratio

    def ok(rec):
        return abs(rec["throughput_ratio"] / target - 1) <= args.tolerance

    for round_to in (8, None):
        lo, hi = (0.0, 1.0), None  # (ratio, speed) below / above the target; ratio 0 is the teacher
        r = start
        for _ in range(args.search_steps):
            s = trial(r, round_to)
            if ok(tried[-1]):
                return {"chosen": tried[-1], "tried": tried, "within_tolerance": True}
            if s < target:
                lo = max(lo, (r, s))
            else:
                hi = (r, s) if hi is None or r < hi[0] else hi
            if hi is None:
                r = min(0.95, r + max(0.1, (1 - r) / 3))
                if r >= 0.95 and tried[-1]["ratio"] >= 0.95:
                    break
                continue
            if hi[0] - lo[0] < 1e-3:
                break
            t = (math.log(target) - math.log(lo[1])) / max(1e-9, math.log(hi[1]) - math.log(lo[1]))
            r = lo[0] + (hi[0] - lo[0]) * min(0.85, max(0.15, t))
    best = min(tried, key=lambda rec: abs(rec["throughput_ratio"] / target - 1))
    return {"chosen": best, "tried": tried, "within_tolerance": False}


def where_time_goes(models: dict, args, calls: int = 10) -> dict:
    """Self CPU time per operator (1 thread, batch ``args.batch``, deployed), top 8 per model, ms per call."""
    prev = torch.get_num_threads()
    torch.set_num_threads(args.speed_threads)
    x = torch.randn(args.batch, 3, SIZE, SIZE)
    out = {}
    try:
        for name, m in models.items():
            rows = list(op_self_times(m, x, calls).items())
            total = sum(t for _, t in rows)
            rows.sort(key=lambda r: -r[1])
            out[name] = {"total_ms": total, "top": [{"op": k, "ms": t, "share": t / total} for k, t in rows[:8]]}
    finally:
        torch.set_num_threads(prev)
    return out


# --- one teacher ----------------------------------------------------------------------------------


def ft_settings(args) -> dict:
    return {
        "lr": args.ft_lr, "weight_decay": 0.05, "warmup_epochs": 0.2, "min_lr": 0.0, "label_smoothing": 0.1,
        "kd_weight": args.kd_weight, "kd_temperature": 4.0, "seed": args.seed, "seeds": ft_seeds(args),
        "batch_size": args.ft_batch,
        "schedule": "AdamW, linear warm-up 0.2 epoch then cosine to 0 over the run", "teacher": "the original (KD)",
    }  # fmt: skip


def ft_seeds(args) -> list[int]:
    return [args.seed + i for i in range(args.ft_seeds)]


def run_finetunes(row: dict, start_model, teacher, data: Data, args, name: str) -> None:
    """Each budget once per fine-tune seed (the data order; the models here have no dropout): the
    row's ``top1`` is the mean over seeds, ``top1_std`` their sample standard deviation."""
    s = ft_settings(args)
    keys = ("lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "kd_weight", "kd_temperature")
    row["finetune"] = {}
    for epochs in args.epochs:
        runs, t0 = [], time.perf_counter()
        for seed in ft_seeds(args):
            model = copy.deepcopy(start_model).train()
            res = finetune(
                model, data.loader("ft", args.ft_batch, seed), data.val, teacher=teacher, epochs=epochs,
                progress=False, log=None, seed=seed, **{k: s[k] for k in keys},
            )  # fmt: skip
            runs.append({"seed": seed, "top1": res.final_top1, "best_top1": res.best_top1,
                         "per_epoch_top1": [r.get("val_top1") for r in res.history]})  # fmt: skip
        top1 = [r["top1"] for r in runs]
        row["finetune"][str(epochs)] = {
            "top1": statistics.mean(top1),
            "top1_std": statistics.stdev(top1) if len(top1) > 1 else None,
            "runs": runs,
            "seconds": time.perf_counter() - t0,
        }
        spread = f" +- {statistics.stdev(top1):.2f} over {len(top1)} seeds" if len(top1) > 1 else ""
        say(f"  {name} | {row['name']}: {epochs} epoch(s) KD -> {statistics.mean(top1):.2f}%{spread} "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip


def run_teacher(name: str, data: Data, args) -> dict:
    spec = TEACHERS[name]
    torch.manual_seed(args.seed)
    teacher, tmeta = teacher_for(name, spec, data, args)
    t_acc = tmeta["val_top1_now"]
    result = {"teacher": {"name": name, "timm_model": spec["model"], "kwargs": spec["kwargs"], **tmeta}}
    teacher_dep = partialize.deploy(teacher)
    t_macs = macs(teacher)
    result["teacher"]["macs"] = t_macs
    recipe = spec["recipe"]
    recipe_name = recipe if isinstance(recipe, str) else recipe["name"]
    result["recipe"] = recipe

    # partialize (a) converted, (b) calibrated
    converted = partialize.apply(teacher, recipe, input_size=SIZE).eval()
    say(f"{name}: teacher {t_acc:.2f}%; converted with {recipe_name}: {acc(converted, data):.2f}%")
    t0 = time.perf_counter()
    cal = calibrate_model(converted, teacher, data.calib, images=args.calib_images, seed=args.seed)
    cal_s = time.perf_counter() - t0
    calibrated = cal.model.eval()
    p_macs = macs(converted)
    rows = [
        {"name": f"partialize {recipe_name}, no calibration", "kind": "partialize", "model": converted},
        {"name": f"partialize {recipe_name}, calibrated (512 unlabelled)", "kind": "partialize", "model": calibrated,
         "calibration": {"seconds": cal_s, "threads": args.train_threads, "steps": cal.steps,
                         "agreement_before": cal.before.agreement, "agreement_after": cal.after.agreement,
                         "kl_before": cal.before.kl, "kl_after": cal.after.kl, "notes": cal.notes}},
    ]  # fmt: skip
    say(f"{name}: calibrated in {cal_s:.1f} s: {acc(calibrated, data):.2f}% "
        f"(agreement with the teacher {cal.before.agreement:.1f}% -> {cal.after.agreement:.1f}%)")  # fmt: skip
    p_dep = partialize.deploy(calibrated)
    p_speed = pair_ratio(teacher_dep, p_dep, args)
    say(f"{name}: partialize MACs {p_macs / t_macs:.3f}x, throughput {p_speed:.3f}x (search timing)")

    # Torch-Pruning at equal MACs and at equal measured speed
    r_macs, rt_macs, m_reached = match_macs(teacher, p_macs, t_macs)
    say(f"{name}: equal MACs: ratio {r_macs:.4f} (round_to {rt_macs}) -> {m_reached / t_macs:.3f}x MACs")
    search = search_speed(teacher, teacher_dep, p_speed, r_macs, args)
    ch = search["chosen"]
    say(f"{name}: equal speed: ratio {ch['ratio']:.4f} (round_to {ch['round_to']}) -> {ch['throughput_ratio']:.3f}x"
        f" vs partialize {p_speed:.3f}x ({'within' if search['within_tolerance'] else 'NOT within'} "
        f"+-{args.tolerance:.0%})")  # fmt: skip
    for point, (r, rt) in (("equal MACs", (r_macs, rt_macs)), ("equal speed", (ch["ratio"], ch["round_to"]))):
        for imp in ("magnitude", "taylor"):
            pruned, info = prune_to_ratio(teacher, r, SIZE, importance=imp, images=data.calib_used, round_to=rt)
            bn = copy.deepcopy(pruned)
            recalibrate_bn(bn, data.calib_used)
            row = {"name": f"Torch-Pruning {imp}, {point}", "kind": "torch-pruning", "point": point,
                   "importance": imp, "model": pruned.eval(), "pruning": info,
                   "start_top1_bn_recalibrated": acc(bn.eval(), data)}  # fmt: skip
            if point == "equal speed":
                row["speed_search"] = search
            rows.append(row)

    # MACs, the final side-by-side timing, the start accuracy
    deployed = {"teacher": teacher_dep}
    for i, row in enumerate(rows):
        row["macs"] = macs(row["model"])
        row["macs_ratio"] = row["macs"] / t_macs
        row["start_top1"] = acc(row["model"], data)
        if i != 0:  # the converted and calibrated models have the same graph: timed once (calibrated)
            deployed[row["name"]] = partialize.deploy(row["model"])
    say(f"{name}: final timing run ({len(deployed)} models interleaved, {args.final_rounds} rounds)")
    th = time_models(deployed, args, args.final_rounds)
    for i, row in enumerate(rows):
        key = rows[1]["name"] if i == 0 else row["name"]
        row["throughput_ips"] = th[key]
        row["throughput_ratio"] = th[key] / th["teacher"]
        row["batch_time_iqr_ms"] = th[f"{key}_iqr_ms"]
        if i == 0:
            row["timing_note"] = "same graph as the calibrated model: its timing"
    result["teacher"]["throughput_ips"] = th["teacher"]
    result["partialize_search_throughput_ratio"] = p_speed
    speed_rows = [r for r in rows if r.get("point") == "equal speed"]
    result["equal_speed_final_rel_diff"] = speed_rows[0]["throughput_ratio"] / rows[1]["throughput_ratio"] - 1
    prof = {"teacher": teacher_dep, "partialize": p_dep, "Torch-Pruning equal speed": deployed[speed_rows[0]["name"]]}
    result["where_time_goes"] = where_time_goes(prof, args)
    for row in rows:
        say(f"  {name} | {row['name']}: MACs {row['macs_ratio']:.3f}x, throughput {row['throughput_ratio']:.3f}x, "
            f"start {row['start_top1']:.2f}%")  # fmt: skip

    # the same fine-tune for every row
    for row in rows:
        run_finetunes(row, row["model"], teacher, data, args, name)
    for row in rows:
        row.pop("model")
    result["rows"] = rows
    result["finetune_settings"] = ft_settings(args) | {"epochs": list(args.epochs)}
    return result


# --- ablation -------------------------------------------------------------------------------------


def run_ablation(data: Data, args) -> dict:
    spec = TEACHERS["resnet18"]
    teacher, tmeta = teacher_for("resnet18", spec, data, args)
    converted = partialize.apply(teacher, "default", input_size=SIZE).eval()
    out = {"teacher_top1": tmeta["val_top1_now"], "recipe": "default", "converted_top1": acc(converted, data)}
    runs = [{"use": list(u), "steps": 200, "images": args.calib_images} for u in ABLATION_USES]
    runs += [{"use": ["channels", "bn", "distil"], "steps": s, "images": args.calib_images} for s in (50, 100, 400)]
    runs += [{"use": ["channels", "bn", "distil"], "steps": 200, "images": n} for n in (128, 1024)]
    for r in runs:
        n = r["images"]
        imgs = data.calib if n == args.calib_images else data.x_ft[torch.randperm(
            data.x_ft.shape[0], generator=torch.Generator().manual_seed(args.seed))[: n + max(16, n // 8)]]  # fmt: skip
        res = calibrate_model(converted, teacher, imgs, images=n, steps=r["steps"], use=tuple(r["use"]), seed=args.seed)
        r.update(top1=acc(res.model, data), seconds=res.seconds, agreement=res.after.agreement, kl=res.after.kl)
        say(f"ablation: use={'+'.join(r['use'])} steps={r['steps']} images={n}: {r['top1']:.2f}% "
            f"({r['seconds']:.1f} s, agreement {r['agreement']:.1f}%)")  # fmt: skip
    out["runs"] = runs
    out["threads"] = args.train_threads
    return out


# --- output ---------------------------------------------------------------------------------------


def fmt(v, spec=".2f", unit=""):
    return "not measured" if v is None else f"{v:{spec}}{unit}"


def seeds_text(fs: dict) -> str:
    seeds = fs.get("seeds") or [fs["seed"]]
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return (f"each fine-tune run {len(seeds)} times (data order seeded {seeds[0]}-{seeds[-1]}; KD cells: mean "
            "+- sample standard deviation over the runs)")  # fmt: skip


def ft_cell(ft: dict) -> str:
    if ft.get("top1_std") is None:
        return fmt(ft.get("top1"), ".2f", "%")
    return f"{ft['top1']:.2f}% +- {ft['top1_std']:.2f}"


def paired_lines(rows: list[dict], epochs: list[int]) -> list[str]:
    """With several seeds: the calibrated partialize row minus each equal-speed pruned row, per seed
    (the same seed is the same data order for both: a paired difference), mean +- std."""
    cal = next((r for r in rows if "calibration" in r), None)
    pruned = [r for r in rows if r.get("point") == "equal speed"]
    out = []
    for e in epochs:
        mine = {x["seed"]: x["top1"] for x in (cal or {}).get("finetune", {}).get(str(e), {}).get("runs", [])}
        for p in pruned:
            theirs = {x["seed"]: x["top1"] for x in p["finetune"].get(str(e), {}).get("runs", [])}
            d = [mine[k] - theirs[k] for k in mine if k in theirs]
            if len(d) > 1:
                out.append(f"- KD {e} ep, calibrated partialize minus {p['name']}: {statistics.mean(d):+.2f} +- "
                           f"{statistics.stdev(d):.2f} points (paired over {len(d)} seeds; "
                           f"{sum(x > 0 for x in d)} ahead, {sum(x < 0 for x in d)} behind)")  # fmt: skip
    return ["", *out] if out else []


def render_md(doc: dict) -> str:
    env = doc["environment"]
    lines = [
        "# Accuracy at equal measured speed: partialize vs Torch-Pruning",
        "",
        f"Written by `examples/bench_accuracy.py` (numbers in [{doc.get('json_file', 'bench_accuracy.json')}]"
        f"({doc.get('json_file', 'bench_accuracy.json')})).",
        f"Machine: {env['machine']}. Training, calibration and fine-tuning: {env['train_threads']} threads; "
        f"speed: {env['speed_threads']} thread, batch {env['batch']}, fp32, deployed forms (BN folded), "
        "every contender interleaved with its teacher in one timing run (medians). "
        f"torch {env['torch']}, timm {env['timm']}, torch-pruning {env['torch_pruning']}; seed {env['seed']}.",
        "",
        f"Data: {doc['data']['dataset']}; teachers trained on {doc['data']['teacher_train_images']} images, "
        f"fine-tuning on {doc['data']['finetune_train_images']} (a subset of them), accuracy on "
        f"{doc['data']['val_images']} held-out images (360 digits never trained on, "
        f"{doc['data']['val_images'] // 360} renders each). Calibration: {doc['data']['calibration_images']} "
        "unlabelled train images. MACs: multiply-accumulates per image (`macs_breakdown`).",
        "",
    ]
    fs = doc.get("finetune_settings")
    if fs:
        lines += [
            f"Fine-tune (every row alike): KD from the teacher (weight {fs['kd_weight']}, T {fs['kd_temperature']}) "
            f"+ cross-entropy (smoothing {fs['label_smoothing']}), {fs['schedule']}, peak lr {fs['lr']}, weight decay "
            f"{fs['weight_decay']}, batch {fs['batch_size']}, {seeds_text(fs)}. Torch-Pruning: one shot, uniform "
            "channel ratio, channels rounded to multiples of 8 (unrounded when rounding cannot match), classifier "
            "kept; Taylor importance on the 512 calibration images with the teacher's argmax as labels (no true "
            "labels). Pruned rows start calibration-free; 'BN re-est.' is the same model after BN statistics are "
            "re-estimated on the 512 calibration images (not fine-tuned from).",
            "",
        ]
    for name, res in doc["teachers"].items():
        t = res["teacher"]
        epochs = res["finetune_settings"]["epochs"]
        lines += [
            f"## {name}: teacher {t['val_top1_now']:.2f}% ({t['macs'] / 1e6:.1f} MMACs, "
            f"{t['throughput_ips']:.0f} img/s)",
            "",
            "| row | MACs | throughput | start | BN re-est. | " + " | ".join(f"KD {e} ep" for e in epochs) + " |",
            "|---|---|---|---|---|" + "---|" * len(epochs),
        ]
        for r in res["rows"]:
            ft = [ft_cell(r["finetune"].get(str(e), {})) for e in epochs]
            bn = r.get("start_top1_bn_recalibrated")
            lines.append(
                f"| {r['name']} | {r['macs_ratio']:.3f}x | {r['throughput_ratio']:.2f}x | {r['start_top1']:.2f}% | "
                f"{fmt(bn, '.2f', '%') if bn is not None else '-'} | " + " | ".join(ft) + " |"
            )
        lines += paired_lines(res["rows"], epochs)
        cal = next(r["calibration"] for r in res["rows"] if "calibration" in r)
        sp = next(r for r in res["rows"] if r.get("point") == "equal speed")["speed_search"]
        lines += [
            "",
            f"Calibration: {cal['seconds']:.1f} s ({cal['threads']} threads, steps {'+'.join(cal['steps'])}); "
            f"top-1 agreement with the teacher {cal['agreement_before']:.1f}% -> {cal['agreement_after']:.1f}%. "
            f"Equal-speed search: {len(sp['tried'])} candidates, chosen ratio {sp['chosen']['ratio']:.4f} at "
            f"{sp['chosen']['throughput_ratio']:.3f}x against partialize's "
            f"{res['partialize_search_throughput_ratio']:.3f}x in the search's pair timings "
            f"({'within' if sp['within_tolerance'] else 'NOT within'} the tolerance); in "
            f"the final run the two differ by {res['equal_speed_final_rel_diff']:+.1%}.",
            "",
        ]
        wt = res.get("where_time_goes")
        if wt:
            lines.append("Where the time goes (self CPU time per op, 1 thread, batch 16, ms per call, top 4):")
            lines.append("")
            for m, w in wt.items():
                tops = ", ".join(f"{e['op']} {e['ms']:.1f} ({e['share']:.0%})" for e in w["top"][:4])
                lines.append(f"- {m}: {w['total_ms']:.1f} ms: {tops}")
            lines.append("")
    ab = doc.get("ablation")
    if ab:
        lines += [
            f"## Calibration ablation: resnet18 + default (teacher {ab['teacher_top1']:.2f}%, converted "
            f"{ab['converted_top1']:.2f}%, {ab['threads']} threads)",
            "",
            "| steps used | distillation steps per block | images | top-1 | agreement | time |",
            "|---|---|---|---|---|---|",
        ]
        for r in ab["runs"]:
            lines.append(
                f"| {' + '.join(r['use'])} | {r['steps'] if 'distil' in r['use'] else '-'} | {r['images']} | "
                f"{r['top1']:.2f}% | {r['agreement']:.1f}% | {r['seconds']:.1f} s |"
            )
        lines.append("")
    if doc.get("cut"):
        lines += ["## Not measured in this run", ""] + [f"- {c}" for c in doc["cut"]] + [""]
    lines.append(f"Wall time of the run(s): {doc.get('wall_s', 0) / 60:.0f} min.")
    return "\n".join(lines) + "\n"


def environment(args) -> dict:
    return {
        "machine": machine_description(args.speed_threads).split(";")[0] + f", {os.cpu_count()} cores visible",
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_pruning": torch_pruning_version(),
        "partialize": partialize.__version__,
        "train_threads": args.train_threads,
        "speed_threads": args.speed_threads,
        "batch": args.batch,
        "seed": args.seed,
    }


def parser() -> argparse.ArgumentParser:
    """The benchmark's options (examples/searched_accuracy.py takes their defaults)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", default="resnet18,mobilenetv2_100,resnet50,vit_tiny",
                    help=f"comma-separated, from {', '.join(TEACHERS)}")  # fmt: skip
    ap.add_argument("--epochs", default="1,5", help="KD fine-tune budgets, in epochs (default 1,5)")
    ap.add_argument("--ft-lr", type=float, default=5e-4, help="peak lr of every fine-tune (default 5e-4)")
    ap.add_argument("--kd-weight", type=float, default=0.5, help="KD loss weight of every fine-tune (default 0.5)")
    ap.add_argument("--ft-batch", type=int, default=64)
    ap.add_argument("--ft-seeds", type=int, default=1,
                    help="fine-tune every row this many times, data order seeded seed, seed+1, ...; the tables "
                         "give the mean and standard deviation (default 1)")  # fmt: skip
    ap.add_argument("--ft-renders", type=int, default=4, help="renders per digit in the fine-tune set (default 4)")
    ap.add_argument("--teacher-renders", type=int, default=8, help="renders per digit for teachers (default 8)")
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--val-renders", type=int, default=4)
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--tolerance", type=float, default=0.03, help="equal speed: throughput ratio within this")
    ap.add_argument("--search-steps", type=int, default=6, help="speed-search candidates per rounding mode")
    ap.add_argument("--search-rounds", type=int, default=9, help="timing rounds per speed-search candidate")
    ap.add_argument("--final-rounds", type=int, default=11, help="timing rounds of the final side-by-side run")
    ap.add_argument("--batch", type=int, default=16, help="throughput batch (default 16)")
    ap.add_argument("--speed-threads", type=int, default=1)
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="runs/accuracy", help="teacher cache and per-teacher results")
    ap.add_argument("--json", default="docs/bench_accuracy.json")
    ap.add_argument("--md", default="docs/bench_accuracy.md")
    ap.add_argument("--no-ablation", action="store_true", help="skip the calibration ablation")
    ap.add_argument("--ablation-only", action="store_true", help="only the calibration ablation")
    ap.add_argument("--resume", action="store_true", help="reuse per-teacher results under --runs/results")
    ap.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="TEACHER=RECIPE",
        help="convert TEACHER with RECIPE (a file or shipped name) instead of its default (repeatable)",
    )
    ap.add_argument("--cut", action="append", default=[], help="a line for the 'not measured' list (repeatable)")
    ap.add_argument("--teacher-epochs", type=int, help="override every teacher's epochs (a smoke test)")
    ap.add_argument("--smoke", action="store_true", help="a tiny run to check the script (writes under runs/)")
    ap.add_argument("--render-only", action="store_true", help="rewrite --md from --json and stop")
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.smoke:
        args.teacher_epochs, args.teacher_renders, args.ft_renders, args.val_renders = 1, 1, 1, 1
        args.epochs, args.calib_images, args.search_steps, args.search_rounds, args.final_rounds = "1", 64, 2, 3, 3
        args.runs = "runs/accuracy-smoke"
        args.json, args.md = f"{args.runs}/out.json", f"{args.runs}/out.md"
        os.makedirs(args.runs, exist_ok=True)
    if args.teacher_epochs:
        for spec in TEACHERS.values():
            spec["epochs"] = args.teacher_epochs
    args.epochs = [int(e) for e in args.epochs.split(",") if e]
    if args.ft_seeds < 1:
        ap.error(f"--ft-seeds must be >= 1, got {args.ft_seeds}")
    if args.render_only:
        with open(args.json) as f:
            doc = json.load(f)
        doc["json_file"] = os.path.basename(args.json)
        with open(args.md, "w") as f:
            f.write(render_md(doc))
        return
    torch.set_num_threads(args.train_threads)
    torch.manual_seed(args.seed)
    for item in args.recipe:
        teacher, sep, recipe = item.partition("=")
        if not sep or teacher not in TEACHERS or not recipe:
            ap.error(f"--recipe takes TEACHER=RECIPE with TEACHER one of {', '.join(TEACHERS)}, got {item!r}")
        TEACHERS[teacher]["recipe"] = recipe
    names = [n for n in args.teachers.split(",") if n]
    unknown = [n for n in names if n not in TEACHERS]
    if unknown:
        ap.error(f"unknown teacher(s) {unknown}; choose from {', '.join(TEACHERS)}")
    say(f"data: hard_digits, teacher renders {args.teacher_renders}, fine-tune renders {args.ft_renders}")
    data = Data(args)
    doc: dict = {"environment": environment(args), "data": data.describe(), "teachers": {}, "cut": list(args.cut)}
    if os.path.exists(args.json):
        with open(args.json) as f:
            old = json.load(f)
        doc["teachers"] = old.get("teachers", {})  # teachers not rerun keep their last results
        doc["ablation"] = old.get("ablation")
        doc["wall_s_earlier"] = old.get("wall_s", 0) + old.get("wall_s_earlier", 0)
    results = os.path.join(args.runs, "results")
    os.makedirs(results, exist_ok=True)

    def write() -> None:
        doc["wall_s"] = time.perf_counter() - T0
        doc["json_file"] = os.path.basename(args.json)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=float)
        with open(args.md, "w") as f:
            f.write(render_md(doc))

    if not args.ablation_only:
        for name in names:
            path = os.path.join(results, f"{name}.json")
            if args.resume and os.path.exists(path):
                with open(path) as f:
                    doc["teachers"][name] = json.load(f)
                say(f"{name}: results reused from {path}")
            else:
                t0 = time.perf_counter()
                doc["teachers"][name] = run_teacher(name, data, args)
                doc["teachers"][name]["wall_s"] = time.perf_counter() - t0
                with open(path, "w") as f:
                    json.dump(doc["teachers"][name], f, indent=1, default=float)
            doc["finetune_settings"] = doc["teachers"][name]["finetune_settings"]
            write()
    if args.ablation_only or not args.no_ablation:
        doc["ablation"] = run_ablation(data, args)
    write()
    say(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
