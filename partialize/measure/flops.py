"""MACs and parameters for reports, with the one counter (:mod:`partialize.macs`).

A model is counted in its inference form: each partial operator replaced by its ``deploy()`` form
(a DPConv at its learned width, PAT_sp merged, Ada-PConv hard-routed) on the same forward that
the plan counts, so plan, convert, report and bench agree. Data-dependent layers (Ada-PConv) are
counted over a calibration batch and averaged per image. Every figure is in :data:`MAC_UNIT`;
``torch.utils.flop_counter`` is run beside it as a cross-check that may differ (it has no formula
for some attention kernels on some torch versions), never as the count.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..macs import MAC_UNIT, count_macs

__all__ = ["MAC_UNIT", "count_params", "flop_counter_macs", "macs_breakdown", "model_macs"]

_log = logging.getLogger(__name__)


def model_macs(
    model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], *, by_module: bool = False
) -> int | tuple[int, dict[str, int]]:
    """MACs of one eval forward ``model(*inputs)`` as given (no deploy); with ``by_module`` also the
    inclusive count per module (every call summed)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    r = count_macs(model, *inputs, per_module=by_module)
    return (r.total, r.by_module) if by_module else r.total


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
    """Expected MACs of an Ada-PConv's inference form (hard routing) on one h x w image: router
    (C x branches) plus the branch cost averaged over ``histogram`` (samples per branch). A layer
    trained with soft or straight-through routing deploys hard-routed, so it is counted so too."""
    k = tuple(op.branches[0].kernel_size)
    branch = [conv_macs(n, n, k, h, w) for n in op.widths]
    router = op.dim * len(op.widths)
    hist = [int(v) for v in (histogram if histogram is not None else [0] * len(branch))]
    total = sum(hist)
    if total == 0:
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
        "realised_ratio": sum(c * n for c, n in zip(hist, op.widths)) / total / op.dim if total else None,
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
            continue  # never called on this input: nothing to describe
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


def flop_counter_macs(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> int | None:
    """MACs by ``torch.utils.flop_counter`` (its FLOPs / 2) for one eval forward: the cross-check only.

    Its formulas change with the torch version (2.14 has none for CPU flash attention); None if it
    cannot run here."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(*inputs)
        return int(fc.get_total_flops() // 2)
    except Exception as e:  # a cross-check must never break a report
        _log.debug("flop_counter cross-check failed: %s", e)
        return None
    finally:
        model.train(was)


def inference_copy(model: nn.Module) -> tuple[nn.Module, str | None]:
    """An eval copy of ``model`` with every partial operator in its deploy form (what is counted), and
    a note when some operator could not be deployed (then that one is counted as trained)."""
    from ..inference import deploy_operators
    from ..ops.registry import get_operator, list_operators

    form = copy.deepcopy(model).eval()
    try:
        if getattr(model, "_partialize_deployed", False):
            return form, None
        if isinstance(form, tuple(get_operator(n) for n in list_operators())):  # an operator on its own
            return form.deploy().eval(), None
        deploy_operators(form)
        return form, None
    except Exception as e:  # e.g. DPConv gates not monotone: count the trained form, and say so
        return copy.deepcopy(model).eval(), f"counted in training form: deploy failed ({type(e).__name__}: {e})"


def macs_breakdown(
    model: nn.Module,
    input_size: int | tuple[int, int, int] = 224,
    calibration: Sequence[torch.Tensor] | torch.Tensor | None = None,
    crosscheck: bool = True,
) -> dict:
    """Per-image MACs of ``model`` in its inference form (see the module docstring), per module too.

    Models with data-dependent layers (Ada-PConv) are counted over ``calibration`` (default: 32 N(0, 1)
    images) and averaged per image; ``dynamic`` describes each DPConv / Ada-PConv layer (width, branch
    histogram) with its counted MACs. Returns ``{"total", "per_module", "dynamic", "flop_counter",
    "crosscheck_rel_diff", "calibration", "uncounted_ops", "notes"}``, every count in :data:`MAC_UNIT`.
    """
    size = _input_chw(input_size)
    device = _device_of(model)
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    form, note = inference_copy(model)
    notes = [note] if note else []
    batches, calib_desc, dyn = [x], None, {}
    if dynamic_layers(model):
        if calibration is None:
            gen = torch.Generator().manual_seed(0)
            calibration = torch.randn(32, *size, generator=gen).to(device)
            calib_desc = "32 random N(0, 1) images (no data given)"
        batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
        if calib_desc is None:
            calib_desc = f"{sum(b.shape[0] for b in batches)} images from the given data"
        dyn = dynamic_macs(model, calibrate_dynamic(model, batches))
    images, total, per, uncounted = 0, 0, {}, {}
    for batch in batches:
        r = count_macs(form, batch, per_module=True)
        images += batch.shape[0]
        total += r.total
        for k, v in r.by_module.items():
            per[k] = per.get(k, 0) + v
        for k, v in r.uncounted.items():
            uncounted[k] = uncounted.get(k, 0) + v
    per = {k: v / images for k, v in per.items()}
    for name, d in dyn.items():  # the counted figure is the one reported; the analytic one checks it
        d["analytic_macs"] = d["macs"]
        d["macs"] = per.get(name, 0.0)
    if uncounted:
        notes.append(f"ops with no MAC formula were seen and are not counted: {sorted(uncounted)}")
    # the cross-check runs on one image: comparable only when the count does not depend on the data
    fc = flop_counter_macs(form, x) if crosscheck and not dyn else None
    per_image = total / images
    return {
        "total": float(per_image),
        "per_module": per,
        "dynamic": dyn,
        "flop_counter": fc,
        "crosscheck_rel_diff": None if not fc else (per_image - fc) / fc,
        "calibration": calib_desc,
        "uncounted_ops": uncounted,
        "notes": notes,
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
