"""partialize: convert vision networks to partial-channel form, fine-tune them, report the change.

Importing the package registers the operators (and, once available, the native PartialNet models
with timm); nothing else happens at import time.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the native models with timm)
from .api import apply, plan  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ModelError,
    OperatorError,
    PartializeError,
    RecipeError,
    WeightsUnavailableError,
)
from .exporting import export  # noqa: E402
from .inference import deploy  # noqa: E402
from .ops import get_operator, list_operators, register_operator  # noqa: E402
from .serialization import load, save  # noqa: E402

__all__ = [
    "apply",
    "deploy",
    "export",
    "load",
    "plan",
    "save",
    "CheckpointError",
    "ModelError",
    "OperatorError",
    "PartializeError",
    "RecipeError",
    "WeightsUnavailableError",
    "__version__",
    "get_operator",
    "list_operators",
    "register_operator",
]
