"""Apply: swap modules on the eager model by qualified name (setattr on the parent)."""

from __future__ import annotations

import collections

import torch
from torch import nn

from ..errors import PartializeError
from ..ops._utils import clone_module
from ._shape_only import FastMeta, attribute_values, is_meta, shadow_of
from .plan import Plan
from .planner import build_op, fingerprint


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()  # a view's too: shared storage, whatever the offset


def _built_by_planner(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """The operators the planner built for this plan from this very model, each only if its layer is
    still the module it came from, unchanged since (``fingerprint``), and the operator shares no
    tensor with the model; handed out once (a plan applied twice builds anew the second time)."""
    source, built = getattr(plan, "_built", (None, {}))
    if source is None or source() is not model:
        return {}
    held = {_storage(t) for t in list(model.parameters()) + list(model.buffers()) if not is_meta(t)}
    out = {}
    for name in list(built):
        op, module, print_ = built.pop(name)
        try:
            same = model.get_submodule(name) is module and fingerprint(module) == print_
        except AttributeError:
            same = False
        tensors = list(op.parameters()) + list(op.buffers())
        if same and not any(_storage(t) in held for t in tensors if not is_meta(t)):
            out[name] = op
    return out


def _copy_for(model: nn.Module, plan: Plan, built: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` to swap the operators into, without copying the outermost converted
    layers whose operators are already built (most of a large model's weights): an ``nn.Identity``
    holds their place until the swap. A full copy when a placeholder would stay reachable in the copy
    (a module shared under two names, or kept in a plain list or dict)."""
    names = [e.layer for e in plan.converted_outermost if e.layer in built]
    if not names:
        return clone_module(model)
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    originals = [model.get_submodule(n) for n in names]
    if any(uses[id(m)] != 1 for m in originals):
        return clone_module(model)
    holders = {id(m): nn.Identity() for m in originals}
    target = clone_module(model, dict(holders))
    if _reachable_outside_modules(target, {id(h) for h in holders.values()}):
        return clone_module(model)
    return target


def _reachable_outside_modules(model: nn.Module, ids: set[int]) -> bool:
    """Whether a module's plain attributes (or the lists, tuples and dicts in them) hold any of ``ids``."""
    return any(id(v) in ids for v in attribute_values(model))


def _check_forward(model: nn.Module, x: torch.Tensor, shape_only: bool):
    """The converted model's output on ``x``: on shapes only for a plan made that way (the real forward
    is slow; on a meta copy of the model), for real if the model cannot run on shapes."""
    if shape_only:
        try:
            shadow = shadow_of(model, x)
            with FastMeta():
                return shadow.model(shadow.x)
        except Exception:  # values needed somewhere: check for real
            pass
    return model(x)


def apply_plan(
    model: nn.Module,
    plan: Plan,
    *,
    inplace: bool = False,
    check: bool = True,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Return ``model`` with every ``convert`` entry of ``plan`` swapped in (a copy unless inplace).

    With ``check`` a forward pass on the example input verifies the output shape is unchanged.
    """
    built = _built_by_planner(model, plan)
    target = model if inplace else _copy_for(model, plan, built)
    for e in plan.converted:  # parents before children: a nested layer is built inside its new parent
        op = built.pop(e.layer, None)
        if op is None:
            params = dict(e.params)
            ratio = params.pop("ratio", None)
            op = build_op(target.get_submodule(e.layer), e.variant, ratio, params, where=f"layer {e.layer!r}")
        set_module(target, e.layer, op)
    target._partialize_plan = plan
    if check and plan.output_shape is not None:
        x = example_input
        if x is None:
            ref = next((t for t in target.parameters() if t.is_floating_point()), None)
            x = torch.randn(plan.input_shape, generator=torch.Generator().manual_seed(0))
            if ref is not None:
                x = x.to(ref.device, ref.dtype)
        was = target.training
        target.eval()
        try:
            with torch.no_grad():
                out = _check_forward(target, x, plan.shape_only)
        finally:
            target.train(was)
        shape = tuple((out[0] if isinstance(out, (tuple, list)) else out).shape)
        if shape != tuple(plan.output_shape):
            raise PartializeError(f"converted model output shape {shape} != original {tuple(plan.output_shape)}")
    return target
