"""Inference form of a model: partial operators replaced by their ``.deploy()`` forms, BN folded.

``deploy(model)`` works on any ``nn.Module`` and leaves its input untouched:

1. every submodule that is an instance of a registered partialize operator (``partialize.ops.registry``)
   is replaced by ``op.deploy()`` (outermost first; an operator's insides are its own business);
2. each BatchNorm whose input is the output of a conv used nowhere else is folded into that conv
   (``fold_bn_into_conv``) and replaced by ``nn.Identity``.

Pairs are found by torch.fx tracing (registered operators kept as leaves): a conv node whose only
user is a BN node. Where tracing fails, the module's children are traced one by one, and inside an
``nn.Sequential`` that cannot be traced, adjacent (conv, BN) children are paired. Only exact
``nn.Conv1d/2d/3d`` and ``nn.BatchNorm1d/2d/3d``/``SyncBatchNorm`` types with running statistics are
folded (subclasses such as weight-standardised convs or BN+activation layers change the maths), and a
module that is registered or called more than once is never folded.
"""

from __future__ import annotations

import copy
import logging

import torch.fx
from torch import nn

from .ops._utils import fold_bn_into_conv
from .ops.registry import get_operator, is_partial_op, list_operators

__all__ = ["deploy", "deploy_operators", "find_conv_bn_pairs", "fold_batchnorm"]

_log = logging.getLogger(__name__)

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BNS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}


def deploy(model: nn.Module) -> nn.Module:
    """Return a new eval-mode, frozen copy of ``model`` in inference form (operators deployed, BN folded)."""
    out = copy.deepcopy(model).eval()
    deploy_operators(out)
    fold_batchnorm(out)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _operator_classes() -> tuple[type, ...]:
    return tuple(get_operator(name) for name in list_operators())


def deploy_operators(model: nn.Module) -> int:
    """In place: replace each outermost registered operator by its ``.deploy()`` form; returns the count."""
    classes = _operator_classes()
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            if isinstance(child, classes):
                setattr(parent, name, child.eval().deploy())
                count += 1
            else:
                visit(child)

    if isinstance(model, classes):
        raise TypeError(
            "deploy_operators works on a model that contains operators; call op.deploy() directly"
        )
    visit(model)
    return count


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps partialize operators (and their deploy forms) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_partial_op(m) or super().is_leaf_module(m, qualname)


def _is_conv(m: nn.Module) -> bool:
    return type(m) in _CONVS


def _is_foldable_bn(m: nn.Module, conv: nn.Module) -> bool:
    if type(m) not in _BNS or not m.track_running_stats or m.running_mean is None:
        return False
    dims = _BNS[type(m)]
    return (dims is None or dims == _CONVS[type(conv)]) and m.num_features == conv.out_channels


def _pairs_fx(module: nn.Module, prefix: str) -> list[tuple[str, str]]:
    graph = _LeafTracer().trace(module)
    mods = dict(module.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_conv(mods[node.target]) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args[:1] != (node,) or len(user.args) + len(user.kwargs) != 1:
            continue
        bn = mods[user.target]
        if not _is_foldable_bn(bn, mods[node.target]):
            continue
        if calls[node.target] != 1 or calls[user.target] != 1:
            continue
        pairs.append((prefix + node.target, prefix + user.target))
    return pairs


def _pairs_sequential(seq: nn.Sequential, prefix: str) -> list[tuple[str, str]]:
    names = list(seq._modules)
    pairs = []
    for a, b in zip(names, names[1:]):
        conv, bn = seq._modules[a], seq._modules[b]
        if conv is not None and bn is not None and _is_conv(conv) and _is_foldable_bn(bn, conv):
            pairs.append((prefix + a, prefix + b))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names (conv, bn) where the BN reads only that conv's output and can be folded.

    fx tracing first; where a module cannot be traced, its children are tried one by one and an
    untraceable ``nn.Sequential`` contributes its adjacent (conv, BN) children.
    """
    pairs: list[tuple[str, str]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        if is_partial_op(module):
            return
        try:
            pairs.extend(_pairs_fx(module, prefix))
            return
        except Exception as e:  # untraceable (data-dependent control flow, unsupported op...)
            _log.debug("fx trace of %r failed (%s); descending", prefix or type(module).__name__, e)
        if isinstance(module, nn.Sequential):
            pairs.extend(_pairs_sequential(module, prefix))
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(model, "")
    # never fold a module that is registered under several names (shared weights)
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen[id(m)] = seen.get(id(m), 0) + 1
    mods = dict(model.named_modules())
    used: set[str] = set()
    out = []
    for c, b in pairs:
        if seen[id(mods[c])] == 1 and seen[id(mods[b])] == 1 and c not in used and b not in used:
            used.update((c, b))
            out.append((c, b))
    return out


def _set(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, attr = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def fold_batchnorm(model: nn.Module) -> int:
    """In place: fold every exact (conv, BN) pair (see ``find_conv_bn_pairs``); returns the count."""
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set(model, conv_name, fold_bn_into_conv(conv, bn))
        _set(model, bn_name, nn.Identity())
    return len(pairs)
