"""Save and load converted models: the plan (JSON, with the recipe) plus tensors, in one
safetensors file. Loading rebuilds the base model and replays the plan; nothing is unpickled.

Metadata: ``format`` (``partialize/1``; a higher number was written by a newer partialize and is
refused), ``partialize_version``, ``plan`` and ``deployed`` (``"true"``: the tensors are the trained
ones and ``load`` returns ``partialize.deploy`` of the replayed model; deployment is deterministic).
"""

from __future__ import annotations

import copy
import json
import os
import re

from torch import nn

from . import __version__
from .errors import CheckpointError, PartializeError

FORMAT = "partialize/1"
FORMAT_VERSION = 1


def save(model: nn.Module, path: str | os.PathLike, *, deployed: bool = False, overwrite: bool = False) -> str:
    """Write ``model`` (made by ``partialize.apply``) to ``path`` (.safetensors), atomically.

    ``deployed=True`` marks the file so that ``load`` returns the deployed (inference) form. A model
    returned by ``partialize.deploy`` cannot be saved (its structure is not replayable from the plan):
    save the trained model with ``deployed=True`` instead. ``overwrite=False`` refuses an existing file.
    """
    from safetensors.torch import save_model

    from .fsutil import atomic_write

    if getattr(model, "_partialize_deployed", False):
        raise PartializeError(
            "this is a deployed model (partialize.deploy output); save the trained model instead: "
            "partialize.save(trained, path, deployed=True) loads back as its deployed form"
        )
    plan = getattr(model, "_partialize_plan", None)
    if plan is None:
        raise PartializeError("this model was not made by partialize.apply (it has no plan to save)")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path += ".safetensors"
    meta = {
        "format": FORMAT,
        "partialize_version": __version__,
        "plan": plan.to_json(indent=None),
        "deployed": "true" if deployed else "false",
    }
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta), force=overwrite)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a partialize checkpoint; CheckpointError if missing, unreadable or of another
    (newer, unknown, non-partialize) format."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors checkpoint (truncated or corrupt?): {e}"
        ) from None
    fmt = meta.get("format")
    if fmt == FORMAT:
        return meta
    m = re.fullmatch(r"partialize/(\d+)", fmt or "")
    if m and int(m.group(1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} was written by a newer partialize (format {fmt!r}; partialize {__version__} reads "
            f"{FORMAT!r}): upgrade partialize to load it"
        )
    if fmt is None or "plan" not in meta:
        raise CheckpointError(
            f"{path!r} is a safetensors file but not a partialize checkpoint (no partialize format/plan "
            "metadata). Plain weights go in with `partialize convert MODEL --weights PATH`"
        )
    raise CheckpointError(f"{path!r} has an unknown format {fmt!r}; partialize {__version__} reads {FORMAT!r}")


def read_plan(path: str | os.PathLike):
    """The Plan stored in a checkpoint (CheckpointError if unreadable or of an unknown format)."""
    from .engine.plan import Plan

    meta = read_metadata(path)
    try:
        return Plan.from_dict(json.loads(meta["plan"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{os.fspath(path)!r}: the stored plan is unreadable: {e}") from None


def _check_spec(spec: str, kwargs: dict, path, trust_factory: bool) -> None:
    """Refuse to import/call code named by a file unless the user trusts it."""
    if not isinstance(spec, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{os.fspath(path)!r}: malformed model spec in the plan")
    bad = {k: v for k, v in kwargs.items() if not isinstance(v, (int, float, str, bool, type(None)))}
    if bad:
        raise CheckpointError(f"{os.fspath(path)!r}: model kwargs must be plain values, got {sorted(bad)}")
    if ":" in spec and not spec.startswith("torchvision:") and not trust_factory:
        raise CheckpointError(
            f"{os.fspath(path)!r} asks to build its base model with the factory {spec!r}, which would import "
            "and run code named by the file. Pass the base model yourself (partialize.load(path, "
            "model=...)) or trust_factory=True if you trust this file"
        )


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    deployed: bool | None = None,
    trust_factory: bool = False,
) -> nn.Module:
    """Rebuild a converted model: base model (from the plan's spec, or a copy of ``model``) + plan + tensors.

    ``deployed``: None follows the file (``partialize export --format safetensors`` marks it); True
    returns ``partialize.deploy`` of the loaded model, False the trained form. A file can only name
    a timm or ``torchvision:`` model to build; a ``package.module:factory`` base would import and call
    code named by the file, so it needs ``model=`` or ``trust_factory=True``.
    """
    from safetensors.torch import load_model

    from .engine.apply import apply_plan
    from .zoo import build_model

    meta = read_metadata(path)
    plan = read_plan(path)
    if model is None:
        spec = plan.model
        if not spec:
            raise CheckpointError(
                f"{os.fspath(path)!r} does not say how to build its base model; pass it: "
                "partialize.load(path, model=YourModel())"
            )
        kwargs = spec.get("kwargs") or {}
        _check_spec(spec["spec"], kwargs, path, trust_factory)
        model = build_model(spec["spec"], weights="random", **kwargs)
    else:
        model = copy.deepcopy(model)  # the caller's model stays untouched
    converted = apply_plan(model, plan, inplace=True, check=False)
    try:
        missing, unexpected = load_model(converted, os.fspath(path), strict=False)
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise CheckpointError(
                f"weights in {os.fspath(path)!r} do not match the replayed plan (tensor shapes differ): {str(e)[:400]}"
            ) from None
        raise CheckpointError(f"cannot load tensors from {os.fspath(path)!r} (truncated or corrupt?): {e}") from None
    except Exception as e:
        raise CheckpointError(f"cannot load tensors from {os.fspath(path)!r} (truncated or corrupt?): {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {os.fspath(path)!r} do not match the replayed plan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if deployed is None:
        deployed = meta.get("deployed") == "true"
    if deployed:
        from .deployment import deploy

        return deploy(converted)
    return converted
