"""Top-1 / top-5 accuracy on an ImageFolder (``DIR/val`` if it exists, else ``DIR``) with timm's
eval transforms resolved from the model's pretrained config."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from ..errors import PartializeError


class DataError(PartializeError):
    """A validation folder is missing, empty or does not fit the model's classes."""


def resolve_val_dir(data: str) -> str:
    """``DATA/val`` when it exists, else ``DATA`` itself; raises DataError when neither is a folder."""
    if not os.path.isdir(data):
        raise DataError(f"--data {data!r} is not a directory (expected an ImageFolder: CLASS/IMAGE files)")
    val = os.path.join(data, "val")
    return val if os.path.isdir(val) else data


def make_loader(
    model: nn.Module, data: str, batch: int = 64, workers: int = 0, input_size: int | None = None
):
    """DataLoader over the validation ImageFolder with the model's timm eval transform."""
    import timm.data
    from torchvision import datasets

    root = resolve_val_dir(data)
    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    cfg = timm.data.resolve_data_config(args, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    try:
        ds = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read an ImageFolder from {root!r}: {e}") from None
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers), cfg


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    data: str,
    *,
    batch: int = 64,
    workers: int = 0,
    limit: int | None = None,
    input_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Top-1 and top-5 accuracy (percent) of ``model`` on the folder; ``limit`` caps the images.

    Class indices are the ImageFolder's sorted folder names, which is ImageNet's order for the
    usual ``val/nXXXXXXXX`` layout. ``progress(done, total)`` is called after every batch.
    """
    loader, cfg = make_loader(model, data, batch, workers, input_size)
    n_classes = len(loader.dataset.classes)
    total = len(loader.dataset) if limit is None else min(limit, len(loader.dataset))
    if total == 0:
        raise DataError(f"no images found under {resolve_val_dir(data)!r}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = correct5 = seen = 0
    try:
        for images, target in loader:
            if seen >= total:
                break
            images, target = images[: total - seen].to(device), target[: total - seen].to(device)
            logits = model(images)
            if logits.shape[1] < n_classes:
                raise DataError(
                    f"the model has {logits.shape[1]} outputs but the folder has {n_classes} classes"
                )
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == target[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            seen += images.shape[0]
            if progress:
                progress(seen, total)
    finally:
        model.train(was_training)
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "images": seen,
        "classes": n_classes,
        "data": os.path.abspath(resolve_val_dir(data)),
        "transform": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }


def calibration_batch(
    model: nn.Module, data: str, n: int = 32, input_size: int | None = None
) -> torch.Tensor:
    """First ``n`` validation images, transformed, to calibrate dynamic operators on real data."""
    loader, _ = make_loader(model, data, batch=n, input_size=input_size)
    images, _ = next(iter(loader))
    return images
