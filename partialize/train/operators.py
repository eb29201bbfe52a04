"""The trainer's side of the operator contract: everything training does to operators goes through the
methods of :class:`~partialize.ops.base.PartialOperator`, never an operator class.

- families: the model's operators grouped by the class whose ``training_objective`` they use, and
  those objectives built for a run;
- optimizer groups (``structure_parameters()`` apart, no weight decay);
- evaluation of the deployed function (``set_routing("hard")`` for the measurement, then restored);
- freezing learned structure (``freeze()``) and what was learned (``describe()``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._modes import in_mode
from ..errors import OperatorError
from ..ops.base import PartialOperator, TrainingContext, TrainingError, TrainingObjective
from ..ops.registry import get_operator, list_operators, operators_in
from .config import declared_settings


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _objective_owner(op: PartialOperator) -> type[PartialOperator]:
    """The class whose ``training_objective`` this operator uses (its family)."""
    return next(k for k in type(op).__mro__ if "training_objective" in vars(k))


def operator_families(model: nn.Module) -> dict[type[PartialOperator], dict[str, PartialOperator]]:
    """The model's operators (nested ones too) grouped by family, in the order they first appear."""
    families: dict[type[PartialOperator], dict[str, PartialOperator]] = {}
    for name, op in operators_in(_unwrap(model)).items():
        families.setdefault(_objective_owner(op), {})[name] = op
    return families


def check_targets(model: nn.Module, given: Mapping[str, Any]) -> None:
    """TrainingError for a ``needs_layers`` setting given for a model with no operator that reads it."""
    present = {type(op) for op in operators_in(_unwrap(model)).values()}
    for key, setting in declared_settings(present).items():
        if not setting.needs_layers or given.get(key) is None or any(key in c.training_settings for c in present):
            continue
        readers = [c for c in _registered() if key in c.training_settings]
        words = sorted({w for c in readers for w in c.ratio_words})
        names = ", ".join(repr(c.registry_name or c.__name__) for c in readers)
        how = f"convert with ratio={' or '.join(map(repr, words))}" if words else "convert to it"
        raise TrainingError(
            f"{setting.name(key)} was given but the model has no layer of the operator that reads it ({names}): "
            f"{how}, or leave it out"
        )


def _registered() -> list[type[PartialOperator]]:
    return [get_operator(n) for n in list_operators()]


def build_objectives(
    model: nn.Module, settings: Mapping[str, Any], context: TrainingContext
) -> list[TrainingObjective]:
    """Each family's ``training_objective`` for this run (families in the order they appear)."""
    return [owner.training_objective(layers, settings, context) for owner, layers in operator_families(model).items()]


def param_groups(model: nn.Module, weight_decay: float, gate_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay on weights (ndim > 1), none on biases/norms; the operators'
    ``structure_parameters()`` (DPConv gates) apart, without decay, at ``gate_lr_scale`` x lr."""
    structure = {id(p) for op in operators_in(_unwrap(model)).values() for p in op.structure_parameters()}
    decay, no_decay, gate = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (gate if id(p) in structure else decay if p.ndim > 1 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if gate:
        groups.append({"params": gate, "weight_decay": 0.0, "lr_scale": gate_lr_scale})
    return [g for g in groups if g["params"]]


def has_structure_parameters(model: nn.Module) -> bool:
    return any(op.structure_parameters() for op in operators_in(_unwrap(model)).values())


def set_routing(model: nn.Module, routing: str) -> dict[str, str]:
    """Every routing operator routes with ``routing`` (``"hard"``: the deployed routing); returns the
    previous routing of each, by name (operators that do not route are left out)."""
    before = {}
    for name, op in operators_in(_unwrap(model)).items():
        prev = op.set_routing(routing)
        if prev is not None:
            before[name] = prev
    return before


def restore_routing(model: nn.Module, before: Mapping[str, str]) -> None:
    """Undo :func:`set_routing` with what it returned."""
    ops = operators_in(_unwrap(model))
    for name, routing in before.items():
        ops[name].set_routing(routing)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool = False) -> dict:
    """Top-1 (%) and mean cross-entropy of the deployed function (every routing operator routes hard
    for the measurement, then gets its own routing back), and per data-dependent operator the summed
    ``histogram`` its ``describe()`` reports (Ada-PConv: branches chosen per image)."""
    counted = {n: op for n, op in operators_in(_unwrap(model)).items() if op.data_dependent}
    with in_mode(model):  # each module back in its own mode after (a frozen BN stays frozen)
        before = set_routing(model, "hard")
        hist: dict[str, list[int]] = {}
        correct = seen = 0
        loss_sum = 0.0
        try:
            for x, y in loader:
                if not y.numel():  # every image of the batch unreadable (train.data.collate_readable)
                    continue
                x, y = x.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    logits = model(x)
                loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                seen += y.numel()
                for n, op in counted.items():
                    h = op.describe().get("histogram")
                    if h is not None:
                        hist[n] = [a + b for a, b in zip(hist[n], h)] if n in hist else list(h)
        finally:
            restore_routing(model, before)
    return {
        "top1": 100.0 * correct / max(1, seen),
        "loss": loss_sum / max(1, seen),
        "images": seen,
        "branch_histogram": hist,
    }


def learned_ratios(model: nn.Module) -> dict[str, dict]:
    """What each operator with learned structure (``structure_parameters()``: DPConv's width) learned:
    its ``describe()`` (``width``, ``channels``, ``realised_ratio``), by name."""
    return {n: op.describe() for n, op in operators_in(_unwrap(model)).items() if op.structure_parameters()}


def freeze_dynamic(model: nn.Module) -> dict[str, dict]:
    """In place: every operator becomes its ``freeze()`` form (DPConv: the static slice at its learned
    width; Ada-PConv: hard routing); returns :func:`learned_ratios` as it was before.

    Every operator is asked first: when one refuses (DPConv gates that are not monotone), an
    OperatorError names every such layer and nothing is changed."""
    ratios = learned_ratios(model)
    swaps: dict[str, nn.Module] = {}
    refused: list[str] = []

    def visit(prefix: str, parent: nn.Module) -> None:
        for name, child in parent.named_children():
            qual = f"{prefix}{name}"
            if isinstance(child, PartialOperator):
                try:
                    frozen = child.freeze()
                except OperatorError as e:
                    refused.append(f"{qual!r}: {e}")
                    continue
                if frozen is not child:
                    swaps[qual] = frozen
                    continue
            visit(f"{qual}.", child)

    visit("", model)
    if refused:
        raise OperatorError("cannot freeze layer " + "; layer ".join(refused))
    for qual, frozen in swaps.items():
        parent_name, _, child = qual.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, frozen)
    return ratios
