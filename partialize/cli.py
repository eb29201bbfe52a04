"""Command line interface: thin click commands over the Python API."""

from __future__ import annotations

import functools
import sys

import click

from . import __version__
from .errors import PartializeError


def _friendly_errors(fn):
    """Print PartializeError messages without a traceback and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PartializeError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)

    return wrapper


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
@click.option("--threads", default=1, show_default=True, help="torch.set_num_threads for the run.")
@click.option("--channels", default="64,128,256", show_default=True, help="Comma-separated C values.")
@click.option("--sizes", default="56,28,14", show_default=True, help="Comma-separated H=W values.")
@click.option("--batches", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--rounds", default=5, show_default=True, help="Interleaved timing rounds per point.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False), help="Also write a Markdown table.")
@_friendly_errors
def bench_ops_cmd(threads, channels, sizes, batches, rounds, md_path) -> None:
    """Time every operator against a dense and a depthwise 3x3 conv (CPU).

    For each channel count C, spatial size and batch, all candidates run interleaved round by
    round; the table gives the median time per call and its ratio to the dense and the depthwise
    conv measured in the same run.
    """
    from rich.console import Console
    from rich.progress import Progress

    from .measure.opbench import bench_ops, machine_description
    from .measure.render import op_bench_markdown, op_bench_table

    parse = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    cs, ss, bs = parse(channels), parse(sizes), parse(batches)
    with Progress(transient=True) as prog:
        task = prog.add_task("benchmarking operators", total=len(cs) * len(ss) * len(bs))
        rows = bench_ops(cs, ss, bs, threads=threads, rounds=rounds, progress=lambda: prog.advance(task))
    machine = machine_description(threads)
    Console().print(op_bench_table(rows, machine))
    if md_path:
        with open(md_path, "w") as f:
            f.write(op_bench_markdown(rows, machine))
        click.echo(f"wrote {md_path}")


def _register_commands() -> None:
    from .measure.commands import register as register_measure

    register_measure(main, bench)


_register_commands()

if __name__ == "__main__":
    main()
