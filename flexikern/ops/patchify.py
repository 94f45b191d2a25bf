"""patchify / unpatchify: images (N, C, H, W) or videos (N, C, F, H, W) <-> tokens.

Layout (DESIGN.md): tokens (N, T, prod(patch) * C) on a row-major grid, features ordered
(pt, ph, pw, C) as DiT's `unpatchify` expects. Backends, in priority order: the compiled
extension (`flexikern._C`: C++ with OpenMP on CPU, CUDA kernels; patch sizes 1..8 per axis) and
the torch reference (reshape + permute). Both are differentiable: each op's backward is the other.

The packed variant puts groups with different patch sizes into one token buffer (see
`patchify_packed` for the layout), the input of `varlen_attention`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from flexikern.ops._checks import FLOAT_DTYPES, as_patch, check_divides, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, register

__all__ = ["patchify", "unpatchify", "patchify_packed", "unpatchify_packed", "patchify_reference",
           "unpatchify_reference", "patchify_packed_reference", "unpatchify_packed_reference"]

# Patchify only moves values, so float64 is as exact as the rest (and lets gradcheck run).
DTYPES = FLOAT_DTYPES + (torch.float64,)


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
    return tokens.reshape(n, -1, c * math.prod(patch_size))


def unpatchify_reference(tokens: torch.Tensor, patch_size: tuple[int, ...],
                         size: tuple[int, ...]) -> torch.Tensor:
    """The plain-torch ground truth: the exact inverse of `patchify_reference`."""
    n, _, features = tokens.shape
    k = len(size)
    c = features // math.prod(patch_size)
    grid = [s // p for s, p in zip(size, patch_size)]
    x = tokens.reshape(n, *grid, *patch_size, c)
    # (n, g0.., p0.., c) -> (n, c, g0, p0, g1, p1, ...)
    order = [0, 1 + 2 * k]
    for i in range(k):
        order += [1 + i, 1 + k + i]
    return x.permute(order).reshape(n, c, *size)


def packed_cu_seqlens(shapes: Sequence[Sequence[int]], patch_sizes: Sequence[tuple[int, ...]],
                      device: torch.device | str | None = None) -> torch.Tensor:
    """int32 (sum N_i + 1,): where each sequence starts in the packed buffer, then the total."""
    lengths = [math.prod([s // p for s, p in zip(shape[2:], patch)])
               for shape, patch in zip(shapes, patch_sizes) for _ in range(shape[0])]
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def patchify_packed_reference(xs: Sequence[torch.Tensor], patch_sizes: Sequence[tuple[int, ...]]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch ground truth of `patchify_packed`."""
    width = max([math.prod(p) for p in patch_sizes]) * xs[0].shape[1]
    rows = []
    for x, patch in zip(xs, patch_sizes):
        tokens = patchify_reference(x, patch)
        rows.append(F.pad(tokens.reshape(-1, tokens.shape[-1]), (0, width - tokens.shape[-1])))
    cu_seqlens = packed_cu_seqlens([x.shape for x in xs], patch_sizes, xs[0].device)
    return torch.cat(rows), cu_seqlens


def unpatchify_packed_reference(tokens: torch.Tensor, patch_sizes: Sequence[tuple[int, ...]],
                                sizes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """The plain-torch ground truth of `unpatchify_packed` (cu_seqlens follows from `sizes`)."""
    out, row = [], 0
    for patch, (n, c, *size) in zip(patch_sizes, sizes):
        grid = math.prod([s // p for s, p in zip(size, patch)])
        group = tokens[row:row + n * grid, :math.prod(patch) * c].reshape(n, grid, -1)
        out.append(unpatchify_reference(group, patch, tuple(size)))
        row += n * grid
    return out


# ---- backends: the extension first (priority), then torch ------------------------------------


class _ExtensionBackend(Backend):
    """flexikern._C: CPU (C++/OpenMP) and, when built with CUDA, CUDA kernels; patch <= 8."""

    name = "ext"
    dtypes = DTYPES

    def unavailable_reason(self) -> str | None:
        from flexikern import _ext
        return _ext.unavailable_reason()

    def _reasons(self, tensor: torch.Tensor, patches: Sequence[tuple[int, ...]]) -> list[str]:
        reasons = super().not_supported_reasons(tensor=tensor)
        if reasons:
            return reasons
        from flexikern import _ext
        if tensor.device.type == "cuda" and not _ext.cuda_built():
            reasons.append("flexikern._C was built without CUDA (no CUDA torch or nvcc at build "
                           "time, or FLEXIKERN_SKIP_CUDA_BUILD)")
        too_big = [p for p in patches if max(p) > _ext.load().max_patch]
        if too_big:
            reasons.append(f"patch sizes {too_big} exceed the extension's maximum "
                           f"{_ext.load().max_patch} per axis")
        return reasons


@register
class ExtensionPatchify(_ExtensionBackend):
    op = "patchify"

    def not_supported_reasons(self, x, patch_size):
        return self._reasons(x, [patch_size])

    def __call__(self, x, patch_size):
        return torch.ops.flexikern.patchify(x, list(patch_size))


@register
class ExtensionUnpatchify(_ExtensionBackend):
    op = "unpatchify"

    def not_supported_reasons(self, tokens, patch_size, size):
        return self._reasons(tokens, [patch_size])

    def __call__(self, tokens, patch_size, size):
        return torch.ops.flexikern.unpatchify(tokens, list(patch_size), list(size))


@register
class ExtensionPatchifyPacked(_ExtensionBackend):
    op = "patchify_packed"

    def not_supported_reasons(self, xs, patch_sizes):
        return self._reasons(xs[0], patch_sizes)

    def __call__(self, xs, patch_sizes):
        return torch.ops.flexikern.patchify_packed(list(xs), [p for ps in patch_sizes for p in ps])


@register
class ExtensionUnpatchifyPacked(_ExtensionBackend):
    op = "unpatchify_packed"

    def not_supported_reasons(self, tokens, cu_seqlens, patch_sizes, sizes):
        return self._reasons(tokens, patch_sizes)

    def __call__(self, tokens, cu_seqlens, patch_sizes, sizes):
        return list(torch.ops.flexikern.unpatchify_packed(
            tokens, [p for ps in patch_sizes for p in ps], [s for size in sizes for s in size]))


class _TorchBackend(Backend):
    name = "torch"
    dtypes = DTYPES


@register
class TorchPatchify(_TorchBackend):
    op = "patchify"

    def __call__(self, x, patch_size):
        return patchify_reference(x, patch_size)


@register
class TorchUnpatchify(_TorchBackend):
    op = "unpatchify"

    def __call__(self, tokens, patch_size, size):
        return unpatchify_reference(tokens, patch_size, size)


@register
class TorchPatchifyPacked(_TorchBackend):
    op = "patchify_packed"

    def not_supported_reasons(self, xs, patch_sizes):
        return super().not_supported_reasons(x=xs[0])

    def __call__(self, xs, patch_sizes):
        return patchify_packed_reference(xs, patch_sizes)


@register
class TorchUnpatchifyPacked(_TorchBackend):
    op = "unpatchify_packed"

    def __call__(self, tokens, cu_seqlens, patch_sizes, sizes):
        return unpatchify_packed_reference(tokens, patch_sizes, sizes)


# ---- public API ------------------------------------------------------------------------------


def _patch_for(x_dim: int, patch_size) -> tuple[int, ...]:
    return as_patch(patch_size, 2 if x_dim == 4 else 3)


def patchify(x: torch.Tensor, patch_size: int | tuple[int, ...]) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/ph * W/pw, ph*pw*C); video (N, C, F, H, W) with (pt, ph, pw).

    Tokens lie on a row-major grid of patches, features ordered (ph, pw, C) / (pt, ph, pw, C).
    fp16, bf16, fp32 and fp64; any strides (the input is read as if contiguous).
    """
    check_tensor("x", x, ndim=(4, 5), dtypes=DTYPES)
    patch = _patch_for(x.dim(), patch_size)
    check_divides("x", x.shape[2:], patch)
    return dispatch("patchify", x=x, patch_size=patch)


def _check_tokens_fit(name: str, shape: tuple[int, ...], patch: tuple[int, ...],
                      size: tuple[int, ...]) -> None:
    grid = math.prod([s // p for s, p in zip(size, patch)])
    volume = math.prod(patch)
    if shape[-2] != grid or shape[-1] % volume:
        raise ValueError(f"{name}: shape {shape} does not fit size {size} with patch "
                         f"{patch}: expected (..., {grid}, {volume}*C)")


def unpatchify(tokens: torch.Tensor, patch_size: int | tuple[int, ...],
               size: tuple[int, ...]) -> torch.Tensor:
    """The exact inverse of `patchify`: tokens (N, T, prod(patch)*C) -> (N, C, *size)."""
    check_tensor("tokens", tokens, ndim=3, dtypes=DTYPES)
    if not isinstance(size, (tuple, list, torch.Size)) or len(size) not in (2, 3):
        raise ValueError(f"size={size!r}: expected (H, W) or (F, H, W)")
    size = tuple(int(s) for s in size)
    patch = _patch_for(len(size) + 2, patch_size)
    check_divides("size", size, patch)
    _check_tokens_fit("tokens", tuple(tokens.shape), patch, size)
    return dispatch("unpatchify", tokens=tokens, patch_size=patch, size=size)


def _check_groups(name: str, shapes: Sequence[tuple[int, ...]], patch_sizes) -> list[tuple]:
    """Validates the packed groups' image shapes against their patch sizes; returns the patches."""
    if not isinstance(patch_sizes, (list, tuple)) or len(patch_sizes) != len(shapes):
        raise ValueError(f"patch_sizes={patch_sizes!r}: expected a list with one patch size per "
                         f"group ({len(shapes)} groups)")
    rank, channels = len(shapes[0]), shapes[0][1] if len(shapes[0]) > 1 else None
    patches = []
    for i, shape in enumerate(shapes):
        if len(shape) not in (4, 5) or len(shape) != rank or shape[1] != channels:
            raise ValueError(f"{name}[{i}]: shape {tuple(shape)}; every group must be "
                             f"(N, C, H, W) or (N, C, F, H, W) with the rank and channels of "
                             f"group 0, {tuple(shapes[0])}")
        patch = _patch_for(rank, patch_sizes[i])
        check_divides(f"{name}[{i}]", shape[2:], patch)
        patches.append(patch)
    return patches


def patchify_packed(xs: Sequence[torch.Tensor], patch_sizes: Sequence[int | tuple[int, ...]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patchify groups with different patch sizes into one packed token buffer.

    Group i is `xs[i]`, (N_i, C, H_i, W_i) or (N_i, C, F_i, H_i, W_i), with patch `patch_sizes[i]`;
    every group has the same rank, C, dtype and device. It gives N_i sequences of T_i tokens of
    D_i = prod(patch_i) * C features. Layout of `tokens`, (total_tokens, D_max) with
    D_max = max_i D_i: rows are group 0's samples in order (each its T_i tokens, row-major as in
    `patchify`), then group 1's, ...; in a row of group i, columns [0, D_i) are `patchify`'s
    features and columns [D_i, D_max) are zero. `cu_seqlens`, int32 (sum_i N_i + 1,), holds the
    first row of each sequence and then total_tokens (the `varlen_attention` convention).
    Differentiable; the inverse is `unpatchify_packed`.
    """
    if not isinstance(xs, (list, tuple)) or not xs:
        raise ValueError(f"xs: expected a non-empty list of tensors, got {type(xs).__name__}")
    for i, x in enumerate(xs):
        check_tensor(f"xs[{i}]", x, ndim=(4, 5), dtypes=DTYPES, device=xs[0].device)
        if x.dtype != xs[0].dtype:
            raise TypeError(f"xs[{i}]: dtype {x.dtype} differs from xs[0]'s {xs[0].dtype}")
    patches = _check_groups("xs", [tuple(x.shape) for x in xs], patch_sizes)
    return dispatch("patchify_packed", xs=list(xs), patch_sizes=patches)


def _capturing_or_compiling() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available()
                                             and torch.cuda.is_current_stream_capturing())


def unpatchify_packed(tokens: torch.Tensor, cu_seqlens: torch.Tensor,
                      patch_sizes: Sequence[int | tuple[int, ...]],
                      sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The exact inverse of `patchify_packed`: returns the groups' images, a list.

    `sizes[i]` is group i's image shape (N_i, C, H_i, W_i) or (N_i, C, F_i, H_i, W_i), e.g.
    `[x.shape for x in xs]`. `cu_seqlens` must be the one `patchify_packed` gave; its values are
    checked except while compiling or capturing a CUDA graph (reading them would sync).
    """
    check_tensor("tokens", tokens, ndim=2, dtypes=DTYPES)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=tokens.device)
    if not isinstance(sizes, (list, tuple)) or not sizes:
        raise ValueError(f"sizes={sizes!r}: expected a non-empty list of image shapes "
                         "(N_i, C, H_i, W_i) or (N_i, C, F_i, H_i, W_i)")
    shapes = [tuple(int(s) for s in size) for size in sizes]
    patches = _check_groups("sizes", shapes, patch_sizes)
    rows = sum(n * math.prod([s // p for s, p in zip(size, patch)])
               for (n, _, *size), patch in zip(shapes, patches))
    width = shapes[0][1] * max([math.prod(p) for p in patches])
    if tuple(tokens.shape) != (rows, width):
        raise ValueError(f"tokens: shape {tuple(tokens.shape)} does not fit sizes {shapes} with "
                         f"patch sizes {patches}: expected ({rows}, {width})")
    sequences = sum(shape[0] for shape in shapes)
    if cu_seqlens.shape[0] != sequences + 1:
        raise ValueError(f"cu_seqlens: length {cu_seqlens.shape[0]}, expected {sequences + 1} "
                         f"(one start per sequence, then the total)")
    if not _capturing_or_compiling():
        expected = packed_cu_seqlens(shapes, patches)
        if not torch.equal(cu_seqlens.cpu(), expected):
            raise ValueError(f"cu_seqlens={cu_seqlens.tolist()} does not match sizes {shapes} "
                             f"with patch sizes {patches}: expected {expected.tolist()}")
    return dispatch("unpatchify_packed", tokens=tokens, cu_seqlens=cu_seqlens,
                    patch_sizes=patches, sizes=shapes)
