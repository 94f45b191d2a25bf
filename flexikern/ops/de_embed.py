"""de_embed: FlexiDiT's final linear D -> prod(patch)*C_out, with unpatchify into image layout.

Images: `weight` is the underlying de-embedding (kh*kw*C_out, D), rows ordered (kh, kw, C_out)
like DiT's `final_layer.linear`; it is bilinearly resized to `patch_size` on the fly
(`flexikern.ops.resize.deembed_weight`). Videos: (pt*ph*pw*C_out, D), rows ordered
(pt, ph, pw, C_out), at its stored size (3-D de-embeddings are not resized).

Backends, in priority order: Triton (fused epilogue, 2-D only; CUDA, or the interpreter when
forced) and torch (linear, then `unpatchify`). The Triton backend is the custom op
`flexikern::de_embed_triton` (torch.library, so torch.compile keeps it opaque): the kernels'
launches (`flexikern.kernels.de_embed`) for the forward and grad tokens, torch ops for the
parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexikern.ops._checks import check_divides, check_same_dtype, check_size, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, triton_interpreting
from flexikern.ops.patch_embed import autocast_inputs, triton_reasons
from flexikern.ops.patch_size import PatchSize, PatchSizeLike
from flexikern.ops.patchify import patchify_reference, unpatchify, unpatchify_reference
from flexikern.ops.resize import deembed_weight, resize_matrix

__all__ = ["de_embed", "de_embed_reference", "de_embed_triton", "DE_EMBED_BACKENDS"]


def de_embed_reference(x, weight, bias, kernel_size, patch_size, size):
    """The plain-torch ground truth: resize, linear, unpatchify."""
    w, b = deembed_weight(weight, bias, kernel_size, patch_size)
    return unpatchify_reference(F.linear(x, w, b), patch_size, size)


# ---- the Triton backend: custom ops around the kernels' launches -----------------------------
# `flexikern::de_embed_triton` and its backward's launch `flexikern::de_embed_triton_grad_x` are
# torch.library custom ops with fake kernels: torch.compile keeps each as one opaque call in its
# forward and backward graphs. The resize matrix is an input (a constant the caller looks up), so
# nothing inside the ops or their backward reads a cache while being traced.


def _deembed_resize(kernel: tuple[int, int], patch: tuple[int, int],
                    device: torch.device) -> torch.Tensor | None:
    """R^T, (kh*kw, ph*pw): a stored output map times it is the map at the patch size; or None."""
    return None if kernel == patch else resize_matrix(kernel, patch, device, torch.float32).T


@torch.library.custom_op(
    "flexikern::de_embed_triton", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? resize, Tensor? bias, int[] kernel_size, "
           "int[] patch_size, int[] size) -> Tensor")
def _de_embed_op(x, weight, resize, bias, kernel_size, patch_size, size):
    """de_embed of image tokens with the fused Triton kernel; `resize` is `_deembed_resize`'s."""
    from flexikern.kernels.de_embed import de_embed_forward
    return de_embed_forward(x, weight, resize, bias, kernel_size, patch_size, size,
                            interpret=triton_interpreting())


@_de_embed_op.register_fake
def _de_embed_fake(x, weight, resize, bias, kernel_size, patch_size, size):
    channels = weight.shape[0] // (kernel_size[0] * kernel_size[1])
    return x.new_empty((x.shape[0], channels, size[0], size[1]))


@torch.library.custom_op(
    "flexikern::de_embed_triton_grad_x", mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor? resize, int[] kernel_size, "
           "int[] patch_size) -> Tensor")
def _de_embed_grad_x_op(grad_out, x, weight, resize, kernel_size, patch_size):
    """The gradient w.r.t. the tokens x of `flexikern::de_embed_triton`: the fused kernel run the
    other way."""
    from flexikern.kernels.de_embed import de_embed_backward_x
    return de_embed_backward_x(grad_out, x, weight, resize, kernel_size, patch_size,
                               interpret=triton_interpreting())


@_de_embed_grad_x_op.register_fake
def _de_embed_grad_x_fake(grad_out, x, weight, resize, kernel_size, patch_size):
    return x.new_empty(x.shape)  # contiguous, as de_embed_backward_x allocates it


def _de_embed_setup(ctx, inputs, output):
    x, weight, resize, bias, kernel_size, patch_size, size = inputs
    ctx.save_for_backward(x, weight, resize)
    ctx.kernel, ctx.patch = tuple(kernel_size), tuple(patch_size)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _de_embed_backward(ctx, grad_out):
    """Gradients of `flexikern::de_embed_triton`.

    Backward: grad tokens by the fused kernel run the other way; grad of the resized weight =
    patchify(grad image)^T @ tokens, one torch matmul whose long reduction over N*T tokens cuBLAS
    splits well (the patchified grad image is ph*pw*C_out features per token, small next to the
    tokens); grad of the stored weight and bias = the resize matrix times those, a
    (kh*kw, ph*pw) matmul.
    """
    # The torch ops below work in fp32 on purpose; autocast must not downcast them.
    with torch.autocast(grad_out.device.type, enabled=False):
        return _de_embed_grads(ctx, grad_out)


def _de_embed_grads(ctx, grad_out):
    x, weight, resize_t = ctx.saved_tensors
    kernel, patch = ctx.kernel, ctx.patch
    needs = ctx.needs_input_grad   # x, weight, resize, bias, kernel_size, patch_size, size
    d = weight.shape[1]
    c = weight.shape[0] // (kernel[0] * kernel[1])
    grad_x = grad_weight = grad_bias = None

    if needs[0]:
        grad_x = torch.ops.flexikern.de_embed_triton_grad_x(grad_out, x, weight, resize_t,
                                                             list(kernel), list(patch))
    if needs[1] or needs[3]:
        pp = patch[0] * patch[1]
        patches = patchify_reference(grad_out, patch).reshape(-1, pp * c)  # (N*T, (j, c))
        if needs[1]:
            grad_resized = patches.to(x.dtype).T @ x.reshape(-1, d)              # (ph*pw*C, D)
            if resize_t is not None:
                grad_resized = resize_t @ grad_resized.float().reshape(pp, c * d)
            grad_weight = grad_resized.reshape(-1, d).to(weight.dtype)
        if needs[3]:
            grad_bias = patches.sum(0, dtype=torch.float32)
            if resize_t is not None:
                grad_bias = resize_t @ grad_bias.reshape(pp, c)
            grad_bias = grad_bias.reshape(-1).to(ctx.bias_dtype)
    return grad_x, grad_weight, None, grad_bias, None, None, None


_de_embed_op.register_autograd(_de_embed_backward, setup_context=_de_embed_setup)


def de_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    kernel_size: tuple[int, int], patch_size: tuple[int, int],
                    size: tuple[int, int]) -> torch.Tensor:
    """The Triton de_embed of image tokens (inputs validated by `de_embed`), forward and
    backward: `flexikern::de_embed_triton`.

    x may have any strides; the weight and bias are made contiguous (a no-op for parameters).
    """
    kernel = (int(kernel_size[0]), int(kernel_size[1]))
    patch = (int(patch_size[0]), int(patch_size[1]))
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    resize_t = _deembed_resize(kernel, patch, x.device)
    return torch.ops.flexikern.de_embed_triton(x, weight, resize_t, bias, list(kernel),
                                               list(patch), [int(size[0]), int(size[1])])


# ---- backends and their priority: Triton, then torch -----------------------------------------


class TritonDeEmbed(Backend):
    """Fused Triton kernel (flexikern.kernels.de_embed): resizes the weight inside the launch and
    writes the image layout directly (unpatchify fused). Images only. CUDA, or CPU tensors under
    TRITON_INTERPRET=1 when forced."""

    op, name = "de_embed", "triton"
    requires = ("triton",)
    devices = ("cuda", "cpu")
    auto_on_cpu = False

    def not_supported_reasons(self, **inputs):
        return triton_reasons(
            self, inputs["x"], {"weight": inputs["weight"], "bias": inputs.get("bias")},
            {"patch_size": tuple(inputs["patch_size"]),
             "kernel_size": tuple(inputs["kernel_size"])})

    def __call__(self, **inputs):
        return de_embed_triton(**autocast_inputs(inputs, ("x", "weight", "bias")))


class TorchDeEmbed(Backend):
    """torch's linear, then `fk.ops.unpatchify` (the compiled extension when it is built)."""

    op, name = "de_embed", "torch"

    def __call__(self, x, weight, bias, kernel_size, patch_size, size):
        w, b = deembed_weight(weight, bias, kernel_size, patch_size)
        return unpatchify(F.linear(x, w, b), patch_size, size)


DE_EMBED_BACKENDS = (TritonDeEmbed(), TorchDeEmbed())


# ---- public API ------------------------------------------------------------------------------


def de_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             kernel_size: PatchSizeLike, patch_size: PatchSizeLike,
             size: tuple[int, ...]) -> torch.Tensor:
    """De-embed tokens (N, T, D) into an image (N, C_out, H, W) or a video (N, C_out, F, H, W).

    Args:
        x: tokens (N, T, D) on the (H/ph, W/pw) grid, or the (F/pt, H/ph, W/pw) grid.
        weight: images: the underlying de-embedding (kh*kw*C_out, D), rows ordered
            (kh, kw, C_out); videos: (pt*ph*pw*C_out, D), rows ordered (pt, ph, pw, C_out).
        bias: (weight.shape[0],) or None.
        kernel_size: the size `weight` is stored at: (kh, kw), or (pt, ph, pw) equal to
            `patch_size` (3-D de-embeddings are not resized).
        patch_size: the size to run at; an image weight is resized to it.
        size: the output (H, W) or (F, H, W), positive ints.
    Returns:
        (N, C_out, *size) in x's dtype (autocast's under autocast).
    Raises:
        TypeError: x or weight not a float tensor, or weight/bias of another dtype than x
            (F.linear needs one dtype; autocast casts them).
        ValueError: shapes, sizes or devices that do not fit.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("weight", weight, ndim=2, device=x.device)
    check_same_dtype("weight", weight, x)
    size = check_size("size", size)
    # Plain tuples: torch.compile traces them.
    kernel = tuple(PatchSize.parse(kernel_size, ndim=len(size), name="kernel_size"))
    patch = tuple(PatchSize.parse(patch_size, ndim=len(size)))
    if len(patch) == 3 and kernel != patch:
        raise ValueError(f"kernel_size={kernel}: a video de-embedding must be stored at "
                         f"patch_size {patch}; 3-D de-embeddings are not resized")
    check_divides("size", size, patch)
    if weight.shape[0] % math.prod(kernel) or weight.shape[1] != x.shape[2]:
        layout = "kh*kw*C_out" if len(kernel) == 2 else "pt*ph*pw*C_out"
        raise ValueError(f"weight: shape {tuple(weight.shape)} is not ({layout}, D) for kernel "
                         f"{kernel} and D={x.shape[2]}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        check_same_dtype("bias", bias, x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    tokens = math.prod([s // p for s, p in zip(size, patch)])
    if x.shape[1] != tokens:
        raise ValueError(f"x: {x.shape[1]} tokens, but size {size} with patch {patch} has {tokens}")
    return dispatch("de_embed", x=x, weight=weight, bias=bias, kernel_size=kernel,
                    patch_size=patch, size=size)
