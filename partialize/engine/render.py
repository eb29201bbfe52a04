"""Plan rendering: rich table and plain text."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table


def _m(v: int) -> str:
    return f"{v / 1e6:+.3f}M" if v else "0"


def plan_table(plan, show_skipped: bool = True) -> Table:
    """A rich table of the plan: one row per converted (and, optionally, skipped) layer."""
    t = Table(title="conversion plan (MACs = multiply-accumulates at batch 1)", show_lines=False)
    for col in ("layer", "original", "->", "ratio", "d params", "d MACs", "found"):
        t.add_column(col, overflow="fold")
    for e in plan.converted:
        t.add_row(e.layer, e.original, e.variant, f"{e.ratio}", _m(e.delta_params), _m(e.delta_macs), e.found)
    if show_skipped and plan.skipped:
        t.add_section()
        for e in plan.skipped:
            t.add_row(e.layer, e.original, "[dim]skip[/dim]", "", "", "", f"[dim]{e.reason}[/dim]")
    return t


def summary_table(plan) -> Table:
    """Before/after params and MACs of the whole model."""
    t = Table(title="summary")
    for col in ("", "before", "after", "ratio"):
        t.add_column(col, justify="right")
    pb, pa, mb, ma = plan.params_before, plan.params_after, plan.macs_before, plan.macs_after
    t.add_row("params", f"{pb / 1e6:.3f} M", f"{pa / 1e6:.3f} M", f"{pa / max(pb, 1):.3f}x")
    t.add_row("MACs", f"{mb / 1e9:.3f} G", f"{ma / 1e9:.3f} G", f"{ma / max(mb, 1):.3f}x")
    t.add_row("layers converted", "", str(len(plan.converted)), f"{plan.converted_macs_share():.1%} of MACs")
    bounds = sorted({e.macs_basis for e in plan.converted if e.macs_basis != "inference form"})
    if bounds:
        t.caption = "MACs after: " + "; ".join(bounds)
    return t


def plan_text(plan) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=160, force_terminal=False, color_system=None)
    con.print(plan_table(plan))
    con.print(summary_table(plan))
    return buf.getvalue()


def speed_table(s: dict, plan=None) -> Table:
    """Before/after speed (from measure.speed.speed_summary), with the MACs-proportional limit."""
    c = s.get("conditions", {})
    title = (
        f"speed ({c.get('device', 'cpu')}, {c.get('threads', '?')} thread(s), medians of "
        f"{c.get('rounds', '?')} interleaved rounds)"
    )
    t = Table(title=title)
    for col in ("", "original", "converted", "ratio"):
        t.add_column(col, justify="right")
    a, b = s["models"]["original"], s["models"]["converted"]
    t.add_row(
        "latency, batch 1 (ms)",
        f"{a['latency_ms']['median']:.2f}",
        f"{b['latency_ms']['median']:.2f}",
        f"{s['latency_speedup']:.2f}x faster",
    )
    t.add_row(
        f"throughput, batch {c.get('batch', '?')} (img/s)",
        f"{a['throughput_ips']['median']:.1f}",
        f"{b['throughput_ips']['median']:.1f}",
        f"{s['throughput_ratio']:.2f}x",
    )
    if plan is not None and plan.macs_after:
        limit = plan.macs_before / plan.macs_after
        t.add_row("MACs-proportional limit", "", "", f"{limit:.2f}x (reached: {s['throughput_ratio'] / limit:.0%})")
    return t
