"""Input validation shared by the ops: bad input never reaches a kernel.

Patch sizes are read by `flexikern.ops.patch_size.PatchSize.parse`, the one parser.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def check_same_dtype(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    """`t` (a weight or bias) must have x's dtype, as F.conv2d and F.linear require, unless
    autocast is on (it casts both)."""
    if t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}; cast one to the other "
                        f"(e.g. x.to({name}.dtype)) or run under torch.autocast")


def check_size(name: str, size) -> tuple[int, ...]:
    """An output size given as (H, W) or (F, H, W) positive ints (numpy ints too), as a tuple."""
    ok = (isinstance(size, (tuple, list, torch.Size)) and len(size) in (2, 3)
          and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size))
    if not ok:
        raise ValueError(f"{name}={size!r}: expected (H, W) or (F, H, W) of positive ints")
    return tuple(int(s) for s in size)


def check_divides(name: str, sizes: Sequence[int], patch: Sequence[int]) -> None:
    """Spatial `sizes` must be positive multiples of `patch`."""
    if any(s <= 0 for s in sizes):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} has an empty axis; expected positive "
                         f"multiples of the patch size {tuple(patch)}")
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} is not divisible by patch size "
                         f"{tuple(patch)}; crop or pad the input to a multiple of the patch size")
