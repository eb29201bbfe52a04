"""Shape-only forwards for the planner on models whose real forward is slow.

Planning needs shapes and MAC counts, not values: discovery, the captured call arguments, each
operator's shape check and MAC count and the final output-shape check. On a large model (a ViT at
1024 px: 490 GMACs, 17 s a forward on 2 cores) these real forwards were nearly all of the conversion
time. Under torch's ``FakeTensorMode`` the same code runs on tensors that carry only shape, dtype and
device: MAC counts are identical (they come from shapes), the time is that of dispatching the ops.

It is not always faster: torch decomposes a fake conv or norm into many fake ops (about 5 ms each on
the 2-core VM; ResNet-152 takes 1.5 s on shapes, 0.42 s for real), so a small or convolution-heavy
model is quicker for real. Discovery therefore runs the real forward, and when it has run longer than
``REAL_BUDGET_S`` compares what the ops dispatched so far cost for real with what they would cost on
shapes (``shapes_pay``): if shapes are cheaper it starts again on shapes, else it carries on for real.
A model whose forward needs values (``.item()``, data-dependent shapes) cannot run on shapes; it
stays real.

A forward may write state into the model (a cached bias table, a buffer rebuilt for a new input size).
Under fake mode that state would be fake tensors, so every module's buffers and plain attributes are
put back as they were after each shape-only pass (``restored``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

REAL_BUDGET_S = 0.5  # a real discovery forward running longer than this switches the plan to shapes only

# seconds one dispatched op costs on shapes (measured on the 2-core VM, torch 2.14: ResNet-152 and
# ViT-L/16 fitted): convs and norms are decomposed into many fake ops, the others cost about one
FAKE_S_HEAVY, FAKE_S_LIGHT = 0.004, 0.0013
_HEAVY_OPS = ("convolution", "batch_norm", "layer_norm", "group_norm")


def is_heavy(op_name: str) -> bool:
    return any(k in op_name for k in _HEAVY_OPS)


def shapes_pay(heavy: int, light: int, seconds: float) -> bool:
    """Whether the rest of planning is cheaper on shapes: the ops dispatched so far cost ``seconds``
    for real; on shapes they would cost ``FAKE_S_HEAVY`` each for convs and norms, ``FAKE_S_LIGHT`` for
    the others. The model's remaining ops are taken to be of the same mix."""
    return heavy * FAKE_S_HEAVY + light * FAKE_S_LIGHT < 0.8 * seconds


class OpTally(TorchDispatchMode):
    """Counts the ops dispatched inside it, convs and norms apart."""

    def __init__(self) -> None:
        super().__init__()
        self.heavy = self.light = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_heavy(func.name()):
            self.heavy += 1
        else:
            self.light += 1
        return func(*args, **(kwargs or {}))


# torch's own bookkeeping in a module's __dict__ (hooks are added and removed around the passes)
_TORCH_ATTRS = frozenset({"_modules", "_parameters", "_buffers", "training"})


def new_mode() -> FakeTensorMode:
    return FakeTensorMode(allow_non_fake_inputs=True)


def is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def fake_mode_of(values) -> FakeTensorMode | None:
    """The fake mode of the first fake tensor in a (nested) call's arguments, or None."""
    if isinstance(values, FakeTensor):
        return values.fake_mode
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, (list, tuple)):
        for v in values:
            mode = fake_mode_of(v)
            if mode is not None:
                return mode
    return None


def _bookkeeping(k: str) -> bool:
    return k in _TORCH_ATTRS or k.endswith("_hooks") or k.startswith("_backward")


def _snapshot(m: nn.Module) -> dict:
    saved = {}
    for k, v in vars(m).items():
        if _bookkeeping(k):
            continue
        if isinstance(v, dict):
            saved[k] = (v, dict(v))
        elif isinstance(v, list):
            saved[k] = (v, list(v))
        else:
            saved[k] = (v, None)
    return {"attrs": saved, "buffers": dict(m._buffers), "params": dict(m._parameters)}


def _restore(m: nn.Module, snap: dict) -> None:
    m._buffers.clear()
    m._buffers.update(snap["buffers"])
    m._parameters.clear()
    m._parameters.update(snap["params"])
    attrs = snap["attrs"]
    for k in [k for k in vars(m) if k not in attrs and not _bookkeeping(k)]:
        delattr(m, k)  # set during the pass (a cache created on first use)
    for k, (obj, contents) in attrs.items():
        object.__setattr__(m, k, obj)
        if isinstance(contents, dict):
            obj.clear()
            obj.update(contents)
        elif isinstance(contents, list):
            obj[:] = contents


@contextlib.contextmanager
def restored(*modules: nn.Module) -> Iterator[None]:
    """Run the block, then put every submodule's buffers, parameters and plain attributes (a dict's or
    a list's contents included) back as they were."""
    snaps = [(m, _snapshot(m)) for root in modules for m in root.modules()]
    try:
        yield
    finally:
        for m, snap in snaps:
            _restore(m, snap)


@contextlib.contextmanager
def running(mode: FakeTensorMode, *modules: nn.Module) -> Iterator[None]:
    """Shape-only execution of ``modules`` under ``mode``, their state restored afterwards."""
    with restored(*modules), mode:
        yield


def fake_input(mode: FakeTensorMode, x: torch.Tensor) -> torch.Tensor:
    return mode.from_tensor(x)
