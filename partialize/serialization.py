"""Save and load converted models: the plan (JSON, with the recipe) plus tensors, in one
safetensors file. Loading rebuilds the base model and replays the plan; nothing is unpickled.

Metadata: ``format`` (``partialize/1``; a higher number was written by a newer partialize and is
refused), ``partialize_version``, ``plan``, ``deployed`` (``"true"``: the tensors are the trained
ones and ``load`` returns ``partialize.deploy`` of the replayed model; deployment is deterministic)
and ``probe``: the saved model's eval output on a seeded random input of the plan's shape. ``load``
runs the rebuilt model on the same input and refuses a file whose rebuilt model computes something
else: a plan names its base model by architecture and ``num_classes`` only, and a timm model built
with other arguments (``act_layer``, ``global_pool``, ``output_stride``) has the same layers and
tensors but another function.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn

from ._fs import atomic_write
from ._modes import in_mode
from ._version import __version__
from .base_model import build_model
from .engine.apply import apply_plan
from .engine.plan import Plan
from .errors import CheckpointError, PartializeError
from .inference import deploy

FORMAT = "partialize/1"
FORMAT_VERSION = 1

_TRUST_FACTORY: contextvars.ContextVar[bool] = contextvars.ContextVar("partialize_trust_factory", default=False)


@contextlib.contextmanager
def trusting_factories(trust: bool = True) -> Iterator[None]:
    """Within the block, ``load`` (and what calls it, e.g. ``export``) may build a base model from the
    ``package.module:factory`` a file names, as with ``trust_factory=True`` (the CLI's --trust-factory)."""
    token = _TRUST_FACTORY.set(trust)
    try:
        yield
    finally:
        _TRUST_FACTORY.reset(token)


def save(model: nn.Module, path: str | os.PathLike, *, deployed: bool = False, overwrite: bool = False) -> str:
    """Write ``model`` (made by ``partialize.apply``) to ``path`` (.safetensors), atomically.

    ``deployed=True`` marks the file so that ``load`` returns the deployed (inference) form. A model
    returned by ``partialize.deploy`` cannot be saved (its structure is not replayable from the plan):
    save the trained model with ``deployed=True`` instead. ``overwrite=False`` refuses an existing file.
    """
    from safetensors.torch import save_model

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
    routing = _routing_of(model)
    if routing:
        meta["routing"] = json.dumps(routing)
    probe = _probe(model, plan)
    if probe is not None:
        meta["probe"] = json.dumps({"seed": PROBE_SEED, "device": probe[1], "values": probe[0].tolist()})
    return atomic_write(path, lambda tmp: save_model(model, tmp, metadata=meta), force=overwrite)


PROBE_SEED = 20261204
PROBE_VALUES = 1024  # the first values of the flattened outputs are stored


def _probe(model: nn.Module, plan) -> tuple[torch.Tensor, str] | None:
    """(the first output values of ``model`` in eval mode on a seeded N(0, 1) input of the plan's shape,
    the device it ran on); None when the plan has no input shape or the output holds no tensor."""
    shape = tuple(getattr(plan, "input_shape", None) or ())
    if not shape:
        return None
    p = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    if p is not None:
        x = x.to(p.device, p.dtype)
    try:
        with in_mode(model), torch.no_grad():
            out = model(x)
    except Exception:  # a model that needs other inputs than one image batch: not probed
        return None
    flat = [t.detach().flatten().float().cpu() for t in _tensors(out)]
    if not flat:
        return None
    return torch.cat(flat)[:PROBE_VALUES], str(x.device)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _verify_probe(model: nn.Module, meta: dict, plan, path, own_base: bool) -> None:
    """Refuse a rebuilt model whose output on the stored probe input differs from the saved model's
    (relative to the output's largest magnitude: above 1e-3 for a file saved on CPU, 1e-2 on CUDA,
    whose convs may run in TF32)."""
    if "probe" not in meta:
        return  # written before probes were stored
    try:
        stored = json.loads(meta["probe"])
        want = torch.tensor(stored["values"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{os.fspath(path)!r}: the stored probe is unreadable") from None
    got = _probe(model, plan)
    if got is None or got[0].numel() != want.numel():
        err = float("inf")
    elif not torch.equal(torch.isfinite(got[0]), torch.isfinite(want)):
        err = float("inf")  # NaN / inf where the saved model had none, or the other way round
    else:
        ok = torch.isfinite(want)  # a saved model may give NaN or inf in places: compared as positions
        diff = (got[0][ok] - want[ok]).abs().max() if ok.any() else torch.tensor(0.0)
        err = float(diff / (want[ok].abs().max() if ok.any() else torch.tensor(1.0)).clamp_min(1e-12))
    tol = 1e-2 if str(stored.get("device", "cpu")).startswith("cuda") else 1e-3
    if err <= tol:
        return
    spec = plan.model or {}
    if own_base:
        how = (
            f"the file names its base model as {spec.get('spec')!r} with {spec.get('kwargs') or {}}, but the model "
            "was probably built with other arguments that partialize does not record (e.g. timm's act_layer, "
            "global_pool, output_stride); pass it: partialize.load(path, model=timm.create_model(name, <your "
            "arguments>))"
        )
    else:
        how = "the given model is not the base model the file was converted from (same architecture and arguments)"
    raise CheckpointError(
        f"{os.fspath(path)!r}: the rebuilt model computes something other than the model that was saved "
        f"(relative difference {err:.3g} on the stored probe input, tolerance {tol:g}): {how}"
    )


def _routing_of(model: nn.Module) -> dict[str, list]:
    """layer -> [routing, trained_routing] of each routing operator (Ada-PConv): not tensors, so not in
    the state dict, and not the recipe's (a fine-tune sets them). Without them a loaded file routed
    as the recipe said (soft), not as it was trained and deployed."""
    return {
        n: [m.routing, m.trained_routing]
        for n, m in model.named_modules()
        if isinstance(getattr(m, "routing", None), str) and hasattr(m, "trained_routing")
    }


def _restore_routing(model: nn.Module, meta: dict, path) -> None:
    try:
        saved = json.loads(meta.get("routing") or "{}")
    except ValueError:
        raise CheckpointError(f"{os.fspath(path)!r}: the stored routing is unreadable") from None
    modules = dict(model.named_modules())
    for name, (routing, trained) in saved.items():
        m = modules.get(name)
        if m is None or not hasattr(m, "set_routing"):
            raise CheckpointError(f"{os.fspath(path)!r}: routing stored for {name!r}, which routes nothing here")
        m.set_routing(routing)
        m.trained_routing = trained


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
            "model=...)) or, if you trust this file, trust_factory=True (around other calls: with "
            "partialize.serialization.trusting_factories(): ...; CLI: --trust-factory)"
        )


def _shape_mismatches(model: nn.Module, path) -> list[tuple[str, tuple, tuple]]:
    """(name, shape in the file, shape in the model) for tensors both have with different shapes."""
    from safetensors import safe_open

    state = model.state_dict()
    out = []
    try:
        with safe_open(os.fspath(path), "pt") as f:
            for k in f.keys():
                if k in state:
                    shape = tuple(f.get_slice(k).get_shape())
                    if shape != tuple(state[k].shape):
                        out.append((k, shape, tuple(state[k].shape)))
    except Exception:  # unreadable: load_model reports it
        return []
    return out


def _load_tensors(model: nn.Module, path) -> tuple[list[str], list[str]]:
    """Load the file's tensors into ``model`` (missing, unexpected), as safetensors' ``load_model``
    does, with the state-dict versions of ``model``'s own modules attached: the tensors were saved
    from the same classes, and a module that reads the version (torchvision's MNASNet) refused a
    state dict without it. A name missing from the file because it shares its tensor with one the
    file has (tied weights, saved once) is not missing."""
    from safetensors.torch import load_file

    state = OrderedDict(load_file(os.fspath(path)))
    own = model.state_dict()
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(state, strict=False)
    where = lambda t: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))  # noqa: E731
    loaded = {where(own[k]) for k in state if k in own}
    return [k for k in missing if where(own[k]) not in loaded], list(unexpected)


def _base_hint(plan) -> str:
    spec = (plan.model or {}).get("spec")
    return f"this model (the file was converted from {spec!r})" if spec else "this model"


def _check_fits(model: nn.Module, plan, path) -> None:
    """Refuse a base model the plan was not made for: every converted layer must exist with its type."""
    modules = dict(model.named_modules())
    spec = (plan.model or {}).get("spec")
    fix = (
        f"pass the model the file was converted from ({spec!r}; e.g. partialize.base_model.build_model({spec!r}"
        + (f", **{plan.model.get('kwargs')}" if plan.model.get("kwargs") else "")
        + ")), or leave model= out to build it from the file"
        if spec
        else "pass the model the file was converted from"
    )
    missing = [e.layer for e in plan.converted if e.layer not in modules]
    if missing:
        raise CheckpointError(
            f"{os.fspath(path)!r} does not fit the given {type(model).__name__}: it has no layer(s) "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} that the plan converts; {fix}"
        )
    for e in plan.converted:
        want = (e.original or "").split("(")[0]
        have = type(modules[e.layer]).__name__
        if want and want != have:
            raise CheckpointError(
                f"{os.fspath(path)!r} does not fit the given {type(model).__name__}: layer {e.layer!r} is a {have}, "
                f"the plan converts a {e.original}; {fix}"
            )


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    deployed: bool | None = None,
    trust_factory: bool | None = None,
) -> nn.Module:
    """Rebuild a converted model: base model (from the plan's spec, or a copy of ``model``) + plan + tensors.

    ``deployed``: None follows the file (``partialize export --format safetensors`` marks it); True
    returns ``partialize.deploy`` of the loaded model, False the trained form. A file can only name
    a timm or ``torchvision:`` model to build; a ``package.module:factory`` base would import and call
    code named by the file, so it needs ``model=`` or ``trust_factory=True`` (None: as set by
    :func:`trusting_factories`, else False).
    """

    meta = read_metadata(path)
    plan = read_plan(path)
    if model is not None and not isinstance(model, nn.Module):
        raise CheckpointError(
            f"partialize.load({os.fspath(path)!r}, model=...): model= must be an nn.Module (the base model the "
            f"file was converted from), got {type(model).__name__}"
        )
    own_base = model is None  # built from the file's own spec: a mismatch is the file's fault
    if model is None:
        spec = plan.model
        if not spec:
            raise CheckpointError(
                f"{os.fspath(path)!r} does not say how to build its base model; pass it: "
                "partialize.load(path, model=YourModel())"
            )
        kwargs = spec.get("kwargs") or {}
        trust = _TRUST_FACTORY.get() if trust_factory is None else trust_factory
        _check_spec(spec["spec"], kwargs, path, trust)
        model = build_model(spec["spec"], weights="random", **kwargs)
    else:
        _check_fits(model, plan, path)
        model = copy.deepcopy(model)  # the caller's model stays untouched
    try:
        converted = apply_plan(model, plan, inplace=True, check=False)
    except PartializeError as e:
        raise CheckpointError(
            f"{os.fspath(path)!r}: the stored plan does not replay on {_base_hint(plan)}: {e}"
        ) from None
    differ = _shape_mismatches(converted, path)
    if differ:
        shapes = "; ".join(f"{k}: {list(a)} in the file, {list(b)} in the model" for k, a, b in differ[:3])
        shapes += " ..." if len(differ) > 3 else ""
        if own_base:  # the file's plan, replayed on the base it names, does not give its own tensors
            spec = plan.model or {}
            raise CheckpointError(
                f"weights in {os.fspath(path)!r} do not match the replayed plan stored in the same file ({shapes}). "
                f"The file names its base model as {spec.get('spec')!r} with {spec.get('kwargs') or {}}: a model built "
                "with other arguments (e.g. timm's img_size) gives other shapes; pass it: partialize.load(path, "
                "model=...). Otherwise the file is corrupt or was edited: convert the model again"
            )
        raise CheckpointError(
            f"weights in {os.fspath(path)!r} do not fit {_base_hint(plan)}: tensor shapes differ ({shapes}). "
            "Pass the base model the file was converted from (same architecture and num_classes)"
        )
    try:
        missing, unexpected = _load_tensors(converted, path)
    except RuntimeError as e:
        raise CheckpointError(f"cannot load tensors from {os.fspath(path)!r} (truncated or corrupt?): {e}") from None
    except Exception as e:
        raise CheckpointError(f"cannot load tensors from {os.fspath(path)!r} (truncated or corrupt?): {e}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {os.fspath(path)!r} do not match the replayed plan: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    _restore_routing(converted, meta, path)
    _verify_probe(converted, meta, plan, path, own_base)
    if deployed is None:
        deployed = meta.get("deployed") == "true"
    if deployed:
        return deploy(converted)
    return converted
