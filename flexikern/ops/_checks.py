"""Input validation shared by the ops: bad input never reaches a kernel."""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_patch(patch_size, ndim: int, name: str = "patch_size") -> tuple[int, ...]:
    """A patch size as a tuple of `ndim` ints in 1..64. An int means a square (2-D) patch only."""
    if isinstance(patch_size, int) and not isinstance(patch_size, bool) and ndim == 2:
        patch_size = (patch_size, patch_size)
    if (not isinstance(patch_size, (tuple, list)) or len(patch_size) != ndim
            or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 64 for p in patch_size)):
        shape = "an int or (ph, pw)" if ndim == 2 else "(pt, ph, pw)"
        raise ValueError(f"{name}={patch_size!r}: expected {shape} with sizes in 1..64")
    return tuple(int(p) for p in patch_size)


def check_tensor(name: str, t, *, ndim: int | Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(f"{name}: expected {' or '.join(map(str, allowed))} dimensions, "
                             f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported; expected one of {list(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, but the other inputs are on {device}; "
                         "move them to one device")


def check_divides(name: str, sizes: Sequence[int], patch: Sequence[int]) -> None:
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} is not divisible by patch size "
                         f"{tuple(patch)}; crop or pad the input to a multiple of the patch size")
