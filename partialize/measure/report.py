"""Reports: what a model costs (params, MACs, speed, accuracy), alone or against a baseline and an
equal-MAC pruning baseline; versioned JSON, with rendering in :mod:`partialize.measure.render`.

Every MAC figure is per image, counted by :mod:`partialize.macs` on the inference form; the
report's ``units`` field says so, and :func:`check_compatible` refuses to compare reports whose
units or measuring conditions differ.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .._fs import write_text
from ..errors import PartializeError
from ..ops.registry import is_partial_op
from .accuracy import calibration_batch, evaluate_accuracy
from .flops import MAC_UNIT, _input_chw, count_params, dynamic_layers, macs_breakdown, params_per_module
from .pruning import prune_to_macs
from .render import render_report_details, render_report_table, report_markdown  # noqa: F401  (re-exported)
from .speed import machine_description, measure_speed, speed_summary  # noqa: F401  (speed_summary re-exported)

SCHEMA = "partialize.report"
SCHEMA_VERSION = 1
UNITS = {
    "macs": MAC_UNIT,
    "params": "parameters (count)",
    "latency": "ms per forward at batch 1 (median over interleaved rounds)",
    "throughput": "images/s at the stated batch (batch / median time)",
    "memory": "MiB of extra allocated memory for one batch forward (CUDA only)",
    "accuracy": "% top-1 / top-5",
}
NOT_MEASURED = "not measured"


class ReportError(PartializeError):
    """A report file is unreadable, of another schema/version, or not comparable with the others."""


@dataclass
class ModelMeasurement:
    """Everything measured about one model; ``None`` means not measured (see ``notes``)."""

    name: str
    role: str  # "model", "baseline" or "pruned"
    params_total: int
    params_trainable: int
    macs: float
    macs_crosscheck: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    dynamic: dict[str, dict] = field(default_factory=dict)
    calibration: str | None = None
    speed: dict | None = None
    accuracy: dict | None = None
    source: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A versioned measurement report: the model, optionally its baseline and pruning baseline."""

    model: ModelMeasurement
    input_size: list[int]
    baseline: ModelMeasurement | None = None
    pruned: ModelMeasurement | None = None
    pruning: dict | None = None
    speed_conditions: dict | None = None
    ratios: dict = field(default_factory=dict)
    units: dict = field(default_factory=lambda: dict(UNITS))
    environment: dict = field(default_factory=dict)
    created: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def entries(self) -> list[ModelMeasurement]:
        """Model, baseline and pruned measurements that are present, in that order."""
        return [m for m in (self.model, self.baseline, self.pruned) if m is not None]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | os.PathLike | None = None, *, force: bool = True) -> str:
        """The report as JSON text; also written to ``path`` when given: atomically, with the mode a
        plain ``open()`` gives; ``force=False`` refuses an existing file (as ``report --json`` does)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            write_text(path, text + "\n", force=force)
        return text

    @classmethod
    def from_dict(cls, d: dict, origin: str = "report") -> Report:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ReportError(f"{origin} is not a partialize report (no schema {SCHEMA!r})")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ReportError(
                f"{origin} has report schema version {d.get('schema_version')!r}; this partialize reads "
                f"version {SCHEMA_VERSION}: regenerate it with `partialize report`"
            )
        from pydantic import TypeAdapter, ValidationError

        names = {f.name for f in fields(cls)}
        mnames = {f.name for f in fields(ModelMeasurement)}
        kw = {k: v for k, v in d.items() if k in names}
        for key in ("model", "baseline", "pruned"):
            if isinstance(kw.get(key), dict):
                kw[key] = {k: v for k, v in kw[key].items() if k in mnames}
        try:
            rep = TypeAdapter(cls).validate_python(kw)  # field types too, not only their presence
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ReportError(
                f"{origin}: field {where!r}: {err['msg']} (not a complete version-{SCHEMA_VERSION} report: "
                "damaged or hand-edited? regenerate it with `partialize report`)"
            ) from None
        if len(rep.input_size) not in (2, 3) or any(v < 1 for v in rep.input_size):
            raise ReportError(f"{origin}: field 'input_size' {rep.input_size} is not [C, H, W]; regenerate the report")
        return rep

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Report:
        """Parse JSON text, or read the file when given a path."""
        origin = "report"
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            origin = text
            try:
                with open(text) as f:
                    text = f.read()
            except OSError as e:
                raise ReportError(f"cannot read report {origin!r}: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{origin} is not valid JSON: {e}") from None
        return cls.from_dict(d, origin)


def layer_rows(model: nn.Module, per_module_macs: dict[str, float]) -> list[dict]:
    """One row per layer: leaves, and partial operators taken whole; rows with no params and no MACs
    are left out. Params are the layer's own (with its children's for a partial operator)."""

    own = params_per_module(model)
    rows, skip = [], None
    for name, mod in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        partial = is_partial_op(mod)
        if not partial and any(True for _ in mod.children()):
            continue
        if partial:
            skip = name + "."
            total = sum(v[0] for k, v in own.items() if k == name or k.startswith(skip))
            train = sum(v[1] for k, v in own.items() if k == name or k.startswith(skip))
        else:
            total, train = own[name]
        macs = per_module_macs.get(name, 0)
        if total or macs:
            rows.append(
                {
                    "name": name,
                    "type": type(mod).__name__,
                    "partial": partial,
                    "params": total,
                    "trainable": train,
                    "macs": float(macs),
                }
            )
    return rows


def accuracy_with_notes(model: nn.Module, data: str, **kw) -> tuple[dict, list[str]]:
    """:func:`evaluate_accuracy` and its user warnings (class folders vs outputs, unreadable images left
    out) as report notes, where a reader sees them; any other warning is shown as it would have been."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        accuracy = evaluate_accuracy(model, data, **kw)
    notes = []
    for w in seen:
        if issubclass(w.category, UserWarning):
            notes.append(f"accuracy: {w.message}")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return accuracy, notes


def measure_model(
    model: nn.Module,
    name: str,
    role: str = "model",
    input_size: int | tuple[int, int, int] = 224,
    *,
    data: str | None = None,
    data_limit: int | None = None,
    calibration_images: int = 32,
    crosscheck: bool = True,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ModelMeasurement:
    """Params, MACs (with cross-check and dynamic layers) and, with ``data``, accuracy of one model."""

    chw = _input_chw(input_size)
    calibration = None
    notes = []
    if data is not None and dynamic_layers(model):
        calibration = calibration_batch(model, data, calibration_images, chw[1])
    if progress:
        progress(f"{name}: counting MACs")
    mb = macs_breakdown(model, chw, calibration=calibration, crosscheck=crosscheck)
    accuracy = None
    if data is not None:
        if progress:
            progress(f"{name}: accuracy on {data}")
        accuracy, said = accuracy_with_notes(model, data, limit=data_limit, input_size=chw[1])
        notes.extend(said)
    else:
        notes.append("accuracy not measured (no --data)")
    notes.extend(mb["notes"])
    if mb["dynamic"]:
        notes.append(
            "dynamic layers counted in inference form: DPConv at its learned width, Ada-PConv hard-routed "
            f"and averaged over the calibration batch ({mb['calibration']})"
        )
    return ModelMeasurement(
        name=name,
        role=role,
        params_total=count_params(model),
        params_trainable=count_params(model, trainable_only=True),
        macs=mb["total"],
        macs_crosscheck={
            "flop_counter": mb["flop_counter"],
            "rel_diff": mb["crosscheck_rel_diff"],
            "uncounted_ops": mb["uncounted_ops"],
            "note": f"torch.utils.flop_counter (FLOPs / 2, torch {torch.__version__}) on the same inference form, "
            "for information: its formulas change with the torch version; partialize.macs is the count",
        },
        layers=layer_rows(model, mb["per_module"]),
        dynamic=mb["dynamic"],
        calibration=mb["calibration"],
        accuracy=accuracy,
        source=source,
        notes=notes,
    )


def environment() -> dict:
    """Versions and machine the figures came from."""
    import timm

    return {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "machine": machine_description(torch.get_num_threads()).split(";")[0],
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def build_report(
    model: nn.Module,
    *,
    name: str,
    input_size: int | tuple[int, int, int] = 224,
    baseline: nn.Module | None = None,
    baseline_name: str = "baseline",
    speed: bool = True,
    threads: int = 1,
    batch: int = 16,
    device: str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    rounds: int = 7,
    allocator: str | None = None,
    data: str | None = None,
    data_limit: int | None = None,
    pruning_baseline: bool = False,
    pruning_finetune: Callable[[nn.Module, nn.Module], dict] | None = None,
    calibration_images: int = 32,
    source: str | None = None,
    baseline_source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Measure ``model`` (and ``baseline``, and a pruned copy of ``baseline`` at the model's MACs when
    ``pruning_baseline``) and return a :class:`Report`. Speed is measured side by side for all of them.

    ``pruning_finetune(pruned, baseline) -> dict``: trains the pruned copy in place before its accuracy
    is measured (the budget the converted model had, to compare like with like; the CLI passes a KD
    fine-tune, ``partialize.train``); what it returns, with the accuracy before it, goes into
    ``report.pruning["finetune"]``.
    """
    chw = _input_chw(input_size)
    kw = dict(data=data, data_limit=data_limit, calibration_images=calibration_images, progress=progress)
    m = measure_model(model, name, "model", chw, source=source, **kw)
    report = Report(model=m, input_size=list(chw), environment=environment())
    report.created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    timed: dict[str, nn.Module] = {name: model}
    if baseline is not None:
        bname = baseline_name if baseline_name != name else f"{baseline_name} (baseline)"
        report.baseline = measure_model(baseline, bname, "baseline", chw, source=baseline_source, **kw)
        timed[bname] = baseline
    if pruning_baseline:
        if baseline is None:
            raise ReportError("--pruning-baseline prunes the original model: give it with --baseline MODEL")

        if progress:
            progress("pruning the baseline to the same MACs")
        pruned, info = prune_to_macs(baseline, m.macs, chw)
        pname = f"{report.baseline.name} pruned"
        if pruning_finetune:
            before = None
            if data is not None:
                if progress:
                    progress("pruned baseline: accuracy before the fine-tune")
                before = evaluate_accuracy(pruned, data, limit=data_limit, input_size=chw[1]).get("top1")
            if progress:
                progress("fine-tuning the pruned baseline")
            info = dict(info, finetune={**pruning_finetune(pruned, baseline), "top1_before": before})
            pruned.eval()
            pm = measure_model(pruned, pname, "pruned", chw, **kw)
            ft = info["finetune"]
            pm.notes.append(
                f"fine-tuned {ft['epochs']} epoch(s) with KD from {report.baseline.name} on {ft['data']} "
                f"(lr {ft['lr']:g}, batch {ft['batch_size']}); top-1 before the fine-tune: "
                + (f"{ft['top1_before']:.2f}%" if ft.get("top1_before") is not None else "not measured")
            )
        else:
            pm = measure_model(pruned, pname, "pruned", chw, calibration_images=calibration_images, progress=progress)
            if data is not None:
                pm.notes = [n for n in pm.notes if not n.startswith("accuracy")]
                pm.notes.append(
                    "accuracy not measured: a pruned network must be fine-tuned like the converted one "
                    "before its accuracy means anything (--pruning-finetune EPOCHS --train-data DIR)"
                )
        report.pruned, report.pruning = pm, info
        timed[pname] = pruned
    if speed:
        if progress:
            progress(f"timing {len(timed)} model(s) side by side")
        sp = measure_speed(
            timed,
            chw,
            threads=threads,
            batch=batch,
            device=device,
            amp=amp,
            channels_last=channels_last,
            rounds=rounds,
            allocator=allocator,
        )
        report.speed_conditions = sp["conditions"]
        for mm in report.entries():
            mm.speed = sp["models"][mm.name]
    else:
        for mm in report.entries():
            mm.notes.append("speed not measured (--no-speed)")
    report.ratios = ratios(report)
    return report


def ratios(report: Report) -> dict:
    """Each non-baseline entry relative to the baseline: params and MACs as fractions, latency as a
    speed-up (baseline / model) and throughput as model / baseline; None where not measured."""
    base = report.baseline
    if base is None:
        return {}
    out = {}
    for mm in (report.model, report.pruned):
        if mm is None:
            continue
        r = {
            "params": mm.params_total / base.params_total if base.params_total else None,
            "macs": mm.macs / base.macs if base.macs else None,
            "latency_speedup": None,
            "throughput_ratio": None,
        }
        if mm.speed and base.speed:
            if "latency_ms" in mm.speed and "latency_ms" in base.speed:
                r["latency_speedup"] = base.speed["latency_ms"]["median"] / mm.speed["latency_ms"]["median"]
            r["throughput_ratio"] = mm.speed["throughput_ips"]["median"] / base.speed["throughput_ips"]["median"]
        if mm.accuracy and base.accuracy:
            r["top1_delta"] = mm.accuracy["top1"] - base.accuracy["top1"]
        out[mm.name] = r
    return out


# --- compare ------------------------------------------------------------------------------------

SPEED_KEYS = ("device", "threads", "batch", "precision", "channels_last", "allocator")
ACCURACY_KEYS = ("images", "classes")  # a top-1 over another count of images or classes is another number


def load_reports(paths: list[str]) -> list[Report]:
    """Read report files; raises ReportError for unreadable or foreign files."""
    return [Report.from_json(p) for p in paths]


def check_compatible(reports: list[Report], labels: list[str] | None = None) -> None:
    """Raise ReportError unless the reports share units, input size and (where both timed) speed
    conditions, so their numbers can sit in one table."""
    labels = labels or [r.model.name for r in reports]
    ref, ref_label = reports[0], labels[0]
    for r, label in zip(reports[1:], labels[1:]):
        for key in sorted(set(ref.units) | set(r.units)):
            if ref.units.get(key) != r.units.get(key):
                raise ReportError(
                    f"cannot compare {ref_label} and {label}: their {key} units differ "
                    f"({ref.units.get(key)!r} vs {r.units.get(key)!r}); regenerate both with one partialize"
                )
        if list(ref.input_size) != list(r.input_size):
            raise ReportError(
                f"cannot compare {ref_label} and {label}: MACs were counted at different input sizes "
                f"({ref.input_size} vs {r.input_size}); use the same --input-size"
            )
        _check_same_accuracy_data(ref, r, ref_label, label)
        if ref.speed_conditions and r.speed_conditions:
            for key in SPEED_KEYS:
                a, b = ref.speed_conditions.get(key), r.speed_conditions.get(key)
                if a != b:
                    raise ReportError(
                        f"cannot compare {ref_label} and {label}: speed was measured with different "
                        f"{key} ({a!r} vs {b!r}); re-run with the same settings, or pass --no-speed to "
                        "compare params, MACs and accuracy only"
                    )


def _check_same_accuracy_data(ref: Report, r: Report, ref_label: str, label: str) -> None:
    """Top-1 over another set of images is another number: refuse to put the two side by side. The
    folders' paths are not compared (the same data may sit elsewhere on another machine)."""
    for a in [m.accuracy for m in ref.entries() if m.accuracy]:
        for b in [m.accuracy for m in r.entries() if m.accuracy]:
            differ = [k for k in ACCURACY_KEYS if a.get(k) != b.get(k)]
            if differ:
                raise ReportError(
                    f"cannot compare {ref_label} and {label}: accuracy was measured on other images ("
                    + "; ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
                    + "); report both with the same --data (and --data-limit)"
                )


def compare_entries(reports: list[Report], with_speed: bool = True) -> list[ModelMeasurement]:
    """Every measured model across the reports (model, baseline, pruned), first occurrence of a name
    kept; speed dropped when ``with_speed`` is False."""
    seen: dict[str, ModelMeasurement] = {}
    out = []
    for r in reports:
        for m in r.entries():
            if m.name in seen:
                first = seen[m.name]
                if (first.params_total, round(first.macs)) != (m.params_total, round(m.macs)):
                    raise ReportError(
                        f"two different models are both called {m.name!r} ({first.params_total} vs "
                        f"{m.params_total} params, {first.macs:.0f} vs {m.macs:.0f} MACs); give them "
                        "distinct names (report --name)"
                    )
                continue
            seen[m.name] = m
            if not with_speed:
                m = ModelMeasurement(**{**asdict(m), "speed": None})
            out.append(m)
    return out
