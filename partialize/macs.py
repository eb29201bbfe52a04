"""The one MAC counter: plan, convert, report, bench and the trainer's budgets all count with it.

What it counts (docs/measure.md, "What a MAC is"): multiply-accumulates of every tensor contraction
that runs in one eval-mode forward, read off the aten ops as they execute (a ``TorchDispatchMode``),
so a module called twice counts twice and whatever path an op takes (fused attention kernels,
``nn.MultiheadAttention``'s fast path) is seen:

- convolutions (``aten.convolution``, transposed too): output elements x (C_in / groups) x kernel size;
- matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``mv``, ``dot``, ``linear``): M x K x N;
  ``einsum`` pairwise from left to right, as torch evaluates it without opt_einsum; ``inner``;
  ``linalg.multi_dot`` in its cheapest bracketing, the one torch runs;
- attention: q k^T and attn v, B x heads x L x S x (d_qk + d_v), for every scaled-dot-product
  kernel (math, flash, efficient, cuDNN, CPU flash) and masks/causality not discounted;
- ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` fast paths: their projections,
  attention and (encoder layer) feed-forward products.

The same count in ``no_grad`` and ``inference_mode`` (where composite ops such as ``conv2d``,
``linear``, ``matmul``, ``einsum`` and ``scaled_dot_product_attention`` reach the mode whole).
Not counted: normalisation, activations, pooling, elementwise arithmetic, softmax. Their cost is
linear in the activations; eval-mode BN folds into the preceding conv, so the count is the same
for a model and its BN-folded inference form. Our formulas, not ``torch.utils.flop_counter``'s,
so the count does not change with the torch version (that counter misses CPU attention in
torch 2.14). A contraction-like op without a formula is listed in ``MacCount.uncounted`` rather
than silently counted as 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ._modes import in_mode

aten = torch.ops.aten

__all__ = ["MAC_UNIT", "MacCount", "MacCounter", "count_macs", "per_image_macs"]

#: the unit every report states next to a MAC figure
MAC_UNIT = "MACs (multiply-adds of convs, matrix products and attention; partialize.macs), per image"


def _conv(args, out) -> int:
    x, w, transposed = args[0], args[1], bool(args[6])
    per_out = w.shape[1] * prod(w.shape[2:])  # (C_in / groups) * kernel, or (C_out / groups) * kernel
    return (x.numel() if transposed else out.numel()) * per_out


def _mm(a, b) -> int:  # (..., M, K) @ (..., K, N)
    return prod(a.shape[:-1]) * a.shape[-1] * b.shape[-1]


def _conv_composite(args, out) -> int:
    """``aten.convNd`` (seen as one op under inference mode): output elements x weight[1] x kernel."""
    w = args[1]
    return out.numel() * w.shape[1] * prod(w.shape[2:])


def _conv_transpose_composite(args, out) -> int:
    x, w = args[0], args[1]
    return x.numel() * w.shape[1] * prod(w.shape[2:])


def _matmul(args, out) -> int:
    """``aten.matmul`` with broadcasting: every output element is a K-long dot product (1-D ends too)."""
    a = args[0]
    return max(1, out.numel()) * a.shape[-1]


def _einsum_labels(spec: str, ndim: int) -> list[str]:
    """The index labels of one operand, its ellipsis spelled out as the dimensions it covers (numbered
    from the right, so operands broadcast against each other share them)."""
    if "..." not in spec:
        return list(spec)
    head, tail = spec.split("...")
    covered = ndim - len(head) - len(tail)
    return list(head) + [f"...{covered - k}" for k in range(covered)] + list(tail)


def _einsum(args, out) -> int:
    """A contraction, pairwise from left to right as torch evaluates it (without opt_einsum): each
    pair costs the product of the sizes of the indices it touches, once an operand's own indices that
    nothing later needs are summed out (a reduction, no multiply)."""
    equation, operands = args[0].replace(" ", ""), args[1]
    if len(operands) < 2:
        return 0
    lhs, _, rhs = equation.partition("->")
    specs = [_einsum_labels(spec, t.dim()) for spec, t in zip(lhs.split(","), operands)]
    sizes: dict[str, int] = {}
    for labels, t in zip(specs, operands):
        for ch, n in zip(labels, t.shape):
            sizes[ch] = max(sizes.get(ch, 1), n)  # a broadcast dimension of size 1 takes the other's
    if "->" in equation:
        keep = set(_einsum_labels(rhs, out.dim()))
    else:  # implicit output: the labels used once, and the ellipsis
        flat = [c for labels in specs for c in labels]
        keep = {c for c in flat if flat.count(c) == 1 or c.startswith("...")}
    total, acc = 0, set(specs[0])
    for k, labels in enumerate(specs[1:], start=1):
        later = keep.union(*[set(x) for x in specs[k + 1 :]])
        b = set(labels)
        a, b = acc & (b | later), b & (acc | later)
        total += prod(sizes[c] for c in a | b)
        acc = (a | b) & later
    return total


def _multi_dot(args, out) -> int:
    """``linalg.multi_dot``: the least multiply count over the bracketings, the order torch picks (a
    1-D first or last operand is a row or a column vector)."""
    shapes = [tuple(t.shape) for t in args[0]]
    if len(shapes) < 2:
        return 0
    dims = [shapes[0][0] if len(shapes[0]) == 2 else 1] + [s[-1] if len(s) == 2 else 1 for s in shapes[:-1]]
    dims.append(shapes[-1][-1] if len(shapes[-1]) == 2 else 1)
    if len(shapes[0]) == 1:
        dims[1] = shapes[0][0]
    n = len(shapes)
    best = [[0] * n for _ in range(n)]
    for span in range(1, n):
        for i in range(n - span):
            j = i + span
            best[i][j] = min(best[i][m] + best[m + 1][j] + dims[i] * dims[m + 1] * dims[j + 1] for m in range(i, j))
    return best[0][n - 1]


def _attention_bhld(q, k, v) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): q k^T and attn v."""
    rows = prod(q.shape[:-1])  # batch x heads x L
    return rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _attention_blhd(q, k, v) -> int:
    """Layout (B, L, H, E) of the flash / efficient attention forward kernels."""
    b, l, h, e = q.shape
    return b * h * l * k.shape[1] * (e + v.shape[-1])


def _mha(q, k, v, embed_dim: int, out_proj_rows: int) -> int:
    """Fast-path multi-head attention on (B, L, E) / (B, S, E): in-projections, attention, out-projection."""
    b, l = q.shape[0], q.shape[1]
    s = k.shape[1]
    proj_in = b * (l + 2 * s) * embed_dim * embed_dim
    attend = b * l * s * 2 * embed_dim  # summed over heads: heads x head_dim = E
    return proj_in + attend + b * l * embed_dim * out_proj_rows


def _encoder_layer(args) -> int:
    src, embed_dim = args[0], int(args[1])
    ffn_w1 = args[14]
    tokens = prod(src.shape[:-1])
    return _mha(src, src, src, embed_dim, embed_dim) + 2 * tokens * embed_dim * ffn_w1.shape[0]


_FORMULAS: dict[object, Callable] = {
    aten.convolution.default: lambda a, o: _conv(a, o),
    aten._convolution.default: lambda a, o: _conv(a, o),
    aten.mm.default: lambda a, o: _mm(a[0], a[1]),
    aten.addmm.default: lambda a, o: _mm(a[1], a[2]),
    aten._addmm_activation.default: lambda a, o: _mm(a[1], a[2]),
    aten.bmm.default: lambda a, o: _mm(a[0], a[1]),
    aten.baddbmm.default: lambda a, o: _mm(a[1], a[2]),
    aten.mv.default: lambda a, o: a[0].shape[0] * a[0].shape[1],
    aten.addmv.default: lambda a, o: a[1].shape[0] * a[1].shape[1],
    aten.dot.default: lambda a, o: a[0].numel(),
    aten.linear.default: lambda a, o: prod(a[0].shape[:-1]) * a[0].shape[-1] * a[1].shape[0],
    aten._scaled_dot_product_flash_attention_for_cpu.default: lambda a, o: _attention_bhld(*a[:3]),
    aten._scaled_dot_product_flash_attention.default: lambda a, o: _attention_bhld(*a[:3]),
    aten._scaled_dot_product_efficient_attention.default: lambda a, o: _attention_bhld(*a[:3]),
    aten._scaled_dot_product_cudnn_attention.default: lambda a, o: _attention_bhld(*a[:3]),
    aten._scaled_dot_product_fused_attention_overrideable.default: lambda a, o: _attention_bhld(*a[:3]),
    aten._flash_attention_forward.default: lambda a, o: _attention_blhd(*a[:3]),
    aten._efficient_attention_forward.default: lambda a, o: _attention_blhd(*a[:3]),
    aten._native_multi_head_attention.default: lambda a, o: _mha(a[0], a[1], a[2], int(a[3]), a[7].shape[0]),
    aten._transformer_encoder_layer_fwd.default: lambda a, o: _encoder_layer(a),
    # composite ops that inference mode hands to the mode whole (no_grad shows what they decompose to)
    aten.conv1d.default: _conv_composite,
    aten.conv2d.default: _conv_composite,
    aten.conv3d.default: _conv_composite,
    aten.conv1d.padding: _conv_composite,
    aten.conv2d.padding: _conv_composite,
    aten.conv3d.padding: _conv_composite,
    aten.conv_transpose1d.default: _conv_transpose_composite,
    aten.conv_transpose2d.input: _conv_transpose_composite,
    aten.conv_transpose3d.input: _conv_transpose_composite,
    aten.matmul.default: _matmul,
    aten.einsum.default: _einsum,
    aten.inner.default: lambda a, o: max(1, o.numel()) * (a[0].shape[-1] if a[0].dim() else 1),
    aten.linalg_multi_dot.default: _multi_dot,
    aten.scaled_dot_product_attention.default: lambda a, o: _attention_bhld(*a[:3]),
    # pairwise distances of x1 (..., P, M) and x2 (..., R, M): one M-long reduction per output element
    aten._cdist_forward.default: lambda a, o: o.numel() * a[0].shape[-1],
    aten._euclidean_dist.default: lambda a, o: o.numel() * a[0].shape[-1],
}

# ops that do multiply-accumulate work but have no formula here: reported, never silently 0
_CONTRACTION = re.compile(
    r"(mm|conv|attention|matmul|linear|einsum|bilinear|rnn|lstm|gru|tensordot|_int\d?pack|cdist|euclidean_dist"
    r"|inner|multi_dot|chain_matmul|kron)"
)


def _op_macs(func, args, out) -> int | None:
    fn = _FORMULAS.get(func)
    return None if fn is None else int(fn(args, out))


@dataclass
class MacCount:
    """The result of one counted forward. ``by_module`` holds inclusive counts (a module's own ops
    and its children's, every call summed; ``""`` is the whole model), ``calls`` forward calls per
    module, ``uncounted`` the contraction-like ops seen that have no formula (op -> calls), and
    ``used_outside`` the modules whose parameters or buffers an op read while that module was not
    running (weights used functionally by another module, e.g. ``F.conv2d(x, self.conv.weight)``)."""

    total: int = 0
    by_module: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    uncounted: dict[str, int] = field(default_factory=dict)
    used_outside: dict[str, tuple[str, str]] = field(default_factory=dict)


class MacCounter(TorchDispatchMode):
    """Count MACs of every op run inside the ``with`` block; with ``model``, attribute them to its
    modules by a call stack kept with forward hooks (see :class:`MacCount`)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.result = MacCount()
        self._model = model
        self._stack: list[str] = []
        self._handles: list = []
        # id -> (owning module, the tensor): the tensor is held so that its id cannot be reused while
        # counting (a module that replaces a buffer in forward, as ConViT's GPSA does, frees the old one,
        # and a temporary elsewhere could take its id and look like a read of this module's weights)
        self._owner: dict[int, tuple[str, torch.Tensor]] = {}

    def _push(self, name: str):
        def pre(_m, _args):
            self._stack.append(name)
            self.result.calls[name] = self.result.calls.get(name, 0) + 1

        return pre

    def _pop(self, name: str):
        def post(_m, _args, _out):
            # pop back to this module (a child that raised and was caught left its name behind)
            while self._stack and self._stack.pop() != name:
                pass

        return post

    def __enter__(self):
        if self._model is not None:
            for name, m in self._model.named_modules():
                self._handles.append(m.register_forward_pre_hook(self._push(name)))
                self._handles.append(m.register_forward_hook(self._pop(name), always_call=True))
                for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
                    self._owner.setdefault(id(t), (name, t))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self._owner:
            self._check_owners(func, args)
        n = _op_macs(func, args, out)
        if n is None:
            name = func.name()
            if _CONTRACTION.search(name.split("::")[-1]):
                self.result.uncounted[name] = self.result.uncounted.get(name, 0) + 1
            return out
        self.result.total += n
        by = self.result.by_module
        for mod in dict.fromkeys(self._stack):  # a module on the stack twice (recursion) counts once
            by[mod] = by.get(mod, 0) + n
        return out

    def _check_owners(self, func, args) -> None:
        running = set(self._stack)
        for a in args:
            if isinstance(a, torch.Tensor):
                entry = self._owner.get(id(a))
                owner = entry[0] if entry is not None and entry[1] is a else None
                if owner is not None and owner not in running and owner not in self.result.used_outside:
                    self.result.used_outside[owner] = (self._stack[-1] if self._stack else "", func.name())


def count_macs(module: nn.Module, *args, per_module: bool = False, **kwargs) -> MacCount:
    """Count one eval-mode, no-grad call ``module(*args, **kwargs)``; the module's mode is restored.

    ``per_module`` attributes the count to submodules (``MacCount.by_module``) and records weights
    used outside their module. Counts are for the batch given: divide by it for per image.
    """
    with in_mode(module), torch.no_grad(), MacCounter(module if per_module else None) as counter:
        module(*args, **kwargs)
    if not per_module:
        counter.result.by_module = {"": counter.result.total}
    return counter.result


def per_image_macs(module: nn.Module, x: torch.Tensor) -> float:
    """MACs per image of ``module`` on the batch ``x`` (total / batch): exact for static models, the
    average over the batch for data-dependent ones (Ada-PConv's hard routing)."""
    return count_macs(module, x).total / max(1, x.shape[0])
