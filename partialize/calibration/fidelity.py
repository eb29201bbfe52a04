"""How close a converted model is to its original on unlabelled images: top-1 agreement, KL to the
original's softened outputs, and the relative feature error after every converted layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import in_mode
from ..inference import eval_reference
from ..ops.registry import operators_in
from .steps import blocks_of


@dataclass
class Fidelity:
    """``agreement``: % of images where both models give the same top-1 class; ``kl``: mean
    KL(original || converted) of the outputs softened at ``temperature``; ``layers``: relative error
    ||y - y_orig|| / ||y_orig|| of each compared module's output (by default the blocks holding
    converted layers), over all images."""

    images: int
    agreement: float
    kl: float
    temperature: float
    layers: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def fidelity(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    layers: list[str] | None = None,
    *,
    temperature: float = 4.0,
    batch_size: int = 64,
) -> Fidelity:
    """Compare ``model`` with ``reference`` (the original, or a function-identical permutation of it) on
    ``images`` in eval mode. ``layers``: names present in both whose outputs are compared (default: the
    blocks holding converted layers, i.e. each converted layer's parent: a partial layer's own output
    differs from the original's by design, in the channels it hands to something cheap; the block's
    output is what the rest of the network sees). ``model`` is compared in the form ``deploy`` computes
    (``eval_reference``: hard routing for an Ada-PConv trained with soft mixing), not its eval form."""
    if layers is None:
        plan = getattr(model, "_partialize_plan", None)
        layers = blocks_of(model, [e.layer for e in plan.converted_outermost]) if plan is not None else []
    if operators_in(model):
        model = eval_reference(model)
    sums = {n: [0.0, 0.0] for n in layers}  # squared error, squared reference norm
    caught: dict[str, dict[str, torch.Tensor]] = {"model": {}, "reference": {}}
    hooks = []
    for tag, net in (("model", model), ("reference", reference)):
        modules = dict(net.named_modules())
        for n in layers:
            if n in modules:

                def hook(_m, _a, out, n=n, tag=tag):
                    caught[tag][n] = _logits(out).detach().float().clone()

                hooks.append(modules[n].register_forward_hook(hook))
    agree = seen = 0
    kl = 0.0
    try:
        with in_mode(model), in_mode(reference):  # each module back in its own mode after
            for i in range(0, images.shape[0], batch_size):
                x = images[i : i + batch_size]
                y, r = _logits(model(x)).float(), _logits(reference(x)).float()
                agree += int((y.argmax(1) == r.argmax(1)).sum())
                seen += x.shape[0]
                logp, logq = F.log_softmax(y / temperature, 1), F.log_softmax(r / temperature, 1)
                kl += float(F.kl_div(logp, logq, log_target=True, reduction="sum"))
                for n in layers:
                    a, b = caught["model"].get(n), caught["reference"].get(n)
                    if a is not None and b is not None and a.shape == b.shape:
                        sums[n][0] += float((a - b).square().sum())
                        sums[n][1] += float(b.square().sum())
                caught["model"].clear()
                caught["reference"].clear()
    finally:
        for h in hooks:
            h.remove()
    per_layer = {n: (e / max(ref, 1e-12)) ** 0.5 for n, (e, ref) in sums.items() if ref > 0}
    return Fidelity(seen, 100.0 * agree / max(1, seen), kl / max(1, seen), temperature, per_layer)
