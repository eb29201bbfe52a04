"""Errors a user can cause. Each names what went wrong and how to fix it; the CLI prints
them without a traceback and exits non-zero."""

from __future__ import annotations


class PartializeError(Exception):
    """Base class of every error partialize raises for bad input."""

    exit_code = 2


class OperatorError(PartializeError):
    """A layer cannot be represented by the requested operator (with the reason)."""


class RecipeError(PartializeError):
    """A recipe file is malformed, names an unknown field/variant, or a rule matches nothing."""


class ModelError(PartializeError):
    """An unknown model name or a factory that cannot be imported or called."""


class WeightsUnavailableError(PartializeError):
    """Pretrained weights were requested but cannot be had (offline, none published)."""


class CheckpointError(PartializeError):
    """A checkpoint is corrupt, truncated, from an unknown format, or does not match its plan."""


class ExportError(PartializeError):
    """A model cannot be exported the way that was asked (an exporter that cannot express an operator)."""


class TrainingError(PartializeError):
    """Training cannot go on: a setting it cannot use, a non-finite loss, a target no layer can reach
    (raised by the trainer and by operators' training objectives)."""
