"""Resizing patch-embedding kernels between patch sizes (FlexiViT's PI-resize, arXiv 2212.08013).

A kernel of spatial size (h, w) acts on flattened patches of h*w pixels. The bilinear resize of
a patch from (h, w) to (h', w') is a linear map `R = resize(eye(h*w))` of shape (h'w', hw)
(half-pixel centres, `align_corners=False`, no antialias). Two kernel resizes follow from it:

* `pi_resize` (embedding): `w' = w @ pinv(R)`, so `<R x, w'> = <x, w>` when upsampling and the
  token of a resized patch is unchanged. Equals timm's `resample_patch_embed(..., "bilinear",
  antialias=False)`.
* `resize_deembed` (de-embedding): `w' = w @ R^T`, the plain bilinear resize of each output
  map, so the de-embedded patch at (h', w') is the resized de-embedded patch at (h, w).

Both are a small matrix product on the flattened kernel; the matrices are constants cached per
(sizes, device, dtype), built outside inference mode (`flexikern.ops._cache`), so a matrix first
built while sampling serves training too. `lift_embed` / `lift_deembed` go the other way (a
kernel stored at a small size, lifted to a larger one), and `deembed_weight` applies
`resize_deembed` to a de-embedding stored as a linear layer's weight. Sizes are (h, w) pairs,
read by `PatchSize.parse`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexikern.ops._cache import tensor_cache
from flexikern.ops._checks import FLOAT_DTYPES, check_tensor
from flexikern.ops.patch_size import PatchSize, PatchSizeLike

__all__ = ["resize_matrix", "pi_resize_matrix", "pi_resize", "resize_deembed", "lift_embed",
           "lift_deembed", "lift_deembed_weight", "deembed_weight", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel of `dtype` is resized in (its matrices' dtype): float64 for float64,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Kernels are resized in float32 (float64 for float64 kernels) and returned in their own dtype.
DTYPES = FLOAT_DTYPES + (torch.float64,)


def _check_kernel(weight) -> None:
    """A kernel (..., h, w) of a float dtype: an integer one would be truncated when cast back."""
    check_tensor("weight", weight, dtypes=DTYPES)
    if weight.dim() < 2:
        raise ValueError(f"weight: expected (..., h, w), got shape {tuple(weight.shape)}")


def _matrix_dtype(dtype) -> torch.dtype:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype (a resize matrix holds "
                        f"fractional weights), e.g. torch.float32")
    return dtype


def _size(value: PatchSizeLike, name: str) -> tuple[int, int]:
    # A plain tuple: torch.compile traces tuple arithmetic, not a tuple subclass's.
    return tuple(PatchSize.parse(value, ndim=2, name=name))


@tensor_cache(maxsize=256, small=True)
def _resize_matrix_cached(old: tuple[int, int], new: tuple[int, int], device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    h, w = old
    eye = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    resized = F.interpolate(eye, size=new, mode="bilinear", align_corners=False, antialias=False)
    return resized.reshape(h * w, -1).T.contiguous().to(device=device, dtype=dtype)  # (h'w', hw)


@tensor_cache(maxsize=256, small=True)
def _pi_resize_matrix_cached(old: tuple[int, int], new: tuple[int, int], device: torch.device,
                             dtype: torch.dtype) -> torch.Tensor:
    R = _resize_matrix_cached(old, new, torch.device("cpu"), torch.float64)
    return torch.linalg.pinv(R).to(device=device, dtype=dtype)  # (hw, h'w')


def resize_matrix(old, new, device=None, dtype=torch.float32) -> torch.Tensor:
    """The bilinear resize matrix R, shape (h'w', hw), mapping a flattened (h, w) patch to (h', w')."""
    return _resize_matrix_cached(_size(old, "old size"), _size(new, "new size"),
                                 torch.device(device or "cpu"), _matrix_dtype(dtype))


def pi_resize_matrix(old, new, device=None, dtype=torch.float32) -> torch.Tensor:
    """pinv(R), shape (hw, h'w'): `w_new = w.flatten(-2) @ pi_resize_matrix(old, new)`."""
    return _pi_resize_matrix_cached(_size(old, "old size"), _size(new, "new size"),
                                    torch.device(device or "cpu"), _matrix_dtype(dtype))


def _apply(weight: torch.Tensor, matrix: torch.Tensor, new: tuple[int, int]) -> torch.Tensor:
    lead = weight.shape[:-2]
    out = weight.reshape(*lead, -1).to(matrix.dtype) @ matrix
    return out.reshape(*lead, *new).to(weight.dtype)


def pi_resize(weight: torch.Tensor, new_size: PatchSizeLike) -> torch.Tensor:
    """PI-resize a patch-embedding kernel (..., h, w) -> (..., h', w') (FlexiViT).

    Works in float32 (or float64 for float64 weights) and returns the input dtype. Differentiable.
    """
    return _resized(weight, new_size, pi_resize_matrix)


def resize_deembed(weight: torch.Tensor, new_size: PatchSizeLike) -> torch.Tensor:
    """Bilinearly resize de-embedding output maps (..., h, w) -> (..., h', w') (`w @ R^T`)."""
    return _resized(weight, new_size, lambda old, new, device, dtype: resize_matrix(old, new, device, dtype).T)


def _resized(weight: torch.Tensor, new_size: PatchSizeLike, matrix) -> torch.Tensor:
    """`weight` (..., h, w) times `matrix(old, new, device, dtype)` (hw, h'w'), in float32 (float64
    for float64 weights), back in the input dtype."""
    _check_kernel(weight)
    old, new = tuple(weight.shape[-2:]), _size(new_size, "new_size")
    if old == new:
        return weight
    compute = compute_dtype(weight.dtype)
    return _apply(weight, matrix(old, new, weight.device, compute), new)


def lift_embed(weight: torch.Tensor, size: PatchSizeLike) -> torch.Tensor:
    """The smallest-norm embedding kernel at `size` that `pi_resize`s back exactly to `weight`.

    `w_big = w @ R` with R the bilinear resize from `size` down to the kernel's size. For a factor
    of 2 each weight is spread over its 2x2 block and divided by 4, so a token of the bigger
    patch is the stored kernel applied to that patch downsampled (average-pooled): how a new,
    larger patch size's kernel starts from a trained one.
    """
    _check_kernel(weight)
    old, big = tuple(weight.shape[-2:]), _size(size, "size")
    if old == big:
        return weight.clone()
    compute = compute_dtype(weight.dtype)
    return _apply(weight, resize_matrix(big, old, weight.device, compute), big)


def lift_deembed(weight: torch.Tensor, size: PatchSizeLike) -> torch.Tensor:
    """The smallest-norm de-embedding maps at `size` that `resize_deembed` back exactly to `weight`.

    `w_big = w @ pinv(R)^T`; for a factor of 2 each weight is replicated over its 2x2 block.
    """
    _check_kernel(weight)
    old, big = tuple(weight.shape[-2:]), _size(size, "size")
    if old == big:
        return weight.clone()
    compute = compute_dtype(weight.dtype)
    return _apply(weight, pi_resize_matrix(big, old, weight.device, compute).T, big)


def deembed_weight(weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: PatchSizeLike,
                   patch_size: PatchSizeLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize a de-embedding stored as a linear layer, (kh*kw*C, D) with rows ordered (kh, kw, C)
    like DiT's `final_layer.linear`, and its bias (kh*kw*C,), from `kernel_size` to `patch_size`
    (`resize_deembed` on each output map). Returned as they are when the sizes are equal, 3-D
    (video) sizes included; only 2-D sizes are resized."""
    kernel = tuple(PatchSize.parse(kernel_size, name="kernel_size"))
    patch = tuple(PatchSize.parse(patch_size))
    if kernel == patch:
        return weight, bias
    if len(kernel) != 2 or len(patch) != 2:
        raise ValueError(f"kernel_size={kernel}, patch_size={patch}: only 2-D de-embeddings are "
                         "resized; a 3-D one runs at its stored size")
    return _on_output_maps(weight, bias, kernel, lambda maps: resize_deembed(maps, patch))


def lift_deembed_weight(weight: torch.Tensor, bias: torch.Tensor, kernel_size: PatchSizeLike,
                        size: PatchSizeLike) -> tuple[torch.Tensor, torch.Tensor]:
    """`lift_deembed` for a de-embedding stored as a linear layer (rows (kh, kw, C), like
    `deembed_weight`): the smallest-norm (weight, bias) at `size` that resize back exactly."""
    kernel = tuple(PatchSize.parse(kernel_size, ndim=2, name="kernel_size"))
    size = _size(size, "size")
    return _on_output_maps(weight, bias, kernel, lambda maps: lift_deembed(maps, size))


def _on_output_maps(weight, bias, kernel, fn):
    """Apply `fn` to a linear de-embedding's output maps: rows (kh, kw, C) of (kh*kw*C, D) are
    viewed as maps (C, D, kh, kw) (and the bias as (C, kh, kw)), and the result turned back."""
    kh, kw = kernel
    check_tensor("weight", weight, ndim=2, dtypes=DTYPES)
    if weight.shape[0] % (kh * kw):
        raise ValueError(f"weight: shape {tuple(weight.shape)} is not (kh*kw*C_out, D) for kernel_size {kernel}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=DTYPES, device=weight.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    d = weight.shape[1]
    c = weight.shape[0] // (kh * kw)
    w = fn(weight.reshape(kh, kw, c, d).permute(2, 3, 0, 1))            # (C, D, h, w)
    w = w.permute(2, 3, 0, 1).reshape(-1, d).contiguous()
    if bias is not None:
        bias = fn(bias.reshape(kh, kw, c).permute(2, 0, 1)).permute(1, 2, 0).reshape(-1).contiguous()
    return w, bias
