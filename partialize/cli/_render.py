"""Terminal rendering the commands share: calibration progress and the fidelity table."""

from __future__ import annotations

import re

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class CalibrationBar:
    """A rich progress bar over every distillation step of every block (``update`` is the callback)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("calibrating {task.fields[block]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("loss {task.fields[loss]}"),
            console=console,
            transient=True,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, block: str, step: int, total: int, loss: float) -> None:
        if self.task is None:
            self.task = self.progress.add_task("calibrate", total=total, block=block, loss="")
        self.progress.update(self.task, completed=step, total=total, block=block, loss=f"{loss:.4f}")


def fidelity_table(cal, worst: int = 8) -> Table:
    """Fidelity before and after calibration, and the converted layers that still differ most."""
    b, a = cal.before, cal.after
    t = Table(title=f"fidelity to the original ({a.images} held-out calibration images; {cal.seconds:.0f} s)")
    for col in ("", "converted", "calibrated"):
        t.add_column(col, justify="right")
    t.add_row("top-1 agreement", f"{b.agreement:.1f}%", f"{a.agreement:.1f}%")
    t.add_row(f"KL to the original (T={a.temperature:g})", f"{b.kl:.4f}", f"{a.kl:.4f}")
    rows = sorted(a.layers.items(), key=lambda kv: -kv[1])[:worst]
    for name, err in rows:
        t.add_row(escape(f"output error of {name}"), f"{b.layers.get(name, float('nan')):.3f}", f"{err:.3f}")
    notes = "; ".join(cal.notes)
    t.caption = escape(f"steps: {', '.join(cal.steps)} on {cal.images} images" + (f". {notes}" if notes else ""))
    return t


def _mmacs(v: int) -> str:
    return f"{v / 1e6:.2f}M"


def _relevant(result: dict, nodes: list[dict]) -> list[str]:
    """The operators that convert some of ``nodes`` (all of them when none does)."""
    ops = [op for op in result["operators"] if any(n["operators"][op]["converts"] for n in nodes)]
    return ops or list(result["operators"])


def _kind_table(result: dict, kind: str, nodes: list[dict]) -> Table:
    """One row per node of ``kind``; one column per operator that converts some node of it (that
    layer's MACs after / before); refusals are in the reasons table."""
    ops = _relevant(result, nodes)
    s = result["summary"][kind]
    t = Table(title=f"{kind}: {s['nodes']} nodes, {s['convertible']} convertible (MACs after / before per layer)")
    for col in ("node", "original", "MACs"):
        t.add_column(col, overflow="fold", justify="right" if col == "MACs" else "left")
    for op in ops:
        t.add_column(op, justify="right")
    for n in nodes:
        cells = [f"{r['macs_ratio']:.3f}x" if r["converts"] and r["macs_ratio"] is not None else "[dim]no[/dim]"
                 for r in (n["operators"][op] for op in ops)]  # fmt: skip
        t.add_row(escape(n["name"]), escape(n["original"]), _mmacs(n["macs"]), *cells)
    others = [op for op in result["operators"] if op not in ops]
    if others:
        t.caption = f"{', '.join(others)}: no {kind} node here (their reasons are in --json)"
    return t


def _reasons_table(result: dict) -> Table:
    """The refusals of the operators shown for each kind, grouped by reason (numbers aside), with how
    many nodes and the first few."""
    groups: dict[tuple[str, str, str], list] = {}
    for kind in result["kinds"]:
        nodes = [n for n in result["nodes"] if n["kind"] == kind]
        for op in _relevant(result, nodes) if nodes else ():
            for n in nodes:
                r = n["operators"][op]
                if not r["converts"]:
                    key = (kind, op, re.sub(r"\d+", "#", r["reason"]))
                    groups.setdefault(key, [r["reason"]]).append(n["name"])
    t = Table(title="why not: the refusals of the operators above (first example of each reason)")
    for col in ("kind", "operator", "nodes", "reason", "e.g."):
        t.add_column(col, overflow="fold", justify="right" if col == "nodes" else "left")
    for (kind, op, _), (reason, *names) in groups.items():
        t.add_row(kind, op, str(len(names)), escape(reason), escape(", ".join(names[:2])))
    return t


def scan_tables(result: dict) -> list[Table]:
    """The scan as rich tables: one per node kind, the refusal reasons, a summary by kind."""
    out = []
    for kind in result["kinds"]:
        nodes = [n for n in result["nodes"] if n["kind"] == kind]
        if nodes:
            out.append(_kind_table(result, kind, nodes))
    if result["nodes"]:
        out.append(_reasons_table(result))
    t = Table(title=f"scan of {escape(result['model'])} at {'x'.join(map(str, result['input_shape']))}")
    for col in ("kind", "nodes", "convertible", "share of MACs", "converted by (nodes)"):
        t.add_column(col, justify="left" if col in ("kind", "converted by (nodes)") else "right")
    for kind in result["kinds"]:
        s = result["summary"][kind]
        by = ", ".join(f"{op} {c}" for op, c in s["by_operator"].items()) or "-"
        t.add_row(kind, str(s["nodes"]), str(s["convertible"]), f"{s['macs'] / max(1, result['macs']):.1%}", by)
    t.caption = f"{result['macs'] / 1e9:.3f} GMACs in all (multiply-accumulates, batch 1); {result['seconds']:.1f} s"
    out.append(t)
    return out
