"""What a block's forward does with its children, recorded without torch.fx.

``partial_mlp`` needs to know whether a block's forward is a plain chain of calls of its children
(each output the next one's only input), maybe added to the block's input. torch.fx answers that,
but each trace patches ``nn.Module`` (about 2 ms a trace on the 2-core VM, whatever the block's size;
MobileNetV5's 150 chains, each traced in eval and train mode, spent 1.5 s there). The probe here
runs the forward once per mode with every child replaced by a recorder and the input by a token:
calling a child and adding two values (a residual) are recorded; anything else done to a token (an
attribute such as ``.shape``, another operator, a torch function other than ``torch.add``) ends the
probe, as would an fx node that is not a call of a child. The children are put back afterwards.
"""

from __future__ import annotations

import inspect
import operator

import torch
from torch import nn


class NotAChain(Exception):
    pass


class Ref(tuple):
    """The value produced by record ``i`` (0: the block's input), as it appears in a record's args."""

    def __new__(cls, i: int):
        return super().__new__(cls, ("ref", i))


class _Token:
    """A value flowing through the probed forward."""

    __slots__ = ("_probe", "_ref")

    def __init__(self, probe: _Probe, ref: Ref) -> None:
        object.__setattr__(self, "_probe", probe)
        object.__setattr__(self, "_ref", ref)

    def __getattr__(self, name):  # x.shape, x.permute(...): not a chain
        raise NotAChain(name)

    def __setattr__(self, name, value):
        raise NotAChain(name)

    def __add__(self, other):
        return self._probe.record("call_function", operator.add, (self, other))

    def __radd__(self, other):
        return self._probe.record("call_function", operator.add, (other, self))

    def __iadd__(self, other):
        return self._probe.record("call_function", operator.iadd, (self, other))

    def __bool__(self):
        raise NotAChain("bool")

    def __iter__(self):
        raise NotAChain("iter")

    def __len__(self):
        raise NotAChain("len")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.add and not kwargs and len(args) == 2:
            probe = next(a._probe for a in args if isinstance(a, _Token))
            return probe.record("call_function", torch.add, tuple(args))
        raise NotAChain(getattr(func, "__name__", str(func)))


class _Recorder(nn.Module):
    def __init__(self, probe: _Probe, name: str, identity: bool, items: list | None = None) -> None:
        super().__init__()
        self.probe, self.child_name, self.identity = probe, name, identity
        self.items = items or []  # a Sequential's: a forward may iterate or index it instead of calling it

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def forward(self, *args, **kwargs):
        if self.identity and len(args) == 1 and not kwargs:
            return args[0]  # an nn.Identity call is its input (EfficientViT's `shortcut(x)`)
        return self.probe.record("call_module", self.child_name, args, kwargs)


def _recorders(probe: _Probe, name: str, child: nn.Module) -> nn.Module:
    """A recorder for ``child``; a list or dict of modules becomes one of recorders, so a forward that
    iterates it records ``blocks.0``, ``blocks.1``, ... as fx would."""
    if type(child) is nn.ModuleList:  # a subclass with a forward of its own (MixNet's) is called
        return nn.ModuleList(_recorders(probe, f"{name}.{i}", c) for i, c in enumerate(child))
    if type(child) is nn.ModuleDict:
        return nn.ModuleDict({k: _recorders(probe, f"{name}.{k}", c) for k, c in child.items()})
    if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
        items = [_recorders(probe, f"{name}.{k}", c) for k, c in child.named_children()]
        return _Recorder(probe, name, False, items)
    return _Recorder(probe, name, type(child) is nn.Identity)


class _Probe:
    def __init__(self) -> None:
        self.records: list[tuple] = []

    def _arg(self, v):
        if isinstance(v, _Token):
            return v._ref
        if isinstance(v, (torch.Tensor, nn.Module)) or not _plain(v):
            raise NotAChain(type(v).__name__)  # a parameter or buffer read in the forward, say
        return v

    def record(self, op: str, target, args: tuple, kwargs: dict | None = None) -> _Token:
        entry = (op, target, tuple(self._arg(a) for a in args), tuple(sorted((kwargs or {}).items())))
        if any(not _plain(v) for _, v in entry[3]):
            raise NotAChain("kwargs")
        self.records.append(entry)
        return _Token(self, Ref(len(self.records)))


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, tuple) and all(_plain(a) for a in v))


def _one_input(block: nn.Module) -> bool:
    """Whether the forward takes exactly one argument (fx would make every further one, defaulted or
    not, an input of its own: not a chain)."""
    try:
        params = list(inspect.signature(block.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def record_forward(block: nn.Module, training: bool) -> tuple[list[tuple], object] | None:
    """(records, output) of ``block.forward`` on one token input in the given mode, each record
    ``(op, target, args, kwargs)`` with ``Ref(i)`` for the value of record ``i`` (``Ref(0)``: the
    input); None when the forward does anything else with a value (see the module docstring)."""
    if not _one_input(block):
        return None
    probe = _Probe()
    children = dict(block._modules)
    was = block.training
    try:
        block.training = training  # the block's own flag: its children are recorders meanwhile
        for name, child in children.items():
            if child is not None:
                block._modules[name] = _recorders(probe, name, child)
        out = block.forward(_Token(probe, Ref(0)))
    except Exception:  # NotAChain, or whatever the forward raises on a token: not a chain we can read
        return None
    finally:
        block._modules.clear()
        block._modules.update(children)
        block.training = was
    return probe.records, out._ref if isinstance(out, _Token) else None
