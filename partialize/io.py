"""Save and load converted models: the plan (JSON, with the recipe) plus tensors, in one
safetensors file. Loading rebuilds the base model and replays the plan; nothing is unpickled."""

from __future__ import annotations

import json
import os
import tempfile

from torch import nn

from . import __version__
from .errors import CheckpointError, PartializeError

FORMAT = "partialize/1"


def save(model: nn.Module, path: str | os.PathLike) -> str:
    """Write ``model`` (made by ``partialize.apply``) to ``path`` (.safetensors), atomically."""
    from safetensors.torch import save_model

    plan = getattr(model, "_partialize_plan", None)
    if plan is None:
        raise PartializeError("this model was not made by partialize.apply (it has no plan to save)")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        path += ".safetensors"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {"format": FORMAT, "partialize_version": __version__, "plan": plan.to_json(indent=None)}
    fd, tmp = tempfile.mkstemp(
        prefix=".partialize-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path))
    )
    os.close(fd)
    try:
        save_model(model, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_plan(path: str | os.PathLike):
    """The Plan stored in a checkpoint (CheckpointError if unreadable or of an unknown format)."""
    from safetensors import safe_open

    from .engine.plan import Plan

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
    if fmt != FORMAT:
        raise CheckpointError(
            f"{path!r} has format {fmt!r}; this partialize ({__version__}) reads {FORMAT!r}"
            + (" (written by a newer partialize? upgrade)" if fmt and fmt.startswith("partialize/") else "")
        )
    try:
        return Plan.from_dict(json.loads(meta["plan"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path!r}: the stored plan is unreadable: {e}") from None


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted model: base model (from the plan's spec, or ``model``) + plan + tensors."""
    from safetensors.torch import load_model

    from .engine.apply import apply_plan
    from .zoo import build_model

    plan = read_plan(path)
    if model is None:
        spec = plan.model
        if not spec:
            raise CheckpointError(
                f"{os.fspath(path)!r} does not say how to build its base model; pass it: "
                "partialize.load(path, model=YourModel())"
            )
        model = build_model(spec["spec"], weights="random", **spec.get("kwargs", {}))
    converted = apply_plan(model, plan, inplace=True, check=False)
    try:
        missing, unexpected = load_model(converted, os.fspath(path), strict=False)
    except Exception as e:
        raise CheckpointError(f"cannot load tensors from {os.fspath(path)!r}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {os.fspath(path)!r} do not match the replayed plan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return converted
