"""The public Python API: plan, apply, save, load."""

from __future__ import annotations

import torch
from torch import nn

from .engine.apply import apply_plan
from .engine.plan import Plan
from .engine.planner import make_plan
from .errors import PartializeError, RecipeError


def _check_args(model, ratio, variant, example_input, input_size, fn: str) -> None:
    """Refuse bad arguments with the argument's name and the fix (not a pydantic or torch error)."""
    from .ops.registry import list_operators
    from .recipe import RATIO_WORDS, SKIP_VARIANTS, check_ratio

    if not isinstance(model, nn.Module):
        raise PartializeError(
            f"partialize.{fn}(model, ...): model must be an nn.Module, got {type(model).__name__}; build it first "
            "(e.g. timm.create_model(name) or partialize.base_model.build_model(spec))"
        )
    try:
        check_ratio(ratio)
    except ValueError:
        raise RecipeError(
            f"partialize.{fn}(..., ratio={ratio!r}): ratio must be a number in (0, 1] (the share of channels "
            f"that keep the expensive op, e.g. 0.25) or one of {', '.join(RATIO_WORDS)}"
        ) from None
    known = sorted(set(list_operators()) | set(SKIP_VARIANTS))
    if variant is not None and (not isinstance(variant, str) or variant not in known):
        raise RecipeError(
            f"partialize.{fn}(..., variant={variant!r}): unknown variant; use one of {', '.join(known)} "
            "(or register your own with partialize.register_operator)"
        )
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1):
        raise PartializeError(
            f"partialize.{fn}(..., input_size={input_size!r}): input_size must be a positive int (H = W of the "
            "example input, e.g. 224), or pass example_input=torch.randn(1, 3, H, W)"
        )
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise PartializeError(
            f"partialize.{fn}(..., example_input=...): must be a torch.Tensor (e.g. torch.randn(1, 3, 224, 224)), "
            f"got {type(example_input).__name__}"
        )


def plan(
    model: nn.Module,
    recipe=None,
    *,
    ratio: float | str = 0.25,
    variant: str | None = None,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
) -> Plan:
    """Resolve a recipe (path, shipped name, YAML text, dict; default: ``default``) against ``model``.

    Returns an ordered Plan: layer, original, new, params, ratio, delta params/MACs, how each layer
    was found, and the reason for every layer left alone.
    """
    _check_args(model, ratio, variant, example_input, input_size, "plan")
    return make_plan(model, recipe, example_input=example_input, input_size=input_size, ratio=ratio, variant=variant)


def apply(
    model: nn.Module,
    recipe=None,
    *,
    ratio: float | str = 0.25,
    variant: str | None = None,
    inplace: bool = False,
    example_input: torch.Tensor | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """Convert ``model`` to partial-channel form and return it (a copy unless ``inplace``).

    With no recipe, every eligible 3x3 conv becomes ``variant`` (default PConv) at ``ratio``;
    ``ratio="dynamic"`` gives DPConv, ``"adaptive"`` Ada-PConv. Weights are inherited; output shape,
    dtype and device are unchanged; the plan is kept on the result (``model._partialize_plan``).
    """
    _check_args(model, ratio, variant, example_input, input_size, "apply")
    p = make_plan(model, recipe, example_input=example_input, input_size=input_size, ratio=ratio, variant=variant)
    return apply_plan(model, p, inplace=inplace, example_input=example_input)
