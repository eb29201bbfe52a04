"""Terminal rendering the commands share: calibration progress and the fidelity table."""

from __future__ import annotations

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
