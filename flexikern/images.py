"""Samples as pictures: model outputs to uint8 images, and a PNG grid of them.

    images, note = to_uint8(samples)      # (N, C, H, W) tensor -> (N, H, W, 3) uint8 numpy
    save_grid(images, "grid.png", columns=4)

Used by the `sample`, `demo` and `eval` commands; needs numpy and Pillow only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flexikern.files import atomic_write

__all__ = ["to_uint8", "save_grid"]


def to_uint8(x: Any) -> tuple[Any, str | None]:
    """(N, C, H, W) samples -> (N, H, W, 3) uint8 numpy, and a note when they are not images.

    3 channels are images in [-1, 1] (DiT's `sample_ddp.py` quantisation); other channel counts
    (latents without a VAE) show their first 3 channels, each normalised to its own range per image.
    """
    import torch
    x = x.detach().float().cpu()
    if x.shape[1] == 3:
        return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), None
    v = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo = v.amin(dim=(2, 3), keepdim=True)
    hi = v.amax(dim=(2, 3), keepdim=True)
    v = (v - lo) / (hi - lo).clamp_min(1e-12)
    note = (f"the samples are {x.shape[1]}-channel latents and no --vae was given: the images show "
            f"their first 3 channels, each normalised to its own min/max")
    return (v * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), note


def save_grid(images: Any, path: str | Path, columns: int) -> None:
    """Tile (N, H, W, 3) uint8 images into one image file (its format from the suffix: .png, .jpg,
    ...; written atomically), enlarged (nearest) to at least 128 px a side."""
    import numpy as np
    from PIL import Image
    n, h, w, _ = images.shape
    zoom = max(1, 128 // max(h, w))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    h, w, pad = h * zoom, w * zoom, 2
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(grid).save(tmp)
