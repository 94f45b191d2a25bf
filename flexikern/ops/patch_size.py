"""The patch size: one type and one parser, from the command line down to the kernels.

A `PatchSize` is a tuple of positive ints, (ph, pw) for images or (pt, ph, pw) for videos, so it
compares, hashes, indexes and unpacks like the tuple it is, and the kernels take it as one.
`PatchSize.parse` is the only place a user's patch size (an int, a tuple or list, a PatchSize, or
command-line text "4", "2x4", "1x2x2") is read. `.name` ("4x4") is how parameter dicts name
per-size weights in checkpoints: written, never parsed back.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Union

import torch

from flexikern.ops._checks import is_int

__all__ = ["PatchSize", "PatchSizeLike"]


class PatchSize(tuple):
    """A patch size: (ph, pw) or (pt, ph, pw), positive ints. Build one with `PatchSize.parse`."""

    __slots__ = ()

    @classmethod
    def parse(cls, value: Any, ndim: int | None = None, name: str = "patch_size") -> "PatchSize":
        """A PatchSize from an int (a square image patch), a tuple or list of 2 or 3 ints, a
        PatchSize, or text "4" / "2x4" / "1x2x2". Ints may be numpy integers; bools and floats
        (even 2.0) are refused.

        Args:
            value: the patch size as the user gave it.
            ndim: 2 or 3 to require an image or a video patch; None accepts both.
            name: the argument's name, for the error message.
        Raises:
            ValueError: naming `name` and `value`, with what was expected.
        """
        if isinstance(value, PatchSize) and ndim in (None, len(value)):
            # torch.compile may have made its ints symbolic (an argument that changed): specialise.
            return tuple.__new__(cls, [operator.index(s) for s in value]) if torch.compiler.is_compiling() else value
        sizes = value
        if isinstance(value, str):
            try:
                sizes = tuple(int(p) for p in value.lower().replace(" ", "").split("x"))
            except ValueError:
                sizes = None
        if is_int(sizes):
            sizes = (sizes, sizes) if ndim != 3 else None
        elif isinstance(sizes, tuple) and isinstance(value, str) and len(sizes) == 1 and ndim != 3:
            sizes = sizes * 2
        ok = (isinstance(sizes, (tuple, list)) and len(sizes) in ((2, 3) if ndim is None else (ndim,))
              and all(is_int(s) and s > 0 for s in sizes))
        if not ok:
            expected = {2: "an int or (ph, pw)", 3: "(pt, ph, pw)",
                        None: "an int, (ph, pw) or (pt, ph, pw)"}[ndim]
            raise ValueError(f"{name}={value!r}: expected {expected} of positive ints")
        # operator.index: an int (numpy's too) as an int; inside torch.compile it also specialises
        # a symbolic int, so every patch size compiles its own static graph.
        return tuple.__new__(cls, [operator.index(s) for s in sizes])

    @property
    def ndim(self) -> int:
        """2 for an image patch, 3 for a video patch."""
        return len(self)

    @property
    def volume(self) -> int:
        """Pixels (voxels) per patch: ph * pw, or pt * ph * pw."""
        return math.prod(tuple(self))   # a plain tuple: torch.compile traces math on it

    def next_larger(self, sizes) -> "PatchSize | None":
        """The smallest of `sizes` with more pixels per patch than this one (by volume), or None:
        the default weak size of a model whose powerful size is this one."""
        larger = [size for size in map(PatchSize.parse, sizes) if size.volume > self.volume]
        return min(larger, key=lambda size: size.volume) if larger else None

    def tokens(self, size: tuple[int, ...]) -> int:
        """The number of patches in a latent of spatial (or (F, H, W)) `size`."""
        return math.prod([s // p for s, p in zip(size, tuple(self))])

    @property
    def name(self) -> str:
        """"4x4", "1x2x2": the size's name in parameter dicts (checkpoint keys) and on the command line."""
        return "x".join(map(str, self))


PatchSizeLike = Union[int, tuple, list, str, PatchSize]
