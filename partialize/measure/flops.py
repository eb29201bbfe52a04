"""MAC counting with fvcore (the papers' counter: one fvcore "flop" is one multiply-add).

fvcore misses ``aten::scaled_dot_product_attention``; we add a handle for it. All figures are
multiply-accumulates (MACs); reports say so.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from math import prod

import torch
from torch import nn


def _shape(v) -> list[int]:
    return v.type().sizes()


def sdpa_mac_handle(inputs, outputs) -> int:
    """q k^T and attn v: 2 * B * heads * Nq * Nk * d MACs (mask add and softmax ignored)."""
    q, k = _shape(inputs[0]), _shape(inputs[1])
    v = _shape(inputs[2])
    batch = prod(q[:-2])
    return batch * q[-2] * k[-2] * q[-1] + batch * q[-2] * k[-2] * v[-1]


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_mac_handle,
}


def count_macs(
    model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], *, by_module: bool = False
) -> int | tuple[int, dict[str, int]]:
    """Total MACs of ``model(*inputs)`` (fvcore + our handles); with ``by_module`` also per module."""
    from fvcore.nn import FlopCountAnalysis

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            fca = FlopCountAnalysis(model, tuple(inputs))
            fca.set_op_handle(**EXTRA_HANDLES)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            total = int(fca.total())
            per = {k: int(v) for k, v in fca.by_module().items()} if by_module else None
    finally:
        model.train(was_training)
    return (total, per) if by_module else total


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
