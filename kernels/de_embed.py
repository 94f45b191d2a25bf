"""Fused de-embedding launches: linear D -> ph*pw*C_out, weight resized in-launch, unpatchify fused.

* `de_embed_forward` (one launch, `_common.tokens_to_image`): tokens (N, T, D) times the stored
  de-embedding (kh*kw*C_out, D), rows ordered (kh, kw, C_out), resized to the patch size inside
  the K loop, plus the resized bias, written straight into the image (N, C_out, H, W).
* `de_embed_backward_x` (one launch, `_common.image_to_tokens`): the fused GEMM run the other
  way, grad tokens from the grad image read in place through its strides.

The caller (`flexikern.ops.de_embed`, which holds the custom ops and the parameter
gradients) passes the resize matrix: `resize` is (kh*kw, ph*pw), each output map resized as
`map_patch = map_stored @ resize` on the flattened pixels (the bilinear resize R^T), or None when
the stored size is the patch size.
"""

from __future__ import annotations

import torch

from flexikern.kernels._common import EffectiveWeight, image_to_tokens, new_output, tokens_to_image

__all__ = ["de_embed_forward", "de_embed_backward_x"]


def _effective_weight(weight: torch.Tensor, resize: torch.Tensor | None,
                      kernel: tuple[int, int], patch: tuple[int, int]) -> EffectiveWeight:
    """Describe the resized de-embedding W_eff[d, c, j] = sum_i resize[i, j] weight[(i, c), d]."""
    c = weight.shape[0] // (kernel[0] * kernel[1])
    # Row (i, c) of the stored weight sits at (i*C + c) * stride(0).
    strides = (weight.stride(1), weight.stride(0), c * weight.stride(0))
    return EffectiveWeight(weight=weight, weight_strides=strides, channels=c,
                           features=weight.shape[1], kernel_size=kernel, patch_size=patch,
                           resize=resize)


def de_embed_forward(x: torch.Tensor, weight: torch.Tensor, resize: torch.Tensor | None,
                     bias: torch.Tensor | None, kernel_size: tuple[int, int],
                     patch_size: tuple[int, int], size: tuple[int, int], *,
                     interpret: bool) -> torch.Tensor:
    """The image (N, C_out, *size) of tokens x (N, T, D), any strides.

    `weight` (kh*kw*C_out, D) and `bias` (kh*kw*C_out,) contiguous. `interpret`: launch in the
    Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
    """
    kernel = (int(kernel_size[0]), int(kernel_size[1]))
    patch = (int(patch_size[0]), int(patch_size[1]))
    effective = _effective_weight(weight, resize, kernel, patch)
    c = effective.channels
    out = new_output((x.shape[0], c, int(size[0]), int(size[1])), x.dtype, x.device)
    # The stored bias (kh*kw*C,) is ordered (i, c): channel stride 1, pixel stride C.
    return tokens_to_image(x, effective, out, bias=bias, bias_strides=(1, c), interpret=interpret)


def de_embed_backward_x(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        resize: torch.Tensor | None, kernel_size: tuple[int, int],
                        patch_size: tuple[int, int], *, interpret: bool) -> torch.Tensor:
    """The gradient w.r.t. the tokens x (their shape and dtype) of `de_embed_forward`."""
    kernel = (int(kernel_size[0]), int(kernel_size[1]))
    patch = (int(patch_size[0]), int(patch_size[1]))
    grad_x = new_output(x.shape, x.dtype, x.device)
    return image_to_tokens(grad_out, _effective_weight(weight, resize, kernel, patch), grad_x,
                           interpret=interpret)
