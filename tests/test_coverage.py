"""Model-zoo coverage sweep (slow: run with `pytest -m coverage`; writes docs/coverage.md)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.coverage
def test_default_recipe_converts_95_percent_of_timm_families():
    spec = importlib.util.spec_from_file_location("coverage_sweep", ROOT / "examples" / "coverage_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rows = [sweep.check(s, fam) for fam, s in sweep.targets()]
    (ROOT / "docs" / "coverage.md").write_text(sweep.markdown(rows, 0.0))
    timm_rows = [r for r in rows if r["family"].startswith("timm:") and r["status"] != "nothing eligible"]
    ok = sum(r["status"] == "ok" for r in timm_rows)
    assert ok / len(timm_rows) >= 0.95, [r for r in timm_rows if r["status"] != "ok"]
