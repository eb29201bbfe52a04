"""CLI commands ``finetune`` and ``train``; registered by partialize.cli through :func:`register`."""

from __future__ import annotations

import copy
import json
import os

import click
import torch
from torch import nn

from ..cliutil import friendly_errors
from ..errors import CheckpointError, PartializeError


def _warn(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        click.secho(f"warning: {msg}", fg="yellow", err=True)


def _join_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the process group *before* any loader is built: the
    DistributedSampler reads the rank and world size when it is created, so a loader built earlier
    would hand every rank the whole dataset. True when distributed."""
    from .distributed import init_distributed

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
    from ..io import load, read_plan
    from ..zoo import build_model

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

    from ..io import save
    from .finetune import freeze_dynamic

    console = Console()
    model = model.cpu()
    if getattr(model, "_partialize_plan", None) is not None:
        path = save(model, os.path.join(out_dir, "final.safetensors"), overwrite=True)  # a rerun replaces it
        console.print(f"wrote {path} (training form)")
    else:  # a plain state_dict, loadable with --weights PATH / --teacher-weights PATH
        from safetensors.torch import save_file

        path = os.path.join(out_dir, "final.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        console.print(f"wrote {path} (state_dict)")
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


def _run(model, loaders, *, teacher, opts: dict, out_dir: str, resume: bool, device, kappa) -> object:
    from .finetune import finetune

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
        **opts,
    )


def _kappa(model, theta, target_macs, input_size) -> float | None:
    from .constraints import kappa_from_target_macs, kappa_from_theta

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
    from ..io import load
    from ..zoo import build_model
    from .data import check_data_dir, image_folder_loaders

    check_data_dir(data)
    distributed = _join_group()
    model = load(converted)
    if not any(p.requires_grad for p in model.parameters()):
        from .finetune import TrainingError

        raise TrainingError(
            f"{converted!r} is marked deployed, so it loads as the frozen inference form (BN folded, no "
            "trainable parameters), which cannot be fine-tuned; pass the training-form file written by "
            "`partialize convert --out` (or partialize.save(model) without deployed=True)"
        )
    defaults = dict(
        epochs=30, lr=1e-3, batch_size=64, weight_decay=0.05, warmup_epochs=1, smoothing=0.1, mixup=0.0,
        cutmix=0.0, clip_grad=None,
    )  # fmt: skip
    cfg = {k: (kw[k] if kw.get(k) is not None else v) for k, v in defaults.items()}
    loaders = image_folder_loaders(
        data, model, batch_size=cfg["batch_size"], input_size=kw["input_size"], seed=kw["seed"],
        workers=kw["workers"],
    )  # fmt: skip
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
                  device=kw["device"], kappa=kappa)  # fmt: skip
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


@click.command("train")
@click.argument("model_spec", metavar="MODEL")
@_common_options
@_dynamic_options
@friendly_errors
def train_cmd(model_spec, data, **kw) -> None:
    """Train MODEL from scratch on an ImageFolder.

    For the native family (partialnet_t0 ... partialnet_l) the defaults are the paper's per-variant
    ImageNet settings (001 Table 7: epochs, batch, lr, weight decay, warm-up, stochastic depth,
    RandAugment, mixup, CutMix, label smoothing, clipping); any option given overrides them. Other
    models default to 100 epochs, AdamW lr 1e-3, wd 0.05, 5 warm-up epochs, label smoothing 0.1.
    Outputs as for `partialize finetune` (no teacher, report without a baseline).
    """
    from ..zoo import build_model
    from .data import check_data_dir, image_folder_loaders

    check_data_dir(data)
    distributed = _join_group()
    defaults = dict(
        epochs=100, lr=1e-3, batch_size=128, weight_decay=0.05, warmup_epochs=5, smoothing=0.1, mixup=0.0,
        cutmix=0.0, clip_grad=None,
    )  # fmt: skip
    extra: dict = {}
    rand_augment = None
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
    from torchvision import datasets

    n_classes = len(datasets.ImageFolder(os.path.join(data, "train")).classes)
    model = build_model(model_spec, weights="random", num_classes=n_classes, **extra)
    loaders = image_folder_loaders(
        data, model, batch_size=cfg["batch_size"], input_size=kw["input_size"], seed=kw["seed"],
        workers=kw["workers"], rand_augment=rand_augment,
    )  # fmt: skip
    click.echo(f"data: {loaders.description}")
    kappa = _kappa(model, kw["theta"], kw["target_macs"], loaders.input_size)
    opts = _opts(cfg, kw, 4.0, 0.0)
    result = _run(model, loaders, teacher=None, opts=opts, out_dir=kw["out_dir"], resume=kw["resume"],
                  device=kw["device"], kappa=kappa)  # fmt: skip
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
