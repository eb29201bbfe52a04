"""Rendering of measurements: rich tables and Markdown."""

from __future__ import annotations

import os

from rich.table import Table

from .._fs import atomic_write
from ..errors import PartializeError

# columns of the converted-layer table (terminal and Markdown), matching _changed_cells
CHANGED_LAYER_COLUMNS = (
    "layer",
    "before",
    "after",
    "MACs before (M)",
    "MACs after (M)",
    "params before",
    "params after",
)


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
            f"| {r.channels} | {r.size}x{r.size} | {r.batch} | {r.op} | {r.ms:.3f} | {r.vs_dense:.2f} | {r.vs_dw:.2f} |"
        )
    return "\n".join(lines) + "\n"


# --- reports ----------------------------------------------------------------------------------------

NM = "not measured"


def _m(v: float) -> str:
    return f"{v / 1e6:.2f}"


def _g(v: float) -> str:
    return f"{v / 1e9:.3f}"


def _lat(m) -> str:
    s = (m.speed or {}).get("latency_ms")
    return f"{s['median']:.2f} ± {s['iqr']:.2f}" if s else NM


def _thr(m) -> str:
    s = (m.speed or {}).get("throughput_ips")
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]" if s else NM


def _mem(m) -> str:
    v = (m.speed or {}).get("peak_memory_mib")
    return f"{v:.0f}" if v is not None else NM


def _acc(m, key: str) -> str:
    return f"{m.accuracy[key]:.2f}" if m.accuracy else NM


def _xcheck(m) -> str:
    rel = m.macs_crosscheck.get("rel_diff") if m.macs_crosscheck else None
    return f"{rel:+.2%}" if rel is not None else NM


def _conditions(cond: dict | None) -> str:
    if not cond:
        return "speed not measured"
    threads = f", {cond['threads']} thread(s)" if cond.get("threads") else ""
    return (
        f"speed: {cond['device']}{threads}; input {'x'.join(map(str, cond.get('input_size', [])[-2:])) or '?'}; "
        f"latency at batch 1, throughput at batch {cond['batch']}; "
        f"{cond['precision']}{', channels_last' if cond.get('channels_last') else ''}; "
        f"medians of {cond['rounds']} interleaved rounds (± IQR, [min-max])"
        + ("; freed memory reused (--allocator reuse)" if cond.get("allocator") == "reuse" else "")
    )


def _ratio_text(report, m) -> tuple[str, str, str]:
    r = report.ratios.get(m.name) if report is not None else None
    if not r:
        return ("", "", "")
    f = lambda v, fmt: fmt.format(v) if v is not None else NM  # noqa: E731
    return (f(r["macs"], "{:.2f}x"), f(r["latency_speedup"], "{:.2f}x"), f(r["throughput_ratio"], "{:.2f}x"))


SUMMARY_COLUMNS = (
    "model",
    "params (M)",
    "trainable (M)",
    "GMACs",
    "flop_counter diff",
    "latency ms (b=1)",
    "throughput img/s",
    "peak MiB",
    "top-1 %",
    "top-5 %",
)


def _summary_cells(m) -> list[str]:
    return [
        m.name,
        _m(m.params_total),
        _m(m.params_trainable),
        _g(m.macs),
        _xcheck(m),
        _lat(m),
        _thr(m),
        _mem(m),
        _acc(m, "top1"),
        _acc(m, "top5"),
    ]


def render_report_table(report) -> Table:
    """Rich table of a report: one column per measured model (metrics as rows, so it fits a terminal),
    ratios against the baseline as extra rows, units and measuring conditions in the caption."""
    from rich.markup import escape

    size = "x".join(map(str, report.input_size))
    t = Table(title=escape(f"partialize report: {report.model.name} at {size}"))
    entries = report.entries()
    t.add_column("metric", justify="left")
    for m in entries:
        t.add_column(escape(m.name), justify="right")
    cells = [_summary_cells(m) for m in entries]
    for i, label in enumerate(SUMMARY_COLUMNS[1:], start=1):
        t.add_row(label, *(escape(c[i]) for c in cells))
    if report.ratios:
        ratio_cells = [
            list(_ratio_text(report, m)) if m.role != "baseline" else ["1.00x", "1.00x", "1.00x"] for m in entries
        ]
        for i, label in enumerate(("MACs vs baseline", "latency speed-up", "throughput vs baseline")):
            t.add_row(label, *(c[i] for c in ratio_cells))
    cond = _conditions(report.speed_conditions)
    t.caption = escape(
        f"GMACs = 1e9 multiply-adds per image (partialize.macs, inference form; flop_counter diff: torch's "
        f"counter for information). {cond}."
    )
    return t


def render_report_details(report) -> list[Table]:
    """Extra tables: dynamic layers (realised widths / branch histograms) and changed layers."""
    from rich.markup import escape

    out = []
    for m in report.entries():
        if m.dynamic:
            t = Table(title=escape(f"{m.name}: dynamic layers ({m.calibration})"))
            for col in ("layer", "type", "input HxW", "MACs (M)", "realised ratio", "histogram / basis"):
                t.add_column(col, justify="left" if col in ("layer", "type", "histogram / basis") else "right")
            for name, d in m.dynamic.items():
                t.add_row(*map(escape, _dynamic_cells(name, d)))
            out.append(t)
    rows = changed_layers(report)
    if rows:
        t = Table(title=f"converted layers ({len(rows)}), MACs per image")
        for col in CHANGED_LAYER_COLUMNS:
            t.add_column(col, justify="left" if col in ("layer", "before", "after") else "right")
        for r in rows:
            t.add_row(*map(escape, _changed_cells(r)))
        out.append(t)
    return out


def _dynamic_cells(name: str, d: dict) -> list[str]:
    """One row of an operator's own description (``describe()``): learned width or routing histogram."""
    ratio = f"{d['realised_ratio']:.3f}" if d.get("realised_ratio") is not None else "n/a"
    if d.get("histogram") is not None:
        extra = f"widths {d.get('widths')}: {d['histogram']} (hard routing, per calibration image)"
    else:
        extra = f"width {d.get('width')}/{d.get('channels')}"
    hw = "x".join(map(str, d["input_hw"])) if d.get("input_hw") else "-"
    return [name, d.get("kind", ""), hw, f"{d['macs'] / 1e6:.3f}", ratio, extra]


def _changed_cells(r: dict) -> list[str]:
    f = lambda v, fn: fn(v) if v is not None else "-"  # noqa: E731
    return [
        r["name"],
        r["before_type"] or "-",
        r["after_type"],
        f(r["before_macs"], lambda v: f"{v / 1e6:.3f}"),
        f"{r['after_macs'] / 1e6:.3f}",
        f(r["before_params"], str),
        str(r["after_params"]),
    ]


def changed_layers(report) -> list[dict]:
    """Partial-operator layers of the model, with the baseline's layer of the same name when there is one."""
    base = {}
    if report.baseline is not None:
        for r in report.baseline.layers:
            base[r["name"]] = r
        # a converted layer may contain the original's leaves (e.g. name.conv): sum them
    rows = []
    for r in report.model.layers:
        if not r.get("partial"):
            continue
        b = base.get(r["name"])
        if b is None and base:
            kids = [v for k, v in base.items() if k.startswith(r["name"] + ".")]
            if kids:
                b = {
                    "type": "+".join(sorted({k["type"] for k in kids})),
                    "macs": sum(k["macs"] for k in kids),
                    "params": sum(k["params"] for k in kids),
                }
        rows.append(
            {
                "name": r["name"],
                "before_type": b["type"] if b else None,
                "after_type": r["type"],
                "before_macs": b["macs"] if b else None,
                "after_macs": r["macs"],
                "before_params": b["params"] if b else None,
                "after_params": r["params"],
            }
        )
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def report_markdown(report) -> str:
    """Markdown version of a report: summary, ratios, units/conditions, dynamic and converted layers."""
    lines = [
        f"# partialize report: {report.model.name}",
        "",
        f"Input {'x'.join(map(str, report.input_size))}; created {report.created}; "
        f"torch {report.environment.get('torch')}, timm {report.environment.get('timm')}.",
        "",
        "**Units.** MACs are multiply-adds per image of convs, matrix products and attention, counted by "
        "partialize.macs on the inference form (docs/measure.md); GMACs = 1e9 MACs. Params in millions. "
        + _conditions(report.speed_conditions)
        + ".",
        "",
    ]
    header = list(SUMMARY_COLUMNS)
    rows = [_summary_cells(m) for m in report.entries()]
    if report.ratios:
        header += ["MACs vs base", "latency speed-up", "throughput vs base"]
        rows = [
            cells + (list(_ratio_text(report, m)) if m.role != "baseline" else ["1.00x", "1.00x", "1.00x"])
            for cells, m in zip(rows, report.entries())
        ]
    lines += _md_table(header, rows)
    notes = [f"- {m.name}: {n}" for m in report.entries() for n in m.notes]
    if report.pruning:
        p = report.pruning
        notes.append(
            f"- pruning baseline: {p['method']}; target {p['target_macs'] / 1e9:.3f} GMACs, reached "
            f"{p['reached_macs'] / 1e9:.3f} ({p['rel_error']:+.1%}) after {p['steps']} steps "
            f"(channel ratio {p['channel_ratio']:.3f}); not fine-tuned"
        )
    if notes:
        lines += ["", "Notes:", ""] + notes
    for m in report.entries():
        if m.dynamic:
            lines += ["", f"## {m.name}: dynamic layers", "", f"Calibration: {m.calibration}.", ""]
            lines += _md_table(
                ["layer", "type", "input HxW", "MACs (M)", "realised ratio", "histogram / basis"],
                [_dynamic_cells(n, d) for n, d in m.dynamic.items()],
            )
    changed = changed_layers(report)
    if changed:
        lines += ["", f"## Converted layers ({len(changed)})", ""]
        lines += _md_table(list(CHANGED_LAYER_COLUMNS), [_changed_cells(r) for r in changed])
    return "\n".join(lines) + "\n"


# --- compare -----------------------------------------------------------------------------------------

SEPARATE = "separate runs"


def _runs(entries, runs) -> list[str | None]:
    """Per entry, the run its speed was timed in (None: not timed); one run when not given."""
    runs = list(runs) if runs is not None else ["this run"] * len(entries)
    return [r if (m.speed or {}).get("throughput_ips") else None for m, r in zip(entries, runs)]


def speed_runs_note(entries, runs) -> str:
    """One sentence on whether the throughputs were timed side by side (empty when they were)."""
    timed = [r for r in _runs(entries, runs) if r is not None]
    distinct = list(dict.fromkeys(timed))
    if len(distinct) <= 1:
        return ""
    return (
        f"Throughputs come from {len(distinct)} separate runs ({', '.join(distinct)}): models of different runs "
        "were not timed side by side, so a ratio between them also carries run-to-run drift (machine load, "
        f"thermals, clocks) beyond the spread shown; such ratios are marked '{SEPARATE}'. To time them side "
        "by side: partialize compare ... --remeasure, or partialize bench MODEL MODEL ..."
    )


def compare_table(entries, conditions: dict | None, runs=None) -> Table:
    """Rich table of models from several reports; ratios are against the first entry."""
    from rich.markup import escape

    t = Table(title="partialize compare (ratios vs the first model)")
    t.add_column("metric", justify="left")
    for m in entries:
        t.add_column(escape(m.name), justify="right")
    rows = _compare_rows(entries, runs)
    labels = SUMMARY_COLUMNS + ("MACs vs first", "throughput vs first", "speed timed in")
    for i, label in enumerate(labels[1:], start=1):
        t.add_row(label, *(escape(r[i]) for r in rows))
    note = speed_runs_note(entries, runs)
    t.caption = escape(
        f"GMACs = 1e9 multiply-adds per image. {_conditions(conditions)}." + (f" {note}" if note else "")
    )
    return t


def _compare_rows(entries, runs=None) -> list[list[str]]:
    first = entries[0]
    timed = _runs(entries, runs)
    rows = []
    for m, run in zip(entries, timed):
        macs = f"{m.macs / first.macs:.2f}x" if first.macs else NM
        a, b = (m.speed or {}).get("throughput_ips"), (first.speed or {}).get("throughput_ips")
        thr = f"{a['median'] / b['median']:.2f}x" if a and b else NM
        if a and b and run != timed[0]:
            thr += f" ({SEPARATE})"
        rows.append(_summary_cells(m) + [macs, thr, run if run is not None else NM])
    return rows


def compare_markdown(entries, conditions: dict | None, runs=None) -> str:
    """Markdown table of models from several reports, units, conditions and timing runs stated."""
    note = speed_runs_note(entries, runs)
    lines = [
        "# partialize compare",
        "",
        'MACs are multiply-adds per image (the papers\' "FLOPs"). ' + _conditions(conditions) + ". "
        "Ratios are against the first row." + (f" **{note}**" if note else ""),
        "",
    ]
    header = list(SUMMARY_COLUMNS) + ["MACs vs first", "throughput vs first", "speed timed in"]
    lines += _md_table(header, _compare_rows(entries, runs))
    return "\n".join(lines) + "\n"


def accuracy_interval(acc: dict) -> tuple[float, float] | None:
    """95% (normal approximation) binomial interval of a top-1 over ``acc['images']`` images, in %."""
    n = acc.get("images")
    if not n:
        return None
    p = acc["top1"] / 100.0
    half = 1.96 * (max(p * (1 - p), 0.25 / n) / n) ** 0.5 * 100.0  # never a zero-width bar at 0% or 100%
    return max(0.0, acc["top1"] - half), min(100.0, acc["top1"] + half)


def _axis_limits(lo: float, hi: float, *, floor: float | None, ceil: float | None, span: float | None) -> tuple:
    """Limits with a margin, at least ``span`` wide (no auto-zoom), shifted inside [floor, ceil]."""
    if span is not None and hi - lo < span:
        mid = (lo + hi) / 2
        lo, hi = mid - span / 2, mid + span / 2
    pad = 0.08 * max(hi - lo, 1e-9)
    lo, hi = lo - pad, hi + pad
    if floor is not None and lo < floor:
        lo, hi = floor, hi + (floor - lo)
    if ceil is not None and hi > ceil:
        lo, hi = lo - (hi - ceil), ceil
    if floor is not None:
        lo = max(lo, floor)
    return lo, hi


def plot_format(path: str) -> str:
    """The image format a plot path asks for (its extension); PartializeError if matplotlib cannot
    write it. Cheap: the CLI calls it before any work."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise PartializeError(
            f"--plot {path!r}: cannot write a {fmt or 'no-extension'} file; end the name with one of "
            + ", ".join(f".{k}" for k in sorted(supported))
        )
    return fmt


def plot_entries(entries, path: str, conditions: dict | None = None, runs=None, *, force: bool = False) -> str:
    """Write :func:`plot_figure` to ``path`` (format from its extension), atomically; an existing file is
    kept unless ``force``. Returns the y-x description."""
    import matplotlib.pyplot as plt

    fmt = plot_format(path)
    fig, what = plot_figure(entries, conditions, runs)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt), force=force, option="--plot")
    finally:
        plt.close(fig)
    return what


def plot_figure(entries, conditions: dict | None = None, runs=None):
    """Scatter plot like 000 Figure 2: top-1 (when every entry has it) or GMACs against throughput
    (or against GMACs when throughput was not measured). Returns the figure and the y-x description.

    Honest axes: throughput and GMACs start at 0, accuracy spans at least 10 points (so a 0.2-point
    difference does not look like a cliff). Bars: throughput min-max over the timing rounds, top-1 a 95%
    binomial interval over the evaluated images. Models timed in different runs get different markers
    and the title says they were not timed side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr_stats = [(m.speed or {}).get("throughput_ips") for m in entries]
    thr = [t["median"] if t else None for t in thr_stats]
    acc = [m.accuracy["top1"] if m.accuracy else None for m in entries]
    gmacs = [m.macs / 1e9 for m in entries]
    x_is_thr = all(v is not None for v in thr)
    y_is_acc = all(v is not None for v in acc)
    if x_is_thr:
        x, xlabel = thr, "throughput (images/s)"
        if conditions:
            xlabel += f", {conditions['device']}, batch {conditions['batch']}"
            if conditions.get("threads"):
                xlabel += f", {conditions['threads']} thread(s)"
        if y_is_acc:
            y, ylabel = acc, "top-1 accuracy (%)"
        else:
            y, ylabel = gmacs, "GMACs per image (multiply-adds)"
    elif y_is_acc:
        x, xlabel, y, ylabel = gmacs, "GMACs per image (multiply-adds)", acc, "top-1 accuracy (%)"
    else:
        raise PartializeError(
            "nothing to plot: the reports have neither throughput for every model nor accuracy for every "
            "model; re-run `partialize report` with speed (the default) or --data"
        )
    # spread bars: what the reports carry (timing min-max), and the sampling interval of a top-1
    xlo = [t["min"] if x_is_thr and t and "min" in t else xi for t, xi in zip(thr_stats, x)]
    xhi = [t["max"] if x_is_thr and t and "max" in t else xi for t, xi in zip(thr_stats, x)]
    if y is acc:
        iv = [accuracy_interval(m.accuracy) or (a, a) for m, a in zip(entries, acc)]
        ylo, yhi = [v[0] for v in iv], [v[1] for v in iv]
    else:
        ylo, yhi = list(y), list(y)
    timed = _runs(entries, runs) if x_is_thr else [None] * len(entries)
    groups = list(dict.fromkeys(timed))
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for gi, g in enumerate(groups):
        idx = [i for i, r in enumerate(timed) if r == g]
        ax.errorbar(
            [x[i] for i in idx],
            [y[i] for i in idx],
            xerr=[[x[i] - xlo[i] for i in idx], [xhi[i] - x[i] for i in idx]],
            yerr=[[y[i] - ylo[i] for i in idx], [yhi[i] - y[i] for i in idx]],
            fmt=markers[gi % len(markers)],
            ms=6,
            capsize=3,
            zorder=3,
            label=f"timed in {g}" if len(groups) > 1 and g is not None else None,
        )
    for xi, yi, m in zip(x, y, entries):
        ax.annotate(m.name, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlim(*_axis_limits(0.0, max(xhi), floor=0.0, ceil=None, span=None))  # from 0: ratios read true
    if y is acc:
        ax.set_ylim(*_axis_limits(min(ylo), max(yhi), floor=0.0, ceil=100.0, span=10.0))
    else:
        ax.set_ylim(*_axis_limits(0.0, max(yhi), floor=0.0, ceil=None, span=None))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    title = f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}"
    bars = []
    if x_is_thr:
        bars.append("x bars: min-max over timing rounds")
    if y is acc:
        bars.append("y bars: 95% binomial interval")
    separate = len([g for g in groups if g is not None]) > 1
    sub = ("throughput from separate runs: NOT timed side by side; " if separate else "") + "; ".join(bars)
    ax.set_title(title + (f"\n{sub}" if sub else ""), fontsize=9)
    if separate:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig, f"{ylabel} vs {xlabel}" + (" (throughput from separate runs)" if separate else "")
