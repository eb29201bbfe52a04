"""CLI command ``scan``: every candidate node of a model by kind, and what each registered operator
would do there; registered by partialize.cli through :func:`register`. Heavy imports stay inside the
command, so ``partialize --help`` does not pay for torch."""

from __future__ import annotations

import click

from ._common import POSITIVE, friendly_errors


@click.command("scan")
@click.argument("model")
@click.option("--input-size", type=POSITIVE, help="Example input size for discovery [default: the model's].")
@click.option(
    "--kind",
    type=click.Choice(["conv", "mlp", "attention", "all"]),
    default="all",
    show_default=True,
    help="Which candidate nodes to list.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the scan as JSON here.")
@click.option("--num-classes", type=POSITIVE, help="Build the base model with this many classes.")
@click.option("--force", is_flag=True, help="Overwrite --json if it exists (otherwise an existing file is an error).")
@friendly_errors
def scan_cmd(model, input_size, kind, json_path, num_classes, force) -> None:
    """List every candidate node of MODEL (convs, MLP-like blocks, attention) and, for every
    registered operator, what it would do there at its default parameters: the layer's MACs before
    -> after, or why it refuses. Like `convert --dry-run`, for all operators at once.

    MODEL is a timm name (resnet50), torchvision:NAME or package.module:factory, built with random
    weights (what converts does not depend on them). MACs are multiply-accumulates at batch 1. Example:

      partialize scan vit_tiny_patch16_224 --kind attention --json vit-scan.json
    """
    import json

    from rich.console import Console

    from .._fs import check_output, write_text
    from ..api import scan
    from ._render import scan_tables

    if json_path:
        check_output(json_path, force=force, option="--json")
    result = scan(model, input_size, kind=kind, num_classes=num_classes)
    console = Console(width=None if console_is_tty() else 160)
    for table in scan_tables(result):
        console.print(table)
    if json_path:
        write_text(json_path, json.dumps(result, indent=2) + "\n", force=force, option="--json")
        console.print(f"wrote {json_path}")


def console_is_tty() -> bool:
    import sys

    return sys.stdout.isatty()


def register(main: click.Group) -> None:
    """Add ``scan`` to the CLI group."""
    main.add_command(scan_cmd)
