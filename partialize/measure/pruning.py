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


def torch_pruning_version() -> str:
    """The installed torch-pruning release (its ``__version__`` string lags: 1.6.1 says 1.6.0)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch-pruning")
    except PackageNotFoundError:  # imported from a source tree
        import torch_pruning as tp

        return tp.__version__


def _trainable_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every parameter trainable: torch-pruning traces its dependency graph
    through autograd, so on a frozen model (requires_grad=False) it finds no layer and prunes nothing."""
    return copy.deepcopy(model).eval().requires_grad_(True)


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
    pruned = _trainable_copy(model)
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
        "torch_pruning_version": torch_pruning_version(),
        "target_macs": float(target_macs),
        "reached_macs": float(macs),
        "rel_error": rel,
        "steps": step,
        "channel_ratio": max_ratio * step / steps,
        "original_macs": float(start),
        "fine_tuned": False,
    }
    return pruned, info


# --- one-shot pruning at a given channel ratio, magnitude or group-Taylor importance ------------------

#: the importance criteria :func:`prune_to_ratio` knows
IMPORTANCES = ("magnitude", "taylor")


def _importance(kind: str):
    import torch_pruning as tp

    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise PruningError(f"unknown pruning importance {kind!r}; choose from {', '.join(IMPORTANCES)}")


def taylor_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 64
) -> torch.Tensor:
    """In place: ``model``'s ``.grad`` set to the gradient of the mean cross-entropy over ``images``
    (eval mode: BN uses its running statistics, as at inference). ``labels`` default to the model's
    own argmax on ``images`` (no labels needed: what a user with unlabelled images has). Returns the
    labels used."""
    model.eval()
    if labels is None:
        with torch.no_grad():
            labels = torch.cat([model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    model.zero_grad(set_to_none=True)
    n = images.shape[0]
    with torch.enable_grad():
        for i in range(0, n, batch_size):
            x, y = images[i : i + batch_size], labels[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum") / n
            loss.backward()
    return labels


def _attention_heads(model: nn.Module) -> list[nn.Module]:
    """Attention modules with a fused ``qkv`` Linear and ``num_heads`` (timm's): torch-pruning must know
    their head count so it prunes the same dimensions of every head."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def prune_to_ratio(
    model: nn.Module,
    ratio: float,
    input_size: int | tuple[int, int, int] = 224,
    *,
    importance: str = "magnitude",
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    round_to: int | None = None,
) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable coupled group removed in one
    shot (torch-pruning ``MetaPruner``, uniform per-layer ratio, classifier kept).

    ``importance``: ``"magnitude"`` (group L2 norm of the weights) or ``"taylor"`` (group first-order
    Taylor, |w * dL/dw| summed over each channel's weights, on ``images``: cross-entropy against
    ``labels``, by default the original model's argmax on ``images``). ``model`` is not modified.
    Returns ``(pruned, info)`` with the MACs before and after.
    """
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise PruningError(f"the pruning ratio must be in [0, 1), got {ratio!r}")
    if importance == "taylor" and images is None:
        raise PruningError("Taylor importance needs calibration images (images=...)")
    imp = _importance(importance)
    chw = _input_chw(input_size)
    pruned = _trainable_copy(model)
    device = next(model.parameters()).device
    example = torch.randn(1, *chw, device=device)
    start = model_macs(pruned, example)
    info = {
        "method": f"torch-pruning MetaPruner, one shot, {importance} importance, uniform per-layer channel ratio, "
        "classifier kept",
        "torch_pruning_version": torch_pruning_version(),
        "importance": importance,
        "channel_ratio": float(ratio),
        "round_to": round_to,
        "original_macs": float(start),
        "fine_tuned": False,
    }
    if ratio == 0:
        return pruned, info | {"reached_macs": float(start)}
    heads = _attention_heads(pruned)
    try:
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=imp,
            pruning_ratio=ratio,
            iterative_steps=1,
            ignored_layers=_classifier_layers(pruned),
            round_to=round_to,
            num_heads={m.qkv: m.num_heads for m in heads},
            prune_head_dims=True,
        )
    except Exception as e:  # tracing / dependency graph failures are model-specific
        raise PruningError(f"torch-pruning cannot build a dependency graph for this model: {e}") from None
    if importance == "taylor":
        used = taylor_gradients(pruned, images.to(device), None if labels is None else labels.to(device))
        info["taylor"] = {"images": int(images.shape[0]), "labels": "given" if labels is not None else "model argmax"}
        info["taylor"]["label_classes_seen"] = int(used.unique().numel())
    pruner.step()
    for m in heads:  # fused qkv attention (timm): every head keeps its count and loses the same dims
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        if hasattr(m, "attn_dim"):
            m.attn_dim = m.num_heads * m.head_dim
    pruned.zero_grad(set_to_none=True)
    pruned.eval()
    return pruned, info | {"reached_macs": float(model_macs(pruned, example))}
