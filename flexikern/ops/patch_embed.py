"""patch_embed: a conv with kernel = stride = patch size, as tokens, with FlexiDiT's adds fused.

Images: `weight` is the underlying kernel of ANY spatial size; it is PI-resized to `patch_size` on
the fly. Output (N, T, D) = conv(x, pi_resize(weight), bias) flattened + pos_embed + size_embed.
Videos (N, C, F, H, W): the kernel (D, C, pt, ph, pw) runs at its stored size (3-D kernels are not
resized), as a linear map of `patchify`'s tokens.

Backends, in priority order: Triton (fused, 2-D only; CUDA, or the interpreter when forced) and
the torch reference. The Triton backend is the custom op `flexikern::patch_embed_triton`
(torch.library, so torch.compile keeps it opaque): the kernels' launches
(`flexikern.kernels.patch_embed`) for the forward and grad x, torch ops for the parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexikern.ops._checks import check_divides, check_same_dtype, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, triton_interpreting
from flexikern.ops.patch_size import PatchSize, PatchSizeLike
from flexikern.ops.patchify import patchify_reference
from flexikern.ops.resize import pi_resize, pi_resize_matrix

__all__ = ["patch_embed", "patch_embed_reference", "patch_embed_triton", "PATCH_EMBED_BACKENDS"]

# Register/tile limit of the fused kernels: patches and stored kernels up to 64 pixels (8x8).
TRITON_MAX_PIXELS = 64


def patch_embed_reference(x, weight, bias, patch_size, pos_embed=None, size_embed=None):
    """The plain-torch ground truth (also the model's CPU path: for the original patch size and
    no extras it is DiT's `x_embedder(x) + pos_embed`, bit for bit). Videos: the linear map of
    `patchify`'s tokens, as Latte's embedding computes it."""
    if x.dim() == 5:
        d = weight.shape[0]
        tokens = F.linear(patchify_reference(x, patch_size),
                          weight.permute(0, 2, 3, 4, 1).reshape(d, -1), bias)
    else:
        w = pi_resize(weight, patch_size)
        tokens = F.conv2d(x, w, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    if size_embed is not None:
        tokens = tokens + size_embed
    return tokens


# ---- the Triton backend: custom ops around the kernels' launches -----------------------------
# `flexikern::patch_embed_triton` and its backward's launch `flexikern::patch_embed_triton_grad_x`
# are torch.library custom ops with fake kernels: torch.compile keeps each as one opaque call in
# its forward and backward graphs. The resize matrix is an input (a constant the caller looks
# up), so nothing inside the ops or their backward reads a cache while being traced.


def _embed_resize(kernel: tuple[int, int], patch: tuple[int, int],
                  device: torch.device) -> torch.Tensor | None:
    """The (kh*kw, ph*pw) matrix taking the stored kernel to the patch size, or None."""
    return None if kernel == patch else pi_resize_matrix(kernel, patch, device, torch.float32)


@torch.library.custom_op(
    "flexikern::patch_embed_triton", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? resize, Tensor? bias, int[] patch_size, "
           "Tensor? pos_embed, Tensor? size_embed) -> Tensor")
def _patch_embed_op(x, weight, resize, bias, patch_size, pos_embed, size_embed):
    """patch_embed of an image with the fused Triton kernel; `resize` is `_embed_resize`'s."""
    from flexikern.kernels.patch_embed import patch_embed_forward
    return patch_embed_forward(x, weight, resize, bias, patch_size, pos_embed, size_embed,
                               interpret=triton_interpreting())


@_patch_embed_op.register_fake
def _patch_embed_fake(x, weight, resize, bias, patch_size, pos_embed, size_embed):
    n, _, h, w = x.shape
    dtype = x.dtype
    for t in (pos_embed, size_embed):  # the adds promote, as in the reference
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return x.new_empty((n, (h // patch_size[0]) * (w // patch_size[1]), weight.shape[0]),
                       dtype=dtype)


@torch.library.custom_op(
    "flexikern::patch_embed_triton_grad_x", mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor? resize, int[] patch_size) -> Tensor")
def _patch_embed_grad_x_op(grad_out, x, weight, resize, patch_size):
    """The gradient w.r.t. x of `flexikern::patch_embed_triton`: the fused kernel run the other
    way."""
    from flexikern.kernels.patch_embed import patch_embed_backward_x
    return patch_embed_backward_x(grad_out, x, weight, resize, patch_size,
                                  interpret=triton_interpreting())


@_patch_embed_grad_x_op.register_fake
def _patch_embed_grad_x_fake(grad_out, x, weight, resize, patch_size):
    # As patch_embed_backward_x allocates it: channels_last for a channels_last x.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty_like(x, memory_format=torch.channels_last if channels_last
                            else torch.contiguous_format)


def _patch_embed_setup(ctx, inputs, output):
    x, weight, resize, bias, patch_size, pos_embed, size_embed = inputs
    ctx.save_for_backward(x, weight, resize)
    ctx.patch = tuple(patch_size)
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in (bias, pos_embed, size_embed))


def _patch_embed_backward(ctx, grad_out):
    """Gradients of `flexikern::patch_embed_triton`.

    Backward: grad x by the fused kernel run the other way; grad of the resized kernel by one
    torch matmul, grad_out^T @ patches (the patchified latent is a copy of x, tiny next to the
    tokens: C*ph*pw <= D features per token, and cuBLAS does the long reduction over N*T tokens
    with split-K better than a hand-written kernel would); grad of the stored kernel = that times
    the resize matrix^T, a (kh*kw, ph*pw) matmul; bias, size embedding, pos_embed: fp32 sums of
    grad_out.
    """
    # The torch ops below work in fp32 on purpose; autocast must not downcast them.
    with torch.autocast(grad_out.device.type, enabled=False):
        return _patch_embed_grads(ctx, grad_out)


def _patch_embed_grads(ctx, grad_out):
    x, weight, resize = ctx.saved_tensors
    patch = ctx.patch
    needs = ctx.needs_input_grad   # x, weight, resize, bias, patch_size, pos_embed, size_embed
    bias_dtype, pos_dtype, size_dtype = ctx.dtypes
    d, c, kh, kw = weight.shape
    grad_x = grad_weight = grad_bias = grad_pos = grad_size = None

    if needs[0]:
        grad_x = torch.ops.flexikern.patch_embed_triton_grad_x(grad_out, x, weight, resize,
                                                                list(patch))
    if needs[1]:
        patches = patchify_reference(x, patch).reshape(-1, patch[0] * patch[1] * c)
        grad_resized = grad_out.reshape(-1, d).to(x.dtype).T @ patches   # (D, ph*pw*C)
        grad_resized = grad_resized.reshape(d, patch[0] * patch[1], c).transpose(1, 2)
        if resize is None:
            grad_weight = grad_resized.reshape(d, c, kh, kw).to(weight.dtype)
        else:
            grad_weight = (grad_resized.float() @ resize.T).reshape(d, c, kh, kw)
            grad_weight = grad_weight.to(weight.dtype)
    if needs[3] or needs[6]:
        summed = grad_out.sum((0, 1), dtype=torch.float32)
        grad_bias = summed.to(bias_dtype) if needs[3] else None
        grad_size = summed.to(size_dtype) if needs[6] else None
    if needs[5]:
        grad_pos = grad_out.sum(0, dtype=torch.float32).to(pos_dtype)
    return grad_x, grad_weight, None, grad_bias, None, grad_pos, grad_size


_patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


def patch_embed_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       patch_size: tuple[int, int], pos_embed: torch.Tensor | None = None,
                       size_embed: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton patch_embed of an image (inputs validated by `patch_embed`), forward and
    backward: `flexikern::patch_embed_triton`.

    x may have any strides; the small parameters are made contiguous (a no-op for parameters).
    """
    patch = (int(patch_size[0]), int(patch_size[1]))
    weight, bias, size_embed = (t.contiguous() if t is not None else None
                                for t in (weight, bias, size_embed))
    resize = _embed_resize(tuple(weight.shape[2:]), patch, x.device)
    return torch.ops.flexikern.patch_embed_triton(x, weight, resize, bias, list(patch), pos_embed,
                                                  size_embed)


# ---- backends and their priority: Triton, then torch -----------------------------------------


def triton_reasons(backend: Backend, x: torch.Tensor, same_dtype: dict[str, torch.Tensor | None],
                   pixels: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the fused Triton kernels (patch_embed, de_embed) cannot run these inputs.

    Checked before importing triton, so a CPU caller never pays for the import. `same_dtype`:
    tensors that must share x's dtype (autocast casts them in `autocast_inputs`); `pixels`:
    patch/kernel sizes, which must be 2-D and fit the register tiles.
    """
    if any(len(size) != 2 for size in pixels.values()):
        return ["3-D (video) patches: the fused kernels take 2-D images; torch runs videos"]
    if x.device.type == "cpu" and not triton_interpreting():
        return ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"]
    reasons = []
    if x.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {x.device.type} not in ('cuda',)")
    if x.dtype not in backend.dtypes:
        reasons.append(f"dtype {x.dtype} not in {backend.dtypes}")
    if not torch.is_autocast_enabled(x.device.type):
        for name, t in same_dtype.items():
            if t is not None and t.dtype != x.dtype:
                reasons.append(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
    for name, (h, w) in pixels.items():
        if h * w > TRITON_MAX_PIXELS:
            reasons.append(f"{name} {(h, w)} has {h * w} pixels, more than {TRITON_MAX_PIXELS}")
    unavailable = backend.unavailable_reason()
    return reasons + ([unavailable] if unavailable else [])


def autocast_inputs(inputs: dict, names: tuple[str, ...]) -> dict:
    """Cast `names` to the autocast dtype when autocast is on, as F.conv2d / F.linear would."""
    device = inputs["x"].device.type
    if not torch.is_autocast_enabled(device):
        return inputs
    dtype = torch.get_autocast_dtype(device)
    return {k: (v.to(dtype) if k in names and v is not None else v) for k, v in inputs.items()}


class TritonPatchEmbed(Backend):
    """Fused Triton kernel (flexikern.kernels.patch_embed): reads x in place, resizes the kernel
    inside the launch, adds bias/pos_embed/size_embed in the epilogue. Images only. CUDA, or CPU
    tensors under TRITON_INTERPRET=1 when forced."""

    op, name = "patch_embed", "triton"
    requires = ("triton",)
    devices = ("cuda", "cpu")
    auto_on_cpu = False

    def not_supported_reasons(self, **inputs):
        x, weight = inputs["x"], inputs["weight"]
        return triton_reasons(
            self, x, {"weight": weight, "bias": inputs.get("bias")},
            {"patch_size": tuple(inputs["patch_size"]), "kernel": tuple(weight.shape[2:])})

    def __call__(self, **inputs):
        return patch_embed_triton(**autocast_inputs(inputs, ("x", "weight", "bias")))


class TorchPatchEmbed(Backend):
    """The reference: conv2d (images) or patchify + linear (videos), then the adds."""

    op, name = "patch_embed", "torch"

    def __call__(self, **inputs):
        return patch_embed_reference(**inputs)


PATCH_EMBED_BACKENDS = (TritonPatchEmbed(), TorchPatchEmbed())


# ---- public API ------------------------------------------------------------------------------


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                patch_size: PatchSizeLike, pos_embed: torch.Tensor | None = None,
                size_embed: torch.Tensor | None = None) -> torch.Tensor:
    """Embed an image (N, C, H, W) into tokens (N, H/ph * W/pw, D), or a video (N, C, F, H, W)
    into tokens (N, F/pt * H/ph * W/pw, D) in (frame, row, column) order.

    Args:
        x: the latent, (N, C, H, W) or (N, C, F, H, W), contiguous or channels_last.
        weight: images: the underlying kernel (D, C, kh, kw) of any size, PI-resized to
            `patch_size`; videos: the kernel (D, C, pt, ph, pw), of the patch size.
        bias: (D,) or None.
        patch_size: an int or (ph, pw), or (pt, ph, pw) for videos, dividing the sizes of x.
        pos_embed: (T, D) positional table, added to every sample, or None.
        size_embed: (D,) patch-size embedding added to every token, or None.
    Returns:
        (N, T, D) tokens in x's dtype promoted with the added tables' (autocast's under autocast).
    Raises:
        TypeError: a tensor not of a float dtype, or weight or bias of another dtype than x
            (F.conv2d needs one dtype; under autocast they may differ). pos_embed and size_embed
            are added with type promotion (an fp32 table makes the output fp32).
        ValueError: shapes or devices that do not fit, an empty spatial axis.
    """
    check_tensor("x", x, ndim=(4, 5))
    check_tensor("weight", weight, ndim=x.dim(), device=x.device)
    check_same_dtype("weight", weight, x)
    patch = tuple(PatchSize.parse(patch_size, ndim=x.dim() - 2))  # plain: torch.compile traces it
    check_divides("x", x.shape[2:], patch)
    d, c = weight.shape[:2]
    if x.shape[1] != c:
        raise ValueError(f"x: {x.shape[1]} channels, but weight {tuple(weight.shape)} expects {c}")
    if len(patch) == 3 and tuple(weight.shape[2:]) != patch:
        raise ValueError(f"weight: a video kernel {tuple(weight.shape[2:])} must equal patch_size "
                         f"{patch}; 3-D kernels are not resized")
    tokens = math.prod([s // p for s, p in zip(x.shape[2:], patch)])
    for name, t, shape in (("bias", bias, (d,)), ("pos_embed", pos_embed, (tokens, d)),
                           ("size_embed", size_embed, (d,))):
        if t is not None:
            check_tensor(name, t, device=x.device)
            if name == "bias":
                check_same_dtype(name, t, x)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return dispatch("patch_embed", x=x, weight=weight, bias=bias, patch_size=patch,
                    pos_embed=pos_embed, size_embed=size_embed)
