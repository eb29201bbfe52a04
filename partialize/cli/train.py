"""CLI commands ``finetune`` and ``train``; registered by partialize.cli through :func:`register`."""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import click
import torch
from torch import nn

from ..errors import CheckpointError, PartializeError
from ._common import friendly_errors


def _warn(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        click.secho(f"warning: {msg}", fg="yellow", err=True)


def _join_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the process group *before* any loader is built: the
    DistributedSampler reads the rank and world size when it is created, so a loader built earlier
    would hand every rank the whole dataset. True when distributed."""
    from ..train.distributed import init_distributed

    return init_distributed()


def _leave_group(distributed: bool) -> None:
    if distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _common_options(fn):
    opts = [
        click.option("--data", required=True, help="ImageFolder root with train/ (and val/) subfolders."),
        click.option("--epochs", type=int, help="Epochs."),
        click.option("--lr", type=float, help="Peak AdamW learning rate (after warm-up)."),
        click.option("--batch-size", type=int, help="Per-process batch size."),
        click.option("--weight-decay", type=float, help="AdamW weight decay (not on biases, norms, gates)."),
        click.option("--warmup-epochs", type=float, help="Linear warm-up epochs before the cosine decay."),
        click.option("--smoothing", type=float, help="Label smoothing."),
        click.option("--mixup", type=float, help="Mixup alpha (0 = off)."),
        click.option("--cutmix", type=float, help="CutMix alpha (0 = off)."),
        click.option("--clip-grad", type=float, help="Clip the gradient norm to this value."),
        click.option("--ema", "ema_decay", type=float, help="Keep an EMA of the weights with this decay."),
        click.option("--amp/--no-amp", default=True, show_default=True, help="fp16 autocast (CUDA only)."),
        click.option("--input-size", type=int, help="Train/test resolution [default: the model's]."),
        click.option("--workers", default=0, show_default=True, help="DataLoader workers per process."),
        click.option("--seed", default=0, show_default=True, help="Seed (data order, augmentation, init)."),
        click.option("--out", "-o", "out_dir", default="runs/partialize", show_default=True, help="Output dir."),
        click.option("--resume", is_flag=True, help="Continue from OUT/last.pt (same settings required)."),
        click.option("--device", help="cpu or cuda[:N] [default: cuda if available]."),
        click.option("--report/--no-report", default=True, show_default=True, help="Write report.json/.md at the end."),
        click.option("--speed/--no-speed", default=True, show_default=True, help="Time the models in the report."),
        click.option("--threads", default=1, show_default=True, help="CPU threads for the report's timing."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _dynamic_options(fn):
    opts = [
        click.option("--theta", type=float, help="DPConv target: kappa = sum (C_l/theta)^2 (000 eq. 8); 4 ~ 1/4."),
        click.option("--target-macs", type=float, help="DPConv target as whole-model MACs per image (e.g. 1.2e9)."),
        click.option("--dp-alpha", default=-0.01, show_default=True, help="alpha when zeta > kappa (000 eq. 8)."),
        click.option(
            "--dp-alpha-under",
            default=0.01,
            show_default=True,
            help="alpha when zeta < kappa (000 eq. 8 has 0: kappa only caps; >0 pulls narrow layers up to it).",
        ),
        click.option("--dp-beta", default=0.9, show_default=True, help="Weight of the gate monotonicity term psi."),
        click.option("--gate-lr-scale", default=1.0, show_default=True, help="DPConv gate lr = lr x this."),
        click.option("--router-budget", type=float, help="Ada-PConv: mean branch cost / widest branch cap."),
        click.option(
            "--ada-routing",
            type=click.Choice(["ste", "soft"]),
            default="ste",
            show_default=True,
            help="Ada-PConv training routing: ste (hard forward as deployed, soft gradient) or soft mixing "
            "(004; deployed hard routing is then a different function).",
        ),
        click.option("--router-weight", default=1.0, show_default=True, help="Weight of the router budget term."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _num_outputs(model: nn.Module, size: int) -> int:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device)).shape[1])
    finally:
        model.train(was)


def resolve_teacher(
    teacher: str, teacher_weights: str | None, student: nn.Module, num_classes: int
) -> tuple[nn.Module | None, str]:
    """The distillation teacher and a sentence saying what it is (or why there is none).

    ``original`` rebuilds the base model the converted one came from (its plan records how) and
    needs ``--teacher-weights``: the converted file holds only the converted weights, and a teacher
    with random weights would teach noise, so without them distillation is switched off.
    """
    from ..base_model import build_model
    from ..serialization import load, read_plan

    if teacher == "none":
        return None, "distillation off (--teacher none)"
    if teacher == "original":
        plan = getattr(student, "_partialize_plan", None)
        spec = plan.model if plan is not None else None
        if not spec:
            return None, "distillation off: the converted model does not record its base model"
        if not teacher_weights:
            _warn(
                "--teacher original: the original's trained weights are not stored in the converted file; "
                "pass --teacher-weights PATH (a state_dict of the unconverted model) to distil from it. "
                "Distillation is OFF for this run (a random-weight teacher would only add noise)."
            )
            return None, "distillation off: original model's weights not given (--teacher-weights)"
        t = build_model(spec["spec"], weights=teacher_weights, **spec.get("kwargs", {}))
        return t, f"original {spec['spec']} with weights {teacher_weights}"
    if os.path.exists(teacher):
        try:
            read_plan(teacher)
        except CheckpointError:
            raise CheckpointError(
                f"--teacher {teacher!r} is not a partialize model file; for a plain state_dict give the "
                "architecture: --teacher MODEL --teacher-weights PATH"
            ) from None
        return load(teacher), f"converted model {teacher}"
    weights = teacher_weights or "random"
    if weights == "random":
        _warn(f"--teacher {teacher}: no --teacher-weights, so it would have random weights; distillation is OFF.")
        return None, f"distillation off: {teacher} has no weights (--teacher-weights PATH or pretrained)"
    t = build_model(teacher, weights=weights, num_classes=num_classes)
    return t, f"{teacher} with weights {weights}"


def _finish(
    model: nn.Module,
    result,
    *,
    out_dir: str,
    data: str,
    input_size: int,
    baseline: nn.Module | None,
    baseline_weighted: bool,
    name: str,
    report: bool,
    speed: bool,
    threads: int,
) -> None:
    """Rank 0: save the final model and ratios, print the learned ratios, write the report."""
    from rich.console import Console
    from rich.table import Table

    from ..serialization import save
    from ..train.finetune import freeze_dynamic

    console = Console()
    model = model.cpu()
    path = save(model, os.path.join(out_dir, "final.safetensors"), overwrite=True)  # a rerun replaces it
    console.print(f"wrote {path} (partialize model file, training form)")
    frozen = copy.deepcopy(model)
    ratios = freeze_dynamic(frozen)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump({**result.to_dict(), "frozen_ratios": ratios}, f, indent=2)
    if ratios:
        t = Table(title="DPConv: learned ratios, frozen to static slices")
        for c in ("layer", "channels", "conv width", "ratio"):
            t.add_column(c, justify="left" if c == "layer" else "right")
        for n, r in ratios.items():
            t.add_row(n, str(r["channels"]), str(r["width"]), f"{r['ratio']:.4f}")
        console.print(t)
    if not report:
        return
    from ..measure.accuracy import evaluate_accuracy
    from ..measure.report import build_report, report_markdown

    both = baseline is not None and baseline_weighted
    rep = build_report(
        frozen,
        name=name,
        input_size=input_size,
        baseline=baseline.cpu().eval() if baseline is not None else None,
        baseline_name="original",
        speed=speed,
        threads=threads,
        data=data if both or baseline is None else None,
        progress=lambda s: console.print(f"[dim]{s}[/dim]"),
    )
    if baseline is not None and not both:
        rep.model.accuracy = evaluate_accuracy(frozen, data, input_size=input_size)
        rep.model.notes = [n for n in rep.model.notes if not n.startswith("accuracy")]
        rep.baseline.notes.append("accuracy not measured: the original's trained weights were not given")
    rep.to_json(os.path.join(out_dir, "report.json"))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_markdown(rep))
    console.print(f"wrote {os.path.join(out_dir, 'report.json')} and report.md")


def _run(model, loaders, *, teacher, opts: dict, out_dir: str, resume: bool, device, kappa, settings) -> object:
    """finetune() with the CLI's logging; Ctrl-C exits 130 saying what is kept and how to continue."""
    from ..train.finetune import finetune

    try:
        return finetune(
            model,
            loaders.train,
            loaders.val,
            teacher=teacher,
            num_classes=loaders.num_classes,
            out_dir=out_dir,
            resume=resume,
            device=device,
            kappa=kappa,
            log=lambda s: click.echo(s),
            settings=settings,
            **opts,
        )
    except KeyboardInterrupt:
        click.secho(f"\ninterrupted: {_kept(out_dir)}", fg="yellow", err=True)
        sys.exit(130)


def _kept(out_dir: str) -> str:
    """What an interrupted run leaves: the last epoch's checkpoint (written atomically) and how to go on."""
    last, log = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(last):
        return f"no epoch had finished, so nothing was saved in {out_dir!r}; rerun the same command to start over"
    epoch = "the last finished epoch"
    try:
        with open(log) as f:
            lines = [line for line in f if line.strip()]
        epoch = f"epoch {json.loads(lines[-1])['epoch']}"
    except (OSError, ValueError, KeyError, IndexError):
        pass
    return (
        f"the checkpoint {last!r} ({epoch}) is kept; run the same command with --resume to continue from it "
        "(the interrupted epoch is trained again)"
    )


def _kappa(model, theta, target_macs, input_size) -> float | None:
    from ..train.constraints import kappa_from_target_macs, kappa_from_theta

    if theta is not None and target_macs is not None:
        raise PartializeError("give --theta or --target-macs, not both")
    if theta is not None:
        return kappa_from_theta(model, theta)
    if target_macs is not None:
        k = kappa_from_target_macs(model, target_macs, input_size)
        click.echo(f"--target-macs {target_macs:.4g}: kappa {k['kappa']:.1f} (uniform theta {k['theta']:.2f})")
        return k["kappa"]
    return None


@click.command("finetune")
@click.argument("converted", type=click.Path(dir_okay=False))
@click.option(
    "--teacher",
    default="original",
    show_default=True,
    help="original (the unconverted model; needs --teacher-weights) | MODEL | PATH.safetensors | none.",
)
@click.option("--teacher-weights", help="State_dict file (or 'pretrained') for the teacher.")
@click.option("--kd-temperature", default=4.0, show_default=True, help="Distillation temperature T.")
@click.option("--kd-weight", default=0.5, show_default=True, help="loss = (1-w) task + w T^2 KL.")
@_common_options
@_dynamic_options
@friendly_errors
def finetune_cmd(converted, teacher, teacher_weights, kd_temperature, kd_weight, data, **kw) -> None:
    """Fine-tune CONVERTED (a file written by `partialize convert --out`) on an ImageFolder.

    Distils from the original model when its weights are given (--teacher-weights); the loss is
    (1 - w) * task + w * T^2 * KL(teacher || student) on softened logits. DPConv layers learn their
    ratios against --theta or --target-macs (000 eq. 8, Algorithm 1); Ada-PConv routers train with
    straight-through hard routing (--ada-routing ste; soft is 004's mixing), with an optional
    --router-budget, and are evaluated with hard routing. Every epoch writes
    OUT/last.pt, OUT/best.pt (atomically) and a line of OUT/log.jsonl; at the end OUT/final.safetensors,
    OUT/result.json and a report against the original (OUT/report.json, report.md).

    Multi-GPU / multi-node: torchrun --nproc-per-node N -m partialize.cli finetune ... (see docs/training.md).
    """
    from ..base_model import build_model
    from ..serialization import load
    from ..train.data import check_data_dir, image_folder_loaders

    defaults = dict(
        epochs=30, lr=1e-3, batch_size=64, weight_decay=0.05, warmup_epochs=1, smoothing=0.1, mixup=0.0,
        cutmix=0.0, clip_grad=None,
    )  # fmt: skip
    cfg = {k: (kw[k] if kw.get(k) is not None else v) for k, v in defaults.items()}
    _check_cli(cfg, kw, kd_temperature=kd_temperature, kd_weight=kd_weight)  # before anything is read or written
    check_data_dir(data)
    distributed = _join_group()
    model = load(converted)
    if not any(p.requires_grad for p in model.parameters()):
        from ..train.finetune import TrainingError

        raise TrainingError(
            f"{converted!r} is marked deployed, so it loads as the frozen inference form (BN folded, no "
            "trainable parameters), which cannot be fine-tuned; pass the training-form file written by "
            "`partialize convert --out` (or partialize.save(model) without deployed=True)"
        )
    size, why = _input_size(model, kw["input_size"])
    loaders = image_folder_loaders(
        data, model, batch_size=cfg["batch_size"], input_size=size, seed=kw["seed"], workers=kw["workers"],
    )  # fmt: skip
    click.echo(f"resolution: {loaders.input_size}x{loaders.input_size} ({why})")
    n_out = _num_outputs(model, loaders.input_size)
    if n_out != loaders.num_classes:
        raise PartializeError(
            f"{converted!r} has {n_out} outputs but {data!r} has {loaders.num_classes} classes; convert with "
            f"--num-classes {loaders.num_classes}"
        )
    t, why = resolve_teacher(teacher, teacher_weights, model, loaders.num_classes)
    click.echo(f"data: {loaders.description}\nteacher: {why}")
    kappa = _kappa(model, kw["theta"], kw["target_macs"], loaders.input_size)
    opts = _opts(cfg, kw, kd_temperature, kd_weight)
    result = _run(model, loaders, teacher=t, opts=opts, out_dir=kw["out_dir"], resume=kw["resume"],
                  device=kw["device"], kappa=kappa, settings={"input_size": loaders.input_size})  # fmt: skip
    _leave_group(distributed)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    baseline, weighted = t if teacher == "original" else None, t is not None and teacher == "original"
    spec = model._partialize_plan.model
    if baseline is None and spec:
        baseline = build_model(spec["spec"], weights="random", **spec.get("kwargs", {}))
    _finish(model, result, out_dir=kw["out_dir"], data=data, input_size=loaders.input_size, baseline=baseline,
            baseline_weighted=weighted, name=f"{os.path.basename(converted)} fine-tuned", report=kw["report"],
            speed=kw["speed"], threads=kw["threads"])  # fmt: skip


def _check_cli(cfg: dict, kw: dict, **more) -> None:
    """Every numeric option checked before any file is read or written (a PartializeError naming it)."""
    from ..train.finetune import TrainingError, check_settings

    check_settings(
        epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], weight_decay=cfg["weight_decay"],
        warmup_epochs=cfg["warmup_epochs"], label_smoothing=cfg["smoothing"], mixup=cfg["mixup"], cutmix=cfg["cutmix"],
        clip_grad=cfg["clip_grad"], ema_decay=kw["ema_decay"], gate_lr_scale=kw["gate_lr_scale"],
        dp_alpha=kw["dp_alpha"], dp_alpha_under=kw["dp_alpha_under"], dp_beta=kw["dp_beta"],
        router_weight=kw["router_weight"], ada_routing=kw["ada_routing"], **more,
    )  # fmt: skip
    for opt, key, low in (("--input-size", "input_size", 1), ("--workers", "workers", 0), ("--threads", "threads", 1)):
        v = kw.get(key)
        if v is not None and v < low:
            raise TrainingError(f"{opt} must be >= {low}, got {v}")
    for opt, key in (("--theta", "theta"), ("--target-macs", "target_macs"), ("--router-budget", "router_budget")):
        v = kw.get(key)
        if v is not None and not math.isfinite(v):
            raise TrainingError(f"{opt} must be a finite number, got {v}")


def _input_size(model: nn.Module, given: int | None) -> tuple[int | None, str]:
    """The training resolution: --input-size, else the size the plan was made at, else the model's."""
    if given:
        return given, "--input-size"
    plan = getattr(model, "_partialize_plan", None)
    shape = tuple(getattr(plan, "input_shape", ()) or ())
    if len(shape) == 4 and shape[-1] == shape[-2]:
        return int(shape[-1]), "the size the model was converted at; --input-size to change"
    return None, "the model's default; --input-size to change"


def _opts(cfg: dict, kw: dict, kd_temperature: float, kd_weight: float) -> dict:
    return dict(
        epochs=cfg["epochs"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
        warmup_epochs=cfg["warmup_epochs"], label_smoothing=cfg["smoothing"], mixup=cfg["mixup"],
        cutmix=cfg["cutmix"], clip_grad=cfg["clip_grad"],
        kd_temperature=kd_temperature, kd_weight=kd_weight, ema_decay=kw["ema_decay"], amp=kw["amp"],
        seed=kw["seed"], dp_alpha=kw["dp_alpha"], dp_alpha_under=kw["dp_alpha_under"], dp_beta=kw["dp_beta"],
        gate_lr_scale=kw["gate_lr_scale"],
        router_budget=kw["router_budget"], router_weight=kw["router_weight"], ada_routing=kw["ada_routing"],
    )  # fmt: skip


def _fit_batch(model: nn.Module, wanted: int, given: bool, size: int, device, n_images: int, source: str) -> int:
    """The per-process batch: ``wanted`` when it fits this machine's memory (estimated, see
    partialize.train.memory); otherwise, when it was a default, the largest power of two that fits,
    said in the output; a --batch-size given explicitly is kept, with a warning."""
    from ..train.finetune import TrainingError
    from ..train.memory import available_bytes, describe, fit_batch_size

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    want = min(wanted, n_images)  # the loader cannot make a larger batch than the data
    avail = available_bytes(dev)
    if torch.device(dev).type == "cpu":  # processes on one machine share its memory (torchrun sets this)
        avail //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    batch, info = fit_batch_size(model.to(dev), size, want, avail, dev)
    if batch == want:
        return wanted
    if given:
        _warn(f"--batch-size {wanted} may not fit in memory at {size}x{size}: {describe(info)}; at most about "
              f"{max(1, info['fits'])} images per step would")  # fmt: skip
        return wanted
    if batch == 0:
        raise TrainingError(
            f"not even one image fits in memory at {size}x{size} for training: {describe(info)}; "
            "lower --input-size or free memory"
        )
    click.echo(f"batch: {batch} per process, not {wanted} ({source}): {wanted if wanted <= n_images else n_images} "
               f"would not fit this machine's memory at {size}x{size}: {describe(info)}. --batch-size overrides; "
               "lr is not rescaled (--lr to change)")  # fmt: skip
    return batch


def _native_plan(model: nn.Module, size: int) -> None:
    """Attach a plan with no conversions to a natively built model, so `partialize train` writes a
    partialize model file (loadable by load/export/report): the plan names how to rebuild it."""
    from ..api import plan as make_plan

    recipe = {"version": 1, "name": "native", "description": "trained as built: nothing converted",
              "strict": False, "rules": [{"select": {"name": "__nothing__"}, "variant": "skip"}]}  # fmt: skip
    was = model.training
    model._partialize_plan = make_plan(model.eval(), recipe, input_size=size)
    model.train(was)


@click.command("train")
@click.argument("model_spec", metavar="MODEL")
@_common_options
@_dynamic_options
@friendly_errors
def train_cmd(model_spec, data, **kw) -> None:
    """Train MODEL from scratch on an ImageFolder.

    For the native family (partialnet_t0 ... partialnet_l) the defaults are the paper's per-variant
    ImageNet settings (001 Table 7: epochs, batch, lr, weight decay, warm-up, stochastic depth,
    RandAugment, mixup, CutMix, label smoothing, clipping); any option given overrides them. Table 7's
    batch is a global batch over many GPUs: when it does not fit this machine's memory the largest
    batch that does is used, and said. Other models default to 100 epochs, AdamW lr 1e-3, wd 0.05,
    5 warm-up epochs, label smoothing 0.1. The warm-up is capped at half the run. Outputs as for
    `partialize finetune` (no teacher, report without a baseline); final.safetensors is a partialize
    model file (export, report and load read it).
    """
    from ..base_model import build_model
    from ..train.data import check_data_dir, image_folder_loaders

    defaults = dict(
        epochs=100, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_epochs=5, smoothing=0.1, mixup=0.0,
        cutmix=0.0, clip_grad=None,
    )  # fmt: skip
    extra: dict = {}
    rand_augment = None
    source = "the default"
    if model_spec.startswith("partialnet_"):
        from ..models.partialnet import partialnet_train_settings

        s = partialnet_train_settings(model_spec)
        defaults.update(
            epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"], weight_decay=s["weight_decay"],
            warmup_epochs=s["warmup_epochs"], smoothing=s["label_smoothing"], mixup=s["mixup_alpha"] or 0.0,
            cutmix=s["cutmix_alpha"] or 0.0, clip_grad=s["clip_grad"],
        )  # fmt: skip
        extra["drop_path_rate"] = s["drop_path_rate"]
        rand_augment = s["rand_augment"]
        source = f"{s['source']}, a global batch over many GPUs"
        given = {k for k in defaults if kw.get(k) is not None}
        click.echo(
            f"defaults from {s['source']} for {s['model']}: "
            + ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in given)
            + f", drop_path_rate={s['drop_path_rate']}, rand_augment={rand_augment}"
            + (f"; overridden: {', '.join(sorted(given))}" if given else "")
        )
        click.echo(
            "not reproduced: multi-resolution training (one size per run here), repeated 300-epoch ImageNet "
            "schedule is yours to choose; lr is not rescaled when you change --batch-size"
        )
    cfg = {k: (kw[k] if kw.get(k) is not None else v) for k, v in defaults.items()}
    _check_cli(cfg, kw)  # before anything is read or written
    check_data_dir(data)
    distributed = _join_group()
    from torchvision import datasets

    train_folder = datasets.ImageFolder(os.path.join(data, "train"))
    torch.manual_seed(kw["seed"])  # --seed also fixes the initial weights
    model = build_model(model_spec, weights="random", num_classes=len(train_folder.classes), **extra)
    size, why = _input_size(model, kw["input_size"])
    if size is None:
        import timm.data

        size, why = int(timm.data.resolve_data_config({}, model=model)["input_size"][-1]), why
    cfg["batch_size"] = _fit_batch(model, cfg["batch_size"], kw.get("batch_size") is not None, size, kw["device"],
                                   len(train_folder), source)  # fmt: skip
    _native_plan(model.cpu(), size)
    loaders = image_folder_loaders(
        data, model, batch_size=cfg["batch_size"], input_size=size, seed=kw["seed"],
        workers=kw["workers"], rand_augment=rand_augment,
    )  # fmt: skip
    click.echo(f"resolution: {loaders.input_size}x{loaders.input_size} ({why})\ndata: {loaders.description}")
    kappa = _kappa(model, kw["theta"], kw["target_macs"], loaders.input_size)
    opts = _opts(cfg, kw, 4.0, 0.0)
    settings = {"input_size": loaders.input_size, "model": model_spec, "rand_augment": rand_augment, **extra}
    result = _run(model, loaders, teacher=None, opts=opts, out_dir=kw["out_dir"], resume=kw["resume"],
                  device=kw["device"], kappa=kappa, settings=settings)  # fmt: skip
    _leave_group(distributed)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    _finish(model, result, out_dir=kw["out_dir"], data=data, input_size=loaders.input_size, baseline=None,
            baseline_weighted=False, name=model_spec, report=kw["report"], speed=kw["speed"],
            threads=kw["threads"])  # fmt: skip


def register(main: click.Group) -> None:
    """Add ``finetune`` and ``train`` to the CLI group."""
    main.add_command(finetune_cmd)
    main.add_command(train_cmd)
