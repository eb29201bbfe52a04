"""Top-1 / top-5 accuracy on an ImageFolder (``DIR/val`` if it exists, else ``DIR``) with timm's
eval transforms resolved from the model's pretrained config."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .._modes import in_mode
from ..errors import PartializeError


class DataError(PartializeError):
    """A validation folder is missing, empty or does not fit the model's classes."""


def resolve_val_dir(data: str, labels: bool = True) -> str:
    """``DATA/val`` when it exists, else ``DATA`` itself; raises DataError when neither is a folder, or,
    where the labels are used (``labels``), when DATA is a training layout without ``val/`` (its
    ``train/`` would be scored as one class)."""
    if not os.path.isdir(data):
        raise DataError(f"--data {data!r} is not a directory (expected an ImageFolder: CLASS/IMAGE files)")
    val = os.path.join(data, "val")
    if os.path.isdir(val):
        return val
    if labels and os.path.isdir(os.path.join(data, "train")):
        raise DataError(
            f"--data {data!r} has a train/ folder and no val/: accuracy needs held-out images (DATA/val/CLASS/"
            "IMAGE), and scoring DATA itself would count train/ as one class"
        )
    return data


def sample_indices(total: int, n: int | None, seed: int = 0) -> list[int] | None:
    """``n`` distinct indices drawn uniformly (seeded) from ``range(total)``, sorted; None for all.

    An ImageFolder is sorted by class, so its first ``n`` images would all come from the first
    class(es): a subset must be drawn across the whole folder to be representative."""
    if n is None or n >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(total, generator=g)[:n].tolist())


def load_image(path: str):
    """An RGB image, or a DataError naming the file (a corrupt or non-image file in the folder)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"{path!r} is not a readable image ({type(e).__name__}: {e}); remove or replace it") from None


class _Tolerant(torch.utils.data.Dataset):
    """A dataset whose unreadable images come back as their error message (a ``str``) instead of raising:
    :func:`_drop_unreadable` takes them out of the batch, so the accuracy is over the readable images,
    and says which were left out (workers cannot report back any other way)."""

    def __init__(self, ds) -> None:
        self.ds, self.classes = ds, ds.classes

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        try:
            return self.ds[i]
        except DataError as e:
            return str(e)


def _drop_unreadable(batch: list):
    """``(images, targets, messages)``: the readable samples collated, the unreadable ones' messages."""
    bad = [b for b in batch if isinstance(b, str)]
    good = [b for b in batch if not isinstance(b, str)]
    if not good:
        return None, None, bad
    images, target = torch.utils.data.default_collate(good)
    return images, target, bad


def make_loader(
    model: nn.Module,
    data: str,
    batch: int = 64,
    workers: int = 0,
    input_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    labels: bool = True,
    tolerant: bool = False,
):
    """DataLoader over the validation ImageFolder with the model's timm eval transform; with ``limit``,
    over a seeded random sample of that many images (see :func:`sample_indices`). ``labels=False``:
    the caller uses the images only (:func:`resolve_val_dir`). ``tolerant``: batches are ``(images,
    targets, messages)`` with unreadable images left out and named in ``messages``."""
    import timm.data
    from torchvision import datasets

    root = resolve_val_dir(data, labels)
    hw = tuple(input_size) if isinstance(input_size, (tuple, list)) else (input_size, input_size)
    args = {"input_size": (3, *hw)} if input_size else {}  # (H, W): a plan converted at a non-square input
    cfg = timm.data.resolve_data_config(args, model=model)
    transform = timm.data.create_transform(**cfg, is_training=False)
    try:
        ds = datasets.ImageFolder(root, transform=transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read an ImageFolder from {root!r}: {e}") from None
    idx = sample_indices(len(ds), limit, seed)
    sub = ds if idx is None else torch.utils.data.Subset(ds, idx)
    sub.classes = ds.classes  # what the callers read, on the Subset too
    if tolerant:
        sub = _Tolerant(sub)
        return torch.utils.data.DataLoader(
            sub, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=_drop_unreadable
        ), cfg
    return torch.utils.data.DataLoader(sub, batch_size=batch, shuffle=False, num_workers=workers), cfg


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
    """Top-1 and top-5 accuracy (percent) of ``model`` on the folder; ``limit`` caps the images
    (a seeded random sample across all classes, not the first ones).

    Class indices are the ImageFolder's sorted folder names, which is ImageNet's order for the
    usual layout of one folder per WordNet id (``val/n01440764/...``): a folder with fewer class
    folders than the model has outputs is scored against the first N outputs, which is only right
    if those are its classes (a warning says so). ``progress(done, total)`` is called after every batch.
    """
    loader, cfg = make_loader(model, data, batch, workers, input_size, limit=limit, tolerant=True)
    n_classes = len(loader.dataset.classes)
    total = len(loader.dataset)
    if total == 0:
        raise DataError(f"no images found under {resolve_val_dir(data)!r}")
    warned = False
    device = next(model.parameters()).device
    correct1 = correct5 = seen = 0
    unreadable: list[str] = []
    with in_mode(model):
        for images, target, bad in loader:
            unreadable += bad
            if images is None:
                continue
            images, target = images.to(device), target.to(device)
            logits = model(images)
            if logits.shape[1] < n_classes:
                raise DataError(
                    f"the model has {logits.shape[1]} outputs but {resolve_val_dir(data)!r} has {n_classes} "
                    "class folders: labels would not match; use a model with one output per class folder"
                )
            if logits.shape[1] > n_classes and not warned:
                warned = True
                warnings.warn(
                    f"the model has {logits.shape[1]} outputs but {resolve_val_dir(data)!r} has {n_classes} "
                    f"class folders: folder i (sorted by name) is scored as output i, so the accuracy is only "
                    f"meaningful if the model's first {n_classes} classes are these folders, in this order",
                    stacklevel=2,
                )
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top == target[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            seen += images.shape[0]
            if progress:
                progress(seen + len(unreadable), total)
    if not seen:
        raise DataError(f"no image under {resolve_val_dir(data)!r} can be read; the first: {unreadable[0]}")
    if unreadable:
        warnings.warn(
            f"{len(unreadable)} of {total} images could not be read and were left out (top-1 is over the other "
            f"{seen}); the first: {unreadable[0]}",
            stacklevel=2,
        )
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "images": seen,
        "unreadable": len(unreadable),
        "classes": n_classes,
        "data": os.path.abspath(resolve_val_dir(data)),
        "transform": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
    }


def calibration_batch(
    model: nn.Module, data: str, n: int = 32, input_size: int | None = None, seed: int = 0
) -> torch.Tensor:
    """``n`` validation images drawn at random (seeded, so reproducible) across the whole folder,
    transformed, to calibrate dynamic operators on real data. Not the first ``n``: an ImageFolder is
    sorted by class, so those would all be one class."""
    loader, _ = make_loader(model, data, batch=n, input_size=input_size, limit=n, seed=seed, labels=False)
    images, _ = next(iter(loader))
    return images
