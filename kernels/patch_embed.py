"""Fused patch embedding launches: conv(kernel = stride = patch) as tokens, kernel resized inside.

* `patch_embed_forward` (one launch, `_common.image_to_tokens`): reads the latent (N, C, H, W) in
  place through its strides (contiguous or channels_last), resizes the stored kernel
  (D, C, kh, kw) to the patch size inside the K loop, adds the bias, the positional table and the
  patch-size embedding, and writes (N, T, D) once.
* `patch_embed_backward_x` (one launch, `_common.tokens_to_image`): the same fused GEMM run the
  other way, grad tokens times the resized kernel, written straight into the latent's layout.

The caller (`flexikern.ops.patch_embed`, which holds the custom ops and the parameter
gradients) passes the resize matrix: `resize` is (kh*kw, ph*pw), `w_patch = w_stored @ resize` on
the flattened pixels (FlexiViT's PI-resize), or None when the stored size is the patch size.
"""

from __future__ import annotations

import torch

from flexikern.kernels._common import EffectiveWeight, image_to_tokens, new_output, tokens_to_image

__all__ = ["patch_embed_forward", "patch_embed_backward_x"]


def _effective_weight(weight: torch.Tensor, resize: torch.Tensor | None,
                      patch: tuple[int, int]) -> EffectiveWeight:
    """Describe the stored kernel (D, C, kh, kw) times `resize` for the kernels (not computed)."""
    d, c, kh, kw = weight.shape
    return EffectiveWeight(weight=weight, weight_strides=(weight.stride(0), weight.stride(1),
                                                          weight.stride(3)),
                           channels=c, features=d, kernel_size=(kh, kw), patch_size=patch,
                           resize=resize)


def _output_dtype(x: torch.Tensor, *adds: torch.Tensor | None) -> torch.dtype:
    # Like the reference: the conv is in x's dtype, then `+ pos_embed + size_embed` promotes.
    dtype = x.dtype
    for t in adds:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def patch_embed_forward(x: torch.Tensor, weight: torch.Tensor, resize: torch.Tensor | None,
                        bias: torch.Tensor | None, patch_size: tuple[int, int],
                        pos_embed: torch.Tensor | None, size_embed: torch.Tensor | None, *,
                        interpret: bool) -> torch.Tensor:
    """Tokens (N, H/ph * W/pw, D) of x (N, C, H, W), any strides.

    `weight` (D, C, kh, kw) with a unit stride along kw and kh = kw * stride(3) (contiguous, or a
    parameter); `bias`, `size_embed` (D,) contiguous; `pos_embed` (T, D) any strides.
    `interpret`: launch in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
    """
    n, _, h, w = x.shape
    patch = (int(patch_size[0]), int(patch_size[1]))
    tokens = (h // patch[0]) * (w // patch[1])
    out = new_output((n, tokens, weight.shape[0]), _output_dtype(x, pos_embed, size_embed),
                     x.device)
    return image_to_tokens(x, _effective_weight(weight, resize, patch), out, bias=bias,
                           pos_embed=pos_embed, size_embed=size_embed, interpret=interpret)


def patch_embed_backward_x(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           resize: torch.Tensor | None, patch_size: tuple[int, int], *,
                           interpret: bool) -> torch.Tensor:
    """The gradient w.r.t. x (shape, dtype and memory format of `x`) of `patch_embed_forward`."""
    patch = (int(patch_size[0]), int(patch_size[1]))
    # channels_last x gets a channels_last gradient: the kernel writes through strides.
    memory_format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous() else torch.contiguous_format)
    grad_x = new_output(x.shape, x.dtype, x.device, memory_format)
    return tokens_to_image(grad_out, _effective_weight(weight, resize, patch), grad_x,
                           interpret=interpret)
