"""Helpers shared by the click command modules."""

from __future__ import annotations

import functools
import sys

import click

from .errors import PartializeError


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
