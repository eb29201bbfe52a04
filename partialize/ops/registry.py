"""Operator registry: maps the names used in recipes (``pconv``, ``patconv``...) to classes.

Users add their own with ``@register_operator("name")``; a registered class must provide
``from_module(original, **params)`` and ``deploy()``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import RecipeError

_OPERATORS: dict[str, type[nn.Module]] = {}


def register_operator(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering an operator under ``name`` for use in recipes."""

    def wrap(cls: type) -> type:
        if not callable(getattr(cls, "from_module", None)):
            raise TypeError(f"operator {cls.__name__} needs a classmethod from_module(original, **params)")
        if name in _OPERATORS and _OPERATORS[name] is not cls and not overwrite:
            raise ValueError(
                f"operator name {name!r} is already registered to {_OPERATORS[name].__name__}; "
                "pass overwrite=True to replace it"
            )
        _OPERATORS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def get_operator(name: str) -> type[nn.Module]:
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
    """True for instances of any registered operator (the tracer keeps them as leaves)."""
    return isinstance(module, tuple(_OPERATORS.values())) or getattr(module, "_partialize_leaf", False)
