"""Helpers shared by the click command modules."""

from __future__ import annotations

import functools
import sys

import click

from ..base_model import check_runs_at  # noqa: F401  (re-exported for the commands)
from ..errors import PartializeError
from ..measure.allocator import ALLOCATORS

POSITIVE = click.IntRange(min=1)  # sizes, counts, threads, batches, rounds: 0 or less is a usage error
ALLOCATOR_OPTION = click.option(
    "--allocator",
    type=click.Choice(ALLOCATORS),
    default="system",
    show_default=True,
    help="CPU memory for new tensors: 'system' is glibc's default, which maps blocks above 32 MiB fresh from "
    "the kernel on every call (page faults); 'reuse' keeps freed memory in the heap for every model alike, "
    "as jemalloc or tcmalloc would (glibc only; docs/measure.md).",
)


def check_device(ctx, param, value: str) -> str:
    """Click callback: a device torch understands (cpu, cuda, cuda:1, mps), else a usage error."""
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise click.BadParameter(f"{value!r} is not a torch device; use cpu, cuda or cuda:N") from None
    return value


def int_list(ctx, param, value: str) -> tuple[int, ...]:
    """Click callback: comma-separated positive integers ("64,128"), else a usage error naming the item."""
    out = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        try:
            n = int(item)
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not an integer; give comma-separated integers, e.g. 64,128"
            ) from None
        if n < 1:
            raise click.BadParameter(f"{n} must be at least 1")
        out.append(n)
    if not out:
        raise click.BadParameter("give at least one value, e.g. 64,128")
    return tuple(out)


def trust_factory_option(fn):
    """``--trust-factory``: allow checkpoints whose base model is a ``package.module:factory`` to import
    and call it (explicit opt-in: the file names code to run)."""
    return click.option(
        "--trust-factory",
        is_flag=True,
        help="Allow a checkpoint to build its base model by importing and calling the package.module:factory "
        "it names (code named by the file runs: only for files you trust).",
    )(fn)


def friendly_errors(fn):
    """Print PartializeError messages (user errors) without a traceback and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PartializeError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)

    return wrapper
