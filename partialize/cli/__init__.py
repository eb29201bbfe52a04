"""Command line interface: thin click commands over the Python API."""

from __future__ import annotations

import contextlib

import click

from .._version import __version__
from ._common import ALLOCATOR_OPTION, POSITIVE, check_device, friendly_errors, int_list, trust_factory_option

_friendly_errors = friendly_errors  # the name command modules and older code use


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="partialize")
def main() -> None:
    """partialize: convert vision networks to partial-channel form and measure what changed.

    Partial-channel operators run an expensive op (a 3x3 conv) on a share of the channels and
    something cheap (identity, attention) on the rest: PConv, PATConv, DPConv, Ada-PConv.
    Every MAC count printed is a multiply-add (the papers' "FLOPs").
    """


@main.group()
def bench() -> None:
    """Speed benchmarks, measured side by side and reported as ratios."""


@bench.command("ops")
@click.option("--threads", default=1, type=POSITIVE, show_default=True, help="torch.set_num_threads for the run.")
@click.option(
    "--channels", default="64,128,256", callback=int_list, show_default=True, help="Comma-separated C values."
)
@click.option("--sizes", default="56,28,14", callback=int_list, show_default=True, help="Comma-separated H=W values.")
@click.option("--batches", default="1,16", callback=int_list, show_default=True, help="Comma-separated batch sizes.")
@click.option("--rounds", default=5, type=POSITIVE, show_default=True, help="Interleaved timing rounds per point.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), help="Also write a Markdown table.")
@click.option("--force", is_flag=True, help="Overwrite --md if it exists (otherwise an existing file is an error).")
@friendly_errors
def bench_ops_cmd(threads, channels, sizes, batches, rounds, md_path, force) -> None:
    """Time every operator against a dense and a depthwise 3x3 conv (CPU).

    For each channel count C, spatial size and batch, all candidates run interleaved round by
    round; the table gives the median time per call and its ratio to the dense and the depthwise
    conv measured in the same run.
    """
    from rich.console import Console
    from rich.progress import Progress

    from .._fs import check_output, write_text
    from ..measure.opbench import bench_ops, machine_description
    from ..measure.render import op_bench_markdown, op_bench_table

    if md_path:
        check_output(md_path, force=force, option="--md")
    cs, ss, bs = channels, sizes, batches
    with Progress(transient=True) as prog:
        task = prog.add_task("benchmarking operators", total=len(cs) * len(ss) * len(bs))
        rows = bench_ops(cs, ss, bs, threads=threads, rounds=rounds, progress=lambda: prog.advance(task))
    machine = machine_description(threads)
    Console().print(op_bench_table(rows, machine))
    if md_path:
        write_text(md_path, op_bench_markdown(rows, machine), force=force, option="--md")
        click.echo(f"wrote {md_path}")


@main.command()
@click.argument("model")
@click.option(
    "--recipe",
    "-r",
    "recipe_path",
    default="default",
    show_default=True,
    help="Recipe file, or the name of a shipped recipe (see `partialize recipe list`).",
)
@click.option(
    "--weights",
    default="random",
    show_default=True,
    help="random | pretrained (downloads; needs network) | PATH to a local state_dict file.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write the converted model here (.safetensors: plan + tensors).",
)
@click.option("--input-size", type=POSITIVE, help="Example input size for discovery [default: the model's].")
@click.option("--num-classes", type=POSITIVE, help="Build the base model with this many classes.")
@click.option("--dry-run", is_flag=True, help="Print the plan only: no conversion, nothing written.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists (otherwise an existing file is an error).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan (and summary) as JSON on stdout.")
@click.option(
    "--speed/--no-speed",
    default=True,
    show_default=True,
    help="Measure CPU latency (batch 1) and throughput before vs after, side by side.",
)
@click.option("--threads", default=1, type=POSITIVE, show_default=True, help="torch threads for the speed check.")
@click.option("--batch", default=16, type=POSITIVE, show_default=True, help="Batch size for the throughput check.")
@click.option(
    "--calibrate",
    "calib_dir",
    type=click.Path(),
    help="ImageFolder of unlabelled images: calibrate the converted model against the original on them "
    "(channel choice, BN statistics, block-wise distillation) and print its fidelity before and after.",
)
@click.option("--calib-images", default=512, type=POSITIVE, show_default=True, help="Calibration images to use.")
@click.option(
    "--calib-steps", default=200, type=click.IntRange(min=0), show_default=True, help="Distillation steps per block."
)
@friendly_errors
def convert(
    model,
    recipe_path,
    weights,
    out,
    input_size,
    num_classes,
    dry_run,
    force,
    as_json,
    speed,
    threads,
    batch,
    calib_dir,
    calib_images,
    calib_steps,
) -> None:
    """Convert MODEL to partial-channel form by a recipe and print what changed.

    MODEL is a timm name (resnet50), torchvision:NAME (torchvision:resnet50) or
    package.module:factory for your own nn.Module. The plan lists every converted layer with
    its change in params and MACs (multiply-accumulates, batch 1), and every matched layer that
    was left alone with the reason. Example:

      partialize convert resnet50 --recipe recipes/resnet50-patconv.yaml --out r50.safetensors
    """
    import contextlib
    import json
    import sys as _sys

    from rich.console import Console

    from ..api import convert as run_convert
    from ..engine.render import plan_table, speed_table, summary_table
    from ._render import CalibrationBar, fidelity_table

    stream = _sys.stderr if as_json else _sys.stdout
    console = Console(stderr=as_json, width=None if stream.isatty() else 150)
    bar = CalibrationBar(console) if calib_dir and not as_json else contextlib.nullcontext()
    with bar:
        res = run_convert(
            model,
            recipe_path,
            weights=weights,
            num_classes=num_classes,
            input_size=input_size,
            out=out,
            force=force,
            dry_run=dry_run,
            speed=speed,
            threads=threads,
            batch=batch,
            calibrate=calib_dir,
            calib_images=calib_images,
            calib_steps=calib_steps,
            progress=None if as_json else lambda msg: console.print(f"[dim]{msg}...[/dim]"),
            calib_progress=getattr(bar, "update", None),
        )
    if as_json:
        name = res.plan.recipe.get("name") or recipe_path
        click.echo(json.dumps({"model": model, "recipe": name} | res.to_dict(), indent=2, default=str))
        return
    for note in res.notes:
        console.print(f"[dim]{note}[/dim]")
    console.print(plan_table(res.plan))
    console.print(summary_table(res.plan))
    if res.calibration is not None:
        console.print(fidelity_table(res.calibration))
    if res.speed is not None:
        console.print(speed_table(res.speed, res.plan))
    if res.path:
        console.print(f"wrote {res.path}")


@main.command("export")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["onnx", "torchscript", "safetensors"]),
    required=True,
    help="onnx (verified under onnxruntime), torchscript (torch.jit.trace) or safetensors "
    "(plan + trained tensors marked deployed; partialize.load returns the deployed model).",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False),
    help="Output file [default: CHECKPOINT stem + .onnx / .ts.pt / .deployed.safetensors].",
)
@click.option("--input-size", type=POSITIVE, help="H=W of the example input [default: the size the plan was made at].")
@click.option(
    "--batch", default=1, type=POSITIVE, show_default=True, help="Batch of the example input (ONNX batch is dynamic)."
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists (written to a temp file, then replaced).")
@trust_factory_option
@friendly_errors
def export_cmd(checkpoint, fmt, out, input_size, batch, force, trust_factory) -> None:
    """Deploy CHECKPOINT (a partialize .safetensors) and export it.

    Deploy = BN folded into the preceding convs (also inside the operators), PAT_sp merged into its
    MLP conv, DPConv frozen to a static slice at its learned ratio, Ada-PConv hard routing, PConv in
    its slicing form. The deployed model is checked against the eval-mode trained model, and the
    exported file against the deployed model, on the same random input (relative error <= 1e-4);
    nothing is written if a check fails, and an existing file is kept unless --force.

    Ada-PConv in ONNX/TorchScript: routing stays per sample (arg-max of the router), expressed as
    "every branch on the whole batch, select per sample", so the file costs all branches. Example:

      partialize export r50.safetensors --format onnx --out r50.onnx
    """
    import os

    from .._fs import check_folder, check_output
    from ..exporting import export
    from ..serialization import trusting_factories

    if out:
        check_output(out, force=force, inputs=[checkpoint])
    else:  # the default name sits next to the checkpoint
        check_folder(os.path.dirname(os.path.abspath(checkpoint)), option="the export next to CHECKPOINT")
    with trusting_factories(trust_factory):
        res = export(
            checkpoint,
            fmt,
            out,
            input_size=input_size,
            batch=batch,
            force=force,
            progress=lambda msg: click.echo(msg, err=True),
        )
    click.echo(f"deployed vs trained (eval), max relative error: {res.deploy_rel_err:.2e}")
    what = {"onnx": "ONNX (onnxruntime)", "torchscript": "TorchScript", "safetensors": "reloaded"}[fmt]
    click.echo(f"{what} vs deployed PyTorch, max relative error: {res.max_rel_err:.2e}")
    for note in res.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {res.path} (input {'x'.join(map(str, res.input_shape))})")


@main.command("search")
@click.argument("model")
@click.option("--target-speedup", type=click.FloatRange(min=1.0, min_open=True), required=True,
              help="Throughput speed-up to reach over the original, deployed forms (e.g. 2.0).")  # fmt: skip
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Write the recipe (YAML) here.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the full result as JSON.")
@click.option("--threads", default=1, type=POSITIVE, show_default=True, help="torch CPU threads for every timing.")
@click.option("--batch", default=16, type=POSITIVE, show_default=True, help="Batch the speed-up is for.")
@click.option("--input-size", type=POSITIVE, help="Input H=W [default: the model's].")
@click.option("--data", type=click.Path(file_okay=False), help="ImageFolder for the accuracy proxy [default: N(0,1)].")
@click.option("--weights", default="random", show_default=True, help="random | pretrained | PATH (a state_dict).")
@click.option("--num-classes", type=POSITIVE, help="Build the base model with this many classes.")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="Where to time: cpu or cuda[:N] (CUDA timings are synchronised; --threads then only sets "
                   "the host's threads).")  # fmt: skip
@click.option("--variants", help="Only these operators, comma-separated (e.g. partial_residual or "
              "pconv,partial_residual) [default: every one the search tries].")  # fmt: skip
@click.option("--no-remeasure", is_flag=True, help="Skip timing the whole converted model at the end.")
@click.option("--no-cache", is_flag=True, help="Time every option again instead of reusing this machine's cache.")
@ALLOCATOR_OPTION
@click.option("--channels-last", is_flag=True,
              help="Time every model, the original too, with weights and input in NHWC (channels_last), "
                   "often faster on CPU (docs/search.md). Deploy the recipe's model the same way: "
                   "model.to(memory_format=torch.channels_last).")  # fmt: skip
@click.option("--force", is_flag=True, help="Overwrite --out / --json if they exist.")
@friendly_errors
def search_cmd(model, target_speedup, out, json_path, threads, batch, input_size, data, weights, num_classes,
               device, variants, no_remeasure, no_cache, allocator, channels_last, force) -> None:  # fmt: skip
    """Find the partial form of MODEL that reaches --target-speedup on this machine at the least
    predicted accuracy cost, and write it as a recipe.

    Every layer an operator accepts is tried with each option (PConv 1/8, 1/4, 1/2, PATConv, partial
    MLP / residual / attention, a stage's first residual block with its projection shortcut, and
    combinations inside a block), each built by the planner, deployed and timed in place at its real
    input shape, batch and threads (cached per machine) and scaled to how the unit runs inside the
    whole model; the choice is an exact knapsack on a time grid; the whole converted model is then
    re-measured side by side with the original (predicted vs measured). Example:

      partialize search resnet50 --target-speedup 2.0 --out r50-2x.yaml --json r50-2x.json
    """
    from rich.console import Console

    from .._fs import check_output
    from ..base_model import build_model
    from ..recipe_search import conditions_text, options_for, search, write_result

    options = options_for(variants)  # a bad name fails before anything is built
    check_output(out, force=force, option="--out")
    if json_path:
        check_output(json_path, force=force, option="--json")
    console = Console()
    base = build_model(model, weights=weights, num_classes=num_classes).eval()
    if weights == "random":
        console.print(
            "[yellow]note: random weights: the times hold for any weights, but the accuracy proxy ranks the "
            "options for these random weights (timm zero-initialises residual branches, so changing them looks "
            "free); pass --weights for a trained model[/yellow]"
        )
    with _search_progress(console) as progress:
        res = search(
            base, target_speedup, name=model, input_size=input_size, threads=threads, batch=batch, data=data,
            device=device, options=options, remeasure=not no_remeasure, cache=not no_cache, allocator=allocator,
            channels_last=channels_last, progress=progress,
        )  # fmt: skip
    write_result(res, out, json_path, force=force)
    for note in res.notes:
        console.print(f"note: {note}")
    measured = f"{res.measured_speedup:.2f}x" if res.measured_speedup is not None else "not measured"
    console.print(
        f"{len(res.recipe['rules'])} rules; predicted {res.predicted_speedup:.2f}x, measured {measured} "
        f"(target {target_speedup:g}x; {device}, {conditions_text(res.conditions)}); {res.seconds['total']:.0f} s"
    )
    console.print(f"wrote {out}" + (f" and {json_path}" if json_path else ""))


@contextlib.contextmanager
def _search_progress(console):
    """A bar over the cost table's units ("unit i/N: ..." messages); other messages printed above it."""
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)  # fmt: skip
    task = bar.add_task("cost table", total=None)

    def progress(message: str) -> None:
        m = re.match(r"unit (\d+)/(\d+): (.*)", message)
        if m:
            bar.update(task, completed=int(m.group(1)) - 1, total=int(m.group(2)), description=m.group(3)[:48])
        else:
            bar.console.print(f"[dim]{message}[/dim]")

    with bar:
        yield progress


@main.group()
def recipe() -> None:
    """Inspect and validate recipes."""


@recipe.command("validate")
@click.argument("file")
@friendly_errors
def recipe_validate(file) -> None:
    """Check FILE against the recipe schema; errors name the line, field and fix."""
    from ..recipe import load_recipe

    rec = load_recipe(file)
    click.echo(f"{file}: valid recipe {rec.name or ''} ({len(rec.rules)} rules)".replace("  ", " "))


@recipe.command("schema")
def recipe_schema() -> None:
    """Print the recipe JSON Schema."""
    import json

    from ..recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))


@recipe.command("list")
def recipe_list() -> None:
    """List the shipped recipes with their descriptions."""
    from ..recipe import list_shipped_recipes, load_recipe

    for name in list_shipped_recipes():
        click.echo(f"{name:28s} {load_recipe(name).description or ''}")


def _register_commands() -> None:
    from .measure import register as register_measure

    register_measure(main, bench)
    from .train import register as register_train

    register_train(main)
    from .scan import register as register_scan

    register_scan(main)


_register_commands()
