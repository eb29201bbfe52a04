"""What the search chooses between: units (parts of the model timed and chosen independently) and, for
each, the options the registered operators accept there.

A unit is an outermost layer some option converts, together with every candidate inside it (a ResNet
bottleneck with its 3x3 conv), so options that interact (a partial residual block and the conv
inside it) are timed together, in place, as the planner would build them. An option is a small recipe
over the unit's layers; each is built with the planner (so what the planner refuses, the search never
proposes) and timed deployed, BN folded, at the unit's real input shape.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from torch import nn

from ..engine.discover import Discovery
from ..engine.planner import build_op
from ..errors import PartializeError
from ..ops.partial_residual import projection_of

# (variant, ratio, params): what the search tries on each layer an operator accepts. Offsets of
# partial_residual alternate by block index (consecutive blocks form coupling layers, docs/recipes.md).
DEFAULT_OPTIONS: tuple[tuple[str, float, dict], ...] = (
    ("pconv", 0.125, {}),
    ("pconv", 0.25, {}),
    ("pconv", 0.5, {}),
    ("pconv", 0.125, {"stride_mode": "pool"}),  # strided convs only (the others take the plain option)
    ("pconv", 0.25, {"stride_mode": "pool"}),
    ("patconv", 0.25, {"attn": "ch"}),
    ("partial_mlp", 0.125, {}),
    ("partial_mlp", 0.25, {}),
    ("partial_mlp", 0.5, {}),
    ("partial_residual", 0.25, {"read": "complement"}),
    ("partial_residual", 0.5, {"read": "complement"}),
    # blocks with a projection shortcut only (a stage's first block): the branch reads and writes a group
    ("partial_residual", 0.25, {"read": "group", "projection": True}),
    ("partial_residual", 0.5, {"read": "group", "projection": True}),
    ("partial_attention", 0.5, {}),
)


def options_for(variants: str | None, options=DEFAULT_OPTIONS) -> tuple:
    """``options`` restricted to the comma-separated operator names in ``variants`` (None: all), e.g.
    ``"partial_residual"`` to search block-level cuts only; an unknown name is an error that lists
    the names the search tries."""
    if variants is None:
        return options
    names = [v.strip() for v in variants.split(",") if v.strip()]
    known = list(dict.fromkeys(v for v, _r, _p in options))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        from .solve import SearchError

        raise SearchError(f"--variants {variants!r}: unknown {unknown or 'empty'}; the search tries {', '.join(known)}")
    return tuple(o for o in options if o[0] in names)


MAX_COMBOS = 24  # fewest-change combinations kept per unit; its uniform forms are kept beyond them


@dataclass(frozen=True)
class LayerOption:
    """One operator on one layer: the recipe rule it is."""

    layer: str
    variant: str
    ratio: float
    params: tuple = ()

    def rule(self) -> dict:
        rule = {"select": {"name": self.layer}, "variant": self.variant, "ratio": self.ratio}
        if self.params:
            rule["params"] = dict(self.params)
        return rule

    def describe(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params)
        return f"{self.layer}: {self.variant}({self.ratio:g}{extra})"


@dataclass
class Unit:
    """A part of the model the search times and chooses for on its own; ``options[0]`` is "keep"."""

    name: str
    in_shape: tuple[int, ...] | None
    options: list[tuple[LayerOption, ...]] = field(default_factory=list)


def _parity(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) % 2 if m else 0


def layer_options(module: nn.Module, name: str, options=DEFAULT_OPTIONS) -> list[LayerOption]:
    """The options that build on ``module`` (``build_op`` succeeds: the operator accepts it)."""
    out = []
    strided = isinstance(module, nn.Conv2d) and tuple(module.stride) != (1, 1)
    for variant, ratio, params in options:
        params = dict(params)
        if params.get("stride_mode") == "pool" and not strided:
            continue  # the same operator as the plain option on a stride-1 conv
        if params.get("projection") and projection_of(module) is None:
            continue  # an identity-shortcut block: the same operator as its plain options
        if variant == "partial_residual" and params.get("read") == "complement":
            params["offset"] = 0.0 if _parity(name) else 1.0 - ratio
        try:
            build_op(module, variant, ratio, params)
        except (PartializeError, Exception):  # refused, or not this operator's kind of layer
            continue
        out.append(LayerOption(name, variant, float(ratio), tuple(sorted(params.items()))))
    return out


def find_units(model: nn.Module, discovery: Discovery, options=DEFAULT_OPTIONS) -> list[Unit]:
    """Units in forward order: each outermost layer with at least one option, its inner candidates'
    options combined with its own: the ``MAX_COMBOS`` with the fewest changes, then its uniform forms."""
    modules = dict(model.named_modules())
    cands = {}
    for name, info in sorted(discovery.layers.items(), key=lambda kv: kv[1].order):
        if info.calls != 1:  # reused modules: one choice would change every call; not searched
            continue
        opts = layer_options(modules[name], name, options)
        if opts:
            cands[name] = opts
    names = list(cands)
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    units = []
    for root in outer:
        members = [root] + [n for n in names if n.startswith(root + ".")]
        per_layer = [[None] + cands[n] for n in members]
        combos = [tuple(o for o in c if o is not None) for c in itertools.product(*per_layer)]
        # fewest changes first; among as many, those with the unit's own operator (a block's residual or
        # MLP cut), so a unit with many inner candidates still keeps the block option with its inner ones
        combos.sort(key=lambda c: (len(c), not any(o.layer == root for o in c)))
        kept = combos[:MAX_COMBOS]
        kept += [c for c in _uniform(root, members, cands) if c not in kept]
        units.append(Unit(root, discovery.layers[root].in_shape, kept))
    return units


def _uniform(root: str, members: list[str], cands: dict[str, list[LayerOption]]) -> list[tuple]:
    """The combinations that give one option to every inner layer that takes it (each 3x3 conv of a
    basic block at PConv 1/4, as the ``default`` recipe does), alone and with each of the unit's own
    options. Fewest changes first never reaches them in a unit with many candidates, and they are
    among the unit's fastest forms: without them ResNet-18's fastest searched choice ran 1.62x at 32 px,
    where ``default`` runs 2.05x."""
    inner = [n for n in members if n != root]
    keys = list(dict.fromkeys((o.variant, o.ratio, o.params) for n in inner for o in cands[n]))
    out = []
    for key in keys:
        same = tuple(o for n in inner for o in cands[n] if (o.variant, o.ratio, o.params) == key)
        if len(same) < 2:  # one layer changed: among the fewest-changes combinations already
            continue
        out.append(same)
        out += [(own, *same) for own in cands[root]]
    return out
