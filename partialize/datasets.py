"""Real data that ships inside a package: scikit-learn's 1,797 handwritten digits, made harder so that a
network does not saturate (benchmarks and tests; nothing is downloaded).

``hard_digits`` draws each 8x8 digit at a random size (18-28 px) and place on a 32x32 canvas, in a
random colour against a random background with a gradient, a distracting stroke and pixel noise;
15% of the digits are darker than their background. A ResNet-18 trained here from scratch reaches
about 85% on the held-out digits (docs/benchmarks.md), not 99% as on the plain digits.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

MEAN, STD = 0.4, 0.35  # what the images are normalised with


def _render(digit: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    d = digit.reshape(1, 1, 8, 8) / 16
    s = int(torch.randint(18, 29, (1,), generator=g)) * size // 32
    d = F.interpolate(d, size=(s, s), mode="bilinear", align_corners=False)[0]
    canvas = torch.zeros(1, size, size)
    oy, ox = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
    canvas[:, oy : oy + s, ox : ox + s] = d
    bg = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.1
    sign = 1.0 if float(torch.rand(1, generator=g)) < 0.85 else -1.0
    fg = (bg + sign * (torch.rand(3, 1, 1, generator=g) * 0.3 + 0.35)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = float(torch.rand(1, generator=g)) * 2 * math.pi
    img = bg + (math.cos(angle) * xx + math.sin(angle) * yy) * 0.25 + canvas * (fg - bg)
    t = torch.linspace(0, 1, 40)
    p0, p1 = torch.rand(2, generator=g) * size, torch.rand(2, generator=g) * size
    pts = (p0[None] * (1 - t[:, None]) + p1[None] * t[:, None]).long().clamp(0, size - 1)
    img[:, pts[:, 1], pts[:, 0]] += torch.rand(3, 1, generator=g) * 0.7
    return img + torch.randn(3, size, size, generator=g) * 0.15


def hard_digits(
    split: str = "train", renders: int = 4, seed: int = 0, size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, size, size) normalised, labels (N,)). ``split``: ``train`` (1,437 digits) or ``val``
    (the other 360, never seen in train); each digit is drawn ``renders`` times with its own randomness."""
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    X, y = load_digits(return_X_y=True)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed)).tolist()
    idx = order[:1437] if split == "train" else order[1437:]
    g = torch.Generator().manual_seed(seed * 1000 + (1 if split == "train" else 2))
    digits = torch.tensor(X, dtype=torch.float32)
    imgs = [_render(digits[i], g, size) for _ in range(renders) for i in idx]
    labels = [int(y[i]) for _ in range(renders) for i in idx]
    return (torch.stack(imgs) - MEAN) / STD, torch.tensor(labels)


def write_image_folder(images: torch.Tensor, labels: torch.Tensor, path: str | os.PathLike) -> str:
    """Write normalised ``images`` as PNGs in an ImageFolder (``path/<label>/<n>.png``)."""
    from PIL import Image

    path = os.fspath(path)
    pixels = ((images * STD + MEAN).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for n, (img, label) in enumerate(zip(pixels, labels.tolist())):
        folder = os.path.join(path, str(label))
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, f"{n:05d}.png"))
    return path
