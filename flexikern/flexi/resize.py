"""Resizing patch-embedding kernels between patch sizes (FlexiViT's PI-resize).

A kernel of spatial size (h, w) acts on flattened patches of h*w pixels. The bilinear resize of
a patch from (h, w) to (h', w') is a linear map `R = resize(eye(h*w))` of shape (h'w', hw)
(half-pixel centres, `align_corners=False`, no antialias). Two kernel resizes follow from it:

* `pi_resize` (embedding): `w' = w @ pinv(R)`, so `<R x, w'> = <x, w>` when upsampling and the
  token of a resized patch is unchanged. Equals timm's `resample_patch_embed(..., "bilinear",
  antialias=False)`.
* `resize_deembed` (de-embedding): `w' = w @ R^T`, the plain bilinear resize of each output
  map, so the de-embedded patch at (h', w') is the resized de-embedded patch at (h, w).

Both are a small matrix product on the flattened kernel; the matrices are cached per
(sizes, device, dtype).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["resize_matrix", "pi_resize_matrix", "pi_resize", "resize_deembed", "lift_embed", "lift_deembed",
           "as_size"]


def as_size(size: int | tuple[int, int] | list[int], name: str = "patch_size") -> tuple[int, int]:
    """(h, w) from an int or a pair of positive ints; a clear error otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"{name}={size!r}: expected a positive int or a pair (h, w) of positive ints")
    return (int(size[0]), int(size[1]))


@functools.lru_cache(maxsize=256)
def _resize_matrix_cached(old: tuple[int, int], new: tuple[int, int], device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    h, w = old
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    resized = F.interpolate(eye, size=new, mode="bilinear", align_corners=False, antialias=False)
    return resized.reshape(h * w, -1).T.contiguous().to(device=device, dtype=dtype)  # (h'w', hw)


@functools.lru_cache(maxsize=256)
def _pi_resize_matrix_cached(old: tuple[int, int], new: tuple[int, int], device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor:
    R = _resize_matrix_cached(old, new, torch.device("cpu"), torch.float64)
    return torch.linalg.pinv(R).to(device=device, dtype=dtype)  # (hw, h'w')


def resize_matrix(old, new, device=None, dtype=torch.float32) -> torch.Tensor:
    """The bilinear resize matrix R, shape (h'w', hw), mapping a flattened (h, w) patch to (h', w')."""
    return _resize_matrix_cached(as_size(old, "old size"), as_size(new, "new size"),
                                 torch.device(device or "cpu"), dtype)


def pi_resize_matrix(old, new, device=None, dtype=torch.float32) -> torch.Tensor:
    """pinv(R), shape (hw, h'w'): `w_new = w.flatten(-2) @ pi_resize_matrix(old, new)`."""
    return _pi_resize_matrix_cached(as_size(old, "old size"), as_size(new, "new size"),
                                    torch.device(device or "cpu"), dtype)


def _apply(weight: torch.Tensor, matrix: torch.Tensor, new: tuple[int, int]) -> torch.Tensor:
    lead = weight.shape[:-2]
    out = weight.reshape(*lead, -1).to(matrix.dtype) @ matrix
    return out.reshape(*lead, *new).to(weight.dtype)


def pi_resize(weight: torch.Tensor, new_size: int | tuple[int, int]) -> torch.Tensor:
    """PI-resize a patch-embedding kernel (..., h, w) -> (..., h', w') (FlexiViT).

    Works in float32 (or float64 for float64 weights) and returns the input dtype. Differentiable.
    """
    if weight.dim() < 2:
        raise ValueError(f"weight: expected (..., h, w), got shape {tuple(weight.shape)}")
    old, new = tuple(weight.shape[-2:]), as_size(new_size, "new_size")
    if old == new:
        return weight
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return _apply(weight, pi_resize_matrix(old, new, weight.device, compute), new)


def resize_deembed(weight: torch.Tensor, new_size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize de-embedding output maps (..., h, w) -> (..., h', w') (`w @ R^T`)."""
    if weight.dim() < 2:
        raise ValueError(f"weight: expected (..., h, w), got shape {tuple(weight.shape)}")
    old, new = tuple(weight.shape[-2:]), as_size(new_size, "new_size")
    if old == new:
        return weight
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return _apply(weight, resize_matrix(old, new, weight.device, compute).T, new)


def lift_embed(weight: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The smallest-norm embedding kernel at `size` that `pi_resize`s back exactly to `weight`.

    `w_big = w @ R` with R the bilinear resize from `size` down to the kernel's size; for a factor
    of 2 each weight is spread over its 2x2 block and divided by 4 (DESIGN.md).
    """
    old, big = tuple(weight.shape[-2:]), as_size(size, "size")
    if old == big:
        return weight.clone()
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return _apply(weight, resize_matrix(big, old, weight.device, compute), big)


def lift_deembed(weight: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """The smallest-norm de-embedding maps at `size` that `resize_deembed` back exactly to `weight`.

    `w_big = w @ pinv(R)^T`; for a factor of 2 each weight is replicated over its 2x2 block.
    """
    old, big = tuple(weight.shape[-2:]), as_size(size, "size")
    if old == big:
        return weight.clone()
    compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return _apply(weight, pi_resize_matrix(big, old, weight.device, compute).T, big)
