"""Model-zoo coverage sweep (slow: run with `pytest -m coverage`; writes docs/coverage.md), and fast
checks of how the sweep classifies a model."""

import importlib.util
import pathlib
from types import SimpleNamespace

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("coverage_sweep", ROOT / "examples" / "coverage_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_sweep_counts_only_conversions_that_lower_macs():
    sweep = _sweep()
    plan = lambda n, before, after: SimpleNamespace(converted=[object()] * n, macs_before=before, macs_after=after)  # noqa: E731
    assert sweep.status_of(plan(3, 100, 80)) == "ok"
    assert sweep.status_of(plan(3, 100, 100)) == "no-op"  # layers swapped, nothing saved
    assert sweep.status_of(plan(0, 100, 100)) == "nothing eligible"


def _row(model, status, ratio=None, cands=None, conv=None, err=None, secs=None, **kw):
    r = {"family": f"timm:{model}", "model": model, "status": status, "candidates": cands or {}, **kw}
    if ratio is not None:
        r.update(macs_g=1.0, macs_ratio=ratio, converted_kinds=conv or {}, convert_s=secs)
    if err is not None:
        r["deploy_err"] = err
    return r


def test_sweep_summary_counts_each_target_by_hand():
    """Four made-up models whose counts are known: a, b converted (a under 0.8x, b over), c has
    attention that stayed, d failed to build."""
    sweep = _sweep()
    rows = [
        _row("a", "ok", 0.5, {"conv": 4, "attention": 2}, {"conv": 4, "attention": 2}, 0.0, 0.5),
        _row("b", "ok", 0.9, {"conv": 2}, {"conv": 1}, 2e-4, 3.0),  # deploy error above 1e-4: a mismatch
        _row("c", "nothing eligible", 1.0, {"attention": 3}, {}, None, 0.2, attention_classes=["m.Odd"]),
        {"family": "timm:d", "model": "d", "status": "error", "error": "ValueError: x"},
    ]
    s = sweep.summary(rows)
    assert (s["models"], s["built"], s["converted"], s["converted_under_target"]) == (4, 3, 2, 1)
    assert (s["with_attention"], s["attention_converted"]) == (2, 1)
    assert s["deploy_checked"] == 2 and s["deploy_mismatch"] == [("b", 2e-4, None)]
    assert s["errors"] == [("d", "ValueError: x")]
    assert s["convert_s_median"] == 0.5 and s["convert_s_max"] == 3.0 and s["convert_under_2s"] == 2
    rounding = _row("e", "ok", 0.5, {"conv": 1}, {"conv": 1}, 0.3, 0.1, deploy_err_f64=1e-12, out_absmax=1e9)
    s2 = sweep.summary(rows + [rounding])  # exact in float64: rounding amplified, not a wrong deployed form
    assert s2["deploy_mismatch"] == s["deploy_mismatch"] and s2["deploy_float32_rounding"] == [("e", 0.3, 1e-12, 1e9)]
    md = sweep.markdown(rows, 90.0, "auto", "test machine")
    assert "Total sweep time 1.5 min" in md and "test machine" in md
    assert "| something converted and MACs <= 0.8x | 1/3 (33%)" in md
    assert "| attention converted, of the models with attention | 1/2 (50%)" in md
    assert "| timm:a | a | ok | 1.000 | 0.500 | 4/4 | - | 2/2 | 0.0e+00 | 0.50 |" in md
    assert "- m.Odd (1)" in md  # the attention left unconverted is listed by class


@pytest.mark.coverage
def test_auto_recipe_sweep_writes_docs_coverage_md():
    """The sweep over every timm family and torchvision classifier (about 20 min on 2 cores); the
    shares against issue 15's targets are in the doc. Asserted: nothing converted computes something
    else when deployed, and no model fails inside partialize."""
    from partialize.measure.speed import machine_description

    sweep = _sweep()
    torch.set_num_threads(2)
    rows, seconds = sweep.run("auto")
    (ROOT / "docs" / "coverage.md").write_text(sweep.markdown(rows, seconds, "auto", machine_description(2)))
    s = sweep.summary(rows)
    assert not s["deploy_mismatch"], s["deploy_mismatch"]
    inside = [r for r in rows if r["status"] == "error" and "partialize" in r.get("where", "")]
    assert not inside, [(r["model"], r["error"], r["where"]) for r in inside]
