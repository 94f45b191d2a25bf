"""Input validation shared by the ops: bad input never reaches a kernel.

Patch sizes are read by `flexikern.ops.patch_size.PatchSize.parse`, the one parser.
"""

from __future__ import annotations

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


def check_divides(name: str, sizes: Sequence[int], patch: Sequence[int]) -> None:
    if any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"{name}: spatial size {tuple(sizes)} is not divisible by patch size "
                         f"{tuple(patch)}; crop or pad the input to a multiple of the patch size")
