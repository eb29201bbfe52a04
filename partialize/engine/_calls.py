"""What the planner runs on one layer: its captured call arguments, the MACs before and after a swap,
and whether other code holds on to its tensors."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .._modes import in_mode
from ..errors import OperatorError
from ..macs import MacCounter
from ..ops.base import PartialOperator
from ._shape_only import FastMeta, any_meta, is_meta, meta_copy, params_on_meta
from .discover import Discovery

Call = tuple[tuple, dict]


def _map_tensors(v, fn, memo: dict):
    """A call's arguments (nested lists, tuples, named tuples, dicts) with every tensor replaced by
    ``fn(tensor)``; a tensor passed twice stays one tensor (``nn.MultiheadAttention`` checks
    ``query is key``)."""
    if isinstance(v, torch.Tensor):
        if id(v) not in memo:
            memo[id(v)] = fn(v)
        return memo[id(v)]
    if isinstance(v, (list, tuple)):
        items = [_map_tensors(a, fn, memo) for a in v]
        return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
    if isinstance(v, dict):
        return {k: _map_tensors(a, fn, memo) for k, a in v.items()}
    return v


def _clone_call(args: tuple, kwargs: dict) -> Call:
    """Deep copy of the tensors in a call's arguments (later in-place ops must not change them)."""
    memo: dict = {}
    clone = lambda t: t.detach().clone()  # noqa: E731
    return _map_tensors(args, clone, memo), _map_tensors(kwargs, clone, memo)


def capture_calls(
    model: nn.Module, x: torch.Tensor, names: list[str], outputs: dict[str, list] | None = None
) -> dict[str, list[Call]]:
    """The arguments of every call of each module in ``names`` during one eval forward on ``x`` (on
    shapes only when ``model`` and ``x`` are a meta shadow: the arguments are then meta too);
    ``outputs``, when given, receives each call's output shapes (what ``layer_cost`` checks a converted
    layer against)."""
    calls: dict[str, list[Call]] = {n: [] for n in names}
    handles = []
    for n in names:

        def pre(_m, args, kwargs, n=n):
            calls[n].append(_clone_call(args, kwargs))

        def post(_m, _args, out, n=n):
            outputs.setdefault(n, []).append(_shapes(out))

        handles.append(model.get_submodule(n).register_forward_pre_hook(pre, with_kwargs=True))
        if outputs is not None:
            handles.append(model.get_submodule(n).register_forward_hook(post))
    try:
        with in_mode(model), torch.no_grad(), FastMeta() if x.is_meta else contextlib.nullcontext():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def _real_tensor(t: torch.Tensor) -> torch.Tensor:
    if not is_meta(t):
        return t
    if t.dtype.is_floating_point or t.dtype.is_complex:
        return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(0))
    return torch.zeros(t.shape, dtype=t.dtype)


def real_like(call: Call) -> Call:
    """A call's arguments with every meta tensor replaced by a real one of its shape and dtype (standard
    normal values; zeros for integers and booleans)."""
    return _map_tensors(call, _real_tensor, {})


def _shapes(v):
    if isinstance(v, torch.Tensor):
        if is_meta(v) and v.shape == (0,):
            return None  # meta kernels return an empty tensor where the real one returns None (MHA's weights)
        return tuple(v.shape)
    if isinstance(v, (list, tuple)):
        return tuple(_shapes(a) for a in v)
    return None


def layer_cost(
    module: nn.Module, op: PartialOperator, calls: list[Call], original: tuple[int, list] | None = None
) -> tuple[int, int, str]:
    """(MACs before, MACs after, basis) of swapping ``module`` for ``op``, summed over the layer's calls
    in the example forward. Runs the operator's inference form on each call's own arguments, so any
    call signature works (an output of another shape raises OperatorError); the MACs after are the
    operator's own count (``op.macs``, the contract). ``original``: the module's MACs over those calls
    and each call's output shapes, as discovery and the capture saw them; without it the original is
    run on the calls too."""
    if original is not None and len(original[1]) != len(calls):
        original = None  # not the calls discovery saw: run the original on them
    if any_meta(calls):  # captured on shapes only: run on meta (engine/_shape_only.py), or on random values
        try:
            # deployed on meta too: folding a wide block's BNs into its convs for real cost more
            # than the rest of its planning; the real tensors the forms still hold meet meta inputs
            # in FastMeta as their metadata
            shadow = op if _default_macs(op) else meta_copy(op)  # a custom macs() runs it: on a copy
            with FastMeta():
                with params_on_meta(shadow):
                    form = shadow.deploy()
                return _cost(module if original is not None else meta_copy(module), shadow, form, calls, original)
        except OperatorError:
            raise
        except Exception:  # an operator whose forward needs values (data-dependent routing)
            calls = [real_like(call) for call in calls]
    return _cost(module, op, op.deploy(), calls, original)


def _default_macs(op: PartialOperator) -> bool:
    """Whether ``op`` counts its MACs the contract's default way: ``partialize.macs`` on ``deploy()``."""
    return type(op).macs is PartialOperator.macs


def _reference(module: nn.Module, calls: list[Call]) -> tuple[int, list]:
    """The original's MACs over the calls and each call's output shapes, by running it on them."""
    macs, shapes = 0, []
    for call in calls:
        args, kwargs = _clone_call(*call)
        with torch.no_grad(), MacCounter() as c0:
            shapes.append(_shapes(module(*args, **kwargs)))
        macs += c0.result.total
    return macs, shapes


def _cost(module, op: PartialOperator, form: nn.Module, calls: list[Call], original) -> tuple[int, int, str]:
    # the default macs() is partialize.macs on deploy(): the count taken on the shape-check run of this
    # very form is that number, without deploying and running a second time (plans were half this)
    default_macs = _default_macs(op)
    after, basis = 0, "inference form"
    with in_mode(module):
        before, shapes = original if original is not None else _reference(module, calls)
        for call, want in zip(calls, shapes):
            args, kwargs = _clone_call(*call)
            with torch.no_grad(), MacCounter() as c1:
                got = form(*args, **kwargs)
            if _shapes(got) != want:
                raise OperatorError(f"the converted layer returns shape {_shapes(got)}, the original {want}")
            if default_macs:
                macs = c1.result.total
            else:
                args, kwargs = _clone_call(*call)
                with torch.no_grad():
                    macs, basis = op.macs(*args, **kwargs)
            after += macs
    return before, after, basis


def shared_parameters(name: str, module: nn.Module, discovery: Discovery, owners: dict[int, list[str]]) -> str | None:
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


def tensor_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            owners.setdefault(id(t), []).append(mname)
    return owners
