"""Planning: resolve a recipe against the discovered layers into an ordered list of decisions."""

from __future__ import annotations

import copy
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import OperatorError, PartializeError, RecipeError
from ..macs import MAC_UNIT, MacCounter
from ..ops.registry import get_operator, is_partial_op
from ..recipe import SKIP_VARIANTS, Recipe, closest_names, load_recipe, name_matches, select_matches
from .discover import Discovery, LayerInfo, discover
from .tracer import example_input_for

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
    _ops: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

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
        return sum(self._orig_macs.get(e.layer, 0) for e in self.converted_outermost) / max(1, self.macs_before)

    _orig_macs: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

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
            "original_macs": self._orig_macs,
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
        )
        p._orig_macs = d.get("original_macs", {})
        return p

    def __str__(self) -> str:
        from .render import plan_text

        return plan_text(self)


def _mro_names(m: nn.Module) -> tuple[str, ...]:
    out = []
    for c in type(m).__mro__:
        out += [c.__name__, f"{c.__module__}.{c.__qualname__}"]
    return tuple(out)


def _resolve(recipe: Recipe, info: LayerInfo, mro: tuple[str, ...]) -> tuple[dict | None, list[int]]:
    """Merge defaults and matching rules by precedence; None when no rule matches."""
    # level 1: type/predicates only, 2: glob or re: name, 3: exact name (defaults are level 0)
    matches = [(1 + r.select.name_kind(), i) for i, r in enumerate(recipe.rules) if select_matches(r.select, info, mro)]
    if not matches:
        return None, []
    # defaults < type/predicate rules < glob/regex name < exact name; file order among equals
    order = [i for _, i in sorted(matches)]
    merged = {
        "variant": recipe.defaults.variant,
        "ratio": recipe.defaults.ratio,
        "params": dict(recipe.defaults.params),
    }
    for i in order:
        r = recipe.rules[i]
        if r.variant is not None:
            merged["variant"] = r.variant
        if r.ratio is not None:
            merged["ratio"] = r.ratio
        merged["params"].update(r.params)
    return merged, order


BUILTIN_VARIANTS = (
    "pconv",
    "patconv",
    "pat_sp",
    "dpconv",
    "ada_pconv",
    "partial_mlp",
    "partial_attention",
    "partial_residual",
)
_RATIO_WORDS_OK = {
    "dynamic": ("pconv", "patconv", "dpconv"),
    "adaptive": ("pconv", "ada_pconv"),
    "inherit": ("pconv", "patconv", "dpconv"),
}


def _variant_for_ratio(variant: str, ratio) -> tuple[str, dict]:
    """``ratio: dynamic`` means DPConv, ``adaptive`` means Ada-PConv (PATConv keeps its attention).

    A ratio word a built-in variant cannot take is a RecipeError (user-registered variants get it as is).
    """
    if isinstance(ratio, str) and variant in BUILTIN_VARIANTS and variant not in _RATIO_WORDS_OK[ratio]:
        raise RecipeError(
            f"ratio {ratio!r} does not apply to variant {variant!r} (it applies to "
            f"{', '.join(_RATIO_WORDS_OK[ratio])}); give a number in (0, 1]"
        )
    if ratio == "dynamic" and variant in ("pconv", "patconv", "dpconv"):
        return "dpconv", ({"attn": "ch"} if variant == "patconv" else {})
    if ratio == "adaptive" and variant in ("pconv", "ada_pconv"):
        return "ada_pconv", {}
    return variant, {}


def build_op(module: nn.Module, variant: str, ratio, params: dict) -> nn.Module:
    """Instantiate ``variant`` from ``module`` (weights inherited), on its device and dtype.

    New weights an operator draws (an added attention, gates) come from a fixed seed on a forked RNG:
    planning is reproducible and never moves the caller's global torch RNG.
    """
    cls = get_operator(variant)
    kwargs = dict(params)
    if ratio is not None and ratio not in ("dynamic", "adaptive"):
        kwargs["ratio"] = ratio
    sig = inspect.signature(cls.from_module)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = [k for k in kwargs if k not in sig.parameters]
        if unknown:
            raise RecipeError(
                f"variant {variant!r} has no parameter(s) {unknown}; it takes "
                f"{[p for p in sig.parameters if p not in ('cls', 'original')]}"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        op = cls.from_module(module, **kwargs)
    ref = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
    if ref is not None:
        op = op.to(device=ref.device, dtype=ref.dtype)
    op.train(module.training)
    return op


def _inference_form(op: nn.Module) -> tuple[nn.Module, str]:
    """What to count MACs on: ``op.plan_form()`` if the op defines it (data-dependent ops give a
    bound), else its deploy form (a DPConv counts at its current width, not as its masked full conv)."""
    if callable(getattr(op, "plan_form", None)):
        return op.plan_form()
    if callable(getattr(op, "deploy", None)):
        try:
            return op.deploy(), "inference form"
        except PartializeError:
            pass
    return op, "training form"


Call = tuple[tuple, dict]


def _clone(v, memo: dict | None = None):
    """Deep copy of the tensors in a call's arguments (later in-place ops must not change them); a
    tensor passed twice stays one tensor (``nn.MultiheadAttention`` checks ``query is key``)."""
    memo = {} if memo is None else memo
    if isinstance(v, torch.Tensor):
        if id(v) not in memo:
            memo[id(v)] = v.detach().clone()
        return memo[id(v)]
    if isinstance(v, (list, tuple)):
        items = [_clone(a, memo) for a in v]
        return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
    if isinstance(v, dict):
        return {k: _clone(a, memo) for k, a in v.items()}
    return v


def _clone_call(args: tuple, kwargs: dict) -> Call:
    memo: dict = {}
    return _clone(args, memo), _clone(kwargs, memo)


def capture_calls(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, list[Call]]:
    """The arguments of every call of each module in ``names`` during one eval forward on ``x``."""
    calls: dict[str, list[Call]] = {n: [] for n in names}
    handles = []
    for n in names:

        def pre(_m, args, kwargs, n=n):
            calls[n].append(_clone_call(args, kwargs))

        handles.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return calls


def _shapes(v):
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    if isinstance(v, (list, tuple)):
        return tuple(_shapes(a) for a in v)
    return None


def layer_cost(module: nn.Module, op: nn.Module, calls: list[Call]) -> tuple[int, int, str]:
    """(MACs before, MACs after, basis) of swapping ``module`` for ``op``, summed over the layer's calls
    in the example forward. Runs the original and the operator's inference form on each call's own
    arguments, so any call signature works; an output of another shape raises OperatorError."""
    form, basis = _inference_form(op)
    was = module.training
    module.eval()
    before = after = 0
    try:
        for call in calls:
            args, kwargs = _clone_call(*call)
            with torch.no_grad(), MacCounter() as c0:
                ref = module(*args, **kwargs)
            args, kwargs = _clone_call(*call)
            with torch.no_grad(), MacCounter() as c1:
                got = form(*args, **kwargs)
            if _shapes(got) != _shapes(ref):
                raise OperatorError(f"the converted layer returns shape {_shapes(got)}, the original {_shapes(ref)}")
            before, after = before + c0.result.total, after + c1.result.total
    finally:
        module.train(was)
    return before, after, basis


def _shared_parameters(name: str, module: nn.Module, discovery: Discovery, owners: dict[int, list[str]]) -> str | None:
    """Why ``module`` cannot be swapped because its tensors are used by code outside it, or None."""
    inside = lambda n: n == name or n.startswith(name + ".")  # noqa: E731
    for owner, (user, op) in discovery.used_outside.items():
        if inside(owner) and not inside(user):
            where = f"the forward of {user!r}" if user else "the model's top-level forward"
            return (
                f"its parameters are used outside it ({op} in {where} reads {owner!r}'s tensors): a swapped "
                "layer would leave that code reading weights that no longer exist"
            )
    for t in list(module.parameters()) + list(module.buffers()):
        others = [n for n in owners.get(id(t), []) if not inside(n)]
        if others:
            return f"it shares a parameter with {others[0]!r} (tied weights): converting one side would untie them"
    return None


def _tensor_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            owners.setdefault(id(t), []).append(mname)
    return owners


def _candidates(rec: Recipe, discovery: Discovery, modules: dict[str, nn.Module], names: list[str], hits: list[int]):
    """(name, merged rule fields, matching rule indices) for every layer some rule selects."""
    out = []
    for name in names:
        merged, order = _resolve(rec, discovery.layers[name], _mro_names(modules[name]))
        for i in order:
            hits[i] += 1
        if merged is not None:
            out.append((name, merged, order))
    return out


def make_plan(
    model: nn.Module,
    recipe=None,
    *,
    discovery: Discovery | None = None,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
    ratio=0.25,
    variant: str | None = None,
) -> Plan:
    """Resolve ``recipe`` (default: shipped ``default`` with ``ratio``/``variant``) on ``model``.

    One layer never aborts the plan: whatever goes wrong while building, checking or costing its
    operator becomes a skip with the reason. Only a recipe error (RecipeError) stops planning.
    """
    t_start = time.perf_counter()
    rec = _default_recipe(ratio, variant) if recipe is None else load_recipe(recipe)
    x = example_input if example_input is not None else example_input_for(model, input_size or rec.input_size)
    if discovery is None:
        discovery = discover(model, x)
    t_plan = time.perf_counter()
    modules = dict(model.named_modules())
    # definition order (parents before children), so a block converted as a whole claims its children
    names = [n for n in modules if n in discovery.layers]
    hits = [0] * len(rec.rules)
    cands = _candidates(rec, discovery, modules, names, hits)
    wanted = [n for n, merged, _ in cands if merged["variant"] not in SKIP_VARIANTS]
    calls = capture_calls(model, x, wanted)
    state = _PlanState(rec, discovery, modules, calls, _tensor_owners(model))
    for name, merged, order in cands:
        state.decide(name, merged, order)
    if rec.strict:
        _check_dead_rules(rec, hits, names)
    plan = Plan(
        entries=state.entries,
        recipe=rec.model_dump(mode="json", exclude_none=True),
        model=infer_spec(model),
        input_shape=discovery.input_shape,
        output_shape=discovery.output_shape,
        params_before=sum(p.numel() for p in model.parameters()),
        macs_before=discovery.macs,
        traced=discovery.traced,
        trace_error=discovery.trace_error,
        seconds=dict(discovery.seconds)
        | {"plan": time.perf_counter() - t_plan, "total": time.perf_counter() - t_start},
        uncounted_ops=dict(discovery.uncounted),
    )
    plan._ops = state.ops
    plan._orig_macs = state.orig_macs
    return plan


class _PlanState:
    """The decisions taken so far while walking the candidates in definition order."""

    def __init__(self, rec, discovery, modules, calls, owners) -> None:
        self.rec, self.discovery, self.modules, self.calls, self.owners = rec, discovery, modules, calls, owners
        self.entries: list[PlanEntry] = []
        self.ops: dict[str, nn.Module] = {}
        self.orig_macs: dict[str, int] = {}
        self.whole: list[str] = []  # converted blocks that claim all their children
        self.containers: dict[str, tuple[str, ...]] = {}  # converted blocks whose unchanged children stay convertible

    def _skip_reason(self, name: str, merged: dict) -> str | None:
        if any(name_matches(p, name) for p in self.rec.ignore):
            return "in the recipe's ignore list"
        parent = next((p for p in self.whole if name.startswith(p + ".")), None)
        if parent is not None:
            return f"inside {parent}, which is converted as a whole"
        box = next((p for p in self.containers if name.startswith(p + ".")), None)
        if box is not None and name[len(box) + 1 :].split(".")[0] not in self.containers[box]:
            return f"inside {box}, whose conversion changes this layer's channels"
        owner = _partial_ancestor(name, self.modules)
        if owner is not None:
            return f"inside {owner}, which is already a partial operator"
        if merged["variant"] in SKIP_VARIANTS:
            return "the recipe says skip"
        if is_partial_op(self.modules[name]):
            return "already a partialize operator"
        if not self.calls.get(name):
            return "not called in the example forward (nothing to measure or check it on)"
        return _shared_parameters(name, self.modules[name], self.discovery, self.owners)

    def decide(self, name: str, merged: dict, order: list[int]) -> None:
        info, m = self.discovery.layers[name], self.modules[name]
        rule_desc = ", ".join(f"rules[{i}]" for i in order)
        base = PlanEntry(layer=name, original=info.describe(), status="skip", found=info.found, rule=rule_desc)
        base.reason = self._skip_reason(name, merged)
        if base.reason is not None:
            self.entries.append(base)
            return
        variant_name, implied = _variant_for_ratio(merged["variant"], merged["ratio"])
        params = implied | merged["params"]
        try:
            op = build_op(m, variant_name, merged["ratio"], params)
            before, after, basis = layer_cost(m, op, self.calls[name])
        except RecipeError:
            raise
        except OperatorError as e:
            base.reason = str(e)
        except Exception as e:  # anything else one layer raises is that layer's skip, never the plan's end
            base.reason = f"{variant_name} failed on this layer: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if base.reason is not None:
            self.entries.append(base)
            return
        self.orig_macs[name] = before
        self.ops[name] = op
        if callable(getattr(op, "convertible_children", None)):
            self.containers[name] = tuple(op.convertible_children())
        else:
            self.whole.append(name)
        ratio_out = getattr(op, "ratio", merged["ratio"])
        self.entries.append(
            PlanEntry(
                layer=name,
                original=info.describe(),
                status="convert",
                variant=variant_name,
                ratio=round(float(ratio_out), 6) if isinstance(ratio_out, (int, float)) else ratio_out,
                params=params if merged["ratio"] is None else params | {"ratio": merged["ratio"]},
                new=op.extra_repr().replace("\n", " ") if hasattr(op, "extra_repr") else type(op).__name__,
                delta_params=sum(p.numel() for p in op.parameters()) - sum(p.numel() for p in m.parameters()),
                delta_macs=after - before,
                macs_basis=basis,
                found=info.found,
                rule=rule_desc,
            )
        )


def _check_dead_rules(rec: Recipe, hits: list[int], names: list[str]) -> None:
    """strict: every rule must match some layer (RecipeError listing the dead ones with close names)."""
    dead = [i for i, h in enumerate(hits) if h == 0]
    if not dead:
        return
    msgs = []
    for i in dead:
        sel = rec.rules[i].select
        pats = sel.name if isinstance(sel.name, list) else [sel.name] if sel.name else []
        close = sorted({c for p in pats for c in closest_names(p, names)})
        hint = f"; closest layer names: {', '.join(close)}" if close else ""
        msgs.append(f"rules[{i}] ({sel.model_dump(exclude_none=True)}) matches no layer{hint}")
    raise RecipeError("; ".join(msgs) + ". Fix the selector, or set `strict: false` in the recipe to allow it.")


def _default_recipe(ratio, variant) -> Recipe:
    rec = load_recipe("default")
    data = rec.model_dump(mode="json", exclude_none=True)
    data["defaults"]["ratio"] = ratio
    if variant is not None:
        data["defaults"]["variant"] = variant
        for r in data["rules"]:
            r.pop("variant", None)
    for r in data["rules"]:
        r.pop("ratio", None)
    return Recipe.model_validate(data)


def copy_plan_ops(plan: Plan) -> dict[str, nn.Module]:
    """Operators built by the plan, deep-copied so the plan can be applied more than once."""
    return {k: copy.deepcopy(v) for k, v in plan._ops.items()}


def _partial_ancestor(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest enclosing module that is a partialize operator or timm's Partial_conv3."""
    from ..ops.pconv import is_timm_partial_conv

    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        m = modules.get(anc)
        if m is not None and (is_partial_op(m) or is_timm_partial_conv(m)):
            return anc
    return None


def infer_spec(model: nn.Module) -> dict | None:
    """How to rebuild the base model: set by ``zoo.build_model``, else a timm architecture name."""
    spec = getattr(model, "_partialize_spec", None)
    if spec is not None:
        return spec
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        kwargs = {}
        if getattr(model, "num_classes", None) is not None:
            kwargs["num_classes"] = model.num_classes
        return {"spec": cfg["architecture"], "kwargs": kwargs}
    return None
