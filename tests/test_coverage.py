"""Model-zoo coverage sweep (slow: run with `pytest -m coverage`; writes docs/coverage.md), and fast
checks of how the sweep classifies a model."""

import importlib.util
import pathlib
import time
from types import SimpleNamespace

import pytest

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
    rows = [
        {"family": "timm:a", "model": "a", "status": "ok", "converted": 2, "macs_g": 1.0, "macs_share": 0.5},
        {"family": "timm:b", "model": "b", "status": "no-op", "converted": 1, "macs_g": 2.0, "macs_share": 0.0},
        {"family": "timm:c", "model": "c", "status": "nothing eligible", "macs_g": 0.5},
    ]
    md = sweep.markdown(rows, 90.0)
    assert "Total sweep time 1.5 min" in md
    assert "**1 converted (fewer MACs)" in md and "1 no-op" in md and "**50.0%**" in md  # 1 of 2 eligible
    assert "- timm:b: b (1 layers, 2.000 GMACs before and after)" in md
    assert "| timm:b |" not in md  # not in the table of converted models


@pytest.mark.coverage
def test_default_recipe_converts_95_percent_of_timm_families_with_something_eligible():
    """The share is over the timm families whose representative has at least one eligible layer
    (families with nothing eligible are listed in docs/coverage.md but not counted)."""
    sweep = _sweep()
    t0 = time.perf_counter()
    rows = [sweep.check(s, fam) for fam, s in sweep.targets()]
    (ROOT / "docs" / "coverage.md").write_text(sweep.markdown(rows, time.perf_counter() - t0))
    timm_rows = [r for r in rows if r["family"].startswith("timm:") and r["status"] != "nothing eligible"]
    ok = sum(r["status"] == "ok" for r in timm_rows)
    not_ok = [(r["family"], r["model"], r["status"], r.get("error", "")) for r in timm_rows if r["status"] != "ok"]
    assert ok / len(timm_rows) >= 0.95, (
        f"default recipe converted (with fewer MACs) {ok} of {len(timm_rows)} timm families that have "
        f"something eligible ({ok / len(timm_rows):.1%} < 95%); not converted: {not_ok}"
    )
