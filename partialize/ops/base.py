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
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import OperatorError
from ..macs import count_macs
from ._export import RefuseScript


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

    def convertible_children(self) -> tuple[str, ...]:
        """Names of children this operator kept unchanged from the original: a recipe may convert them
        too (a 3x3 conv inside a partial residual block). Empty: the operator is converted whole."""
        return ()

    # --- inference ----------------------------------------------------------------------------
    def deploy(self) -> nn.Module:
        """The inference form: eval mode, frozen; default an eval copy of this module."""
        return copy.deepcopy(self).eval().requires_grad_(False)

    def reference(self) -> nn.Module:
        """What ``deploy()`` must equal (tests and ``partialize export`` check it): default the eval
        copy; an operator whose training function is a relaxation of the deployed one (Ada-PConv's
        soft routing) returns the deployed function's reference instead."""
        return copy.deepcopy(self).eval()

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
