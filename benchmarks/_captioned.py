"""Captioned shapes and captioned clips of moving shapes, with a deterministic tiny "text encoder".

The data of `t2i_video_examples.py` beside it. Everything is generated (`flexikern.datasets.make_shapes`
draws the shapes, in the first version of their geometry, `SHAPES_VERSION = 1`, which the committed
T2I and video models were trained on), nothing is downloaded:

* `TinyTextEncoder`: a fixed random embedding table over a small vocabulary plus a fixed random
  position table (seeded), standing in for T5. `encode(captions)` -> `TextCondition` with a mask
  (captions have different lengths; padding is masked out).
* `captioned_shapes(n, size, seed)`: images (N, 3, S, S) in [-1, 1] and captions such as
  "a picture of a ring" (the class name in a few templates).
* `moving_shapes(n, frames, size, seed)`: clips (N, 3, F, S, S): a window sliding over a larger
  shapes image at a constant velocity (one pixel per frame, a random direction), captioned with
  the shape and the direction ("a disk moving left").
"""

from __future__ import annotations

import numpy as np
import torch

from flexikern.datasets import CLASS_NAMES, make_shapes
from flexikern.models import TextCondition

__all__ = ["VOCAB", "TinyTextEncoder", "captioned_shapes", "moving_shapes", "DIRECTIONS", "SHAPES_VERSION"]

SHAPES_VERSION = 1    # flexikern.datasets.GEOMETRY version of the committed examples' data

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
TEMPLATES = ("{shape}", "a {shape}", "a picture of a {shape}", "{shape} shape")
VOCAB = ("a", "picture", "of", "shape", "moving", *CLASS_NAMES, *DIRECTIONS)


class TinyTextEncoder:
    """Whitespace tokens -> fixed random vectors (+ a fixed random position vector); max `text_len` tokens."""

    def __init__(self, channels: int = 32, text_len: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(VOCAB), channels, generator=g)
        self.positions = 0.5 * torch.randn(text_len, channels, generator=g)
        self.index = {w: i for i, w in enumerate(VOCAB)}
        self.channels, self.text_len = channels, text_len

    def encode(self, captions: list[str]) -> TextCondition:
        embeds = torch.zeros(len(captions), self.text_len, self.channels)
        mask = torch.zeros(len(captions), self.text_len, dtype=torch.bool)
        for i, caption in enumerate(captions):
            words = caption.split()
            if not 1 <= len(words) <= self.text_len:
                raise ValueError(f"captions[{i}]={caption!r}: expected 1..{self.text_len} words")
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"captions[{i}]: unknown words {unknown}; the vocabulary is {VOCAB}")
            ids = torch.tensor([self.index[w] for w in words])
            embeds[i, :len(words)] = self.table[ids] + self.positions[:len(words)]
            mask[i, :len(words)] = True
        return TextCondition(embeds, mask)


def _captions(labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    templates = rng.integers(0, len(TEMPLATES), len(labels))
    return [TEMPLATES[k].format(shape=CLASS_NAMES[c]) for c, k in zip(labels, templates)]


def captioned_shapes(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(images (N, 3, S, S) in [-1, 1], captions, class labels); deterministic in (n, size, seed)."""
    x, labels = make_shapes(n, size=size, seed=seed, version=SHAPES_VERSION)
    return torch.from_numpy(x), _captions(labels, np.random.default_rng(seed + 7)), labels


def moving_shapes(n: int, frames: int = 4, size: int = 16, seed: int = 0
                  ) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(clips (N, 3, F, S, S) in [-1, 1], captions, class labels): a window panning over a shape."""
    margin = frames - 1
    canvas, labels = make_shapes(n, size=size + 2 * margin, seed=seed, version=SHAPES_VERSION)
    rng = np.random.default_rng(seed + 11)
    names = list(DIRECTIONS)
    which = rng.integers(0, len(names), n)
    clips = np.empty((n, 3, frames, size, size), dtype=np.float32)
    for i in range(n):
        dy, dx = DIRECTIONS[names[which[i]]]
        for f in range(frames):
            # The window moves against the motion so the shape moves in the named direction.
            y0, x0 = margin - dy * f, margin - dx * f
            clips[i, :, f] = canvas[i, :, y0:y0 + size, x0:x0 + size]
    captions = [f"a {CLASS_NAMES[c]} moving {names[d]}" for c, d in zip(labels, which)]
    return torch.from_numpy(clips), captions, labels
