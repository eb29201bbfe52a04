"""A conversion plan: pure data (JSON round trip), made by :mod:`partialize.engine.planner`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import PartializeError
from ..macs import MAC_UNIT
from .render import plan_text

PLAN_FORMAT = 1


@dataclass
class PlanEntry:
    """One layer's decision. ``status`` is ``convert`` or ``skip`` (then ``reason`` says why)."""

    layer: str
    original: str
    status: str
    variant: str | None = None
    ratio: float | str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    new: str | None = None
    delta_params: int = 0
    delta_macs: int = 0
    macs_basis: str = "inference form"
    found: str = ""
    rule: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Plan:
    """An ordered, printable, JSON-serialisable conversion plan."""

    entries: list[PlanEntry]
    recipe: dict
    model: dict | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    params_before: int
    macs_before: int
    traced: bool
    trace_error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    uncounted_ops: dict[str, int] = field(default_factory=dict)  # contraction ops with no MAC formula
    original_macs: dict[str, int] = field(default_factory=dict)  # MACs of each converted layer before
    shape_only: bool = False  # planned on a meta copy (shapes only), the real forward being slow

    @property
    def converted(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.status == "convert"]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.status == "skip"]

    @property
    def params_after(self) -> int:
        return self.params_before + sum(e.delta_params for e in self.converted)

    @property
    def macs_after(self) -> int:
        return self.macs_before + sum(e.delta_macs for e in self.converted)

    @property
    def converted_outermost(self) -> list[PlanEntry]:
        """Converted entries not nested in another converted entry (a block and a layer inside it)."""
        names = [e.layer for e in self.converted]
        return [e for e in self.converted if not any(e.layer.startswith(n + ".") for n in names)]

    def converted_macs_share(self) -> float:
        """Share of the original MACs that sit in layers the plan converts (nested ones counted once)."""
        return sum(self.original_macs.get(e.layer, 0) for e in self.converted_outermost) / max(1, self.macs_before)

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "recipe": self.recipe,
            "input_shape": list(self.input_shape),
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "traced": self.traced,
            "trace_error": self.trace_error,
            "units": {"macs": MAC_UNIT + ", at batch 1 on the example input"},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "converted_macs_share": self.converted_macs_share(),
            "seconds": self.seconds,
            "uncounted_ops": self.uncounted_ops,
            "original_macs": self.original_macs,
            "shape_only": self.shape_only,
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kw))

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        fmt = d.get("format")
        if fmt != PLAN_FORMAT:
            raise PartializeError(f"plan format {fmt!r} is not supported (this partialize reads {PLAN_FORMAT})")
        p = cls(
            entries=[PlanEntry(**e) for e in d["entries"]],
            recipe=d["recipe"],
            model=d.get("model"),
            input_shape=tuple(d["input_shape"]),
            output_shape=tuple(d["output_shape"]) if d.get("output_shape") else None,
            params_before=d["params_before"],
            macs_before=d["macs_before"],
            traced=d["traced"],
            trace_error=d.get("trace_error"),
            seconds=d.get("seconds", {}),
            uncounted_ops=d.get("uncounted_ops", {}),
            original_macs=d.get("original_macs", {}),
            shape_only=d.get("shape_only", False),
        )
        return p

    def __str__(self) -> str:
        return plan_text(self)
