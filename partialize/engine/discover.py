"""Discovery: which layers a model has, with shapes, call counts and MACs, from one eager forward
with hooks; an fx trace (leaf-aware tracer) records which tier found each layer."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .._modes import in_mode
from ..macs import MacCounter
from ._shape_only import FastMeta, Shadow, restored, shadow_of
from .tracer import LeafTracer, example_input_for


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
    # the meta copy of the model and input the forward ran on when it ran on shapes only
    # (engine/_shape_only.py): the planner's later passes then run on shapes too
    shadow: Shadow | None = field(default=None, repr=False, compare=False)


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
    shape_only: bool = True,
) -> Discovery:
    """Trace ``model`` (to learn which modules fx sees as leaves) and run it once eagerly (eval mode,
    no grad) with hooks: shapes, call order and counts, and MACs per module by the one counter
    (``partialize.macs``), every call included. With ``shape_only`` (the default) that forward runs on
    a meta copy of the model (``engine/_shape_only.py``) and ``shadow`` is set; a model that cannot run
    there, or ``shape_only=False``, runs for real."""
    x = example_input if example_input is not None else example_input_for(model, input_size)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        with restored(model):  # a forward that writes into the model would leave fx proxies in it
            graph = LeafTracer().trace(model)  # the graph only: no GraphModule (its code) is needed
        traced, err = True, None
        graph_modules = {n.target for n in graph.nodes if n.op == "call_module"}
    except Exception as e:  # any fx failure: the eager hooks still see every module
        traced, err, graph_modules = False, f"{type(e).__name__}: {e}".splitlines()[0][:300], set()
    times["trace"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    records, counted, out, shadow = _forward(model, x, shape_only)
    times["forward"] = time.perf_counter() - t0

    in_hw = x.shape[-2:] if x.dim() == 4 else None
    total = max(1, len(records))
    layers: dict[str, LayerInfo] = {}
    modules = dict(model.named_modules())
    for name, rec in sorted(records.items(), key=lambda kv: kv[1]["order"]):
        m = modules[name]
        leaf_above = _leaf_above(name, graph_modules)
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
        shadow=shadow,
    )


def _leaf_above(name: str, graph_modules: set[str]) -> str | None:
    """The fx leaf ``name`` lies inside (fx never goes into a leaf, so there is at most one), or None."""
    parts = name.split(".")
    return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in graph_modules), None)


def _observed(model: nn.Module, x: torch.Tensor):
    """(first-call records per module, MacCount, output) of one eval, no-grad forward with hooks."""
    records: dict[str, dict] = {}
    names = {id(m): n for n, m in model.named_modules() if n}
    counter = [0]

    def hook(mod, args, kwargs, out):
        name = names.get(id(mod))
        if name is None or name in records:
            return
        first = args[0] if args else next(iter(kwargs.values()), None)
        records[name] = {"in": _shape(first), "out": _shape(out), "order": counter[0]}
        counter[0] += 1

    handles = [m.register_forward_hook(hook, with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with in_mode(model), torch.no_grad(), MacCounter(model) as fc:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return records, fc.result, out


def _forward(model: nn.Module, x: torch.Tensor, shape_only: bool):
    """The observed forward, on the model's meta shadow (``shape_only``) or for real; a model that
    cannot run on shapes runs for real. Also returns the shadow it ran on, if any."""
    if shape_only:
        try:
            shadow = shadow_of(model, x)
            with FastMeta():
                return (*_observed(shadow.model, shadow.x), shadow)
        except Exception:  # values needed (.item(), data-dependent shapes), or CPU tensors made in forward
            pass
    return (*_observed(model, x), None)
