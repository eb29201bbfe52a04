"""partialize: convert vision networks to partial-channel form, fine-tune them, report the change.

Importing the package registers the operators and the native PartialNet models with timm; nothing
else happens at import time.

The package is layered; a module imports only from its own layer and those below it (enforced by
tests/test_architecture.py; docs/architecture.md says what each does):

1. ``errors``, ``macs`` (the one MAC counter), ``_fs``, ``_version``, ``_modes`` (training modes put
   back exactly), ``datasets`` (digits made harder)
2. ``ops`` (the operators and their contract, ``ops.base.PartialOperator``)
3. ``models`` (native PartialNet), ``recipe`` (schema, loading, rule resolution)
4. ``base_model`` (build the model a conversion starts from)
5. ``engine`` (discover, plan, apply)
6. ``inference`` (deploy: operators' inference forms, BN folding)
7. ``serialization`` (save / load: plan + tensors)
8. ``exporting`` (ONNX, TorchScript, deployed safetensors)
9. ``measure`` (MACs, speed, accuracy, reports)
10. ``train``, ``calibration`` (keeping what the model knew), ``recipe_search`` (``partialize.search``)
11. ``api`` (plan, apply, convert)
12. ``cli`` (parses and prints), this package
"""

from __future__ import annotations

from . import models  # noqa: F401  (registers the native models with timm)
from ._version import __version__
from .api import ConversionResult, apply, convert, plan, scan
from .calibration import calibrate, fidelity
from .errors import (
    CheckpointError,
    ExportError,
    ModelError,
    OperatorError,
    PartializeError,
    RecipeError,
    WeightsUnavailableError,
)
from .exporting import export
from .inference import deploy
from .measure.allocator import reuse_freed_memory
from .ops import PartialOperator, get_operator, list_operators, register_operator
from .recipe_search import search
from .serialization import load, save, trusting_factories

__all__ = [
    "ConversionResult",
    "ExportError",
    "PartialOperator",
    "apply",
    "calibrate",
    "convert",
    "deploy",
    "export",
    "fidelity",
    "load",
    "plan",
    "reuse_freed_memory",
    "save",
    "scan",
    "search",
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
    "trusting_factories",
]
