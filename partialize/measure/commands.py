"""CLI commands for measurement (report, compare, bench MODEL...); registered by partialize.cli."""

from __future__ import annotations

import click


def register(main: click.Group, bench: click.Group) -> None:
    """Attach this module's commands to the top-level group and the `bench` group."""
