"""patchify / unpatchify: images (N, C, H, W) or videos (N, C, F, H, W) <-> tokens.

Layout: tokens (N, T, prod(patch) * C). Token t is patch (fg, hg, wg) of a row-major grid,
t = (fg * GH + hg) * GW + wg (images: t = hg * GW + wg), and its features are ordered
(pt, ph, pw, C), channel fastest: exactly DiT's `unpatchify` (`x.reshape(N, h, w, p, p, C)`,
einsum "nhwpqc->nchpwq") and its patch embedding's token order. Backends, in priority order:
the compiled extension (`flexikern._C`: C++ with OpenMP on CPU, CUDA kernels; patch sizes 1..8
per axis) and the torch reference (reshape + permute). Both are differentiable: each op's
backward is the other.
"""

from __future__ import annotations

import math
import torch

from flexikern.ops._cache import constant_while_tracing
from flexikern.ops._checks import FLOAT_DTYPES, check_divides, check_size, check_tensor
from flexikern.ops._dispatch import Backend, dispatch
from flexikern.ops.patch_size import PatchSize, PatchSizeLike

__all__ = ["patchify", "unpatchify", "patchify_reference", "unpatchify_reference",
           "PATCHIFY_BACKENDS", "UNPATCHIFY_BACKENDS"]

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


# ---- backends and their priority: the extension first, then torch ---------------------------


@constant_while_tracing   # torch.compile loads the library while tracing
def _extension_unavailable() -> str | None:
    from flexikern import _ext
    return _ext.unavailable_reason()


class _ExtensionBackend(Backend):
    """flexikern._C: CPU (C++/OpenMP) and, when built with CUDA, CUDA kernels; patch <= 8."""

    name = "ext"
    dtypes = DTYPES

    def unavailable_reason(self) -> str | None:
        return _extension_unavailable()

    def _reasons(self, tensor: torch.Tensor, patch: tuple[int, ...]) -> list[str]:
        reasons = super().not_supported_reasons(tensor=tensor)
        if reasons:
            return reasons
        from flexikern import _ext
        if tensor.device.type == "cuda" and not _ext.cuda_built():
            reasons.append("flexikern._C was built without CUDA (no CUDA torch or nvcc at build "
                           "time, or FLEXIKERN_SKIP_CUDA_BUILD)")
        if max(patch) > _ext.load().max_patch:
            reasons.append(f"patch size {patch}: its sizes exceed the extension's maximum "
                           f"{_ext.load().max_patch} per axis")
        return reasons


class ExtensionPatchify(_ExtensionBackend):
    op = "patchify"

    def not_supported_reasons(self, x, patch_size):
        return self._reasons(x, patch_size)

    def __call__(self, x, patch_size):
        return torch.ops.flexikern.patchify(x, list(patch_size))


class ExtensionUnpatchify(_ExtensionBackend):
    op = "unpatchify"

    def not_supported_reasons(self, tokens, patch_size, size):
        return self._reasons(tokens, patch_size)

    def __call__(self, tokens, patch_size, size):
        return torch.ops.flexikern.unpatchify(tokens, list(patch_size), list(size))


class _TorchBackend(Backend):
    name = "torch"
    dtypes = DTYPES


class TorchPatchify(_TorchBackend):
    op = "patchify"

    def __call__(self, x, patch_size):
        return patchify_reference(x, patch_size)


class TorchUnpatchify(_TorchBackend):
    op = "unpatchify"

    def __call__(self, tokens, patch_size, size):
        return unpatchify_reference(tokens, patch_size, size)


PATCHIFY_BACKENDS = (ExtensionPatchify(), TorchPatchify())
UNPATCHIFY_BACKENDS = (ExtensionUnpatchify(), TorchUnpatchify())


# ---- public API ------------------------------------------------------------------------------


def patchify(x: torch.Tensor, patch_size: PatchSizeLike) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/ph * W/pw, ph*pw*C); video (N, C, F, H, W) with (pt, ph, pw).

    Tokens lie on a row-major grid of patches, features ordered (ph, pw, C) / (pt, ph, pw, C).
    fp16, bf16, fp32 and fp64; any strides (the input is read as if contiguous).
    """
    check_tensor("x", x, ndim=(4, 5), dtypes=DTYPES)
    patch = tuple(PatchSize.parse(patch_size, ndim=x.dim() - 2))  # plain: torch.compile traces it
    check_divides("x", x.shape[2:], patch)
    return dispatch("patchify", x=x, patch_size=patch)


def _check_tokens_fit(name: str, shape: tuple[int, ...], patch: tuple[int, ...],
                      size: tuple[int, ...]) -> None:
    grid = math.prod([s // p for s, p in zip(size, patch)])
    volume = math.prod(patch)
    if shape[-2] != grid or shape[-1] % volume:
        raise ValueError(f"{name}: shape {shape} does not fit size {size} with patch "
                         f"{patch}: expected (..., {grid}, {volume}*C)")


def unpatchify(tokens: torch.Tensor, patch_size: PatchSizeLike,
               size: tuple[int, ...]) -> torch.Tensor:
    """The exact inverse of `patchify`: tokens (N, T, prod(patch)*C) -> (N, C, *size)."""
    check_tensor("tokens", tokens, ndim=3, dtypes=DTYPES)
    size = check_size("size", size)
    patch = tuple(PatchSize.parse(patch_size, ndim=len(size)))
    check_divides("size", size, patch)
    _check_tokens_fit("tokens", tuple(tokens.shape), patch, size)
    return dispatch("unpatchify", tokens=tokens, patch_size=patch, size=size)

