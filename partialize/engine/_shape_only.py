"""Shape-only forwards: the planner's passes run on a meta copy of the model.

Planning needs shapes and MAC counts, not values: discovery, the captured call arguments, each
operator's shape check and MAC count and apply's output-shape check. On a large model (a ViT at
1024 px: 490 GMACs, 15 s a forward on 2 cores) real forwards were nearly all of the conversion time.
They run instead on a *shadow*: a copy of the model whose tensors are on torch's ``meta`` device
(shape, dtype and strides, no data; making one moves no weights). MAC counts are identical (they come
from shapes); the time is that of dispatching the ops. Each operator is deployed on meta too, its
tensors swapped for meta ones while ``deploy()`` builds the form (``params_on_meta``): folding a wide
block's BNs into its convs for real took longer than the rest of its planning.

Many meta kernels are Python decompositions (an elementwise op about 0.3 ms, a batch norm 0.9 ms on
the 2-core VM), so ``FastMeta`` answers an op it has seen on the same argument metadata from a cache.
With it a meta forward costs 0.02-0.3 ms an op, less than the real forward on every model measured,
small ones included (ResNet-18: 0.03 s against 0.05 s; ResNet-152 0.09 s against 0.38 s; ViT-H/14
0.10 s against 3.1 s). The previous way, torch's ``FakeTensorMode``, cost 1.3-5 ms an op and paid
only on models whose real forward was slow.

A model whose forward needs values (``.item()``, data-dependent shapes) or makes CPU tensors to
combine with its inputs cannot run on meta; it is planned for real. The shadow is a separate model:
what its forward writes into itself (a cached bias table, a buffer rebuilt for a new input size)
never reaches the user's model. The fx trace runs on the model itself, so ``restored`` puts back what
tracing writes (proxies left in a stateful module).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from ..ops._utils import attribute_values, clone_module


class _Uncacheable(Exception):
    pass


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _key_of(v):
    """A hashable description of one op argument (a tensor by its metadata), or _Uncacheable."""
    if isinstance(v, torch.Tensor):
        if not v.is_meta:
            raise _Uncacheable
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.storage_offset())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(_key_of(a) for a in v))
    if v is None or isinstance(v, _PLAIN):
        return v
    raise _Uncacheable


_KINDS: dict = {}


def _returns_kind(func) -> str | None:
    """ "new": a non-mutating op returning fresh tensors; "self": an in-place pointwise op writing its
    first argument only (it returns that argument, metadata unchanged); None: anything else (views,
    ``out=`` variants, metadata changes)."""
    if func not in _KINDS:
        _KINDS[func] = _kind_of(func._schema, torch.Tag.pointwise in func.tags)
    return _KINDS[func]


def _kind_of(schema, pointwise: bool) -> str | None:
    if not schema.returns:
        return None
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    if written:
        return "self" if pointwise and written == [0] and len(schema.returns) == 1 else None
    if any(r.alias_info is not None for r in schema.returns):
        return None
    if all(str(r.type) in ("Tensor", "Tensor[]", "List[Tensor]") for r in schema.returns):
        return "new"
    return None


class FastMeta(TorchDispatchMode):
    """Meta ops answered from a cache of output metadata, and CPU tensors met there moved to meta.

    Many meta kernels are Python decompositions (an elementwise op about 0.3 ms, a batch norm 0.9 ms,
    on the 2-core VM); a ViT's blocks repeat the same ops on the same shapes. The first call of an op
    on given argument metadata runs torch's own meta kernel (which also raises on bad shapes); a later
    identical call gets new empty tensors of the metadata it returned then. Only ops whose every
    tensor argument is meta, that return new tensors (or, pointwise in place, their own first
    argument) are cached: views and metadata-changing ops run as usual."""

    cache: dict = {}  # shared: a meta kernel's output metadata depends on nothing but its arguments'
    MAX_ENTRIES = 50_000

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
            # a tensor the forward made on the CPU (torch.ones(n) without a device) met the shadow's:
            # only its shape matters here, as under torch's FakeTensorMode(allow_non_fake_inputs)
            args, kwargs = tree_map(lambda v: on_meta(v) if isinstance(v, torch.Tensor) else v, (args, kwargs))
        kind = _returns_kind(func)
        if kind is None:
            return func(*args, **kwargs)
        try:
            key = (func, _key_of(args), _key_of(tuple(sorted(kwargs.items()))))
        except _Uncacheable:
            return func(*args, **kwargs)
        hit = self.cache.get(key)
        if hit is not None:
            return args[0] if kind == "self" else _rebuild(hit)
        out = func(*args, **kwargs)
        meta = _meta_of(out)
        if meta is not None and (kind == "new" or out is args[0]):
            if len(self.cache) > self.MAX_ENTRIES:
                self.cache.clear()
            self.cache[key] = meta
        return out


def _meta_of(out):
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape), out.stride(), out.dtype, out.storage_offset()) if out.is_meta else None
    if isinstance(out, (list, tuple)):
        items = [_meta_of(o) for o in out]
        return None if any(i is None for i in items) else (type(out), items)
    return None


def _rebuild(meta):
    if isinstance(meta[0], type):
        return meta[0](_rebuild(m) for m in meta[1])
    shape, stride, dtype, offset = meta
    t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return t if offset == 0 else t.as_strided(shape, stride, offset)


class Shadow(NamedTuple):
    """A meta copy of a model and the example input on meta: where the planner's passes run."""

    model: nn.Module
    x: torch.Tensor


def on_meta(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t, device="meta")
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every tensor it holds on the meta device: parameters, buffers and the
    tensors in its modules' plain attributes (a cached table, directly or in a list, tuple or dict)."""
    memo: dict = {}
    for t in list(module.parameters()) + list(module.buffers()):
        memo.setdefault(id(t), on_meta(t))
    for t in attribute_values(module):
        if isinstance(t, torch.Tensor) and id(t) not in memo:
            memo[id(t)] = on_meta(t)
    return clone_module(module, memo)


@contextlib.contextmanager
def params_on_meta(module: nn.Module) -> Iterator[None]:
    """Inside the block every parameter and buffer of ``module`` is a meta tensor of its metadata (one
    tensor held twice stays one); they are put back after. For ``deploy()``, which builds a new module
    from its operator without changing it: deployed on meta, nothing is copied or folded for real, and
    without the deep copy of the operator that ``meta_copy`` would make first."""
    saved, memo = [], {}
    for m in module.modules():
        for slots in (m._parameters, m._buffers):
            for k, t in slots.items():
                if t is not None and not t.is_meta:
                    saved.append((slots, k, t))
                    slots[k] = memo.setdefault(id(t), on_meta(t))
    try:
        yield
    finally:
        for slots, k, t in saved:
            slots[k] = t


def shadow_of(model: nn.Module, x: torch.Tensor) -> Shadow:
    return Shadow(meta_copy(model), on_meta(x))


def any_meta(values) -> bool:
    """Whether a (nested) call's arguments hold a meta tensor."""
    return any(is_meta(v) for v in tree_leaves(values))


# torch's own bookkeeping in a module's __dict__ (hooks are added and removed around the passes)
_TORCH_ATTRS = frozenset({"_modules", "_parameters", "_buffers", "training"})


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
