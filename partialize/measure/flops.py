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

from .._modes import in_mode
from ..inference import deploy_operators
from ..macs import MAC_UNIT, count_macs
from ..ops.base import PartialOperator
from ..ops.registry import operators_in

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


# --- operators that describe themselves (learned widths, routing), and the cross-check ----------------


def dynamic_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The operators in ``model`` with something to report beyond params and MACs (``describe()``:
    DPConv's learned width, Ada-PConv's routing), by qualified name."""
    return {n: m for n, m in operators_in(model).items() if m.describe()}


def _data_dependent(model: nn.Module) -> bool:
    return any(m.data_dependent for m in operators_in(model).values())


@torch.no_grad()
def describe_layers(model: nn.Module, batches: Sequence[torch.Tensor]) -> dict[str, dict]:
    """Run ``batches`` through ``model`` (eval) and return each describing operator's ``describe()``
    with its input size and the number of images it saw; a ``histogram`` (routing counts) is summed over
    the batches."""
    layers = dynamic_layers(model)
    info: dict[str, dict] = {n: {"input_hw": None, "calibration_samples": 0} for n in layers}
    hooks = []
    for name, mod in layers.items():

        def hook(m, inp, out, name=name):
            rec, d = info[name], m.describe()
            rec["input_hw"] = list(inp[0].shape[-2:])
            rec["calibration_samples"] += inp[0].shape[0]
            hist = d.get("histogram")
            if hist is not None and rec.get("histogram") is not None:
                d["histogram"] = [a + b for a, b in zip(rec["histogram"], hist)]
            rec.update({k: v for k, v in d.items()})

        hooks.append(mod.register_forward_hook(hook))
    try:
        with in_mode(model):
            for x in batches:
                model(x)
    finally:
        for h in hooks:
            h.remove()
    for rec in info.values():  # the realised share of channels over everything seen
        hist, widths = rec.get("histogram"), rec.get("widths")
        if hist and widths and sum(hist):
            rec["realised_ratio"] = sum(c * w for c, w in zip(hist, widths)) / sum(hist) / rec["channels"]
    return info


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
    try:
        with in_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(*inputs)
        return int(fc.get_total_flops() // 2)
    except Exception as e:  # a cross-check must never break a report
        _log.debug("flop_counter cross-check failed: %s", e)
        return None


def inference_copy(model: nn.Module) -> tuple[nn.Module, str | None]:
    """An eval copy of ``model`` with every partial operator in its deploy form (what is counted), and
    a note when some operator could not be deployed (then that one is counted as trained)."""
    form = copy.deepcopy(model).eval()
    try:
        if getattr(model, "_partialize_deployed", False):
            return form, None
        if isinstance(form, PartialOperator):  # an operator on its own
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
    images) and averaged per image; ``dynamic`` holds what each describing operator says of itself
    (``describe()``: learned width, routing histogram) with its counted MACs. Returns ``{"total",
    "per_module", "dynamic", "flop_counter", "crosscheck_rel_diff", "calibration", "uncounted_ops",
    "notes"}``, every count in :data:`MAC_UNIT`.
    """
    size = _input_chw(input_size)
    device = _device_of(model)
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device)
    form, note = inference_copy(model)
    notes = [note] if note else []
    batches, calib_desc, dyn = [x], None, {}
    if dynamic_layers(model) or _data_dependent(model):
        if calibration is None:
            gen = torch.Generator().manual_seed(0)
            calibration = torch.randn(32, *size, generator=gen).to(device)
            calib_desc = "32 random N(0, 1) images (no data given)"
        batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
        if calib_desc is None:
            calib_desc = f"{sum(b.shape[0] for b in batches)} images from the given data"
        dyn = describe_layers(model, batches)
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
    for name, d in dyn.items():
        d["macs"] = per.get(name, 0.0)  # counted on the inference form, per image
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
