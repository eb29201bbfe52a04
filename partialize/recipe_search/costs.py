"""The cost table, measured on this machine: every option of every unit built by the planner, deployed
(BN folded) and timed in place at the unit's real input shape, batch and thread count, interleaved
with the unit's other options; and each option's data-free accuracy proxy (the relative output error
of the converted unit before calibration, on the unit's own inputs).

Times are cached on disk, keyed by machine, torch version, threads, batch, the unit's structure and
input shape and the option (weights do not change a time); accuracy proxies depend on the weights and
the data, so they are recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .._fs import write_text
from ..engine._calls import capture_calls
from ..engine.apply import apply_plan
from ..engine.planner import make_plan
from ..inference import deploy, find_conv_bn_pairs
from ..measure.allocator import allocator_state
from ..measure.speed import machine_description, time_side_by_side
from .units import LayerOption, Unit


@dataclass
class UnitCosts:
    """Measured time (s per batch call) and accuracy proxy of each option of one unit (index 0: keep)."""

    unit: str
    times: list[float]
    costs: list[float]
    spread: list[float] = field(default_factory=list)  # IQR / median of each time
    cached: int = 0
    in_model_factor: float = 1.0  # converted options' time inside the whole model over their time alone


def scale_to_model(
    costs: list[UnitCosts], picks: list[int], inside_original: dict[str, float], inside_converted: dict[str, float]
) -> None:
    """Put each unit's times on the scale they have inside the whole model, in place: "keep" becomes the
    original unit's time there, and every other option is scaled by ``inside / alone`` of the option
    ``picks`` chose for that unit, timed inside a whole model converted with those picks. Timed alone, a
    unit can run at another speed than inside the model (measured on ResNet-50, 1 thread, batch 16: the
    first stage's bottlenecks and layer2.0 1.4-2.4x slower alone, converted or not; the later stages
    within 25%), and the factor of one converted option is taken for the unit's others. A unit whose
    pick is "keep", or that was not timed in the converted model, takes keep's factor instead; one not
    timed in the original either keeps its alone times."""
    for c, k in zip(costs, picks):
        keep_inside = inside_original.get(c.unit)
        inside = inside_converted.get(c.unit) if k > 0 else None
        if inside is not None and c.times[k] > 0:
            f = inside / c.times[k]
        elif keep_inside is not None and c.times[0] > 0:
            f = keep_inside / c.times[0]
        else:
            f = 1.0
        c.times[1:] = [t * f for t in c.times[1:]]
        c.times[0] = keep_inside if keep_inside is not None else c.times[0]
        c.in_model_factor = f


def cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("PARTIALIZE_CACHE", "~/.cache/partialize")), "costs")


def fingerprint(threads: int, batch: int, device: str, channels_last: bool = False) -> dict:
    """What a measured time depends on besides the unit: machine, torch, threads, batch, device, memory
    format, on CPU the memory allocator (``partialize.measure.allocator``), and on CUDA the GPU's name
    and the CUDA version."""
    out = {
        "machine": machine_description(threads),
        "torch": torch.__version__,
        "threads": threads,
        "batch": batch,
        "device": device,
        "memory_format": "channels_last" if channels_last else "contiguous",
    }
    if torch.device(device).type == "cpu":
        alloc = allocator_state()
        out |= {"allocator": alloc["allocator"], "allocator_env": alloc["env"]}
    if torch.device(device).type == "cuda":
        out |= {"gpu": torch.cuda.get_device_name(torch.device(device)), "cuda": torch.version.cuda}
    return out


def _holder(model: nn.Module, unit: str, pairs: dict[str, str]) -> nn.Sequential:
    """The unit alone (``u``), followed by the BN that reads only its output when there is one, so the
    time includes what deploy folds into it."""
    holder = nn.Sequential()
    holder.add_module("u", copy.deepcopy(model.get_submodule(unit)))
    if unit in pairs:
        holder.add_module("bn", copy.deepcopy(model.get_submodule(pairs[unit])))
    return holder.eval()


def _recipe(option: tuple[LayerOption, ...], unit: str) -> dict:
    rules = []
    for o in option:
        rel = "u" + o.layer[len(unit) :]  # the unit is "u" in its holder
        rules.append(LayerOption(rel, o.variant, o.ratio, o.params).rule())
    return {"version": 1, "strict": True, "rules": rules}


def _build(holder: nn.Sequential, option, unit: str, x: torch.Tensor) -> nn.Module | None:
    """The holder with ``option`` applied by the planner (None when the planner skips a part of it)."""
    if not option:
        return holder
    plan = make_plan(holder, _recipe(option, unit), example_input=x)
    if len(plan.converted) != len(option):
        return None
    return apply_plan(holder, plan, example_input=x)


@torch.no_grad()
def _rel_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    ya, yb = a(x), b(x)
    return float((ya - yb).square().sum() / yb.square().sum().clamp_min(1e-12))


Timer = Callable[[dict[str, nn.Module], torch.Tensor], dict[str, tuple[float, float]]]


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def side_by_side_timer(
    rounds: int = 5, min_round_s: float = 0.05, device: torch.device | None = None, channels_last: bool = False
) -> Timer:
    """The real timer: every module on ``x``, interleaved (``time_side_by_side``, synchronising CUDA
    around each round), in inference mode; returns name -> (median seconds per call, IQR / median).
    ``channels_last``: the modules' weights and ``x`` are put in NHWC first (the modules in place: the
    callers hand it deployed copies of their own)."""

    def timer(modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, tuple[float, float]]:
        if channels_last:
            modules = {n: m.to(memory_format=torch.channels_last) for n, m in modules.items()}
            x = _nhwc(x)
        fns = {n: (lambda m=m: m(x)) for n, m in modules.items()}
        t = time_side_by_side(fns, rounds=rounds, min_round_s=min_round_s, device=device)
        return {n: (v.median_s, v.iqr_s / v.median_s) for n, v in t.items()}

    return timer


def measure_units(
    model: nn.Module,
    units: list[Unit],
    x: torch.Tensor,
    *,
    threads: int = 1,
    timer: Timer | None = None,
    cache: bool = True,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[UnitCosts]:
    """Time and score every option of every unit on ``x`` (a batch of the model's input). ``timer``
    (default: :func:`side_by_side_timer`) is replaceable, for tests that must not time anything.
    ``channels_last`` keys the cache (the default timer then times in NHWC; a given timer is told
    separately)."""
    timer = timer or side_by_side_timer(device=x.device, channels_last=channels_last)
    fp = fingerprint(threads, x.shape[0], str(x.device), channels_last)
    path = os.path.join(cache_dir(), hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    table = _read(path) if cache else {}
    calls = capture_calls(model, x, [u.name for u in units])
    pairs = dict(find_conv_bn_pairs(model))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        for i, unit in enumerate(units):
            if progress:
                progress(f"unit {i + 1}/{len(units)}: {unit.name} ({len(unit.options)} options)")
            (args, kwargs), *_ = calls[unit.name]
            out.append(_measure_unit(model, unit, args[0], pairs, table, timer))
    finally:
        torch.set_num_threads(prev)
    if cache:
        write_text(path, json.dumps({"fingerprint": fp, "times": table}, indent=1), force=True)
    return out


def _key(holder: nn.Module, x: torch.Tensor, option) -> str:
    """The unit's structure (repr), the code of its modules' forwards (an edited forward with the same
    modules runs at another speed), the input shape and the option."""
    sig = repr(holder) + _forward_code(holder) + str(tuple(x.shape)) + "|".join(o.describe() for o in option)
    return hashlib.sha256(sig.encode()).hexdigest()[:20]


def _forward_code(module: nn.Module) -> str:
    """A digest of the bytecode and constants of every module class's ``forward`` in ``module``."""
    h = hashlib.sha256()
    for cls in sorted({type(m) for m in module.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if code is not None:
            _digest_code(h, code)
    return h.hexdigest()


def _digest_code(h, code) -> None:
    """Bytecode, names and constants; a nested function's code by its own content (its repr holds an
    address that changes from process to process)."""
    h.update(code.co_code + repr(code.co_names).encode())
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            _digest_code(h, c)
        else:
            h.update(repr(c).encode())


def _measure_unit(model, unit: Unit, x: torch.Tensor, pairs, table: dict, timer: Timer) -> UnitCosts:
    holder = _holder(model, unit.name, pairs)
    built, keep = [], []
    for k, option in enumerate(unit.options):
        try:
            m = _build(holder, option, unit.name, x)
        except Exception:  # the planner refused a combination: not an option
            m = None
        if m is not None:
            built.append((k, m))
            keep.append(k)
    unit.options = [unit.options[k] for k in keep]
    costs = [_rel_error(m, holder, x) for _, m in built]
    keys = [_key(holder, x, unit.options[i]) for i in range(len(built))]
    todo = {i: deploy(m, x[:1]) for i, (_, m) in enumerate(built) if keys[i] not in table}
    if todo:
        with torch.inference_mode():
            timed = timer({str(i): f for i, f in todo.items()}, x)
        for i in todo:
            median, spread = timed[str(i)]
            table[keys[i]] = {"time": median, "spread": spread}
    times = [table[k]["time"] for k in keys]
    spread = [table[k]["spread"] for k in keys]
    return UnitCosts(unit.name, times, costs, spread, cached=len(built) - len(todo))


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get("times", {})
    except (OSError, ValueError):
        return {}


def in_model_times(
    models: dict[str, nn.Module],
    units: list[str],
    x: torch.Tensor,
    *,
    threads: int = 1,
    calls: int = 5,
    channels_last: bool = False,
) -> dict[str, tuple[float, dict[str, float]]]:
    """For each model (deployed here): (whole forward, each unit inside it), median seconds per batch
    call, timed by forward hooks during whole forwards, the models' calls interleaved so drift in the
    machine's speed hits them alike. On CUDA the hooks record events (no synchronisation inside the
    forward, which would stall the queue at every unit) read after each forward. A unit timed alone
    can run at another speed than inside the model (see :func:`scale_to_model`), so the search takes
    its times, and what the rest of the model costs, from here. Units a model does not have (or never
    calls) are left out of its dict. ``channels_last``: every model and ``x`` in NHWC."""
    import statistics
    import time

    cuda = x.device.type == "cuda"

    def mark():  # a point in time: an event on CUDA (read later), the clock on CPU
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(a, b) -> float:
        return a.elapsed_time(b) / 1e3 if cuda else b - a

    deployed = {k: deploy(m, x[:1]) for k, m in models.items()}
    if channels_last:
        deployed = {k: d.to(memory_format=torch.channels_last) for k, d in deployed.items()}
        x = _nhwc(x)
    marks: dict[str, dict[str, list]] = {k: {u: [] for u in units} for k in models}
    hooks = []
    for k, d in deployed.items():
        mods = dict(d.named_modules())
        for u in [u for u in units if u in mods]:
            for hook in (mods[u].register_forward_pre_hook, mods[u].register_forward_hook):
                hooks.append(hook(lambda *_a, u=u, k=k: marks[k][u].append(mark())))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    totals: dict[str, list[float]] = {k: [] for k in models}
    spans: dict[str, dict[str, list[float]]] = {k: {u: [] for u in units} for k in models}
    try:
        with torch.inference_mode():
            for d in deployed.values():
                d(x)  # warm-up
            names = list(deployed)
            for i in range(calls):
                for k in names[i % len(names) :] + names[: i % len(names)]:
                    for v in marks[k].values():
                        v.clear()
                    t0 = mark()
                    deployed[k](x)
                    t1 = mark()
                    if cuda:
                        torch.cuda.synchronize(x.device)
                    totals[k].append(seconds(t0, t1))
                    for u, m in marks[k].items():
                        if len(m) >= 2:  # one call of the unit: its pre-hook and its hook
                            spans[k][u].append(seconds(m[0], m[-1]))
    finally:
        torch.set_num_threads(prev)
        for h in hooks:
            h.remove()
    return {
        k: (statistics.median(totals[k]), {u: statistics.median(v) for u, v in spans[k].items() if v}) for k in models
    }
