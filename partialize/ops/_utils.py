"""Small helpers shared by the operators: channel splits, BN folding, conv checks."""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections import Counter, OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import OperatorError

_SHARE_KEPT = contextvars.ContextVar("partialize_share_kept", default=False)


@contextlib.contextmanager
def sharing_kept_children():
    """Inside the block, an operator that keeps children of its original unchanged
    (``convertible_children``) holds the original's own modules there, not copies. Only the engine
    builds this way: the planner, so that a kept child a nested operator then replaces is never
    copied, and apply, which copies every kept child still shared before the swap (engine/apply.py)."""
    token = _SHARE_KEPT.set(True)
    try:
        yield
    finally:
        _SHARE_KEPT.reset(token)


def shares_kept_children() -> bool:
    """Whether an operator built now keeps the original's own modules as its kept children."""
    return _SHARE_KEPT.get()


def _plain_module_class(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` the way nn.Module defines it (its
    ``__getstate__`` / ``__setstate__``, no ``__deepcopy__`` or ``__reduce__`` of the class's own)."""
    return (
        cls.__getstate__ is nn.Module.__getstate__
        and cls.__setstate__ is nn.Module.__setstate__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and not hasattr(cls, "__deepcopy__")
    )


def clone_module(obj, memo: dict | None = None):
    """``copy.deepcopy(obj, memo)``, faster for modules: what deepcopy does for an nn.Module (a new
    instance of its class, ``__setstate__`` with a deep copy of its state), with the empty hook
    dictionaries every module carries made new instead of copied through ``__reduce_ex__`` and the
    child modules copied the same way. A module class with copy rules of its own, and anything that is
    not a module, goes to ``copy.deepcopy``. A deep copy of a module was 0.2 ms per submodule, most of
    the cost of building and deploying operators on a large model."""
    memo = {} if memo is None else memo
    if not isinstance(obj, nn.Module) or not _plain_module_class(type(obj)):
        return copy.deepcopy(obj, memo)
    if id(obj) in memo:
        return memo[id(obj)]
    new = type(obj).__new__(type(obj))
    memo[id(obj)] = new
    state = {}
    for k, v in obj.__getstate__().items():
        if k == "_modules":
            state[k] = type(v)((n, None if c is None else clone_module(c, memo)) for n, c in v.items())
        elif not v and type(v) in (dict, OrderedDict, set):
            state[k] = type(v)()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__setstate__(state)
    return new


def placeholders(module: nn.Module, replaced) -> dict[int, nn.Module]:
    """A ``clone_module`` memo that leaves the modules in ``replaced`` out of a copy of ``module``, an
    ``nn.Identity`` in each one's place for the caller to replace: a layer about to be replaced by its
    cut is not copied first. Empty (a full copy) unless each is held once in ``module``, in a module
    slot only: a second reference would keep the placeholder where the original had the layer."""
    replaced = [m for m in replaced if isinstance(m, nn.Module)]
    uses = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    ids = {id(m) for m in replaced}
    if any(uses[id(m)] != 1 for m in replaced) or any(id(v) in ids for v in attribute_values(module)):
        return {}
    return {id(m): nn.Identity() for m in replaced}


def attribute_values(module: nn.Module) -> Iterator:
    """Every value in the plain attributes of ``module`` and its submodules (torch's registries of
    parameters, buffers and children left out), a list's, tuple's or dict's items one level down."""
    return (v for _, _, v in named_attribute_values(module))


def named_attribute_values(module: nn.Module) -> Iterator[tuple[str, str, object]]:
    """(submodule name, attribute, value) for each of :func:`attribute_values`."""
    for owner, m in module.named_modules():
        for k, v in vars(m).items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            for item in v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,):
                yield owner, k, item


def qualname(m: nn.Module) -> str:
    """``module.Class`` of ``m``'s class: what the block slicers match known classes by."""
    return f"{type(m).__module__}.{type(m).__qualname__}"


def split_channels(channels: int, ratio: float) -> int:
    """Number of channels the expensive branch gets: round(ratio * C), clamped to [1, C].

    Rounding (not flooring) keeps e.g. C=24, r=1/4 at 6 and C=20, r=1/8 at 3 (2.5 rounds to even
    in Python, so we round half up explicitly).
    """
    if not 0.0 < float(ratio) <= 1.0:
        raise OperatorError(f"ratio must be in (0, 1], got {ratio!r}")
    n = int(float(ratio) * channels + 0.5)
    return max(1, min(channels, n))


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = scale * x + shift (per channel)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale.detach(), shift.detach()


def bn_remainder(bn: nn.Module) -> nn.Module:
    """What is left of a BN-like layer once its normalisation is folded away: nn.Identity for a
    plain BN, the activation (and dropout) for timm's BatchNormAct2d."""
    act = getattr(bn, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        drop = getattr(bn, "drop", None)
        if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
            return nn.Sequential(drop, act)
        return act
    return nn.Identity()


def is_foldable_bn(m: nn.Module) -> bool:
    """An eval-foldable BN: exact torch BN types, or timm's BatchNormAct2d (BN + act)."""
    if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not m.track_running_stats:
        return False
    if m.running_mean is None:
        return False
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return True
    return type(m).__name__ == "BatchNormAct2d" and hasattr(m, "act")


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """Return a new conv computing bn(conv(x)) in eval mode (exact up to rounding)."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BN has {bn.num_features} channels but conv has {conv.out_channels} outputs")
    scale, shift = bn_affine(bn)
    fused = clone_module(conv)
    w = conv.weight.detach() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    b = shift if conv.bias is None else conv.bias.detach() * scale + shift
    fused.weight = nn.Parameter(w)
    fused.bias = nn.Parameter(b)
    return fused


def check_same_size_conv(
    conv: nn.Conv2d, op: str, allow_stride: bool = False, allow_depthwise: bool = False, allow_grouped: bool = False
) -> None:
    """Raise OperatorError unless ``conv`` keeps channels and spatial size (what PConv can represent).

    ``allow_stride`` accepts strided convs whose padding is the size-keeping one; ``allow_depthwise``
    accepts depthwise convs (groups == in == out); ``allow_grouped`` grouped ones (whole groups kept).
    """
    name = type(conv).__name__
    if not isinstance(conv, nn.Conv2d):
        raise OperatorError(f"{op} converts nn.Conv2d layers, got {name}")
    if type(conv) is not nn.Conv2d:
        raise OperatorError(
            f"{op} converts plain nn.Conv2d only; {type(conv).__module__}.{name} subclasses it and may "
            "transform its weight in forward (e.g. weight standardisation), which a copied block would lose"
        )
    reasons = []
    if conv.in_channels != conv.out_channels:
        reasons.append(
            f"in_channels ({conv.in_channels}) != out_channels ({conv.out_channels}): the untouched "
            "channels pass through as identity, so input and output widths must match"
        )
    if tuple(conv.stride) != (1, 1) and not (allow_stride and conv.stride[0] == conv.stride[1]):
        hint = "" if allow_stride else " (PConv converts it with stride_mode: pool)"
        reasons.append(f"stride {tuple(conv.stride)} != 1: identity channels cannot be downsampled{hint}")
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if conv.groups != 1 and not (allow_depthwise and depthwise) and not (allow_grouped and not depthwise):
        kind = "depthwise" if depthwise else "grouped"
        reasons.append(f"groups={conv.groups}: {op} keeps no {kind} conv part (PConv keeps whole groups)")
    if conv.padding_mode != "zeros":
        reasons.append(f"padding_mode={conv.padding_mode!r}: only zero padding is supported")
    if not reasons and not keeps_spatial_size(conv):
        reasons.append(
            f"kernel {tuple(conv.kernel_size)}, dilation {tuple(conv.dilation)} and padding "
            f"{conv.padding!r} change the spatial size"
        )
    if reasons:
        raise OperatorError(f"{op} cannot represent this {name}: " + "; ".join(reasons))


def keeps_spatial_size(conv: nn.Conv2d) -> bool:
    """True when a stride-1 conv's padding keeps H and W (odd effective kernel, symmetric pad)."""
    if conv.padding == "same":
        return True
    if conv.padding == "valid":
        return all(k == 1 for k in conv.kernel_size)
    for k, d, p in zip(conv.kernel_size, conv.dilation, conv.padding):
        span = d * (k - 1)
        if span % 2 or p != span // 2:
            return False
    return True


def conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Explicit symmetric padding of a size-keeping conv (resolves 'same'/'valid')."""
    if isinstance(conv.padding, str):
        return tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    return tuple(conv.padding)


def copy_top_left(dst: nn.Conv2d, src: nn.Conv2d) -> None:
    """Copy the top-left [:out, :in] block of ``src``'s weight (and bias) into ``dst``.

    When ``dst`` is wider than ``src`` (a partial source whose other channels were identity), the
    extra channels get an identity (Dirac) kernel, so the new op computes what the source did.
    """
    same_kernels = dst.in_channels // dst.groups == src.in_channels // src.groups  # one kept group is dense
    if (dst.groups == 1) != (src.groups == 1) and not same_kernels:
        raise OperatorError(
            f"cannot inherit a {'dense' if src.groups == 1 else 'grouped/depthwise'} conv's weights into a "
            f"{'dense' if dst.groups == 1 else 'grouped/depthwise'} one"
        )
    n_out, n_in = min(dst.out_channels, src.out_channels), min(dst.in_channels, src.in_channels)
    group_in = dst.in_channels // dst.groups  # a kernel's input channels: C (dense), 1 (depthwise), C/g
    with torch.no_grad():
        dst.to(device=src.weight.device, dtype=src.weight.dtype)
        if n_out < dst.out_channels or n_in < dst.in_channels:
            dst.weight.zero_()
            kh, kw = dst.kernel_size
            for c in range(n_in, min(dst.in_channels, dst.out_channels)):
                dst.weight[c, c % group_in, kh // 2, kw // 2] = 1.0
        dst.weight[:n_out, :n_in].copy_(src.weight[:n_out, :n_in])
        if dst.bias is not None:
            dst.bias.zero_()
            if src.bias is not None:
                dst.bias[:n_out].copy_(src.bias[:n_out])


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out, in) and ``bias``, on their device and dtype;
    no random init first (every value is overwritten; the init's draws were a tenth of a plan's time)."""
    out = torch.nn.utils.skip_init(
        nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def conv1x1_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A 1x1 ``nn.Conv2d`` holding copies of ``weight`` (out, in, 1, 1) and ``bias``, like :func:`linear_from`."""
    out = torch.nn.utils.skip_init(
        nn.Conv2d, weight.shape[1], weight.shape[0], 1, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def slice_conv(
    conv: nn.Conv2d, out_range: tuple[int, int] | None = None, in_range: tuple[int, int] | None = None
) -> nn.Conv2d:
    """Copy of a dense or depthwise ``nn.Conv2d`` keeping output channels ``out_range`` and input
    channels ``in_range`` (``None``: all). A depthwise conv keeps ``out_range`` for both; a grouped
    conv is cut to whole groups, the same ones in and out (each output group reads only its own)."""
    dw = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    if conv.groups != 1 and not dw:
        return _slice_groups(conv, out_range, in_range)
    o0, o1 = out_range or (0, conv.out_channels)
    i0, i1 = (o0, o1) if dw else in_range or (0, conv.in_channels)
    # no random init: the weights are overwritten (a wide model's init was seconds of its planning)
    new = torch.nn.utils.skip_init(
        nn.Conv2d, i1 - i0, o1 - o0, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        groups=o1 - o0 if dw else 1, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(conv.weight[o0:o1] if dw else conv.weight[o0:o1, i0:i1])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[o0:o1])
    return new


def _slice_groups(conv: nn.Conv2d, out_range: tuple[int, int] | None, in_range: tuple[int, int] | None) -> nn.Conv2d:
    """A grouped conv cut to the groups [g0, g1): outputs [g0 * og, g1 * og), inputs [g0 * ig, g1 * ig)."""
    groups = conv.groups
    og, ig = conv.out_channels // groups, conv.in_channels // groups
    o0, o1 = out_range or (0, conv.out_channels)
    i0, i1 = in_range or (0, conv.in_channels)
    if o0 % og or o1 % og or i0 % ig or i1 % ig or (o0 // og, o1 // og) != (i0 // ig, i1 // ig):
        raise OperatorError(
            f"grouped conv (groups={groups}) can only be cut to whole groups, the same ones in and out: "
            f"outputs [{o0}, {o1}) and inputs [{i0}, {i1}) with {og} outputs and {ig} inputs per group"
        )
    k = o1 // og - o0 // og
    new = torch.nn.utils.skip_init(
        nn.Conv2d, i1 - i0, o1 - o0, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=k,
        bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device,
        dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(conv.weight[o0:o1])  # (out, in per group, kh, kw): the input dim is per group
        if conv.bias is not None:
            new.bias.copy_(conv.bias[o0:o1])
    return new


def slice_bn(bn: nn.modules.batchnorm._BatchNorm, a: int, b: int) -> nn.modules.batchnorm._BatchNorm:
    """Copy of a BN (or timm BatchNormAct2d) keeping channels [a, b): affine and running statistics."""
    return select_bn(bn, slice(a, b), b - a)


def select_bn(bn: nn.modules.batchnorm._BatchNorm, index, n: int) -> nn.modules.batchnorm._BatchNorm:
    """Copy of a BN keeping the ``n`` channels ``index`` (a slice or an index tensor) selects."""
    new = clone_module(bn)
    new.num_features = n
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                setattr(new, name, nn.Parameter(p[index].clone()))
        for name in ("running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None:
                setattr(new, name, t[index].clone())
    return new
