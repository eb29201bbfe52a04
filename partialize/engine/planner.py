"""Planning: the recipe's decision for every discovered layer, each operator built and checked on the
layer's own call arguments; one layer never aborts the plan."""

from __future__ import annotations

import contextlib
import time
import weakref

import torch
from torch import nn

from .._modes import modes_kept
from ..errors import OperatorError, RecipeError
from ..ops._utils import named_attribute_values, sharing_kept_children
from ..ops.base import PartialOperator
from ..ops.registry import get_operator, is_partial_layer, is_partial_op
from ..recipe import (
    SKIP_VARIANTS,
    Decision,
    Recipe,
    apply_ratio_word,
    closest_names,
    cycle_values,
    load_recipe,
    name_matches,
    param_problems,
    resolve,
)
from ._calls import capture_calls, layer_cost, shared_parameters, tensor_owners
from .discover import Discovery, discover
from .plan import Plan, PlanEntry
from .tracer import example_input_for


def build_op(
    module: nn.Module, variant: str, ratio, params: dict, where: str = "", share_kept: bool = False
) -> PartialOperator:
    """Instantiate ``variant`` from ``module`` (weights inherited), on its device and dtype.

    The ratio (a number or a ratio word the operator takes) goes to ``from_module`` as ``ratio``. New
    weights an operator draws (an added attention, gates) come from a fixed seed on a forked RNG:
    planning and replaying are reproducible and never move the caller's global torch RNG.
    ``share_kept``: the operator's kept children are ``module``'s own (``sharing_kept_children``), for
    the planner only, and only when all of ``module``'s floating tensors have one device and dtype
    (moving the operator must not move them); their training modes are left as they were.
    """
    cls = get_operator(variant)
    problems = param_problems(variant, params, ratio)
    if problems:
        raise RecipeError(f"{where or variant}: " + "; ".join(problems))
    kwargs = dict(params)
    if ratio is not None:
        kwargs["ratio"] = ratio
    floats = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    ref = floats[0] if floats else None
    share_kept = share_kept and all(t.device == ref.device and t.dtype == ref.dtype for t in floats[1:])
    # the original's modules the operator may hold keep their own modes (op.train below sets them)
    with modes_kept(module) if share_kept else contextlib.nullcontext():
        with torch.random.fork_rng(devices=[]), sharing_kept_children() if share_kept else contextlib.nullcontext():
            # the CPU generator only (where operators draw): torch.manual_seed also reseeds every
            # accelerator's, which fork_rng(devices=[]) would not put back, and costs a millisecond
            torch.default_generator.manual_seed(0)
            op = cls.from_module(module, **kwargs)
        if ref is not None:
            op = op.to(device=ref.device, dtype=ref.dtype)
        op.train(module.training)
    return op


def fingerprint(module: nn.Module) -> tuple:
    """Which tensors ``module`` holds and how often each was changed in place (torch's version
    counter): equal fingerprints mean an operator built from it then is what building it now gives."""
    return tuple((id(t), t._version) for t in list(module.parameters()) + list(module.buffers()))


def try_operator(module: nn.Module, variant: str, ratio, params: dict, calls, where: str = "", original=None):
    """(operator, (MACs before, after, basis), None) for ``variant`` built on ``module`` and run on its
    captured ``calls``, or (None, None, reason) when the operator refuses the layer or fails on it.
    Only a RecipeError (bad params) propagates: one layer never aborts a plan or a scan. The operator
    may hold ``module``'s own kept children (``build_op``'s ``share_kept``): a scan drops it, a plan
    hands it to apply, which copies them (engine/apply.py)."""
    try:
        op = build_op(module, variant, ratio, params, where=where, share_kept=True)
        return op, layer_cost(module, op, calls, original), None
    except RecipeError:
        raise
    except OperatorError as e:
        return None, None, str(e)
    except Exception as e:  # anything else one layer raises is that layer's skip
        return None, None, f"{variant} failed on this layer: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _mro_names(m: nn.Module) -> tuple[str, ...]:
    out = []
    for c in type(m).__mro__:
        out += [c.__name__, f"{c.__module__}.{c.__qualname__}"]
    return tuple(out)


def _candidates(rec: Recipe, discovery: Discovery, modules: dict[str, nn.Module], names: list[str], hits: list[int]):
    """(name, decision) for every layer some rule selects (recipe.resolve: torch.ao precedence)."""
    out = []
    for name in names:
        decision = resolve(rec, discovery.layers[name], _mro_names(modules[name]))
        if decision is None:
            continue
        for i in decision.rules:
            hits[i] += 1
        out.append((name, apply_ratio_word(decision, name)))
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
    wanted = [n for n, d in cands if d.variant not in SKIP_VARIANTS]
    # on shapes only when discovery's real forward was slow (engine/_shape_only.py)
    runs_on = discovery.shadow or (model, x)  # the meta copy when shapes only (engine/_shape_only.py)
    outputs: dict[str, list] = {}
    calls = capture_calls(*runs_on, wanted, outputs)
    state = _PlanState(rec, discovery, modules, calls, outputs, tensor_owners(model))
    state.held_outside = _held_outside(model)
    for name, decision in cands:
        state.decide(name, decision)
    if rec.strict:
        _check_dead_rules(rec, hits, names)
        _check_dead_ignores(rec, list(modules))
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
        original_macs=state.orig_macs,
        shape_only=discovery.shadow is not None,
    )
    plan._built = (weakref.ref(model), state.built)  # not part of the plan's data (engine/apply.py)
    return plan


class _PlanState:
    """The decisions taken so far while walking the candidates in definition order."""

    def __init__(self, rec, discovery, modules, calls, outputs, owners) -> None:
        self.rec, self.discovery, self.modules, self.calls, self.owners = rec, discovery, modules, calls, owners
        self.outputs: dict[str, list] = outputs  # each captured call's output shapes, per layer
        self.entries: list[PlanEntry] = []
        self.orig_macs: dict[str, int] = {}
        self.whole: list[str] = []  # converted blocks that claim all their children
        self.containers: dict[str, tuple[str, ...]] = {}  # converted blocks whose unchanged children stay convertible
        self.cycles: dict[tuple, int] = {}  # (matching rules, param, values) -> layers that took a turn
        self.built: dict[str, tuple] = {}  # layer -> (operator, the module it came from, its fingerprint)
        self.held_outside: dict[int, str] = {}  # modules a plain attribute holds (``_held_outside``)

    def _take_cycles(self, decision: Decision) -> dict:
        """The decision's params with each ``{cycle: [...]}`` value replaced by this layer's turn: the
        layers selected by the same rules that reached their operator before it, modulo the cycle's
        length (a refused layer takes its turn too, so one value the operator always refuses cannot
        stall the cycle)."""
        params = dict(decision.params)
        for k, v in decision.params.items():
            values = cycle_values(v)
            if values:
                key = (decision.rules, k, repr(values))
                turn = self.cycles.get(key, 0)
                params[k] = values[turn % len(values)]
                self.cycles[key] = turn + 1
        return params

    def _skip_reason(self, name: str, decision: Decision) -> str | None:
        if any(name_matches(p, name) for p in self.rec.ignore):
            return "in the recipe's ignore list"
        parent = next((p for p in self.whole if name.startswith(p + ".")), None)
        if parent is not None:
            return f"inside {parent}, which is converted as a whole"
        box = next((p for p in self.containers if name.startswith(p + ".")), None)
        if box is not None and not any(_under(name[len(box) + 1 :], kept) for kept in self.containers[box]):
            return f"inside {box}, whose conversion changes this layer's channels"
        owner = _partial_ancestor(name, self.modules)
        if owner is not None:
            return f"inside {owner}, which is already a partial operator"
        if decision.variant in SKIP_VARIANTS:
            return "the recipe says skip"
        if is_partial_op(self.modules[name]):
            return "already a partialize operator"
        if not self.calls.get(name):
            return "not called in the example forward (nothing to measure or check it on)"
        return _unswappable(self.modules[name], self.held_outside) or shared_parameters(
            name, self.modules[name], self.discovery, self.owners
        )

    def decide(self, name: str, decision: Decision) -> None:
        info, m = self.discovery.layers[name], self.modules[name]
        rule_desc = decision.rules_text()
        base = PlanEntry(layer=name, original=info.describe(), status="skip", found=info.found, rule=rule_desc)
        base.reason = self._skip_reason(name, decision)
        if base.reason is not None:
            self.entries.append(base)
            return
        variant_name, ratio = decision.variant, decision.ratio
        params = self._take_cycles(decision)
        # the original's MACs (discovery) and output shapes (the capture): it is not run again
        original = (info.macs, self.outputs[name]) if name in self.outputs else None
        op, cost, base.reason = try_operator(
            m, variant_name, ratio, params, self.calls[name], f"layer {name!r} ({rule_desc})", original
        )
        if base.reason is not None:
            self.entries.append(base)
            return
        before, after, basis = cost
        self.orig_macs[name] = before
        self.built[name] = (op, m, fingerprint(m))  # apply may take it instead of building it again
        kept = op.convertible_children()
        if kept:
            self.containers[name] = tuple(kept)
        else:
            self.whole.append(name)
        ratio_out = getattr(op, "ratio", ratio)
        self.entries.append(
            PlanEntry(
                layer=name,
                original=info.describe(),
                status="convert",
                variant=variant_name,
                ratio=round(float(ratio_out), 6) if isinstance(ratio_out, (int, float)) else ratio_out,
                params=params if ratio is None else params | {"ratio": ratio},
                new=op.extra_repr().replace("\n", " ") if hasattr(op, "extra_repr") else type(op).__name__,
                delta_params=sum(p.numel() for p in op.parameters()) - sum(p.numel() for p in m.parameters()),
                delta_macs=after - before,
                macs_basis=basis,
                found=info.found,
                rule=rule_desc,
            )
        )


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _held_outside(model: nn.Module) -> dict[int, str]:
    """id -> where, for every module a plain attribute holds (directly, or in a list, tuple or dict),
    as ``owner.attribute``: a swap by name would leave that reference on the original layer."""
    out: dict[int, str] = {}
    for owner, attr, value in named_attribute_values(model):
        if isinstance(value, nn.Module):
            out.setdefault(id(value), f"{owner}.{attr}" if owner else attr)
    return out


def _unswappable(module: nn.Module, held_outside: dict[int, str]) -> str | None:
    """Why swapping ``module`` would leave the model computing something else than the plan says: a
    reference to it (or to a layer inside it) outside the module tree, or hooks the swap would drop."""
    for rel, m in module.named_modules():
        inside = f" (its {rel})" if rel else ""
        if id(m) in held_outside:
            return (
                f"also held by the plain attribute {held_outside[id(m)]!r}{inside}: the swap replaces the module, "
                "and that reference would still run the original layer"
            )
        hooks = [h for h in _HOOKS if getattr(m, h, None)]
        if hooks:
            return (
                f"has {', '.join(h.strip('_').replace('_', ' ') for h in hooks)} registered{inside}: the "
                "converted layer would not run them (remove them first, and register them again after)"
            )
    return None


def _under(rel: str, path: str) -> bool:
    """Whether the relative name ``rel`` is the kept child ``path`` (dotted for a nested one) or inside it."""
    return rel == path or rel.startswith(path + ".")


def _check_dead_ignores(rec: Recipe, names: list[str]) -> None:
    """strict: every ignore pattern must name some module (a typo would leave what it meant to protect
    converted)."""
    dead = [p for p in rec.ignore if not any(name_matches(p, n) for n in names if n)]
    if dead:
        msgs = []
        for p in dead:
            close = closest_names(p, [n for n in names if n])
            msgs.append(f"ignore pattern {p!r} names no module" + (f" (closest: {', '.join(close)})" if close else ""))
        raise RecipeError("; ".join(msgs) + ". Fix the pattern, or set `strict: false` in the recipe to allow it.")


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


def _partial_ancestor(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The nearest enclosing module that is already partial (an operator, or one an operator recognises)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        anc = ".".join(parts[:i])
        m = modules.get(anc)
        if m is not None and is_partial_layer(m):
            return anc
    return None


def infer_spec(model: nn.Module) -> dict | None:
    """How to rebuild the base model: set by ``base_model.build_model``, else a timm architecture name."""
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
