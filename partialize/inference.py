"""Inference form of a model: partial operators replaced by their ``.deploy()`` forms, BN folded.

``deploy(model)`` works on any ``nn.Module`` and leaves its input untouched:

1. every outermost partialize operator (``partialize.ops.PartialOperator``) is replaced by its
   ``deploy()`` form (the operator contract; an operator's insides are its own business);
2. each BatchNorm whose input is the output of a conv used nowhere else is folded into that conv
   (``fold_bn_into_conv``) and replaced by ``nn.Identity``.

Pairs are found by torch.fx tracing (registered operators kept as leaves): a conv node whose only
user is a BN node. A submodule that cannot be traced becomes a leaf and is analysed on its own; a
module whose own forward cannot be traced is analysed child by child, and inside such an
``nn.Sequential`` adjacent (conv, BN) children are paired. Only exact
``nn.Conv1d/2d/3d`` (or a deployed operator form whose ``fold_bn`` accepts the BN) and
``nn.BatchNorm1d/2d/3d``/``SyncBatchNorm`` types with running statistics are folded (subclasses such
as weight-standardised convs change the maths); timm's ``BatchNormAct2d`` folds its BN and leaves its
activation in place. A module that is registered or called more than once is never folded.
"""

from __future__ import annotations

import copy
import logging

import torch.fx
from torch import nn

from .engine.apply import set_module
from .ops._utils import bn_remainder, fold_bn_into_conv, is_foldable_bn
from .ops.base import InferenceForm, PartialOperator
from .ops.registry import is_partial_op, operators_in

__all__ = ["deploy", "deploy_operators", "eval_reference", "find_conv_bn_pairs", "fold_batchnorm"]

_log = logging.getLogger(__name__)

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BNS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}


def deploy(model: nn.Module) -> nn.Module:
    """Return a new eval-mode, frozen copy of ``model`` in inference form (operators deployed, BN folded).

    Deterministic: the same trained tensors always give bit-identical deployed tensors, which is what
    lets a checkpoint store the trained tensors with ``deployed: true`` (``partialize.save``).
    """
    out = copy.deepcopy(model).eval()
    deploy_operators(out)
    fold_batchnorm(out)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    out._partialize_deployed = True  # save() refuses it: save the trained model with deployed=True
    return out


def eval_reference(model: nn.Module) -> nn.Module:
    """The function ``deploy(model)`` must equal: an eval-mode copy of the trained model with each
    operator replaced by its ``reference()`` (the contract: the eval copy for most, hard routing for an
    input-adaptive one trained with soft mixing). Innermost operators first, so an operator that
    holds another copies the other's reference. Nothing else changes (BN as trained)."""
    ref = copy.deepcopy(model).eval()
    ops = operators_in(ref)
    if isinstance(ref, PartialOperator):
        return ref.reference()
    for name in sorted(ops, key=lambda n: -n.count(".")):
        set_module(ref, name, ref.get_submodule(name).reference())
    return ref


def deploy_operators(model: nn.Module) -> int:
    """In place: replace each outermost operator by its ``deploy()`` form; returns the count."""
    count = 0

    def visit(parent: nn.Module) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            if isinstance(child, PartialOperator):
                setattr(parent, name, child.eval().deploy())
                count += 1
            else:
                visit(child)

    if isinstance(model, PartialOperator):
        raise TypeError("deploy_operators works on a model that contains operators; call op.deploy() directly")
    visit(model)
    return count


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps partialize operators (and their deploy forms) and ``extra`` names as leaves,
    and records the innermost submodule whose forward could not be traced."""

    def __init__(self, extra: set[str]) -> None:
        super().__init__()
        self.extra = extra
        self.failed_at: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            qualname in self.extra
            or is_partial_op(m)
            or is_foldable_bn(m)  # timm's BatchNormAct2d must stay one node to be paired
            or super().is_leaf_module(m, qualname)
        )

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:  # the first handler to run is the innermost module
                self.failed_at = self.path_of_module(m)
            raise


def _is_conv(m: nn.Module) -> bool:
    """An exact conv, or an operator / inference form (its ``fold_bn`` says whether it can absorb a BN)."""
    return type(m) in _CONVS or isinstance(m, (PartialOperator, InferenceForm))


def _is_foldable_bn(m: nn.Module, conv: nn.Module) -> bool:
    if not is_foldable_bn(m):
        return False
    if type(conv) not in _CONVS:
        return True  # the operator's fold_bn decides (None when it cannot)
    dims = _BNS.get(type(m), 2)  # timm BatchNormAct2d is 2-d
    return (dims is None or dims == _CONVS[type(conv)]) and m.num_features == conv.out_channels


def _trace(module: nn.Module, max_retries: int = 64) -> tuple[torch.fx.Graph, set[str]] | None:
    """Trace ``module``, turning untraceable submodules into leaves; None if its own forward fails."""
    extra: set[str] = set()
    for _ in range(max_retries):
        tracer = _LeafTracer(extra)
        try:
            return tracer.trace(module), extra
        except Exception as e:
            if not tracer.failed_at or tracer.failed_at in extra:
                _log.debug("fx trace of %s failed (%s)", type(module).__name__, e)
                return None
            extra = extra | {tracer.failed_at}
    return None


def _collect(module: nn.Module, prefix: str, pairs: list, calls: dict[str, int]) -> None:
    """Add (conv, bn) candidates under ``module`` to ``pairs`` and count module calls in ``calls``."""
    if is_partial_op(module):
        return
    traced = _trace(module)
    if traced is None:  # the module's own forward is untraceable: look inside its children
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for name in names:
                calls[prefix + name] = calls.get(prefix + name, 0) + 1
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if conv is not None and _is_conv(conv) and _is_foldable_bn(bn, conv):
                    pairs.append((prefix + a, prefix + b))
        for name, child in module.named_children():
            _collect(child, f"{prefix}{name}.", pairs, calls)
        return
    graph, extra = traced
    mods = dict(module.named_modules())
    for node in graph.nodes:
        if node.op == "call_module":
            calls[prefix + node.target] = calls.get(prefix + node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or not _is_conv(mods[node.target]) or len(node.users) != 1:
            continue
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            continue
        if _is_foldable_bn(mods[user.target], mods[node.target]):
            pairs.append((prefix + node.target, prefix + user.target))
    for name in sorted(extra):  # untraceable submodules were leaves here: analyse their insides
        _collect(mods[name], f"{prefix}{name}.", pairs, calls)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names (conv, bn) where the BN reads only that conv's output and can be folded.

    fx tracing first (untraceable submodules become leaves and are analysed on their own); a module
    whose own forward cannot be traced is analysed child by child, and if it is an ``nn.Sequential``
    its adjacent (conv, BN) children are paired. A module called, or registered, more than once
    anywhere is never folded.
    """
    pairs: list[tuple[str, str]] = []
    calls: dict[str, int] = {}
    _collect(model, "", pairs, calls)
    registered: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registered[id(m)] = registered.get(id(m), 0) + 1
    mods = dict(model.named_modules())
    out, used = [], set()
    for c, b in pairs:
        once = all(calls.get(n, 0) == 1 and registered[id(mods[n])] == 1 for n in (c, b))
        if once and c not in used and b not in used:
            used.update((c, b))
            out.append((c, b))
    return out


def fold_batchnorm(model: nn.Module) -> int:
    """In place: fold every exact (conv, BN) pair (see ``find_conv_bn_pairs``); returns the count."""
    count = 0
    for conv_name, bn_name in find_conv_bn_pairs(model):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        folded = fold_bn_into_conv(conv, bn) if type(conv) in _CONVS else conv.fold_bn(bn)
        if folded is None:  # the operator cannot absorb this BN: both stay
            continue
        set_module(model, conv_name, folded)
        set_module(model, bn_name, bn_remainder(bn))
        count += 1
    return count
