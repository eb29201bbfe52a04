"""Operator registry: maps the names used in recipes (``pconv``, ``patconv``...) to classes.

Users add their own with ``@register_operator("name")`` on a subclass of
:class:`~partialize.ops.base.PartialOperator` (the contract, documented there and in
docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import RecipeError
from .base import InferenceForm, PartialOperator

_OPERATORS: dict[str, type[PartialOperator]] = {}


def register_operator(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering an operator under ``name`` for use in recipes."""

    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, PartialOperator)):
            raise TypeError(
                f"operator {getattr(cls, '__name__', cls)!r} must subclass partialize.ops.PartialOperator "
                "(the operator contract: from_module, deploy, macs, ...; see docs/architecture.md)"
            )
        if cls.from_module.__func__ is PartialOperator.from_module.__func__:
            # the base's from_module only raises: every layer would become a skip naming no mistake
            raise TypeError(f"operator {cls.__name__!r} must implement from_module (the one required method)")
        if name in _OPERATORS and _OPERATORS[name] is not cls and not overwrite:
            raise ValueError(
                f"operator name {name!r} is already registered to {_OPERATORS[name].__name__}; "
                "pass overwrite=True to replace it"
            )
        _OPERATORS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def unregister_operator(name: str) -> None:
    """Remove ``name`` from the registry (tests, or replacing an operator at run time)."""
    _OPERATORS.pop(name, None)


def get_operator(name: str) -> type[PartialOperator]:
    """Return the operator class registered under ``name`` or raise a RecipeError naming the known ones."""
    try:
        return _OPERATORS[name]
    except KeyError:
        known = ", ".join(sorted(_OPERATORS))
        raise RecipeError(f"unknown variant {name!r}; known variants: {known}") from None


def list_operators() -> list[str]:
    """Names of every registered operator, sorted."""
    return sorted(_OPERATORS)


def is_partial_op(module: nn.Module) -> bool:
    """True for partialize operators and their inference forms (the tracer keeps them as leaves)."""
    return isinstance(module, (PartialOperator, InferenceForm))


def is_partial_layer(module: nn.Module) -> bool:
    """A partialize operator, or a module some registered operator recognises as already partial
    (timm FasterNet's ``Partial_conv3``): the planner leaves what is inside it alone."""
    return is_partial_op(module) or any(cls.recognizes(module) for cls in _OPERATORS.values())


def operators_in(model: nn.Module) -> dict[str, PartialOperator]:
    """Qualified name -> every partialize operator in ``model`` (nested ones included)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PartialOperator)}
