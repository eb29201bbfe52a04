"""Rendering of measurements: rich tables and Markdown."""

from __future__ import annotations

from rich.table import Table


def op_bench_table(rows, machine: str) -> Table:
    """Rich table of `bench ops` rows."""
    t = Table(title=f"operator times ({machine})")
    for col in ("C", "HxW", "batch", "op", "ms/call", "IQR ms", "x dense3x3", "x dw3x3"):
        t.add_column(col, justify="right" if col != "op" else "left")
    for r in rows:
        t.add_row(
            str(r.channels),
            f"{r.size}x{r.size}",
            str(r.batch),
            r.op,
            f"{r.ms:.3f}",
            f"{r.spread_ms:.3f}",
            f"{r.vs_dense:.2f}",
            f"{r.vs_dw:.2f}",
        )
    return t


def op_bench_markdown(rows, machine: str) -> str:
    """Markdown version of the `bench ops` table."""
    lines = [
        f"Machine: {machine}. Times are medians of interleaved rounds; ratios are time divided by "
        "the dense / depthwise 3x3 conv time in the same run (below 1 = faster).",
        "",
        "| C | HxW | batch | op | ms/call | x dense3x3 | x dw3x3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.channels} | {r.size}x{r.size} | {r.batch} | {r.op} | {r.ms:.3f} | "
            f"{r.vs_dense:.2f} | {r.vs_dw:.2f} |"
        )
    return "\n".join(lines) + "\n"
