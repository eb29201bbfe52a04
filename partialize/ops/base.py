"""The operator contract: what every partial operator, built-in or a user's, implements.

The engine finds, plans and swaps; deploy, export, training and measurement call these methods and
never name an operator class. A user's operator subclasses :class:`PartialOperator`, is registered
with ``@register_operator("name")`` and then works in recipes, plans, deploy, export, reports and
the trainer, and is run through the same contract tests as the built-in ones (docs/architecture.md).

Two kinds of module live here:

- :class:`PartialOperator`: the trainable form a layer is converted to (``from_module``), with its
  inference form (``deploy``), its MAC count, and the hooks the trainer and the calibrator call.
- :class:`InferenceForm`: an operator's deployed form when it is a different class (PConv + BN folded,
  PATConv with its gate folded...); it can absorb a following BatchNorm (``fold_bn``).

And the training side of the contract (``partialize.train`` calls only these):

- :class:`TrainingSetting`: one setting an operator family's training reads, declared in the class's
  ``training_settings`` (a key of ``finetune(**settings)`` and a CLI option), with its check.
- :class:`TrainingObjective`: one operator family's part of a training run (000 eq. 8 for DPConv, the
  router budget for Ada-PConv), built by :meth:`PartialOperator.training_objective`.
- :class:`TrainingContext`: what the trainer tells an objective about the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import OperatorError, PartializeError, TrainingError  # noqa: F401  (TrainingError: re-exported)
from ..macs import count_macs
from ._export import RefuseScript
from ._utils import clone_module


@dataclass(frozen=True)
class TrainingSetting:
    """One setting an operator family's training objective reads (``PartialOperator.training_settings``).

    It is a key of ``finetune(**settings)`` and, when ``flag`` is set, a CLI option of ``partialize
    finetune``/``train`` (``value_type``, ``choices``, ``help``); messages name it by ``label`` (default: the
    flag). ``check(value) -> bool`` on values other than None, with ``must_be`` (what a valid value is)
    and ``fix`` for the error. ``needs_layers``: giving it for a model without this operator is an error
    (a target nothing could reach).
    """

    default: Any = None
    help: str = ""
    check: Callable[[Any], bool] | None = None
    must_be: str = ""
    fix: str = ""
    flag: str | None = None
    label: str | None = None
    value_type: type = float
    choices: tuple[str, ...] | None = None
    needs_layers: bool = False

    def name(self, key: str) -> str:
        """How an error message names this setting: ``--flag (key=)``, both spellings a user may have typed."""
        shown = self.label or self.flag
        return f"{shown} ({key}=)" if shown else key


@dataclass
class TrainingContext:
    """What the trainer tells an operator family's objective about the run.

    ``model``: the model being trained (not DDP-wrapped); ``epochs``: the run's length; ``input_size``:
    the training resolution when known; ``log``: prints a line (rank 0); ``count_macs()``: the whole
    model's per-image MACs in its inference form at ``input_size`` (``partialize.measure.flops
    .macs_breakdown``: ``total`` and, per describing operator, ``dynamic[name]`` with its ``input_hw``),
    for objectives with a compute target; it raises when ``input_size`` is unknown.
    """

    model: nn.Module
    epochs: int
    input_size: int | tuple[int, ...] | None
    log: Callable[[str], None]
    count_macs: Callable[[], dict]


class TrainingObjective:
    """One operator family's part of a training run, over ``layers`` (qualified name -> operator).

    The trainer calls, in this order: ``run_settings()`` once (recorded in every checkpoint: a resume
    must match them); ``epoch_start(epoch, total_epochs)`` before each epoch (``epoch`` from 1);
    ``__call__(loss)`` after each forward; ``epoch_record()`` and ``epoch_summary(record)`` at the end of
    each epoch; ``close()`` when training ends, however it ends.

    This base class is the default objective: each layer's ``training_losses()`` added to the loss.
    """

    def __init__(self, layers: Mapping[str, PartialOperator]) -> None:
        self.layers = dict(layers)

    def run_settings(self) -> dict[str, Any]:
        """The values that shape the run (e.g. the resolved target); JSON-friendly."""
        return {}

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Before epoch ``epoch`` of ``total_epochs`` (from 1): routing, temperatures."""

    def __call__(self, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` is the task loss (with distillation, as earlier families left it). Return it, reweighted
        where the family's objective scales the task loss (000 eq. 8) or unchanged, and the named terms to
        add to it (the trainer adds every family's terms after all have reweighted)."""
        terms = {}
        for name, op in self.layers.items():
            for key, value in op.training_losses().items():
                terms[f"{name}.{key}"] = value
        return loss, terms

    def epoch_record(self) -> dict[str, Any]:
        """What the epoch's log record says for this family (JSON-friendly)."""
        return {}

    def epoch_summary(self, record: Mapping[str, Any]) -> str | None:
        """A short phrase for the epoch's one-line summary, read from ``record``; None for nothing."""
        return None

    def close(self) -> None:
        """Training ended: remove hooks, let go of tensors."""


class InferenceForm(RefuseScript, nn.Module):
    """A deployed (eval-only, frozen) form of an operator.

    ``fold_bn(bn)`` returns a module computing ``bn(self(x))`` with the BN absorbed, or None when it
    cannot; BN folding (``partialize.deploy``) calls it for a BN that reads only this module's output.
    """

    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module | None:
        return None


class PartialOperator(RefuseScript, nn.Module):
    """Base class of every partial operator (see the module docstring).

    Class attributes a subclass sets:

    - ``ratio_words``: the ratio words (``dynamic``, ``adaptive``, ``inherit``) a recipe may give this
      operator, each mapped to ``(variant that implements it, parameters it implies)``; a word not
      listed is a recipe error for this operator.
    - ``PARAM_CHOICES``: allowed values of enumerated ``from_module`` parameters (checked when a recipe
      is validated); ``EXTRA_PARAMS``: names accepted through ``**params`` beyond the signatures.
    - ``data_dependent``: True when the cost depends on the input (counted over calibration data).
    - ``training_settings``: the settings this family's :meth:`training_objective` reads (name ->
      :class:`TrainingSetting`); the trainer checks them and fills in defaults.
    - ``faithful_params`` and :meth:`faithful_original`: the setting at which the converted layer
      must equal the original (the contract tests check it on every class the operator accepts in
      real models): ``from_module(faithful_original(m) or m, **faithful_params)`` equals
      ``faithful_original(m) or m``. "Keeps everything" parameters (all heads, all channels) where they
      exist; otherwise an original whose cheap channels already do the cheap thing (identity channels
      for a partial conv) and, for what the operator adds, an identity initialisation.
    """

    registry_name: ClassVar[str] = ""
    ratio_words: ClassVar[Mapping[str, tuple[str, dict]]] = {}
    PARAM_CHOICES: ClassVar[Mapping[str, tuple]] = {}
    EXTRA_PARAMS: ClassVar[tuple[str, ...]] = ()
    data_dependent: ClassVar[bool] = False
    faithful_params: ClassVar[dict[str, Any] | None] = None
    training_settings: ClassVar[Mapping[str, TrainingSetting]] = {}

    # --- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_module(cls, original: nn.Module, ratio: float | str | None = None, **params) -> PartialOperator:
        """Build the operator from ``original`` with its weights, or raise OperatorError with the reason
        (the engine turns it into a skip)."""
        raise NotImplementedError(f"{cls.__name__} must implement from_module")

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether ``from_module(module)`` succeeds with the default parameters (discovery, ``scan``)."""
        try:
            with torch.random.fork_rng(devices=[]):
                cls.from_module(module)
        except OperatorError:
            return False
        return True

    @classmethod
    def recognizes(cls, module: nn.Module) -> bool:
        """True for a module that already is this kind of partial layer without being an instance of
        it (timm FasterNet's ``Partial_conv3`` for PConv): the planner leaves its insides alone."""
        return False

    @classmethod
    def faithful_original(cls, module: nn.Module) -> nn.Module | None:
        """A copy of ``module`` that this operator represents exactly (what the cheap part computes is
        already what those channels do), or None when ``faithful_params`` applies instead. The
        contract tests convert it and require equality."""
        return None

    @classmethod
    def data_params(cls, original: nn.Module, calls: list, params: Mapping[str, Any]) -> dict[str, Any]:
        """Parameters chosen from calibration data for converting ``original`` (``calls``: its
        ``(args, kwargs)`` on the calibration images; ``params``: what the recipe gave). Calibration's
        choice step merges them into the plan entry and converts again. Default: none."""
        return {}

    def convertible_children(self) -> tuple[str, ...]:
        """Names of children this operator kept unchanged from the original: a recipe may convert them
        too (a 3x3 conv inside a partial residual block). Empty: the operator is converted whole."""
        return ()

    # --- inference ----------------------------------------------------------------------------
    def deploy(self) -> nn.Module:
        """The inference form: eval mode, frozen; default an eval copy of this module."""
        return clone_module(self).eval().requires_grad_(False)

    def reference(self) -> nn.Module:
        """What ``deploy()`` must equal (tests and ``partialize export`` check it): default the eval
        copy; an operator whose training function is a relaxation of the deployed one (Ada-PConv's
        soft routing) returns the deployed function's reference instead."""
        return clone_module(self).eval()

    def macs(self, *args, **kwargs) -> tuple[int, str]:
        """(MACs of the inference form for this call, basis). Default: ``partialize.macs`` on
        ``deploy()``; a data-dependent operator gives a bound and says so."""
        form = self.deploy()
        return count_macs(form, *args, **kwargs).total, "inference form"

    def params(self) -> int:
        """Parameters of the inference form."""
        return sum(p.numel() for p in self.deploy().parameters())

    def fold_bn(self, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module | None:
        """A module computing ``bn(self(x))`` with the BN absorbed, or None (see InferenceForm)."""
        return None

    def export_note(self) -> str | None:
        """One line on what an exported graph of this operator does differently (cost), or None."""
        return None

    def describe(self) -> dict:
        """What a report says about this layer beyond params and MACs (a learned width, a routing
        histogram); empty for static operators."""
        return {}

    # --- training -----------------------------------------------------------------------------
    def structure_parameters(self) -> list[nn.Parameter]:
        """Parameters that choose the structure (DPConv gates): the trainer gives them their own
        optimizer group (no weight decay, their own learning-rate scale)."""
        return []

    def training_losses(self) -> dict[str, torch.Tensor]:
        """Named regularisers of this layer the trainer adds to the loss (after weighting)."""
        return {}

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. projecting learned gates back onto their constraint)."""

    def after_epoch(self, epoch: int, total_epochs: int) -> None:
        """Called after every training epoch, ``epoch`` counted from 1 (e.g. temperature annealing)."""

    def set_routing(self, routing: str) -> str | None:
        """Input-adaptive operators: route with ``routing`` from now on (``"hard"`` is the deployed
        routing, the trainer's choice otherwise) and return the previous routing; None (and no
        change) for operators that do not route."""
        return None

    def freeze(self) -> nn.Module:
        """The static form of a learned structure (a DPConv at its learned width); the module itself
        when nothing is learned. Still trainable: fine-tuning may go on after freezing."""
        return self

    @classmethod
    def training_objective(
        cls, layers: Mapping[str, PartialOperator], settings: Mapping[str, Any], context: TrainingContext
    ) -> TrainingObjective:
        """This family's part of a training run: ``layers`` are the model's operators that inherit this
        method from ``cls`` (a subclass joins its parent's family unless it overrides it), ``settings``
        every declared training setting's value (defaults filled in). Default: each layer's
        ``training_losses()`` added to the loss. Raise :class:`TrainingError` for settings this model
        cannot honour."""
        return TrainingObjective(layers)
