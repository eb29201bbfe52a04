"""Calibration images: unlabelled, from an ImageFolder or any iterable of input batches."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import PartializeError
from ..measure.accuracy import calibration_batch


class CalibrationError(PartializeError):
    """Calibration cannot run: no usable images, a model it cannot calibrate, bad settings."""


def calibration_images(
    data: str | os.PathLike | torch.Tensor | Iterable,
    model: nn.Module,
    images: int = 512,
    input_size: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Up to ``images`` calibration images as one (N, C, H, W) tensor.

    ``data`` is an ImageFolder path (images drawn at random across all class folders, seeded, with the
    model's eval transforms at ``input_size``), a tensor of images, or an iterable of batches (tensors,
    or tuples whose first item is the images: labels are ignored, the original model is the target).
    """
    if images < 1:
        raise CalibrationError(f"calibration needs at least one image (images={images})")
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.isdir(path):
            raise CalibrationError(
                f"--calibrate {path!r} is not a directory: give an ImageFolder (DIR/CLASS/IMAGE files; the labels are "
                "not used)"
            )
        try:
            x = calibration_batch(model, path, n=images, input_size=input_size, seed=seed)
        except (PartializeError, StopIteration, ValueError, FileNotFoundError, RuntimeError) as e:
            raise CalibrationError(f"no usable calibration images in {path!r}: {e}") from None
        return x
    if isinstance(data, torch.Tensor):
        batches = [data]
    else:
        batches = []
        seen = 0
        for item in data:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(
                    f"calibration batches must be tensors (or (images, labels)), got {type(x).__name__}"
                )
            batches.append(x)
            seen += x.shape[0] if x.dim() == 4 else 1
            if seen >= images:
                break
    if not batches:
        raise CalibrationError("the calibration data yielded no images")
    x = torch.cat([b if b.dim() == 4 else b.unsqueeze(0) for b in batches])[:images]
    if x.dim() != 4 or x.shape[0] == 0:
        raise CalibrationError(f"calibration images must be (N, C, H, W), got {tuple(x.shape)}")
    return x.float()
