"""A procedural image dataset that flexikern generates itself: coloured shapes and patterns.

The shipped model (`flexikern/assets/`) is trained on it, so no download is ever needed. Ten
classes, each a shape or a pattern drawn at a random position and scale, in a random colour, over
a random two-colour gradient background with a little pixel noise:

    0 disk  1 square  2 triangle  3 ring  4 plus  5 horizontal stripes  6 vertical stripes
    7 checkerboard  8 diagonal stripes  9 diagonal cross (X)

The class is carried by geometry only (colours are random), so a model has to get shapes right,
at the size of a few pixels, to be scored well by the classifier of `flexikern.metrics`.
Shapes are rendered at 4x resolution and box-filtered down (anti-aliased edges).

Two versions of the geometry (`version=`), the same classes, colours and backgrounds:

* 2 (the default; the shipped model and classifier): objects of half-size 0.28-0.42 of the image
  (9-13 pixels across at 16x16), rings and arms 2-4 pixels wide, stripe periods 0.34-0.5 of the
  image (stripes 3-4 pixels wide), centres within 0.7 of the free margin;
* 1 (the first release; the text-to-image and video examples of `benchmarks/`): half-size
  0.18-0.36, rings and arms 1-2 pixels wide, periods 0.22-0.34 (stripes under 3 pixels), centres
  within 0.9 of the margin. At 16x16 its thin rings, crosses and stripes were more than a small
  model trained for an hour on 2 CPU cores could draw (docs/MODEL_CARD.md).

`make_shapes(n, size=16, seed=0)` is deterministic in (n, size, seed, version) and vectorised
with numpy: 20 000 16x16 images take about a second.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "GEOMETRY", "DEFAULT_VERSION", "make_shapes", "shapes_split"]

CLASS_NAMES = ("disk", "square", "triangle", "ring", "plus", "h_stripes", "v_stripes",
               "checkerboard", "diagonal_stripes", "cross")

_SUPERSAMPLE = 4

# Per version: object half-size, centre jitter (fraction of the free margin), stripe period (all in
# image units) and ring / arm width relative to the half-size; each a uniform range.
GEOMETRY = {
    1: dict(radius=(0.18, 0.36), jitter=0.9, period=(0.22, 0.34), thick=(0.28, 0.4)),
    2: dict(radius=(0.28, 0.42), jitter=0.7, period=(0.34, 0.5), thick=(0.42, 0.55)),
}
DEFAULT_VERSION = 2   # the shipped model's and classifier's data


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) hue/saturation/value in [0, 1] -> (N, 3) RGB in [0, 1]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack([v, t, p], 1), np.stack([q, v, p], 1), np.stack([p, v, t], 1),
                      np.stack([p, q, v], 1), np.stack([t, p, v], 1), np.stack([v, p, q], 1)], 0)
    return table[i, np.arange(len(h))]


def _masks(labels: np.ndarray, size: int, rng: np.random.Generator, version: int) -> np.ndarray:
    """(N, S, S) foreground coverage in [0, 1] for each label, S = size * supersampling."""
    n, s, g = len(labels), size * _SUPERSAMPLE, GEOMETRY[version]
    coords = (np.arange(s) + 0.5) / s                       # pixel centres in [0, 1]
    radius = rng.uniform(*g["radius"], n)                    # object half-size, image units
    cy = rng.uniform(0.5 - (0.5 - radius) * g["jitter"], 0.5 + (0.5 - radius) * g["jitter"])
    cx = rng.uniform(0.5 - (0.5 - radius) * g["jitter"], 0.5 + (0.5 - radius) * g["jitter"])
    period = rng.uniform(*g["period"], n)                    # stripe period, image units
    phase = rng.uniform(0, 1, n)
    thick = rng.uniform(*g["thick"], n)                      # arm / ring width relative to radius

    out = np.zeros((n, s, s), dtype=bool)
    for label in np.unique(labels):
        sel = labels == label
        col = lambda a: a[sel][:, None, None]                # noqa: E731  per-image parameter
        yy, xx = coords[None, :, None], coords[None, None, :]
        r, per, ph, th = col(radius), col(period), col(phase), col(thick)
        dy, dx = yy - col(cy), xx - col(cx)
        box, rr = np.maximum(abs(dx), abs(dy)), dx ** 2 + dy ** 2
        if label == 0:
            m = rr <= r ** 2
        elif label == 1:
            m = box <= r * 0.85
        elif label == 2:
            m = (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
        elif label == 3:
            m = (rr <= r ** 2) & (rr >= (r * (1 - th)) ** 2)
        elif label == 4:
            m = (box <= r) & (np.minimum(abs(dx), abs(dy)) <= r * th * 0.6)
        elif label == 5:
            m = ((yy / per + ph) % 1.0) < 0.5 + 0 * xx
        elif label == 6:
            m = ((xx / per + ph) % 1.0) < 0.5 + 0 * yy
        elif label == 7:
            m = ((np.floor(xx / (per * 0.8) + ph) + np.floor(yy / (per * 0.8) + ph)) % 2) == 0
        elif label == 8:
            m = (((xx + yy) / (per * 1.2) + ph) % 1.0) < 0.5
        else:
            m = (box <= r) & (np.minimum(abs(dx - dy), abs(dx + dy)) <= r * th * 0.8)
        out[sel] = m
    cover = out.reshape(n, size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(2, 4))
    return cover


def make_shapes(n: int, size: int = 16, seed: int = 0, num_classes: int = 10,
                labels: np.ndarray | None = None, version: int = DEFAULT_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (N, 3, size, size) float32 in [-1, 1] and labels (N,) int64.

    Labels are balanced (cycled, then shuffled) unless given. `version`: the geometry (`GEOMETRY`,
    module docstring). Deterministic in its arguments.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version not in GEOMETRY:
        raise ValueError(f"version={version!r}: expected one of {sorted(GEOMETRY)} "
                         f"({DEFAULT_VERSION}: the shipped model's data)")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int")
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size={size!r}: expected an int >= 4")
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes={num_classes!r}: expected 1..{len(CLASS_NAMES)}")
    rng = np.random.default_rng(seed)
    if labels is None:
        labels = rng.permutation(np.arange(n) % num_classes)
    labels = np.asarray(labels, dtype=np.int64)
    cover = _masks(labels, size, rng, version)[:, None]                                  # (N, 1, S, S)
    fg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.5, 1.0, n), rng.uniform(0.6, 1.0, n))
    # Background: a gradient between two dim colours in a random direction.
    bg_a = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.2, 0.8, n), rng.uniform(0.05, 0.4, n))
    bg_b = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.2, 0.8, n), rng.uniform(0.05, 0.4, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    coords = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    ramp = 0.5 + (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)   # ~[0, 1]
    ramp = np.clip(ramp, 0, 1)[:, None]
    bg = bg_a[:, :, None, None] * (1 - ramp) + bg_b[:, :, None, None] * ramp
    img = bg * (1 - cover) + fg[:, :, None, None] * cover
    img = img + rng.normal(0, 0.02, img.shape)
    img = np.clip(img, 0, 1) * 2 - 1
    return img.astype(np.float32), labels


def shapes_split(split: str, n: int, size: int = 16,
                 version: int = DEFAULT_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """The fixed splits: "train" (seed 0), "heldout" (seed 1, for FD references), "test" (seed 2)."""
    seeds = {"train": 0, "heldout": 1, "test": 2}
    if split not in seeds:
        raise ValueError(f"split={split!r}: expected one of {sorted(seeds)}")
    return make_shapes(n, size=size, seed=seeds[split], version=version)
