"""Rendering of measurements: rich tables and Markdown."""

from __future__ import annotations

from rich.table import Table

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
        f"speed: {cond['device']}{threads}; latency at batch 1, throughput at batch {cond['batch']}; "
        f"{cond['precision']}{', channels_last' if cond.get('channels_last') else ''}; "
        f"medians of {cond['rounds']} interleaved rounds (± IQR, [min-max])"
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
    "fvcore vs flop_counter",
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
    t.caption = escape(f"GMACs = 1e9 multiply-adds per image (fvcore, the papers' FLOPs). {cond}.")
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
    ratio = f"{d['realised_ratio']:.3f}" if d.get("realised_ratio") is not None else "n/a (soft)"
    if d["type"] == "AdaPConv":
        extra = f"widths {d['widths']}: {d['histogram']}; {d['basis']}"
    else:
        extra = f"width {d['width']}/{d['channels']}"
    return [name, d["type"], "x".join(map(str, d["input_hw"])), f"{d['macs'] / 1e6:.3f}", ratio, extra]


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
        "**Units.** MACs are multiply-adds per image counted by fvcore with partialize's handles (the "
        'papers\' "FLOPs"); GMACs = 1e9 MACs. Params in millions. ' + _conditions(report.speed_conditions) + ".",
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


def compare_table(entries, conditions: dict | None) -> Table:
    """Rich table of models from several reports; ratios are against the first entry."""
    from rich.markup import escape

    t = Table(title="partialize compare (ratios vs the first model)")
    t.add_column("metric", justify="left")
    for m in entries:
        t.add_column(escape(m.name), justify="right")
    rows = _compare_rows(entries)
    labels = SUMMARY_COLUMNS + ("MACs vs first", "throughput vs first")
    for i, label in enumerate(labels[1:], start=1):
        t.add_row(label, *(escape(r[i]) for r in rows))
    t.caption = escape(f"GMACs = 1e9 multiply-adds per image (fvcore). {_conditions(conditions)}.")
    return t


def _compare_rows(entries) -> list[list[str]]:
    first = entries[0]
    rows = []
    for m in entries:
        macs = f"{m.macs / first.macs:.2f}x" if first.macs else NM
        a, b = (m.speed or {}).get("throughput_ips"), (first.speed or {}).get("throughput_ips")
        thr = f"{a['median'] / b['median']:.2f}x" if a and b else NM
        rows.append(_summary_cells(m) + [macs, thr])
    return rows


def compare_markdown(entries, conditions: dict | None) -> str:
    """Markdown table of models from several reports, units and conditions stated."""
    lines = [
        "# partialize compare",
        "",
        'MACs are multiply-adds per image (fvcore, the papers\' "FLOPs"). ' + _conditions(conditions) + ". "
        "Ratios are against the first row.",
        "",
    ]
    lines += _md_table(list(SUMMARY_COLUMNS) + ["MACs vs first", "throughput vs first"], _compare_rows(entries))
    return "\n".join(lines) + "\n"


def plot_entries(entries, path: str, conditions: dict | None = None) -> str:
    """Scatter plot like 000 Figure 2: top-1 (when every entry has it) or GMACs against throughput
    (or against GMACs when throughput was not measured). Returns the y-x description."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import PartializeError

    thr = [(m.speed or {}).get("throughput_ips", {}).get("median") for m in entries]
    acc = [m.accuracy["top1"] if m.accuracy else None for m in entries]
    gmacs = [m.macs / 1e9 for m in entries]
    if all(v is not None for v in thr):
        x, xlabel = thr, "throughput (images/s)"
        if conditions:
            xlabel += f", {conditions['device']}, batch {conditions['batch']}"
            if conditions.get("threads"):
                xlabel += f", {conditions['threads']} thread(s)"
        if all(v is not None for v in acc):
            y, ylabel = acc, "top-1 accuracy (%)"
        else:
            y, ylabel = gmacs, "GMACs per image (multiply-adds)"
    elif all(v is not None for v in acc):
        x, xlabel, y, ylabel = gmacs, "GMACs per image (multiply-adds)", acc, "top-1 accuracy (%)"
    else:
        raise PartializeError(
            "nothing to plot: the reports have neither throughput for every model nor accuracy for every "
            "model; re-run `partialize report` with speed (the default) or --data"
        )
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(x, y, s=36, zorder=3)
    for xi, yi, m in zip(x, y, entries):
        ax.annotate(m.name, (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"{ylabel} vs {xlabel}"
