"""Fused de-embedding: linear D -> ph*pw*C_out with the weight resized in-launch, unpatchify fused.

Forward (one launch, `_common.tokens_to_image`): tokens (N, T, D) times the stored de-embedding
(kh*kw*C_out, D), rows ordered (kh, kw, C_out), bilinearly resized to the patch size inside the
K loop (`w @ R^T` per output map, as `deembed_weight` does), plus the resized bias, written
straight into the image (N, C_out, H, W).

Backward:
* grad tokens: `_common.image_to_tokens`, the fused GEMM run the other way (reads grad image in
  place through its strides, resized weight in registers).
* grad weight and bias: torch ops. grad of the resized weight = patchify(grad image)^T @ tokens,
  one matmul whose long reduction over N*T tokens cuBLAS splits well (the patchified grad image
  is ph*pw*C_out features per token, small next to the tokens); grad of the stored weight =
  R^T times that, a (kh*kw, ph*pw) matmul.
"""

from __future__ import annotations

import torch

from flexikern.flexi.resize import resize_matrix
from flexikern.kernels._common import EffectiveWeight, image_to_tokens, new_output, tokens_to_image
from flexikern.ops.patchify import patchify_reference

__all__ = ["de_embed_triton"]


def _effective_weight(weight: torch.Tensor, kernel: tuple[int, int],
                      patch: tuple[int, int]) -> EffectiveWeight:
    """Describe the resized de-embedding W_eff[d, c, j] = sum_i R[j, i] weight[(i, c), d]."""
    kk = kernel[0] * kernel[1]
    c = weight.shape[0] // kk
    resize = None
    if kernel != patch:
        resize = resize_matrix(kernel, patch, weight.device, torch.float32).T  # (kh*kw, ph*pw)
    # Row (i, c) of the stored weight sits at (i*C + c) * stride(0).
    strides = (weight.stride(1), weight.stride(0), c * weight.stride(0))
    return EffectiveWeight(weight=weight, weight_strides=strides, channels=c,
                           features=weight.shape[1], kernel_size=kernel, patch_size=patch,
                           resize=resize)


class DeEmbedFunction(torch.autograd.Function):
    """de_embed with Triton forward and grad-tokens; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, patch, size):
        effective = _effective_weight(weight, kernel, patch)
        c = effective.channels
        out = new_output((x.shape[0], c, *size), x.dtype, x.device)
        # The stored bias (kh*kw*C,) is ordered (i, c): channel stride 1, pixel stride C.
        tokens_to_image(x, effective, out, bias=bias, bias_strides=(1, c))
        ctx.save_for_backward(x, weight)
        ctx.kernel, ctx.patch = kernel, patch
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The torch ops below work in fp32 on purpose; autocast must not downcast them.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _de_embed_backward(ctx, grad_out)


def _de_embed_backward(ctx, grad_out):
    """Gradients for DeEmbedFunction.forward's inputs (grad tokens by the fused kernel)."""
    x, weight = ctx.saved_tensors
    kernel, patch = ctx.kernel, ctx.patch
    needs = ctx.needs_input_grad
    effective = _effective_weight(weight, kernel, patch)
    c, d = effective.channels, effective.features
    grad_x = grad_weight = grad_bias = None

    if needs[0]:
        grad_x = new_output(x.shape, x.dtype, x.device)
        image_to_tokens(grad_out, effective, grad_x)

    if needs[1] or needs[2]:
        pp = patch[0] * patch[1]
        patches = patchify_reference(grad_out, patch).reshape(-1, pp * c)  # (N*T, (j, c))
        resize_t = None
        if kernel != patch:
            resize_t = resize_matrix(kernel, patch, x.device, torch.float32).T  # (kh*kw, ph*pw)
        if needs[1]:
            grad_resized = patches.to(x.dtype).T @ x.reshape(-1, d)              # (ph*pw*C, D)
            if resize_t is not None:
                grad_resized = resize_t @ grad_resized.float().reshape(pp, c * d)
            grad_weight = grad_resized.reshape(-1, d).to(weight.dtype)
        if needs[2]:
            grad_bias = patches.sum(0, dtype=torch.float32)
            if resize_t is not None:
                grad_bias = resize_t @ grad_bias.reshape(pp, c)
            grad_bias = grad_bias.reshape(-1).to(ctx.bias_dtype)
    return grad_x, grad_weight, grad_bias, None, None, None


def de_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    kernel_size: tuple[int, int], patch_size: tuple[int, int],
                    size: tuple[int, int]) -> torch.Tensor:
    """The Triton de_embed (inputs already validated by `flexikern.ops.de_embed`).

    x may have any strides; the weight and bias are made contiguous (a no-op for parameters).
    """
    kernel = (int(kernel_size[0]), int(kernel_size[1]))
    patch = (int(patch_size[0]), int(patch_size[1]))
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return DeEmbedFunction.apply(x, weight, bias, kernel, patch, (int(size[0]), int(size[1])))
