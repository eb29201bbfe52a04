"""Apply: swap modules on the eager model by qualified name (setattr on the parent)."""

from __future__ import annotations

import torch
from torch import nn

from .._modes import in_mode
from ..errors import PartializeError
from ..ops._utils import clone_module, placeholders
from ._shape_only import FastMeta, is_meta, shadow_of
from .plan import Plan
from .planner import build_op, fingerprint


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()  # a view's too: shared storage, whatever the offset


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return list(m.parameters()) + list(m.buffers())


def _shared_children(op: nn.Module, module: nn.Module) -> list[str]:
    """The kept children of ``op`` that are ``module``'s own (the planner builds that way,
    ``sharing_kept_children``), not copies."""
    out = []
    for p in op.convertible_children() if hasattr(op, "convertible_children") else ():
        try:
            if op.get_submodule(p) is module.get_submodule(p):
                out.append(p)
        except AttributeError:
            pass
    return out


def _built_by_planner(model: nn.Module, plan: Plan) -> dict[str, tuple[nn.Module, list[str]]]:
    """The operators the planner built for this plan from this very model, with the kept children each
    shares with the model, each only if its layer is still the module it came from, unchanged since
    (``fingerprint``), and the operator shares no other tensor with the model; handed out once (a plan
    applied twice builds anew the second time)."""
    source, built = getattr(plan, "_built", (None, {}))
    if source is None or source() is not model:
        return {}
    held = {_storage(t) for t in _tensors(model) if not is_meta(t)}
    out = {}
    for name in list(built):
        op, module, print_ = built.pop(name)
        try:
            same = model.get_submodule(name) is module and fingerprint(module) == print_
        except AttributeError:
            same = False
        if not same:
            continue
        shared = _shared_children(op, module)
        theirs = {id(t) for p in shared for t in _tensors(op.get_submodule(p))}
        if not any(_storage(t) in held for t in _tensors(op) if id(t) not in theirs and not is_meta(t)):
            out[name] = (op, shared)
    return out


def _unshare(built: dict[str, tuple[nn.Module, list[str]]]) -> dict[str, nn.Module]:
    """The operators, each kept child still shared with the original now a copy of its own (in the
    operator's mode, as the operator's own children are), except where a nested operator the planner
    built replaces it: a kept child replaced whole is not copied at all, and inside one, a layer
    replaced is not copied (an ``nn.Identity`` holds its place until the swap)."""
    for name, (op, shared) in built.items():
        for p in shared:
            full = f"{name}.{p}"
            if full in built:
                continue
            child = op.get_submodule(p)
            inner = [n[len(full) + 1 :] for n in built if n.startswith(full + ".")]
            holders = placeholders(child, [child.get_submodule(n) for n in inner])
            set_module(op, p, clone_module(child, holders).train(op.training))
    return {name: op for name, (op, _) in built.items()}


def _copy_for(model: nn.Module, plan: Plan, built: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` to swap the operators into, without copying the outermost converted
    layers whose operators are already built (most of a large model's weights): an ``nn.Identity``
    holds their place until the swap. A full copy when a placeholder would stay reachable in the copy
    (a module shared under two names, or kept in a plain list or dict: ``placeholders``)."""
    names = [e.layer for e in plan.converted_outermost if e.layer in built]
    return clone_module(model, placeholders(model, [model.get_submodule(n) for n in names]))


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
    # in place, an operator may keep the model's own children; a copy must not share the original's
    built = {name: op for name, (op, _) in built.items()} if inplace else _unshare(built)
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
        with in_mode(target), torch.no_grad():
            out = _check_forward(target, x, plan.shape_only)
        shape = tuple((out[0] if isinstance(out, (tuple, list)) else out).shape)
        if shape != tuple(plan.output_shape):
            raise PartializeError(f"converted model output shape {shape} != original {tuple(plan.output_shape)}")
    return target
