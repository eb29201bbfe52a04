"""Inference form of a model: partial operators replaced by their ``.deploy()`` forms, BN folded.

``deploy(model)`` works on any ``nn.Module`` and leaves its input untouched:

1. every outermost partialize operator (``partialize.ops.PartialOperator``) is replaced by its
   ``deploy()`` form (the operator contract; an operator's insides are its own business);
2. each BatchNorm whose input is the output of a conv used nowhere else is folded into that conv
   (``fold_bn_into_conv``) and replaced by ``nn.Identity``.

Pairs are found by torch.fx tracing (registered operators kept as leaves): a conv node whose only
user is a BN node. A submodule that cannot be traced becomes a leaf and is analysed on its own; a
module whose own forward cannot be traced is analysed child by child, and inside a plain
``nn.Sequential`` adjacent (conv, BN) children are paired. Below any other untraceable forward the
calls it makes are unknown (it may call a child's conv and BN one by one with something between
them), so a pair found there is folded only when running the model once on an example input shows
its conv and BN called from inside the forward that was traced; without an input (``deploy(model,
example_input=...)``, by default a random input of the shape partialize converted the model at) it
is left unfolded with a warning. What that run shows is one input's path: a forward whose calls
depend on the data values could call them differently on another. Only exact
``nn.Conv1d/2d/3d`` (or a deployed operator form whose ``fold_bn`` accepts the BN) and
``nn.BatchNorm1d/2d/3d``/``SyncBatchNorm`` types with running statistics are folded (subclasses such
as weight-standardised convs change the maths); timm's ``BatchNormAct2d`` folds its BN and leaves its
activation in place. A module that is registered or called more than once is never folded.
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
import torch.fx
from torch import nn

from ._modes import in_mode
from .engine.apply import set_module
from .ops._utils import bn_remainder, fold_bn_into_conv, is_foldable_bn
from .ops.base import InferenceForm, PartialOperator
from .ops.registry import is_partial_op, operators_in

__all__ = ["deploy", "deploy_operators", "eval_reference", "find_conv_bn_pairs", "fold_batchnorm"]

_log = logging.getLogger(__name__)

_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BNS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3, nn.SyncBatchNorm: None}


def deploy(model: nn.Module, example_input=None) -> nn.Module:
    """Return a new eval-mode, frozen copy of ``model`` in inference form (operators deployed, BN folded).

    ``example_input`` (a tensor or a tuple of them; default: a random tensor of the shape the model was
    converted at, if partialize converted it) is run once only when a BN sits below a forward that
    torch.fx cannot trace, to check how it is called (``find_conv_bn_pairs``).
    Deterministic: the same trained tensors always give bit-identical deployed tensors, which is what
    lets a checkpoint store the trained tensors with ``deployed: true`` (``partialize.save``).
    """
    out = copy.deepcopy(model).eval()
    if example_input is None:
        example_input = _planned_input(model)
    deploy_operators(out)
    fold_batchnorm(out, example_input)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    out._partialize_deployed = True  # save() refuses it: save the trained model with deployed=True
    return out


def _planned_input(model: nn.Module) -> torch.Tensor | None:
    """A random input of the shape partialize converted ``model`` at (None when it did not)."""
    shape = getattr(getattr(model, "_partialize_plan", None), "input_shape", None)
    if not shape:
        return None
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(0)  # deploy stays deterministic
    x = torch.randn(tuple(shape), generator=gen)
    return x if p is None else x.to(p.device, p.dtype if p.dtype.is_floating_point else torch.float32)


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


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own: each child called once, in order."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _collect(module: nn.Module, prefix: str, pairs: list, calls: dict[str, int], trusted: bool = True) -> None:
    """Add (conv, bn, owner, trusted) candidates under ``module`` to ``pairs`` and count module calls in
    ``calls``. ``owner`` is the module whose traced forward shows the pair; ``trusted`` is False when a
    module above it has a forward that could not be traced, so the calls it makes are unknown (it may
    call the owner's conv and BN directly, with something in between)."""
    if is_partial_op(module):
        return
    traced = _trace(module)
    if traced is None:  # the module's own forward is untraceable: look inside its children
        plain = _plain_sequential(module)
        if plain:
            names = list(module._modules)
            for name in names:
                calls[prefix + name] = calls.get(prefix + name, 0) + 1
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if conv is not None and _is_conv(conv) and _is_foldable_bn(bn, conv):
                    pairs.append((prefix + a, prefix + b, prefix[:-1], trusted))
        for name, child in module.named_children():
            _collect(child, f"{prefix}{name}.", pairs, calls, trusted and plain)
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
            pairs.append((prefix + node.target, prefix + user.target, prefix[:-1], trusted))
    for name in sorted(extra):  # untraceable submodules were leaves here: analyse their insides
        _collect(mods[name], f"{prefix}{name}.", pairs, calls, trusted)


def _inside_owner(model: nn.Module, pairs: list, example_input) -> set[tuple[str, str]] | None:
    """The untrusted pairs whose conv and BN, running ``model(example_input)``, were each called and
    only ever from inside their owner's forward (the traced forward in which the BN reads the conv);
    None when the model does not run on that input."""
    watched = {n for c, b, _, _ in pairs for n in (c, b)}
    stack: list[str] = []
    inside: dict[str, list[bool]] = {n: [] for n in watched}
    owner_of = {n: o for c, b, o, _ in pairs for n in (c, b)}
    handles = []

    def enter(name):
        def hook(_m, _args):
            if name in watched:
                inside[name].append(owner_of[name] in stack)
            stack.append(name)

        return hook

    def leave(name):
        def hook(_m, _args, _out):
            while stack and stack.pop() != name:  # back to this module (a child that raised and was caught)
                pass

        return hook

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(enter(name)))
        handles.append(m.register_forward_hook(leave(name), always_call=True))
    try:
        with torch.no_grad(), in_mode(model):
            model(*args)
    except Exception as e:  # not this model's input: nothing is shown, nothing is kept
        _log.debug("running the model to check BN pairs failed (%s)", e)
        return None
    finally:
        for h in handles:
            h.remove()
    return {(c, b) for c, b, _, _ in pairs if all(inside[c] + inside[b]) and inside[c] and inside[b]}


def find_conv_bn_pairs(model: nn.Module, example_input=None) -> list[tuple[str, str]]:
    """Qualified names (conv, bn) where the BN reads only that conv's output and can be folded.

    fx tracing first (untraceable submodules become leaves and are analysed on their own); a module
    whose own forward cannot be traced is analysed child by child, and if it is a plain
    ``nn.Sequential`` its adjacent (conv, BN) children are paired. Below any other untraceable
    forward, the calls it makes are unknown: a pair found there is kept only when running
    ``model(example_input)`` shows its conv and BN called from inside the forward that was traced,
    and is dropped, with a warning naming it, when no ``example_input`` is given. A module called,
    or registered, more than once anywhere is never folded.
    """
    pairs: list[tuple[str, str, str, bool]] = []
    calls: dict[str, int] = {}
    _collect(model, "", pairs, calls)
    untrusted = [p for p in pairs if not p[3]]
    checked = _inside_owner(model, untrusted, example_input) if untrusted and example_input is not None else None
    shown = checked or set()
    dropped = [f"{c} -> {b}" for c, b, _, ok in pairs if not ok and (c, b) not in shown]
    if dropped:
        why = ("no example input was given" if example_input is None else "the model did not run on the example "
               "input" if checked is None else "running it showed them called from elsewhere")  # fmt: skip
        warnings.warn(
            f"BN not folded at {', '.join(dropped)}: a module above them has a forward torch.fx cannot trace, so "
            f"partialize cannot tell how it calls them, and {why}; the deployed model keeps these BNs "
            "(exact, a little slower)" + ("" if example_input is not None else
            "; deploy(model, example_input=x) checks them by running the model once"), stacklevel=4,
        )  # fmt: skip
    registered: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registered[id(m)] = registered.get(id(m), 0) + 1
    mods = dict(model.named_modules())
    out, used = [], set()
    for c, b, _, ok in pairs:
        once = all(calls.get(n, 0) == 1 and registered[id(mods[n])] == 1 for n in (c, b))
        if (ok or (c, b) in shown) and once and c not in used and b not in used:
            used.update((c, b))
            out.append((c, b))
    return out


def fold_batchnorm(model: nn.Module, example_input=None) -> int:
    """In place: fold every exact (conv, BN) pair (see ``find_conv_bn_pairs``); returns the count."""
    count = 0
    for conv_name, bn_name in find_conv_bn_pairs(model, example_input):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        folded = fold_bn_into_conv(conv, bn) if type(conv) in _CONVS else conv.fold_bn(bn)
        if folded is None:  # the operator cannot absorb this BN: both stay
            continue
        set_module(model, conv_name, folded)
        set_module(model, bn_name, bn_remainder(bn))
        count += 1
    return count
