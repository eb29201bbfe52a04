"""Equal-budget baseline: structured (channel) pruning of the original model with torch-pruning's
magnitude importance, stepped until its MACs reach those of the converted model.

We prune with ``MetaPruner`` (uniform per-layer ratio, L2 magnitude importance, classifier kept)
over many small iterative steps, count MACs with partialize.macs after every step, stop at the
first step at or below the target and keep whichever of that step and the previous is closer. The
result is within ``tolerance`` of the target or a PartializeError says why not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..errors import PartializeError
from .flops import _input_chw, model_macs


class PruningError(PartializeError):
    """The pruning baseline cannot reach the requested MACs (or the model cannot be pruned)."""


def _classifier_layers(model: nn.Module) -> list[nn.Module]:
    """Final classifier(s) to keep intact: timm's get_classifier(), else the last Linear."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
            return [head]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def prune_to_macs(
    model: nn.Module,
    target_macs: float,
    input_size: int | tuple[int, int, int] = 224,
    *,
    tolerance: float = 0.05,
    steps: int = 60,
    max_ratio: float = 0.95,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict]:
    """A channel-pruned copy of ``model`` whose per-image MACs are within ``tolerance`` of ``target_macs``.

    Returns ``(pruned_model, info)`` with the reached MACs, relative error, step count and the
    pruning ratio schedule. ``model`` itself is not modified.
    """
    import torch_pruning as tp

    chw = _input_chw(input_size)
    pruned = copy.deepcopy(model).eval()
    example = torch.randn(1, *chw, device=next(model.parameters()).device)
    start = model_macs(pruned, example)
    if target_macs >= start * (1 + tolerance):
        raise PruningError(
            f"the pruning target ({target_macs / 1e9:.3f} GMACs) is above the original model's "
            f"{start / 1e9:.3f} GMACs: there is nothing to prune"
        )
    try:
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=max_ratio,
            iterative_steps=steps,
            ignored_layers=_classifier_layers(pruned),
        )
    except Exception as e:  # tracing / dependency graph failures are model-specific
        raise PruningError(f"torch-pruning cannot build a dependency graph for this model: {e}") from None
    prev, prev_macs, macs, step = copy.deepcopy(pruned), start, start, 0
    while macs > target_macs and step < steps:
        prev, prev_macs = copy.deepcopy(pruned), macs
        pruner.step()
        step += 1
        macs = model_macs(pruned, example)
        if progress:
            progress(step, macs)
    if macs > target_macs * (1 + tolerance):
        raise PruningError(
            f"pruning every layer by {max_ratio:.0%} still leaves {macs / 1e9:.3f} GMACs, above the target "
            f"{target_macs / 1e9:.3f} GMACs"
        )
    if step > 0 and abs(prev_macs - target_macs) < abs(macs - target_macs):
        pruned, macs, step = prev, prev_macs, step - 1
    rel = (macs - target_macs) / target_macs
    if abs(rel) > tolerance:
        raise PruningError(
            f"pruning steps jump over the target: reached {macs / 1e9:.3f} GMACs for a target of "
            f"{target_macs / 1e9:.3f} ({rel:+.1%}); raise steps"
        )
    info = {
        "method": "torch-pruning MetaPruner, L2 magnitude importance, uniform per-layer channel ratio, classifier kept",
        "torch_pruning_version": tp.__version__,
        "target_macs": float(target_macs),
        "reached_macs": float(macs),
        "rel_error": rel,
        "steps": step,
        "channel_ratio": max_ratio * step / steps,
        "original_macs": float(start),
        "fine_tuned": False,
    }
    return pruned, info
