"""CLI commands ``finetune`` and ``train``: parse the options, call ``partialize.train.run_finetune`` /
``run_train``, print what they did; registered by partialize.cli through :func:`register`.

The operator families' options (``--theta``, ``--target-macs``, ``--router-budget``, ``--ada-routing``...)
are built from what the registered operators declare (``PartialOperator.training_settings``)."""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.table import Table

from ..train.config import declared_settings
from ..train.runner import RunResult, interrupted_message, run_finetune, run_train
from ._common import friendly_errors, trust_factory_option


def _warn(msg: str) -> None:
    click.secho(f"warning: {msg}", fg="yellow", err=True)


def _common_options(fn):
    opts = [
        click.option("--data", required=True, help="ImageFolder root with train/ (and val/) subfolders."),
        click.option("--epochs", type=int, help="Epochs."),
        click.option("--lr", type=float, help="Peak AdamW learning rate (after warm-up)."),
        click.option("--batch-size", type=int, help="Per-process batch size."),
        click.option("--weight-decay", type=float, help="AdamW weight decay (not on biases, norms, gates)."),
        click.option("--warmup-epochs", type=float, help="Linear warm-up epochs before the cosine decay."),
        click.option("--smoothing", "label_smoothing", type=float, help="Label smoothing."),
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
        click.option(
            "--force", is_flag=True, help="Replace the run already in OUT (its files are removed first)."
        ),  # fmt: skip
        click.option("--device", help="cpu or cuda[:N] [default: cuda if available]."),
        click.option("--report/--no-report", default=True, show_default=True, help="Write report.json/.md at the end."),
        click.option("--speed/--no-speed", default=True, show_default=True, help="Time the models in the report."),
        click.option("--threads", default=1, show_default=True, help="CPU threads for the report's timing."),
        click.option(
            "--train-threads",
            type=int,
            help="torch CPU threads while training [default: torch's, one per core]; on a shared machine fewer "
            "can be much faster (docs/training.md).",
        ),  # fmt: skip
        click.option(
            "--gate-lr-scale",
            default=1.0,
            show_default=True,
            help="lr multiplier of learned-structure parameters (DPConv gates).",
        ),  # fmt: skip
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _operator_options(fn):
    """One option per training setting the registered operators declare with a flag."""
    for key, s in reversed(list(declared_settings().items())):
        if s.flag:
            kind = click.Choice(s.choices) if s.choices else s.value_type
            fn = click.option(s.flag, key, type=kind, default=s.default, show_default=s.default is not None,
                              help=s.help)(fn)  # fmt: skip
    return fn


def _run(fn, *args, out_dir: str, trust_factory: bool = False, **kw) -> RunResult:
    """Call a run (``--trust-factory`` lets the checkpoints it loads build a ``package.module:factory``
    base model); Ctrl-C exits 130 saying what is kept and how to continue."""
    from ..serialization import trusting_factories

    try:
        with trusting_factories(trust_factory):
            return fn(*args, out_dir=out_dir, log=click.echo, warn=_warn, **kw)
    except KeyboardInterrupt:
        click.secho(f"\ninterrupted: {interrupted_message(out_dir)}", fg="yellow", err=True)
        sys.exit(130)


def _render(res: RunResult) -> None:
    """Rank 0: what was written and the learned structure that was frozen."""
    if not res.written:
        return
    console = Console()
    console.print(f"wrote {res.model_path} (partialize model file, training form)")
    if res.frozen:
        t = Table(title="Learned ratios, frozen to static slices")
        for c in ("layer", "channels", "conv width", "ratio"):
            t.add_column(c, justify="left" if c == "layer" else "right")
        for n, d in res.frozen.items():
            ratio = d.get("realised_ratio")
            t.add_row(n, str(d.get("channels", "")), str(d.get("width", "")), "" if ratio is None else f"{ratio:.4f}")
        console.print(t)
    if res.report_paths:
        console.print(f"wrote {res.report_paths[0]} and {os.path.basename(res.report_paths[1])}")


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
@_operator_options
@trust_factory_option
@friendly_errors
def finetune_cmd(converted, data, **kw) -> None:
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
    _render(_run(run_finetune, converted, data, **kw))


@click.command("train")
@click.argument("model_spec", metavar="MODEL")
@_common_options
@_operator_options
@trust_factory_option
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
    _render(_run(run_train, model_spec, data, **kw))


def register(main: click.Group) -> None:
    """Add ``finetune`` and ``train`` to the CLI group."""
    main.add_command(finetune_cmd)
    main.add_command(train_cmd)
