"""Data for training: ImageFolder loaders with timm's transforms, and scikit-learn's bundled digits.

Every train loader uses a :class:`~torch.utils.data.DistributedSampler` (one replica when not
distributed), so the sample order of an epoch is a function of ``(seed, epoch)`` alone: what makes
``--resume`` reproduce an uninterrupted run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, default_collate

from ..measure.accuracy import DataError
from .distributed import world_info

__all__ = ["DataError", "Loaders", "digits_loaders", "digits_tensors", "image_folder_loaders"]


@dataclass
class Loaders:
    """Train and val loaders plus what the trainer needs to know about the data."""

    train: DataLoader
    val: DataLoader | None
    num_classes: int
    input_size: int
    description: str


def make_train_loader(ds: Dataset, batch_size: int, seed: int, workers: int = 0, drop_last: bool = True) -> DataLoader:
    """Shuffled loader whose order per epoch depends only on (seed, epoch); sharded under DDP."""
    rank, world, _ = world_info()
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last, generator=g)


class SkipUnreadable(Dataset):
    """An ImageFolder whose unreadable files (corrupt, truncated, not an image) are skipped with a
    warning naming the file, so one bad file does not stop a run hours in. For training the next
    readable sample takes the place of each; with ``drop`` (validation, where a stand-in would be
    counted twice) the sample comes back as None and :func:`collate_readable` leaves it out of the
    batch. DataError when no file can be read."""

    ERRORS = (OSError, SyntaxError, ValueError)  # PIL: UnidentifiedImageError is an OSError; SyntaxError

    def __init__(self, folder, drop: bool = False) -> None:
        self.folder, self.drop = folder, drop
        self.classes = folder.classes
        self.warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        n = len(self.folder)
        for k in range(n):
            j = (index + k) % n
            try:
                return self.folder[j]
            except self.ERRORS as e:
                path = self.folder.samples[j][0]
                if path not in self.warned:
                    self.warned.add(path)
                    instead = (
                        "it is left out of the validation"
                        if self.drop
                        else "the next readable image is used in its place"
                    )
                    sys.stderr.write(
                        f"warning: skipping unreadable image {path!r} ({type(e).__name__}: {e}); {instead}. "
                        "Delete or replace the file to silence this\n"
                    )
                if self.drop:
                    return None
        raise DataError(f"no image under {self.folder.root!r} can be read (every file failed to open)")


def collate_readable(batch: list):
    """The batch without the samples :class:`SkipUnreadable` (``drop``) could not read; empty tensors
    when none could be."""
    good = [b for b in batch if b is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(good)


def check_data_dir(data: str) -> tuple[str, str | None]:
    """``(DATA/train, DATA/val or None)``; DataError naming the fix when the layout is wrong."""
    if not os.path.isdir(data):
        raise DataError(f"--data {data!r} is not a directory (expected DATA/train/CLASS/IMAGE files)")
    train = os.path.join(data, "train")
    if not os.path.isdir(train):
        raise DataError(
            f"--data {data!r} has no train/ subfolder: training needs DATA/train/CLASS/IMAGE "
            "(and DATA/val/CLASS/IMAGE for validation)"
        )
    val = os.path.join(data, "val")
    return train, (val if os.path.isdir(val) else None)


def image_folder_loaders(
    data: str,
    model: nn.Module,
    *,
    batch_size: int = 64,
    input_size: int | None = None,
    seed: int = 0,
    workers: int = 0,
    rand_augment: str | None = None,
    hflip: float = 0.5,
) -> Loaders:
    """ImageFolder loaders with timm's train transform (random resized crop, flip, optional
    RandAugment) and eval transform, resolved from the model's pretrained config; ``input_size``
    overrides the config's size. Unreadable images are skipped with a warning."""
    import timm.data
    from torchvision import datasets

    train_dir, val_dir = check_data_dir(data)
    args = {"input_size": (3, input_size, input_size)} if input_size else {}
    cfg = timm.data.resolve_data_config(args, model=model)
    t_train = timm.data.create_transform(**cfg, is_training=True, auto_augment=rand_augment, hflip=hflip, re_prob=0.0)
    t_val = timm.data.create_transform(**cfg, is_training=False)
    try:
        ds_train = datasets.ImageFolder(train_dir, transform=t_train)
        ds_val = datasets.ImageFolder(val_dir, transform=t_val) if val_dir else None
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"cannot read an ImageFolder under {data!r}: {e}") from None
    if ds_val is not None and ds_val.classes != ds_train.classes:
        raise DataError(f"{data!r}: train/ and val/ have different class folders")
    if len(ds_train) == 0:
        raise DataError(f"{train_dir!r} holds no images")
    if len(ds_train) < batch_size:
        batch_size = max(1, len(ds_train))
    classes = ds_train.classes
    ds_train = SkipUnreadable(ds_train)
    ds_val = SkipUnreadable(ds_val, drop=True) if ds_val is not None else None
    train = make_train_loader(ds_train, batch_size, seed, workers)
    val = None
    if ds_val is not None:
        val = DataLoader(ds_val, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_readable)
    return Loaders(
        train,
        val,
        len(classes),
        int(cfg["input_size"][-1]),
        f"ImageFolder {os.path.abspath(data)}: {len(ds_train)} train / "
        f"{len(ds_val) if ds_val else 0} val images, {len(classes)} classes" + _shard_note(train),
    )


def _shard_note(loader: DataLoader) -> str:
    """Under DDP: how many train images this process gets per epoch (its DistributedSampler shard)."""
    rank, world, _ = world_info()
    return f"; rank {rank} of {world} trains on {len(loader.sampler)} per epoch" if world > 1 else ""


def digits_tensors(
    size: int = 32, val_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1797 real 8x8 handwritten digits), bilinearly upsampled to
    ``size``, 3 channels, normalised; a stratified split. Returns ``x_train, y_train, x_val, y_val``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    idx_tr, idx_va = train_test_split(list(range(len(y))), test_size=val_fraction, random_state=seed, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_va], y[idx_va]


def digits_loaders(size: int = 32, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.2) -> Loaders:
    """Loaders over :func:`digits_tensors` (the example's and the tests' real data)."""
    xt, yt, xv, yv = digits_tensors(size, val_fraction, seed)
    train = make_train_loader(TensorDataset(xt, yt), batch_size, seed)
    val = DataLoader(TensorDataset(xv, yv), batch_size=256, shuffle=False)
    return Loaders(train, val, 10, size, f"sklearn digits {size}x{size}: {len(yt)} train / {len(yv)} val")


def write_image_folder(root: str, x: torch.Tensor, y: torch.Tensor, split: str) -> None:
    """Write normalised images ``x`` (N, 3, H, W in [-1, 1]) as PNGs under ``root/split/CLASS/``."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        d = os.path.join(root, split, f"{int(label):02d}")
        os.makedirs(d, exist_ok=True)
        arr = ((img.permute(1, 2, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(d, f"{i:05d}.png"))
