"""Build a base model from a spec: a timm name, ``torchvision:NAME`` or ``package.module:factory``.

Weights: ``random`` (default, offline), ``pretrained`` (timm/torchvision download; a clear error
offline) or a local file path (a state_dict in safetensors or a tensors-only torch file).
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle

import torch
from torch import nn

from . import models  # noqa: F401  (registers partialnet_* with timm)
from ._modes import in_mode
from .errors import CheckpointError, ModelError, PartializeError, WeightsUnavailableError


def build_model(spec: str, weights: str = "random", num_classes: int | None = None, **kwargs) -> nn.Module:
    """Create the model named by ``spec`` with the requested weights (see module docstring)."""
    pretrained = weights == "pretrained"
    extra = dict(kwargs)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1], pretrained, extra)
    elif ":" in spec:
        model = _factory(spec, pretrained, extra)
    else:
        model = _timm(spec, pretrained, extra)
    if weights not in ("random", "pretrained"):
        load_state_file(model, weights)
    model._partialize_spec = {"spec": spec, "kwargs": extra}
    return model


def load_state_file(model: nn.Module, path: str) -> None:
    """Load a local state_dict file into ``model`` (safetensors, or torch with weights_only=True)."""
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(path, "pt") as f:
                fmt = (f.metadata() or {}).get("format", "")
            if fmt.startswith("partialize/"):
                raise CheckpointError(
                    f"{path!r} is a converted partialize model, not plain weights of the base model; use it "
                    "as it is (partialize report/export/finetune PATH, or partialize.load(PATH))"
                )
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
    except CheckpointError:
        raise
    except pickle.UnpicklingError:  # torch's text advises weights_only=False, which would run the file's code
        raise CheckpointError(
            f"cannot read weights from {path!r}: not a safetensors file nor a torch file of tensors only (partialize "
            "loads torch files with weights_only=True, so no code in the file runs). Save plain weights with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from None
    except Exception as e:  # corrupt / truncated / not a tensors-only file
        raise CheckpointError(f"cannot read weights from {path!r}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path!r} is not a state_dict (a mapping of names to tensors); save one with "
            "torch.save(model.state_dict(), path) or safetensors"
        )
    own = model.state_dict()
    differ = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if differ:
        shown = "; ".join(f"{k}: {list(a)} in the file, {list(b)} in the model" for k, a, b in differ[:3])
        classes = {a[0] for _, a, b in differ if len(a) == len(b) and a[1:] == b[1:]}
        if len(classes) == 1 and all(len(a) <= 2 for _, a, _ in differ):  # only the head's rows differ
            n = next(iter(classes))
            hint = f"; the file's classifier has {n} outputs: pass --num-classes {n} (num_classes={n})"
        else:
            hint = "; build the model the weights were saved from (same architecture and options)"
        raise CheckpointError(
            f"weights in {path!r} do not fit {type(model).__name__}: tensor shapes differ ({shown}){hint}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {path!r} do not match the model: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _offline_error(spec: str, e: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pretrained weights for {spec!r} could not be loaded ({type(e).__name__}: {e}). "
        "This machine may be offline: use --weights random, or --weights PATH to a local file."
    )


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether the weights hub answers at all (a DNS lookup and a TCP connect, ``timeout`` seconds)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _prefer_local_cache() -> None:
    """Offline: make huggingface_hub use its local cache only, instead of retrying for ~45 s."""
    try:
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _timm(name: str, pretrained: bool, extra: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(
            f"unknown model {name!r}: not a timm model name{hint} "
            "(use torchvision:NAME for torchvision, or package.module:factory for your own)"
        )
    if pretrained and not hub_reachable():
        _prefer_local_cache()  # weights already in the cache still load; the rest fails at once
    try:
        return timm.create_model(name, pretrained=pretrained, **extra)
    except (OSError, RuntimeError, ConnectionError) as e:
        if pretrained:
            raise _offline_error(name, e) from None
        raise


def _torchvision(name: str, pretrained: bool, extra: dict) -> nn.Module:
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        close = difflib.get_close_matches(name, torchvision.models.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"unknown torchvision model {name!r}{hint}") from None
    try:
        return builder(weights="DEFAULT" if pretrained else None, **extra)
    except Exception as e:
        if pretrained:
            raise _offline_error(f"torchvision:{name}", e) from None
        raise


def _cwd_on_path() -> None:
    """Make modules in the working directory importable, as ``python -m`` does (the console script's
    sys.path starts with its own bin folder instead)."""
    import sys

    cwd = os.getcwd()
    if not any(p in ("", cwd) or (p and os.path.abspath(p) == cwd) for p in sys.path):
        sys.path.insert(0, cwd)


def _factory(spec: str, pretrained: bool, extra: dict) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ModelError(f"model {spec!r}: write a factory as package.module:function")
    _cwd_on_path()
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(
            f"cannot import factory {spec!r}: {e} (run from the folder that holds {mod_name.split('.')[0]!r}, "
            "or put it on PYTHONPATH)"
        ) from None
    if pretrained:
        extra["pretrained"] = True
    try:
        model = fn(**extra)
    except TypeError as e:
        raise ModelError(f"factory {spec!r} rejected its arguments {sorted(extra)}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def check_runs_at(model, size: int, name: str, option: str = "--input-size") -> None:
    """One batch-1 forward at ``size`` x ``size``, so that a model which cannot take that input (a ViT
    built for 224, a size that pools to nothing) fails now, with the reason and the fix, instead of as
    a traceback deep inside discovery, counting or timing."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, native = 3, None
    if isinstance(cfg.get("input_size"), (tuple, list)) and len(cfg["input_size"]) == 3:
        chans, native = cfg["input_size"][0], cfg["input_size"][-1]
    ref = next((t for t in model.parameters() if t.is_floating_point()), None)
    x = torch.zeros(1, chans, size, size, dtype=ref.dtype if ref is not None else None)
    if ref is not None:
        x = x.to(ref.device)
    try:
        with in_mode(model), torch.no_grad():
            model(x)
    except PartializeError:
        raise
    except Exception as e:
        hint = f"; it was built for {native} px: use {option} {native}" if native and native != size else ""
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise PartializeError(
            f"{name} does not run at {option} {size} ({type(e).__name__}: {first}){hint} (or build it for this "
            "size, e.g. timm's img_size=...)"
        ) from None
