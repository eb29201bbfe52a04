"""Latency-aware search: the partial model that reaches a target speed-up on *this* machine at the
least predicted accuracy cost, written as an ordinary recipe.

``partialize.search(model, target_speedup=2.0)``:

1. **units and options** (``units.py``): every outermost layer some operator accepts, with the
   candidates inside it, and the options the operators accept there (PConv at 1/8, 1/4, 1/2,
   PATConv, partial MLP, partial residual, partial attention, and combinations inside a unit);
2. **cost table** (``costs.py``): each option built by the planner, deployed and timed in place at the
   unit's real input shape, batch and thread count (cached on disk), and its accuracy proxy;
3. **the choice** (``solve.py``): a multiple-choice knapsack solved exactly on a time grid: the least
   total proxy whose predicted time reaches the target;
4. the recipe (exact layer names, reviewable and replayable), the prediction, and the whole converted
   model **re-measured** side by side with the original.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import yaml
from torch import nn

from .._fs import write_text
from ..calibration.data import calibration_images
from ..engine.apply import apply_plan
from ..engine.discover import discover
from ..engine.planner import make_plan
from ..engine.tracer import example_input_for
from ..inference import deploy
from ..measure.allocator import use_allocator
from ..recipe import load_recipe
from .costs import (
    Timer,
    UnitCosts,
    fingerprint,
    in_model_times,
    measure_units,
    scale_to_model,
    side_by_side_timer,
)
from .solve import SearchError, choose
from .units import DEFAULT_OPTIONS, Unit, find_units, options_for

__all__ = ["SearchError", "SearchResult", "options_for", "search"]


@dataclass
class SearchResult:
    """The recipe the search wrote, what it predicts and (re-measured) what the model does."""

    target_speedup: float
    predicted_speedup: float
    measured_speedup: float | None
    recipe: dict
    choices: list[dict]
    model_time_ms: float
    rest_time_ms: float
    guarantee: str
    conditions: dict
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # each measurement: aim, predicted, measured, choice

    def to_dict(self) -> dict:
        return asdict(self)

    def recipe_yaml(self) -> str:
        head = (
            f"# written by partialize search: target {self.target_speedup:g}x, predicted "
            f"{self.predicted_speedup:.3f}x, measured "
            + (f"{self.measured_speedup:.3f}x" if self.measured_speedup is not None else "not measured")
            + f"\n# on {self.conditions.get('machine')}"
            + (f", GPU {self.conditions['gpu']}" if self.conditions.get("gpu") else "")
            + f", {conditions_text(self.conditions)}\n"
        )
        return head + yaml.safe_dump(self.recipe, sort_keys=False)


def conditions_text(cond: dict) -> str:
    """Batch, input, threads (CPU), memory format and allocator (CPU) of a search's measurements."""
    shape = cond.get("input_shape")
    parts = [f"batch {cond.get('batch')}"]
    if shape:
        parts.append(f"input {shape[-2]}x{shape[-1]}")
    if str(cond.get("device", "cpu")).startswith("cpu"):
        parts.append(f"{cond.get('threads')} thread(s)")
        parts.append(f"allocator {cond.get('allocator', 'not recorded')}")
    if cond.get("memory_format") == "channels_last":
        parts.append("channels_last")
    return ", ".join(parts)


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """Where the search times: ``device``, else where the model's tensors are; CUDA must exist."""
    if device is None:
        p = next((t for t in list(model.parameters()) + list(model.buffers())), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise SearchError(f"--device must be cpu or cuda[:N], got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise SearchError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SearchError("--device cuda: CUDA is not available on this machine (torch sees no GPU)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise SearchError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return dev


def _inputs(model, data, batch, input_size, seed: int = 0) -> torch.Tensor:
    x1 = example_input_for(model, input_size)  # on the model's device and dtype
    if data is not None:
        return calibration_images(data, model, batch, input_size=input_size, seed=seed).to(x1.device, x1.dtype)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *x1.shape[1:]), generator=g).to(x1.device, x1.dtype)


def _model_time(model: nn.Module, x: torch.Tensor, timer: Timer, threads: int) -> float:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return timer({"model": deploy(model, x[:1])}, x)["model"][0]
    finally:
        torch.set_num_threads(prev)


def _choices(units: list[Unit], costs: list[UnitCosts], picks: list[int]) -> list[dict]:
    out = []
    for unit, uc, k in zip(units, costs, picks):
        out.append(
            {
                "unit": unit.name,
                "option": [o.describe() for o in unit.options[k]] or ["keep"],
                "time_ms": uc.times[k] * 1e3,
                "keep_time_ms": uc.times[0] * 1e3,
                "proxy": uc.costs[k],
                "spread": uc.spread[k],
                "in_model_factor": uc.in_model_factor,
            }
        )
    return out


def search(
    model: nn.Module,
    target_speedup: float,
    *,
    name: str | None = None,
    input_size: int | None = None,
    threads: int = 1,
    batch: int = 16,
    data: str | os.PathLike | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    options=DEFAULT_OPTIONS,
    remeasure: bool = True,
    iterations: int = 3,
    timer: Timer | None = None,
    cache: bool = True,
    allocator: str | None = None,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Search ``model`` for ``target_speedup`` (throughput at ``batch``, ``threads`` CPU threads,
    deployed forms); see the module docstring. ``data``: images for the accuracy proxy (an ImageFolder,
    or a tensor), else N(0, 1) inputs. The prediction sums per-unit times, which misses how units
    interact in the whole model, so the loop re-measures the chosen model and, while it falls short,
    aims higher by the shortfall and solves again (``iterations`` times at most; ``history`` keeps
    every prediction and measurement). A target no measured choice reaches is a ``SearchError`` that
    names the best measured speed-up. ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``; default: where
    the model is) is where every timing runs, synchronised on CUDA; a model elsewhere is copied there,
    never moved. ``timer`` replaces the real timer (tests). ``allocator`` ("system" / "reuse", default:
    the process as it is; ``partialize.measure.allocator``) is set before any timing and is part of the
    cost table's cache key. ``channels_last``: every model, original included, is timed with its weights
    and input in NHWC (the memory format is part of the cache key too)."""
    if not target_speedup > 1.0:
        raise SearchError(f"--target-speedup must be > 1 (a speed-up over the original), got {target_speedup!r}")
    if remeasure and iterations < 1:
        raise SearchError(f"iterations must be >= 1 when the search re-measures, got {iterations!r}")
    say = progress or (lambda _m: None)
    if allocator is not None:
        use_allocator(allocator)
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    dev = _device(model, device)
    model = model.eval() if _device(model, None) == dev else copy.deepcopy(model).to(dev).eval()
    x = _inputs(model, data, batch, input_size)
    units = find_units(model, discover(model, x[:1]), options)
    if not units:
        raise SearchError("no layer of this model is accepted by any operator the search tries")
    secs["units"] = time.perf_counter() - t0
    say(f"cost table: {len(units)} units, {sum(len(u.options) for u in units)} options")
    real = timer is None
    timer = timer or side_by_side_timer(device=dev, channels_last=channels_last)
    costs = measure_units(
        model, units, x, threads=threads, timer=timer, cache=cache, channels_last=channels_last, progress=progress
    )
    if real:  # every unit's times and the rest of the model, as they run inside the whole model
        picks = _fastest_picks(costs)
        say("timing the units inside the whole original and fastest-choice models")
        fast_model = _convert(model, _recipe(units, picks, "search-fastest"), x[:1])
        both = {"original": model, "fastest": fast_model}
        inside = in_model_times(both, [u.name for u in units], x, threads=threads, channels_last=channels_last)
        total = inside["original"][0]
        scale_to_model(costs, picks, inside["original"][1], inside["fastest"][1])
    else:
        total = _model_time(model, x, timer, threads)
    secs["cost_table"] = time.perf_counter() - t0 - secs["units"]
    rest = max(0.0, total - sum(c.times[0] for c in costs))
    fastest = rest + sum(min(c.times) for c in costs)
    label = name or type(model).__name__
    ctx = _Ctx(model, units, costs, total, rest, x, timer, threads, label, batch, channels_last)
    aim, first = target_speedup, None
    if fastest > total / target_speedup:  # predicted out of reach: measured before refusing
        first = _reachable(ctx, target_speedup, fastest, remeasure, say)
        aim = target_speedup * (total / fastest) / first.measured_speedup  # the table's error, removed
    if first is not None and total / aim <= fastest * 1.01:  # nothing cheaper to try: already measured
        result = first
    else:
        result = _loop(ctx, target_speedup, aim, fastest, iterations if remeasure else 0, say)
    if first is not None and result is not first:
        history = [*first.history, *result.history]
        cheaper = _medians(history).get(_choice_id(result.recipe), 0.0)
        if _choice_id(result.recipe) == _choice_id(first.recipe):  # the loop came back to the fastest choice
            first.history, result = history, first
        elif cheaper < target_speedup:
            first.notes.append(f"a cheaper choice measured {cheaper:.2f}x: the fastest one is kept")
            first.history, result = history, first
        else:
            result.notes, result.history = [*first.notes, *result.notes], history
    _settle(result)
    if result.measured_speedup is not None and result.measured_speedup < target_speedup:
        medians = _medians(result.history)
        best = max(medians.values())
        raise SearchError(
            f"{target_speedup:g}x was not reached: the chosen model measured {result.measured_speedup:.2f}x "
            f"(the cost table predicted {result.predicted_speedup:.2f}x; best of {len(medians)} measured "
            f"choices {best:.2f}x); ask for at most {best:.2f}x, or search again on a quieter machine"
        )
    secs["total"] = time.perf_counter() - t0
    result.seconds = secs
    return result


def _choice_id(recipe: dict) -> str:
    """Which choice a recipe is (its rules), so that two measurements of one model are seen as such."""
    digest = hashlib.sha1(json.dumps(recipe["rules"], sort_keys=True, default=str).encode(), usedforsecurity=False)
    return digest.hexdigest()[:12]


def _measured(ctx: _Ctx, result: SearchResult, aim: float) -> None:
    """Time ``result``'s model side by side with the original; the measurement joins its history."""
    result.measured_speedup = _remeasure(ctx, result.recipe)
    result.history.append(
        {"aim": aim, "predicted": result.predicted_speedup, "measured": result.measured_speedup,
         "choice": _choice_id(result.recipe)}
    )  # fmt: skip


def _medians(history: list[dict]) -> dict[str, float]:
    """Each measured choice's median speed-up over all its measurements."""
    runs: dict[str, list[float]] = {}
    for h in history:
        runs.setdefault(h["choice"], []).append(h["measured"])
    return {k: statistics.median(v) for k, v in runs.items()}


def _settle(result: SearchResult) -> None:
    """A choice measured more than once reports the median of its measurements, not the last or the
    best one: on a noisy machine the best of two runs of one model flatters it (measured: 1.86x and
    1.64x for one MobileNetV2 choice in one search)."""
    if result.measured_speedup is None:
        return
    key = _choice_id(result.recipe)
    runs = [h["measured"] for h in result.history if h["choice"] == key]
    if len(runs) > 1:
        result.measured_speedup = statistics.median(runs)
        result.notes.append(
            f"this choice was measured {len(runs)} times ({', '.join(f'{m:.2f}x' for m in runs)}): "
            f"the median, {result.measured_speedup:.2f}x, is reported"
        )


def _reachable(ctx: _Ctx, target: float, fastest: float, remeasure: bool, say) -> SearchResult:
    """The fastest choice, measured; a ``SearchError`` naming what is reachable when it falls short.
    The table sums per-unit times and can under-predict as well as over-predict, so a target the
    prediction puts out of reach is refused only once the whole model has been measured."""
    pred = ctx.total / fastest
    reason = (
        f"the fastest choice predicts {pred:.2f}x (the layers no operator converts take "
        f"{ctx.rest * 1e3:.1f} ms of {ctx.total * 1e3:.1f} ms)"
    )
    if not remeasure:
        raise SearchError(f"{target:g}x is out of reach with these options: {reason}; ask for at most {pred:.2f}x")
    say(f"the table predicts at most {pred:.2f}x: measuring the fastest choice")
    result = _fastest_choice(ctx, target)
    _measured(ctx, result, pred)
    if result.measured_speedup < target:
        best = min(pred, result.measured_speedup)
        raise SearchError(
            f"{target:g}x is out of reach with these options: {reason}, and measured "
            f"{result.measured_speedup:.2f}x; ask for at most {best:.2f}x"
        )
    result.notes.append(
        f"the table predicted at most {pred:.2f}x; the fastest choice measured {result.measured_speedup:.2f}x"
    )
    return result


def _loop(ctx: _Ctx, target: float, aim: float, fastest: float, iterations: int, say) -> SearchResult:
    """Solve for ``aim``, re-measure, and while the model falls short aim higher by the shortfall (up to
    the fastest choice, which is then measured as it is)."""
    at_max = ctx.total / aim <= fastest * 1.01
    result = _fastest_choice(ctx, target) if at_max else _solve(ctx, target, aim)
    for i in range(iterations):
        say(f"re-measuring the whole converted model side by side with the original (aiming at {aim:.3f}x)")
        _measured(ctx, result, aim)
        settled = _medians(result.history)[_choice_id(result.recipe)]  # this choice's runs so far, not the last
        if settled >= target or i == iterations - 1:
            break
        if at_max:
            result.notes.append(f"measured {settled:.2f}x with the fastest choice")
            break
        # the table over-predicted: aim higher by the measured shortfall and solve again (closed loop)
        aim *= target / settled
        at_max = ctx.total / aim <= fastest * 1.01
        history = result.history
        result = _fastest_choice(ctx, target) if at_max else _solve(ctx, target, aim)
        result.history = history
    return result


@dataclass
class _Ctx:
    model: nn.Module
    units: list[Unit]
    costs: list[UnitCosts]
    total: float
    rest: float
    x: torch.Tensor
    timer: Timer
    threads: int
    label: str
    batch: int
    channels_last: bool = False


def _solve(ctx: _Ctx, target: float, aim: float) -> SearchResult:
    """The cheapest choice whose predicted speed-up is ``aim``, as a result with its recipe."""
    pick = choose([c.times for c in ctx.costs], [c.costs for c in ctx.costs], ctx.total / aim - ctx.rest)
    guarantee = (
        f"least proxy among choices within the budget minus {pick.slack * 1e3:.3f} ms (time grid "
        f"{pick.step * 1e6:.2f} us per unit, {len(ctx.units)} units)"
    )
    return _result(ctx, target, pick.picks, guarantee)


def _fastest_picks(costs: list[UnitCosts]) -> list[int]:
    """Every unit's fastest option (the least proxy among equally fast ones)."""
    return [min(range(len(c.times)), key=lambda k, c=c: (c.times[k], c.costs[k])) for c in costs]


def _fastest_choice(ctx: _Ctx, target: float) -> SearchResult:
    """Every unit at its fastest option (the least proxy among equally fast ones)."""
    return _result(ctx, target, _fastest_picks(ctx.costs), "the fastest option of every unit (no budget left to trade)")


def _recipe(units: list[Unit], picks: list[int], name: str, description: str = "", size: int = 0) -> dict:
    rules = [o.rule() for u, k in zip(units, picks) for o in u.options[k]]
    recipe = {
        "version": 1,
        "name": name,
        "description": description or name,
        "strict": True,
        **({"input_size": size} if size else {}),
        "rules": rules or [{"select": {"name": units[0].name}, "variant": "skip"}],
    }
    load_recipe(recipe)  # what is written validates
    return recipe


def _result(ctx: _Ctx, target: float, picks: list[int], guarantee: str) -> SearchResult:
    where = f"{ctx.threads} thread(s)" if ctx.x.device.type == "cpu" else str(ctx.x.device)
    what = f"partialize search: {target:g}x throughput at batch {ctx.batch}, {where}"
    recipe = _recipe(ctx.units, picks, f"search-{ctx.label}-{target:g}x", what, int(ctx.x.shape[-1]))
    time_s = sum(c.times[k] for c, k in zip(ctx.costs, picks))
    return SearchResult(
        target, ctx.total / (ctx.rest + time_s), None, recipe, _choices(ctx.units, ctx.costs, picks),
        ctx.total * 1e3, ctx.rest * 1e3, guarantee,
        fingerprint(ctx.threads, ctx.batch, str(ctx.x.device), ctx.channels_last) | {"input_shape": list(ctx.x.shape)},
    )  # fmt: skip


def _convert(model: nn.Module, recipe: dict, x1: torch.Tensor) -> nn.Module:
    return apply_plan(model, make_plan(model, recipe, example_input=x1), example_input=x1)


def _remeasure(ctx: _Ctx, recipe: dict) -> float:
    """The measured throughput ratio of the whole converted model over the original, side by side."""
    converted = _convert(ctx.model, recipe, ctx.x[:1])
    prev = torch.get_num_threads()
    torch.set_num_threads(ctx.threads)
    try:
        with torch.inference_mode():
            x1 = ctx.x[:1]
            t = ctx.timer({"original": deploy(ctx.model, x1), "converted": deploy(converted, x1)}, ctx.x)
    finally:
        torch.set_num_threads(prev)
    return t["original"][0] / t["converted"][0]


def write_result(result: SearchResult, out: str, json_path: str | None = None, force: bool = False) -> None:
    """Write the recipe (YAML with the prediction in its header) and, optionally, the JSON result."""
    write_text(out, result.recipe_yaml(), force=force, option="--out")
    if json_path:
        write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n", force=force, option="--json")
