"""Discovery: which layers a model has, with shapes, call counts and MACs, from one eager forward
with hooks; an fx trace (leaf-aware tracer) records which tier found each layer."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..macs import MacCounter
from ._shape_only import REAL_BUDGET_S, OpTally, fake_input, new_mode, restored, running, shapes_pay
from .tracer import example_input_for, trace


@dataclass
class LayerInfo:
    """What discovery knows of one module (shapes from the example input, batch 1)."""

    name: str
    type: str
    type_path: str
    found: str  # "fx" | "hook (inside leaf X)" | "hook (tracing failed)"
    order: int  # call order in the forward pass
    depth: float = 0.0  # order / number of called modules, in [0, 1]
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: int | None = None
    dilation: tuple[int, ...] | None = None
    spatial: tuple[int, int] | None = None  # input H, W (feature maps only)
    stage: int | None = None  # log2(input size / feature size) - 1, floored at 0
    params: int = 0
    macs: int = 0  # MACs of the module in the forward, every call summed (partialize.macs)
    calls: int = 0  # how many times the forward called it

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """Short human description, e.g. ``Conv2d(64->64, k3, s1)``."""
        if self.kernel is not None:
            g = f", g{self.groups}" if self.groups and self.groups > 1 else ""
            k = "x".join(map(str, self.kernel)) if len(set(self.kernel)) > 1 else str(self.kernel[0])
            return f"{self.type}({self.in_channels}->{self.out_channels}, k{k}, s{self.stride[0]}{g})"
        if self.in_channels is not None:
            return f"{self.type}({self.in_channels}->{self.out_channels})"
        return self.type


@dataclass
class Discovery:
    """All modules that ran on the example input, in call order."""

    layers: dict[str, LayerInfo]
    traced: bool
    trace_error: str | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    macs: int  # total MACs of the original model on the example input (partialize.macs)
    seconds: dict[str, float] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)  # contraction ops with no MAC formula
    used_outside: dict[str, tuple[str, str]] = field(default_factory=dict)  # module -> (user, op)
    # the example input as a fake tensor when the forward ran on shapes only (engine/_shape_only.py):
    # the planner's later passes then run on shapes too
    fake_input: torch.Tensor | None = field(default=None, repr=False, compare=False)


def _shape(t) -> tuple[int, ...] | None:
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    if isinstance(t, (tuple, list)) and t and isinstance(t[0], torch.Tensor):
        return tuple(t[0].shape)
    return None


def _channels(m: nn.Module) -> tuple[int | None, int | None]:
    for a, b in (("in_channels", "out_channels"), ("in_features", "out_features")):
        if hasattr(m, a) and hasattr(m, b):
            return getattr(m, a), getattr(m, b)
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    if hasattr(m, "qkv") and isinstance(m.qkv, nn.Linear):
        return m.qkv.in_features, m.qkv.in_features
    if hasattr(m, "fc1") and hasattr(m, "fc2"):
        c1, _ = _channels(m.fc1)
        _, c2 = _channels(m.fc2)
        return c1, c2
    return None, None


def discover(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    input_size: int | tuple[int, ...] | None = None,
    shape_only: bool | None = None,
) -> Discovery:
    """Trace ``model`` (to learn which modules fx sees as leaves) and run it once eagerly (eval mode,
    no grad) with hooks: shapes, call order and counts, and MACs per module by the one counter
    (``partialize.macs``), every call included. ``shape_only`` (None: when the real forward is slow)
    runs that forward on fake tensors (``engine/_shape_only.py``); ``fake_input`` is then set."""
    x = example_input if example_input is not None else example_input_for(model, input_size)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        with restored(model):  # a forward that writes into the model would leave fx proxies in it
            gm = trace(model)
        traced, err = True, None
        graph_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    except Exception as e:  # any fx failure: the eager hooks still see every module
        traced, err, graph_modules = False, f"{type(e).__name__}: {e}".splitlines()[0][:300], set()
    times["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    records, counted, out, fake_x = _forward(model, x, shape_only)
    times["forward"] = time.perf_counter() - t0

    in_hw = x.shape[-2:] if x.dim() == 4 else None
    total = max(1, len(records))
    layers: dict[str, LayerInfo] = {}
    modules = dict(model.named_modules())
    for name, rec in sorted(records.items(), key=lambda kv: kv[1]["order"]):
        m = modules[name]
        leaf_above = next((g for g in graph_modules if name.startswith(g + ".")), None)
        if not traced:
            found = "hook (tracing failed)"
        elif name in graph_modules:
            found = "fx"
        elif leaf_above is not None:
            found = f"hook (inside leaf {leaf_above})"
        else:
            found = "fx (inlined block)"
        cin, cout = _channels(m)
        info = LayerInfo(
            name=name,
            type=type(m).__name__,
            type_path=f"{type(m).__module__}.{type(m).__qualname__}",
            found=found,
            order=rec["order"],
            depth=rec["order"] / total,
            in_shape=rec["in"],
            out_shape=rec["out"],
            in_channels=cin,
            out_channels=cout,
            params=sum(p.numel() for p in m.parameters()),
            macs=counted.by_module.get(name, 0),
            calls=counted.calls.get(name, 0),
        )
        if isinstance(m, nn.Conv2d):
            info.kernel, info.stride = tuple(m.kernel_size), tuple(m.stride)
            info.groups, info.dilation = m.groups, tuple(m.dilation)
        if rec["in"] is not None and len(rec["in"]) == 4 and in_hw is not None:
            info.spatial = (rec["in"][2], rec["in"][3])
            reduction = max(1.0, in_hw[0] / max(1, rec["in"][2]))
            info.stage = max(0, round(math.log2(reduction)) - 1)
        layers[name] = info
    return Discovery(
        layers,
        traced,
        err,
        tuple(x.shape),
        _shape(out),
        counted.total,
        times,
        uncounted=dict(counted.uncounted),
        used_outside=dict(counted.used_outside),
        fake_input=fake_x,
    )


class _ShapesPay(Exception):
    """Raised out of the real forward once it has shown that shapes only would be cheaper."""


def _observed(model: nn.Module, x: torch.Tensor, budget: float | None):
    """(first-call records per module, MacCount, output) of one eval, no-grad forward with hooks; with
    a ``budget``, once the forward has run that long it raises _ShapesPay if the ops so far would have
    been cheaper on shapes (``shapes_pay``), else it carries on."""
    records: dict[str, dict] = {}
    names = {id(m): n for n, m in model.named_modules() if n}
    counter = [0]
    tally = OpTally()
    watch = [budget is not None]
    t0 = time.perf_counter()

    def hook(mod, args, kwargs, out):
        if watch[0] and time.perf_counter() - t0 > budget:
            watch[0] = False  # decided once
            if shapes_pay(tally.heavy, tally.light, time.perf_counter() - t0):
                raise _ShapesPay
        name = names.get(id(mod))
        if name is None or name in records:
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        records[name] = {"in": _shape(first), "out": _shape(out), "order": counter[0]}
        counter[0] += 1

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in model.named_modules() if n]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), MacCounter(model) as fc, tally:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records, fc.result, out


def _forward(model: nn.Module, x: torch.Tensor, shape_only: bool | None):
    """The observed forward, real or on shapes only (``shape_only``: None = real unless it runs past
    ``REAL_BUDGET_S``); a model that cannot run on shapes runs for real. Also returns the fake input."""
    if shape_only is not True:
        try:
            return (*_observed(model, x, REAL_BUDGET_S if shape_only is None else None), None)
        except _ShapesPay:
            pass
    mode = new_mode()
    fake_x = fake_input(mode, x)
    try:
        with running(mode, model):
            return (*_observed(model, fake_x, None), fake_x)
    except Exception:  # values needed (.item(), data-dependent shapes, an op without a fake kernel)
        return (*_observed(model, x, None), None)
