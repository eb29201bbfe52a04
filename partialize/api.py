"""The public Python API: plan, apply, save, load."""

from __future__ import annotations

import torch
from torch import nn

from .engine.apply import apply_plan
from .engine.plan import Plan, make_plan


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
    p = make_plan(model, recipe, example_input=example_input, input_size=input_size, ratio=ratio, variant=variant)
    return apply_plan(model, p, inplace=inplace, example_input=example_input)
