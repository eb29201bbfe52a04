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


# --- dynamic operators, per-layer breakdown and the cross-check -----------------------------------

#: unit string every report carries next to a MAC figure
MAC_UNIT = "MACs (multiply-adds; fvcore convention, the papers' 'FLOPs'), per image"


def conv_macs(c_in: int, c_out: int, kernel: tuple[int, int], h_out: int, w_out: int, groups: int = 1) -> int:
    """MACs of one conv on one image: C_out * (C_in / groups) * kh * kw * H_out * W_out (bias ignored)."""
    return c_out * (c_in // groups) * kernel[0] * kernel[1] * h_out * w_out


def dpconv_macs(op: nn.Module, h: int, w: int) -> dict:
    """Realised MACs of a DPConv on one h x w image: the conv on its n learned channels, plus PAT_ch's
    map from the 2(C - n) statistics to C - n gates when ``attn="ch"``: 2(C - n)^2 MACs for the dense
    mapping (every gate sees all statistics), 2(C - n) for ``mapping="channelwise"`` (each gate sees its
    own mean and std); what ``deploy()`` runs."""
    n, c = op.num_conv_channels, op.dim
    conv = conv_macs(n, n, tuple(op.conv.kernel_size), h, w)
    attn = attn_full = 0
    if op.attn is not None:
        channelwise = getattr(op.attn, "mapping", "dense") == "channelwise"
        attn = 2 * (c - n) if channelwise else 2 * (c - n) * (c - n)
        attn_full = 2 * c if channelwise else 2 * c * c
    full = conv_macs(c, c, tuple(op.conv.kernel_size), h, w) + attn_full
    return {
        "macs": conv + attn,
        "conv_macs": conv,
        "attn_macs": attn,
        "dense_equivalent_macs": full,
        "width": n,
        "channels": c,
        "realised_ratio": n / c,
    }


def adapconv_macs(op: nn.Module, h: int, w: int, histogram: Sequence[int] | None) -> dict:
    """Expected MACs of an Ada-PConv on one h x w image: router (C x branches) plus the branch cost,
    averaged over ``histogram`` (samples per branch) under hard routing; soft routing runs every
    branch, so its cost is the sum whatever the histogram says."""
    k = tuple(op.branches[0].kernel_size)
    branch = [conv_macs(n, n, k, h, w) for n in op.widths]
    router = op.dim * len(op.widths)
    hist = [int(v) for v in (histogram if histogram is not None else [0] * len(branch))]
    total = sum(hist)
    if op.routing in ("soft", "ste"):
        expected = float(sum(branch))
        basis = f"{op.routing} routing: every branch runs, cost is their sum"
    elif total == 0:
        expected = float(max(branch))
        basis = "hard routing, no calibration samples: the widest branch (upper bound)"
    else:
        expected = sum(c * b for c, b in zip(hist, branch)) / total
        basis = f"hard routing: branch costs weighted by the histogram over {total} calibration samples"
    return {
        "macs": router + expected,
        "router_macs": router,
        "branch_macs": branch,
        "widths": list(op.widths),
        "channels": op.dim,
        "histogram": hist,
        "routing": op.routing,
        # mean chosen width / C under hard routing; soft routing has no single width
        "realised_ratio": (
            sum(c * n for c, n in zip(hist, op.widths)) / total / op.dim if op.routing == "hard" and total else None
        ),
        "basis": basis,
    }


def _dynamic_types() -> tuple[type, ...]:
    from ..ops import AdaPConv, DPConv

    return (DPConv, AdaPConv)


def dynamic_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified names of the DPConv / Ada-PConv modules in ``model``."""
    types = _dynamic_types()
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


@torch.no_grad()
def calibrate_dynamic(model: nn.Module, batches: Sequence[torch.Tensor] | torch.Tensor) -> dict[str, dict]:
    """Run ``batches`` through ``model`` (eval) and record, per dynamic layer, its input size and,
    for Ada-PConv, the branch histogram summed over every sample."""
    layers = dynamic_layers(model)
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    info: dict[str, dict] = {n: {"hw": None, "histogram": None, "samples": 0} for n in layers}
    hooks = []
    from ..ops import AdaPConv

    for name, mod in layers.items():

        def hook(m, inp, out, name=name):
            rec = info[name]
            rec["hw"] = tuple(inp[0].shape[-2:])
            rec["samples"] += inp[0].shape[0]
            if isinstance(m, AdaPConv):
                h = m.last_histogram.tolist()
                rec["histogram"] = h if rec["histogram"] is None else [a + b for a, b in zip(rec["histogram"], h)]

        hooks.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return info


def dynamic_macs(model: nn.Module, calibration: dict[str, dict]) -> dict[str, dict]:
    """Analytic per-image MACs of every dynamic layer from :func:`calibrate_dynamic`'s record."""
    from ..ops import AdaPConv

    out = {}
    for name, mod in dynamic_layers(model).items():
        rec = calibration.get(name)
        if rec is None or rec["hw"] is None:
            continue  # never called on this input: fvcore's count (0) stands
        h, w = rec["hw"]
        if isinstance(mod, AdaPConv):
            d = adapconv_macs(mod, h, w, rec["histogram"])
            d["type"] = "AdaPConv"
        else:
            d = dpconv_macs(mod, h, w)
            d["type"] = "DPConv"
        d["input_hw"] = [h, w]
        d["calibration_samples"] = rec["samples"]
        out[name] = d
    return out


def override_modules(per_module: dict[str, float], overrides: dict[str, float]) -> dict[str, float]:
    """Replace the counts of the modules in ``overrides`` and propagate the difference to every
    ancestor (``""`` is the whole model); the overridden modules' descendants are dropped."""
    out = dict(per_module)
    for name, value in overrides.items():
        delta = value - out.get(name, 0)
        parts = name.split(".") if name else []
        for i in range(len(parts)):
            anc = ".".join(parts[:i])
            out[anc] = out.get(anc, 0) + delta
        out[name] = value
        for k in [k for k in out if k.startswith(name + ".")]:
            del out[k]
    return out


def flop_counter_macs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """MACs by ``torch.utils.flop_counter``'s formulas (FLOPs / 2) for one eval forward: the cross-check."""
    from ..engine.macs import eval_macs

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return eval_macs(model, *inputs)


def macs_breakdown(
    model: nn.Module,
    input_size: int | tuple[int, int, int] = 224,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
    crosscheck: bool = True,
) -> dict:
    """Per-image MACs of ``model``: fvcore + our handles, dynamic layers replaced by their analytic
    cost over ``calibration`` (default: 32 N(0, 1) images), cross-checked with flop_counter.

    Returns ``{"total", "per_module", "dynamic", "fvcore_static", "flop_counter", "crosscheck_rel_diff",
    "calibration"}``; every count is in MACs per image (see :data:`MAC_UNIT`).
    """
    size = _input_chw(input_size)
    device = _device_of(model)
    x = torch.randn(1, *size, device=device)
    total, per = count_macs(model, x, by_module=True)
    fc = flop_counter_macs(model, x) if crosscheck else None
    dyn: dict[str, dict] = {}
    calib_desc = None
    if dynamic_layers(model):
        if calibration is None:
            gen = torch.Generator().manual_seed(0)
            calibration = torch.randn(32, *size, generator=gen).to(device)
            calib_desc = "32 random N(0, 1) images (no data given)"
        else:
            n = sum(b.shape[0] for b in ([calibration] if isinstance(calibration, torch.Tensor) else calibration))
            calib_desc = f"{n} images from the given data"
        dyn = dynamic_macs(model, calibrate_dynamic(model, calibration))
        per = override_modules(per, {k: v["macs"] for k, v in dyn.items()})
    rel = None if not fc else (total - fc) / fc
    return {
        "total": float(per.get("", total)),
        "per_module": per,
        "dynamic": dyn,
        "fvcore_static": int(total),
        "flop_counter": fc,
        "crosscheck_rel_diff": rel,
        "calibration": calib_desc,
    }


def _input_chw(input_size: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    t = tuple(int(v) for v in input_size)
    if len(t) == 2:
        return (3, *t)
    if len(t) != 3:
        raise ValueError(f"input_size must be S, (H, W) or (C, H, W), got {input_size!r}")
    return t


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def params_per_module(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(total, trainable) parameters directly owned by each module (not its children)."""
    out = {}
    for name, mod in model.named_modules():
        total = train = 0
        for p in mod.parameters(recurse=False):
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
        out[name] = (total, train)
    return out
