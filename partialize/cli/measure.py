"""CLI commands for measurement: ``report``, ``compare`` and ``bench models`` (also reachable as
``bench MODEL [MODEL ...]``); registered by partialize.cli through :func:`register`."""

from __future__ import annotations

import functools
import os

import click

from ..errors import CheckpointError, PartializeError
from ._common import ALLOCATOR_OPTION, POSITIVE, check_device, check_runs_at, friendly_errors, trust_factory_option


def _plan_classes(model) -> int | None:
    """The num_classes the checkpoint's base model was built with, when its plan records it."""
    kwargs = (getattr(getattr(model, "_partialize_plan", None), "model", None) or {}).get("kwargs") or {}
    n = kwargs.get("num_classes")
    return n if isinstance(n, int) else None


def load_model(spec: str, weights: str = "random", *, trust_factory: bool = False, num_classes: int | None = None):
    """A model from a saved checkpoint (an existing path, via partialize.serialization.load) or a model spec
    (built with ``num_classes`` outputs when given)."""
    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise CheckpointError(f"{spec!r} is a folder; give a checkpoint file (.safetensors) or a model name")
        from ..serialization import load

        return load(spec, trust_factory=trust_factory)
    if spec.endswith((".safetensors", ".pt", ".pth")):
        raise CheckpointError(f"checkpoint {spec!r} does not exist (check the path)")
    from ..base_model import build_model

    if num_classes is not None:
        return build_model(spec, weights=weights, num_classes=num_classes)
    return build_model(spec, weights=weights)


def _display_name(spec: str) -> str:
    return os.path.basename(os.path.normpath(spec)) if os.path.exists(spec) else spec


def _converted_size(model) -> int:
    """The size a checkpoint was converted at (what training uses too), else 224."""
    from ..train.runner import plan_input_size

    return plan_input_size(model, None)[0] or 224


def _speed_options(fn):
    opts = [
        click.option(
            "--input-size",
            type=POSITIVE,
            help="Square input size H=W [default: the size a checkpoint was converted at, else 224].",
        ),  # fmt: skip
        click.option(
            "--threads", default=1, type=POSITIVE, show_default=True, help="CPU threads (torch.set_num_threads)."
        ),
        click.option("--batch", default=16, type=POSITIVE, show_default=True, help="Batch size for the throughput."),
        click.option("--device", default="cpu", callback=check_device, show_default=True, help="cpu or cuda[:N]."),
        click.option("--amp", is_flag=True, help="CUDA only: time under fp16 autocast."),
        click.option("--channels-last", is_flag=True, help="Time with channels_last memory format."),
        click.option("--rounds", default=7, type=POSITIVE, show_default=True, help="Interleaved timing rounds."),
        ALLOCATOR_OPTION,
        click.option(
            "--weights",
            default="random",
            show_default=True,
            help="For model names: random, pretrained (needs the network) or a local state_dict file.",
        ),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


class _ModelsByDefault(click.Group):
    """A group whose unknown sub-command names are taken as model names for ``bench models``."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            return "models", self.get_command(ctx, "models"), args
        return super().resolve_command(ctx, args)


def register(main: click.Group, bench: click.Group) -> None:
    """Attach this module's commands to the top-level group and the `bench` group."""
    main.add_command(report_cmd)
    main.add_command(compare_cmd)
    bench.add_command(bench_models_cmd)
    if type(bench) is click.Group:  # let `partialize bench resnet50 resnet18` mean `bench models ...`
        bench.__class__ = _ModelsByDefault
    bench.help = (bench.help or "").rstrip() + (
        "\n\n`partialize bench MODEL [MODEL ...] [OPTIONS]` is short for `partialize bench models MODEL ...`"
        " (options go after the model names)."
    )


@click.command("report")
@click.argument("model_or_checkpoint")
@click.option("--baseline", help="The original model (name or checkpoint) to compare against.")
@click.option("--name", help="Name for the model in the report (default: the argument).")
@click.option("--data", type=click.Path(file_okay=False), help="ImageFolder (DIR/val or DIR) for top-1/5.")
@click.option("--data-limit", type=POSITIVE, help="Evaluate at most this many images.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), help="Write the report as Markdown.")
@click.option("--force", is_flag=True, help="Overwrite --json / --md if they exist (otherwise an error).")
@click.option("--pruning-baseline", is_flag=True, help="Also prune --baseline to the same MACs and measure it.")
@click.option(
    "--pruning-finetune",
    type=POSITIVE,
    metavar="EPOCHS",
    help="Fine-tune the pruned baseline this many epochs (KD from --baseline) on --train-data before its "
    "accuracy is measured: give the budget your converted model had.",
)
@click.option(
    "--train-data",
    type=click.Path(file_okay=False),
    help="ImageFolder root with train/ for --pruning-finetune [default: --data].",
)
@click.option("--ft-lr", type=float, default=5e-4, show_default=True, help="Peak lr of --pruning-finetune.")
@click.option("--num-classes", type=POSITIVE,
              help="Build MODEL and a --baseline given by name with this many classes [default for the baseline: "
                   "the checkpoint's].")  # fmt: skip
@click.option("--ft-batch", type=POSITIVE, default=64, show_default=True, help="Batch size of --pruning-finetune.")
@click.option("--no-speed", is_flag=True, help="Skip timing (params, MACs, accuracy only).")
@_speed_options
@trust_factory_option
@friendly_errors
def report_cmd(
    model_or_checkpoint,
    baseline,
    name,
    data,
    data_limit,
    json_path,
    md_path,
    force,
    pruning_baseline,
    pruning_finetune,
    train_data,
    ft_lr,
    ft_batch,
    num_classes,
    no_speed,
    input_size,
    threads,
    batch,
    device,
    amp,
    channels_last,
    rounds,
    allocator,
    weights,
    trust_factory,
) -> None:
    """Measure a model (or saved checkpoint): params, MACs, speed and, with --data, accuracy.

    MACs are multiply-adds per image of convs, matrix products and attention (partialize.macs), on
    the inference form: DPConv at its learned width, Ada-PConv hard-routed and averaged over a
    calibration batch (32 images of --data, else random); torch.utils.flop_counter's figure is shown
    beside it for information.
    With --baseline both models are timed side by side (interleaved rounds, medians) and reported
    as ratios. --pruning-baseline adds the baseline pruned to the same MACs (torch-pruning,
    magnitude importance); its accuracy is measured only after --pruning-finetune EPOCHS (KD from the
    baseline on --train-data/train, default --data), since a pruned network untrained is not what a
    user would deploy. Unmeasured figures read "not measured".
    """
    from rich.console import Console

    from .._fs import write_text
    from ..measure.render import render_report_details, render_report_table, report_markdown
    from ..measure.report import build_report

    # every output is checked before anything is loaded or timed
    _check_outputs({"--json": json_path, "--md": md_path}, force, inputs=[model_or_checkpoint, baseline, weights])
    finetune = _pruning_finetune(pruning_finetune, pruning_baseline, train_data, data, ft_lr, ft_batch)
    console = Console()
    with console.status("loading models") as status:
        model = load_model(model_or_checkpoint, weights, trust_factory=trust_factory, num_classes=num_classes)
        input_size = input_size or _converted_size(model)
        check_runs_at(model, input_size, model_or_checkpoint)
        classes = num_classes or _plan_classes(model)  # a 10-class checkpoint is compared with a 10-class baseline
        base = load_model(baseline, weights, trust_factory=trust_factory, num_classes=classes) if baseline else None
        if base is not None:
            check_runs_at(base, input_size, baseline)
        rep = build_report(
            model,
            name=name or _display_name(model_or_checkpoint),
            input_size=input_size,
            baseline=base,
            baseline_name=_display_name(baseline) if baseline else "baseline",
            speed=not no_speed,
            threads=threads,
            batch=batch,
            device=device,
            amp=amp,
            channels_last=channels_last,
            rounds=rounds,
            allocator=allocator,
            data=data,
            data_limit=data_limit,
            pruning_baseline=pruning_baseline,
            pruning_finetune=None if finetune is None else functools.partial(finetune, input_size=input_size),
            source=model_or_checkpoint,
            baseline_source=baseline,
            progress=lambda msg: status.update(msg),
        )
    console.print(render_report_table(rep))
    for t in render_report_details(rep):
        console.print(t)
    for m in rep.entries():
        for n in m.notes:
            console.print(f"[dim]{m.name}: {n}[/dim]")
    if json_path:
        write_text(json_path, rep.to_json() + "\n", force=force, option="--json")
        click.echo(f"wrote {json_path}")
    if md_path:
        write_text(md_path, report_markdown(rep), force=force, option="--md")
        click.echo(f"wrote {md_path}")


def _pruning_finetune(epochs, pruning_baseline, train_data, data, lr, batch):
    """The fine-tune ``report --pruning-finetune`` gives the pruned baseline (KD from the baseline on
    DIR/train with partialize.train.finetune's defaults), its options checked before anything is
    loaded; None without the option."""
    if not epochs:
        if train_data:
            raise click.UsageError("--train-data is only used by --pruning-finetune")
        return None
    if not pruning_baseline:
        raise click.UsageError("--pruning-finetune fine-tunes the pruning baseline: add --pruning-baseline")
    root = train_data or data
    if root is None:
        raise click.UsageError("--pruning-finetune needs --train-data DIR (or --data DIR) with a train/ folder")
    from ..train import finetune
    from ..train.data import check_data_dir, image_folder_loaders

    check_data_dir(root)  # a clear error now, before anything is loaded
    if lr <= 0:
        raise click.BadParameter(f"must be > 0, got {lr}", param_hint="--ft-lr")

    def run(pruned, baseline, input_size: int) -> dict:
        loaders = image_folder_loaders(root, pruned, batch_size=batch, input_size=input_size, seed=0)
        res = finetune(
            pruned, loaders.train, None, teacher=baseline.eval(), epochs=epochs, lr=lr, seed=0, progress=False, log=None
        )
        last = res.history[-1] if res.history else {}
        return {
            "data": root, "epochs": epochs, "lr": lr, "batch_size": loaders.train.batch_size,
            "teacher": "the baseline (KD)", "train_images": len(loaders.train.dataset),
            "train_loss": last.get("train_loss"),
        }  # fmt: skip

    return run


def _check_outputs(paths: dict[str, str | None], force: bool, inputs=()) -> dict[str, str]:
    """Check every output path before the work (exists without --force, unwritable, an input, the same
    file twice) and return the ones given."""
    from .._fs import check_output

    given = {opt: p for opt, p in paths.items() if p}
    seen: dict[str, str] = {}
    for opt, p in given.items():
        key = os.path.abspath(p)
        if key in seen:
            raise PartializeError(f"{seen[key]} and {opt} are the same file {p!r}; give each its own path")
        seen[key] = opt
        check_output(p, force=force, option=opt, inputs=inputs)
    return given


@click.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--md", "md_path", type=click.Path(dir_okay=False), help="Write the table as Markdown.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a plot (.png, .svg, .pdf).")
@click.option("--force", is_flag=True, help="Overwrite --md / --plot if they exist (otherwise an error).")
@click.option("--no-speed", is_flag=True, help="Ignore speed (compare reports timed under different settings).")
@click.option(
    "--remeasure",
    is_flag=True,
    help="Time every model again, side by side in one run (needs the models: each report's source "
    "checkpoint or model name), under the reports' speed settings.",
)
@trust_factory_option
@friendly_errors
def compare_cmd(reports, md_path, plot_path, force, no_speed, remeasure, trust_factory) -> None:
    """Put several `partialize report --json` files in one table (ratios vs the first model).

    Refuses, with the reason, reports whose units, input size or speed settings (device, threads,
    batch, precision, memory format) differ. Each report was timed in its own run: throughput ratios
    between models of different reports are marked "separate runs" (they carry run-to-run drift);
    --remeasure times them all again side by side. --plot draws top-1 (or GMACs when accuracy was
    not measured) against throughput, like PartialNet's Figure 2, with spread bars.
    """
    from rich.console import Console

    from ..measure.render import compare_markdown, compare_table, plot_entries, plot_format
    from ..measure.report import check_compatible, compare_entries, load_reports

    if remeasure and no_speed:
        raise PartializeError("--remeasure times the models and --no-speed ignores speed: give one of them")
    _check_outputs({"--md": md_path, "--plot": plot_path}, force, inputs=reports)
    if plot_path:
        plot_format(plot_path)
    reps = load_reports(list(reports))
    if no_speed:
        for r in reps:
            r.speed_conditions = None
    check_compatible(reps, list(reports))
    entries = compare_entries(reps, with_speed=not no_speed)
    first_report = {}
    for label, r in zip(reports, reps):
        for m in r.entries():
            first_report.setdefault(m.name, label)
    runs = [first_report[m.name] for m in entries]
    conditions = next((r.speed_conditions for r in reps if r.speed_conditions), None)
    if remeasure:
        conditions, runs = _remeasure(entries, reps, runs, trust_factory)
    Console().print(compare_table(entries, conditions, runs))
    if md_path:
        from .._fs import write_text

        write_text(md_path, compare_markdown(entries, conditions, runs), force=force, option="--md")
        click.echo(f"wrote {md_path}")
    if plot_path:
        what = plot_entries(entries, plot_path, conditions, runs, force=force)
        click.echo(f"wrote {plot_path} ({what})")


def _remeasure(entries, reps, runs, trust_factory: bool):
    """Time every entry again, side by side, under the reports' speed conditions; entries are updated in
    place. Returns the new conditions and run labels."""
    from ..measure.speed import measure_speed

    cond = next((r.speed_conditions for r in reps if r.speed_conditions), None) or {}
    models = {}
    for m in entries:
        if not m.source:
            raise PartializeError(
                f"--remeasure: the report of {m.name!r} does not say which model it measured (no source; a "
                "pruning baseline is rebuilt by `partialize report --pruning-baseline`); compare without "
                "--remeasure, or time the models with `partialize bench`"
            )
        if not os.path.exists(m.source) and m.source.endswith((".safetensors", ".pt", ".pth")):
            raise PartializeError(
                f"--remeasure: {m.name!r} was measured from {m.source!r}, which is not here; run compare from "
                "the folder the reports were made in"
            )
        models[m.name] = load_model(m.source, "random", trust_factory=trust_factory)
    device = str(cond.get("device", "cpu")).split(":")[0] or "cpu"
    chw = tuple(reps[0].input_size)
    click.echo(f"re-measuring {len(models)} model(s) side by side ({device}) ...", err=True)
    res = measure_speed(
        models,
        chw,
        threads=cond.get("threads") or 1,
        batch=cond.get("batch") or 16,
        device=device,
        amp=cond.get("precision") == "amp-fp16",
        channels_last=bool(cond.get("channels_last")),
        rounds=cond.get("rounds") or 7,
        allocator=cond.get("allocator") or "system",
    )
    for m in entries:
        m.speed = res["models"][m.name]
    return res["conditions"], ["re-measured side by side"] * len(entries)


@click.command("models")
@click.argument("models", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the timings as JSON.")
@click.option("--force", is_flag=True, help="Overwrite --json if it exists (otherwise an error).")
@_speed_options
@trust_factory_option
@friendly_errors
def bench_models_cmd(
    models,
    json_path,
    force,
    input_size,
    threads,
    batch,
    device,
    amp,
    channels_last,
    rounds,
    allocator,
    weights,
    trust_factory,
) -> None:
    """Time models side by side: latency at batch 1, throughput at --batch, ratios vs the first.

    Every model runs interleaved with the others round after round, so machine-load drift hits all
    alike; figures are medians with IQR. Also prints params and MACs (multiply-adds per image;
    DPConv / Ada-PConv counted as in `report`, over 32 random calibration images).
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from ..measure.flops import count_params, macs_breakdown
    from ..measure.speed import measure_speed

    _check_outputs({"--json": json_path}, force, inputs=list(models) + [weights])
    console = Console()
    with console.status("loading models") as status:
        loaded = {}
        for spec in models:
            name = _display_name(spec)
            if name in loaded:
                raise PartializeError(f"model {name!r} is given twice")
            loaded[name] = load_model(spec, weights, trust_factory=trust_factory)
        input_size = input_size or _converted_size(next(iter(loaded.values())))  # the first model's
        for spec, m in zip(models, loaded.values()):
            check_runs_at(m, input_size, spec)
        macs = {n: macs_breakdown(m, input_size, crosscheck=False)["total"] for n, m in loaded.items()}
        status.update("timing side by side")
        res = measure_speed(
            loaded,
            input_size,
            threads=threads,
            batch=batch,
            device=device,
            amp=amp,
            channels_last=channels_last,
            rounds=rounds,
            allocator=allocator,
        )
    cond = res["conditions"]
    t = Table(title="partialize bench (ratios vs the first model)")
    cols = ("model", "params (M)", "GMACs", "latency ms (b=1)", "x first", "img/s", "x first", "peak MiB")
    for col in cols:
        t.add_column(col, justify="left" if col == "model" else "right")
    first = next(iter(loaded))
    f_lat = res["models"][first]["latency_ms"]["median"]
    f_thr = res["models"][first]["throughput_ips"]["median"]
    for n, m in loaded.items():
        r = res["models"][n]
        lat, thr = r["latency_ms"], r["throughput_ips"]
        mem = r.get("peak_memory_mib")
        t.add_row(
            n,
            f"{count_params(m) / 1e6:.2f}",
            f"{macs[n] / 1e9:.3f}",
            f"{lat['median']:.2f} ± {lat['iqr']:.2f}" + (" (noisy)" if lat.get("noisy") else ""),
            f"{f_lat / lat['median']:.2f}x",
            f"{thr['median']:.1f}" + (" (noisy)" if thr["batch_time_ms"].get("noisy") else ""),
            f"{thr['median'] / f_thr:.2f}x",
            f"{mem:.0f}" if mem is not None else "not measured",
        )
    threads_txt = f", {cond['threads']} thread(s)" if cond.get("threads") else ""
    h, w = cond["input_size"][-2:]
    layout = ", channels_last" if cond.get("channels_last") else ""
    alloc = f"; allocator {cond['allocator']}" if cond.get("threads") else ""
    t.caption = (
        f"{cond['device']}{threads_txt}; input {h}x{w}; batch {batch}; {cond['precision']}{layout}{alloc}; "
        "deployed forms; warm-up by time, "
        f"medians of {rounds} interleaved rounds ± IQR, 'noisy' when IQR > 5% of the median; latency x = "
        "speed-up (first / this); GMACs = 1e9 multiply-adds per image."
    )
    console.print(t)
    if json_path:
        for n in loaded:
            res["models"][n]["macs"] = macs[n]
            res["models"][n]["params"] = count_params(loaded[n])
        from .._fs import write_text

        write_text(json_path, json.dumps(res, indent=2) + "\n", force=force, option="--json")
        click.echo(f"wrote {json_path}")
