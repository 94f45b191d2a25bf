"""Fused patch embedding: conv(kernel = stride = patch) as tokens, with the kernel resized in-launch.

Forward (one launch, `_common.image_to_tokens`): reads the latent (N, C, H, W) in place through
its strides (contiguous or channels_last), resizes the stored kernel (D, C, kh, kw) to the patch
size inside the K loop (`pi_resize_matrix`), adds `weight_delta`, bias, the positional table and
the patch-size embedding, and writes (N, T, D) once.

Backward:
* grad x: `_common.tokens_to_image`, the same fused GEMM run the other way (grad tokens times the
  resized kernel, written straight into the latent's layout).
* grad of the resized kernel (and so of `weight_delta`): one torch matmul, grad_out^T @ patches.
  The patchified latent is a copy of x (tiny next to the tokens: C*ph*pw <= D features per
  token), and cuBLAS does the long reduction over N*T tokens with split-K better than a
  hand-written kernel would; grad of the stored kernel = that times P^T (a (kh*kw, ph*pw) matmul).
* bias, size embedding, pos_embed: fp32 sums of grad_out.
"""

from __future__ import annotations

import torch

from flexikern.flexi.resize import pi_resize_matrix
from flexikern.kernels._common import EffectiveWeight, image_to_tokens, new_output, tokens_to_image
from flexikern.ops.patchify import patchify_reference

__all__ = ["patch_embed_triton"]


def _effective_weight(weight: torch.Tensor, patch: tuple[int, int],
                      weight_delta: torch.Tensor | None) -> EffectiveWeight:
    """Describe pi_resize(weight, patch) + weight_delta for the kernels, without computing it."""
    d, c, kh, kw = weight.shape
    resize = None
    if (kh, kw) != patch:
        resize = pi_resize_matrix((kh, kw), patch, weight.device, torch.float32)  # (kh*kw, ph*pw)
    delta_strides = (0, 0, 0)
    if weight_delta is not None:
        delta_strides = (weight_delta.stride(0), weight_delta.stride(1), weight_delta.stride(3))
    return EffectiveWeight(weight=weight, weight_strides=(weight.stride(0), weight.stride(1),
                                                          weight.stride(3)),
                           channels=c, features=d, kernel_size=(kh, kw), patch_size=patch,
                           resize=resize, delta=weight_delta, delta_strides=delta_strides)


def _output_dtype(x: torch.Tensor, *adds: torch.Tensor | None) -> torch.dtype:
    # Like the reference: the conv is in x's dtype, then `+ pos_embed + size_embed` promotes.
    dtype = x.dtype
    for t in adds:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class PatchEmbedFunction(torch.autograd.Function):
    """patch_embed with Triton forward and grad-x; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, patch, pos_embed, size_embed, weight_delta):
        n, c, h, w = x.shape
        tokens = (h // patch[0]) * (w // patch[1])
        out = new_output((n, tokens, weight.shape[0]), _output_dtype(x, pos_embed, size_embed),
                         x.device)
        image_to_tokens(x, _effective_weight(weight, patch, weight_delta), out, bias=bias,
                        pos_embed=pos_embed, size_embed=size_embed)
        ctx.save_for_backward(x, weight, weight_delta)
        ctx.patch = patch
        ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, pos_embed, size_embed))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The torch ops below work in fp32 on purpose; autocast must not downcast them.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _patch_embed_backward(ctx, grad_out)


def _patch_embed_backward(ctx, grad_out):
    """Gradients for PatchEmbedFunction.forward's inputs (grad x by the fused kernel)."""
    x, weight, weight_delta = ctx.saved_tensors
    patch = ctx.patch
    needs = ctx.needs_input_grad
    bias_dtype, pos_dtype, size_dtype = ctx.dtypes
    d, c, kh, kw = weight.shape
    grad_x = grad_weight = grad_bias = grad_pos = grad_size = grad_delta = None

    if needs[0]:
        # channels_last x gets a channels_last gradient: the kernel writes through strides.
        memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                         and not x.is_contiguous() else torch.contiguous_format)
        grad_x = new_output(x.shape, x.dtype, x.device, memory_format)
        tokens_to_image(grad_out, _effective_weight(weight, patch, weight_delta), grad_x)

    if needs[1] or needs[6]:
        patches = patchify_reference(x, patch).reshape(-1, patch[0] * patch[1] * c)
        grad_resized = grad_out.reshape(-1, d).to(x.dtype).T @ patches   # (D, ph*pw*C)
        grad_resized = grad_resized.reshape(d, patch[0] * patch[1], c).transpose(1, 2)
        if needs[6]:
            grad_delta = grad_resized.reshape(d, c, *patch).to(weight_delta.dtype)
        if needs[1]:
            if (kh, kw) == patch:
                grad_weight = grad_resized.reshape(d, c, kh, kw).to(weight.dtype)
            else:
                resize = pi_resize_matrix((kh, kw), patch, x.device, torch.float32)
                grad_weight = (grad_resized.float() @ resize.T).reshape(d, c, kh, kw)
                grad_weight = grad_weight.to(weight.dtype)

    if needs[2] or needs[5]:
        summed = grad_out.sum((0, 1), dtype=torch.float32)
        grad_bias = summed.to(bias_dtype) if needs[2] else None
        grad_size = summed.to(size_dtype) if needs[5] else None
    if needs[4]:
        grad_pos = grad_out.sum(0, dtype=torch.float32).to(pos_dtype)
    return grad_x, grad_weight, grad_bias, None, grad_pos, grad_size, grad_delta


def patch_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       patch_size: tuple[int, int], pos_embed: torch.Tensor | None = None,
                       size_embed: torch.Tensor | None = None,
                       weight_delta: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton patch_embed (inputs already validated by `flexikern.ops.patch_embed`).

    x may have any strides; the small parameters are made contiguous (a no-op for parameters).
    """
    patch = (int(patch_size[0]), int(patch_size[1]))
    contiguous = [t.contiguous() if t is not None else None
                  for t in (weight, bias, size_embed, weight_delta)]
    weight, bias, size_embed, weight_delta = contiguous
    return PatchEmbedFunction.apply(x, weight, bias, patch, pos_embed, size_embed, weight_delta)
