"""de_embed: FlexiDiT's final linear D -> ph*pw*C_out, with unpatchify into image layout.

`weight` is the underlying de-embedding (kh*kw*C_out, D), rows ordered (kh, kw, C_out) like
DiT's `final_layer.linear`; it is bilinearly resized to `patch_size` on the fly
(`flexi.resize_deembed`). Backends: Triton (fused epilogue) and the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexikern.flexi.resize import resize_deembed
from flexikern.ops._checks import as_patch, check_divides, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, register
from flexikern.ops.patch_embed import autocast_inputs, triton_reasons

__all__ = ["de_embed", "de_embed_reference", "deembed_weight"]


def deembed_weight(weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: tuple[int, int],
                   patch_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resize an underlying de-embedding (kh*kw*C, D) from `kernel_size` to `patch_size`."""
    if tuple(kernel_size) == tuple(patch_size):
        return weight, bias
    kh, kw = kernel_size
    d = weight.shape[1]
    c = weight.shape[0] // (kh * kw)
    maps = weight.reshape(kh, kw, c, d).permute(2, 3, 0, 1)            # (C, D, kh, kw)
    w = resize_deembed(maps, patch_size).permute(2, 3, 0, 1).reshape(-1, d)
    if bias is not None:
        bias = resize_deembed(bias.reshape(kh, kw, c).permute(2, 0, 1), patch_size)
        bias = bias.permute(1, 2, 0).reshape(-1)
    return w, bias


def de_embed_reference(x, weight, bias, kernel_size, patch_size, size):
    """The plain-torch ground truth: resize, linear, unpatchify."""
    from flexikern.ops.patchify import unpatchify_reference
    w, b = deembed_weight(weight, bias, kernel_size, patch_size)
    return unpatchify_reference(F.linear(x, w, b), patch_size, size)


@register
class TritonDeEmbed(Backend):
    """Fused Triton kernel (flexikern.kernels.de_embed): resizes the weight inside the launch and
    writes the image layout directly (unpatchify fused). CUDA, or CPU tensors under
    TRITON_INTERPRET=1 when forced."""

    op, name = "de_embed", "triton"
    requires = ("triton",)
    devices = ("cuda", "cpu")
    auto_on_cpu = False

    def not_supported_reasons(self, **inputs):
        return triton_reasons(
            self, inputs["x"], {"weight": inputs["weight"], "bias": inputs.get("bias")},
            {"patch_size": tuple(inputs["patch_size"]), "kernel_size": tuple(inputs["kernel_size"])})

    def __call__(self, **inputs):
        from flexikern.kernels.de_embed import de_embed_triton
        return de_embed_triton(**autocast_inputs(inputs, ("x", "weight", "bias")))


@register
class TorchDeEmbed(Backend):
    """torch's linear, then `fk.ops.unpatchify` (the compiled extension when it is built)."""

    op, name = "de_embed", "torch"

    def __call__(self, x, weight, bias, kernel_size, patch_size, size):
        from flexikern.ops.patchify import unpatchify
        w, b = deembed_weight(weight, bias, kernel_size, patch_size)
        return unpatchify(F.linear(x, w, b), patch_size, size)


def de_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             kernel_size: int | tuple[int, int], patch_size: int | tuple[int, int],
             size: tuple[int, int]) -> torch.Tensor:
    """De-embed tokens (N, T, D) into an image (N, C_out, H, W).

    Args:
        x: tokens (N, T, D) on the (H/ph, W/pw) grid.
        weight: the underlying de-embedding (kh*kw*C_out, D), rows ordered (kh, kw, C_out).
        bias: (kh*kw*C_out,) or None.
        kernel_size: (kh, kw), the size `weight` is stored at.
        patch_size: the size to run at; the weight is resized to it.
        size: the output (H, W).
    """
    check_tensor("x", x, ndim=3)
    check_tensor("weight", weight, ndim=2, device=x.device)
    kernel = as_patch(kernel_size, 2, "kernel_size")
    patch = as_patch(patch_size, 2)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"size={size!r}: expected (H, W)")
    size = (int(size[0]), int(size[1]))
    check_divides("size", size, patch)
    k = kernel[0] * kernel[1]
    if weight.shape[0] % k or weight.shape[1] != x.shape[2]:
        raise ValueError(f"weight: shape {tuple(weight.shape)} is not (kh*kw*C_out, D) for kernel "
                         f"{kernel} and D={x.shape[2]}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    tokens = (size[0] // patch[0]) * (size[1] // patch[1])
    if x.shape[1] != tokens:
        raise ValueError(f"x: {x.shape[1]} tokens, but size {size} with patch {patch} has {tokens}")
    return dispatch("de_embed", x=x, weight=weight, bias=bias, kernel_size=kernel,
                    patch_size=patch, size=size)
