"""patchify / unpatchify: images (N, C, H, W) or videos (N, C, F, H, W) <-> tokens.

Layout (DESIGN.md): tokens (N, T, prod(patch) * C) on a row-major grid, features ordered
(pt, ph, pw, C) as DiT's `unpatchify` expects. Backends: the compiled extension
(`flexikern._C`, when built) and the torch reference (reshape + permute).
"""

from __future__ import annotations

import torch

from flexikern.ops._checks import as_patch, check_divides, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, register

__all__ = ["patchify", "unpatchify", "patchify_reference", "unpatchify_reference"]


def patchify_reference(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """The plain-torch ground truth."""
    n, c, *sizes = x.shape
    grid = [s // p for s, p in zip(sizes, patch_size)]
    k = len(sizes)
    split = [n, c]
    for g, p in zip(grid, patch_size):
        split += [g, p]
    # (n, c, g0, p0, g1, p1, ...) -> (n, g0, g1, ..., p0, p1, ..., c)
    order = [0] + [2 + 2 * i for i in range(k)] + [3 + 2 * i for i in range(k)] + [1]
    tokens = x.reshape(split).permute(order)
    return tokens.reshape(n, -1, c * int(torch.tensor(patch_size).prod()))


def unpatchify_reference(tokens: torch.Tensor, patch_size: tuple[int, ...],
                         size: tuple[int, ...]) -> torch.Tensor:
    """The plain-torch ground truth: the exact inverse of `patchify_reference`."""
    n, _, features = tokens.shape
    k = len(size)
    volume = int(torch.tensor(patch_size).prod())
    c = features // volume
    grid = [s // p for s, p in zip(size, patch_size)]
    x = tokens.reshape(n, *grid, *patch_size, c)
    # (n, g0.., p0.., c) -> (n, c, g0, p0, g1, p1, ...)
    order = [0, 1 + 2 * k]
    for i in range(k):
        order += [1 + i, 1 + k + i]
    return x.permute(order).reshape(n, c, *size)


@register
class TorchPatchify(Backend):
    op, name = "patchify", "torch"

    def __call__(self, x, patch_size):
        return patchify_reference(x, patch_size)


@register
class TorchUnpatchify(Backend):
    op, name = "unpatchify", "torch"

    def __call__(self, tokens, patch_size, size):
        return unpatchify_reference(tokens, patch_size, size)


def _patch_for(x_dim: int, patch_size) -> tuple[int, ...]:
    return as_patch(patch_size, 2 if x_dim == 4 else 3)


def patchify(x: torch.Tensor, patch_size: int | tuple[int, ...]) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/ph * W/pw, ph*pw*C); video (N, C, F, H, W) with (pt, ph, pw)."""
    check_tensor("x", x, ndim=(4, 5))
    patch = _patch_for(x.dim(), patch_size)
    check_divides("x", x.shape[2:], patch)
    return dispatch("patchify", x=x, patch_size=patch)


def unpatchify(tokens: torch.Tensor, patch_size: int | tuple[int, ...],
               size: tuple[int, ...]) -> torch.Tensor:
    """The exact inverse of `patchify`: tokens (N, T, prod(patch)*C) -> (N, C, *size)."""
    check_tensor("tokens", tokens, ndim=3)
    if not isinstance(size, (tuple, list)) or len(size) not in (2, 3):
        raise ValueError(f"size={size!r}: expected (H, W) or (F, H, W)")
    size = tuple(int(s) for s in size)
    patch = _patch_for(len(size) + 2, patch_size)
    check_divides("size", size, patch)
    grid = 1
    for s, p in zip(size, patch):
        grid *= s // p
    volume = 1
    for p in patch:
        volume *= p
    if tokens.shape[1] != grid or tokens.shape[2] % volume:
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not fit size {size} with patch "
                         f"{patch}: expected (N, {grid}, {volume}*C)")
    return dispatch("unpatchify", tokens=tokens, patch_size=patch, size=size)
