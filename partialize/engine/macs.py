"""A light MAC counter for the engine: torch's flop formulas (torch.utils.flop_counter) applied in a
plain TorchDispatchMode, without FlopCounterMode's module tracking (which imports torch._dynamo
and costs about a second on first use). MACs = FLOPs / 2."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class MacCounter(TorchDispatchMode):
    """Counts multiply-accumulates of every op torch has a flop formula for (conv, mm, sdpa...)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    @property
    def macs(self) -> int:
        return int(self.flops // 2)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fn = flop_registry.get(func._overloadpacket)
        if fn is not None:
            self.flops += int(fn(*args, **kwargs, out_val=out))
        return out


def eval_macs(module: torch.nn.Module, *args, **kwargs) -> int:
    """MACs of one eval-mode, no-grad call ``module(*args, **kwargs)``; the module's mode is restored."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad(), MacCounter() as counter:
            module(*args, **kwargs)
    finally:
        module.train(was)
    return counter.macs
