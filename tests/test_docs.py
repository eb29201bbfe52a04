"""Code in the docs runs: the worked example of docs/architecture.md (adding an operator)."""

from __future__ import annotations

import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_architecture_worked_example_runs(capsys):
    text = (DOCS / "architecture.md").read_text()
    section = text[text.index("## Adding an operator: a worked example") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    exec(compile(code, "docs/architecture.md", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert "layers -> half_conv, MACs" in out
    from partialize.ops import list_operators

    assert "half_conv" not in list_operators()  # the example cleans up after itself
