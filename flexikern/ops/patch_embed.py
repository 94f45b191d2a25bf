"""patch_embed: a conv with kernel = stride = patch size, as tokens, with FlexiDiT's adds fused.

`weight` is the underlying kernel of ANY spatial size; it is PI-resized to `patch_size` on the
fly. Output (N, T, D) = conv(x, pi_resize(weight) + weight_delta, bias) flattened
+ pos_embed + size_embed. Backends: Triton (fused, CUDA or the interpreter) and the torch reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexikern.flexi.resize import pi_resize
from flexikern.ops._checks import as_patch, check_divides, check_tensor
from flexikern.ops._dispatch import Backend, dispatch, register, triton_interpreting

__all__ = ["patch_embed", "patch_embed_reference"]

# Register/tile limit of the fused kernels: patches and stored kernels up to 64 pixels (8x8).
TRITON_MAX_PIXELS = 64


def patch_embed_reference(x, weight, bias, patch_size, pos_embed=None, size_embed=None,
                          weight_delta=None):
    """The plain-torch ground truth (also the model's CPU path: for the original patch size and
    no extras it is DiT's `x_embedder(x) + pos_embed`, bit for bit)."""
    w = pi_resize(weight, patch_size)
    if weight_delta is not None:
        w = w + weight_delta
    tokens = F.conv2d(x, w, bias, stride=patch_size).flatten(2).transpose(1, 2)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    if size_embed is not None:
        tokens = tokens + size_embed
    return tokens


def triton_reasons(backend: Backend, x: torch.Tensor, same_dtype: dict[str, torch.Tensor | None],
                   pixels: dict[str, tuple[int, int]]) -> list[str]:
    """Why the fused Triton kernels (patch_embed, de_embed) cannot run these inputs.

    Checked before importing triton, so a CPU caller never pays for the import. `same_dtype`:
    tensors that must share x's dtype (autocast casts them in `autocast_inputs`); `pixels`:
    patch/kernel sizes that must fit the register tiles.
    """
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


@register
class TritonPatchEmbed(Backend):
    """Fused Triton kernel (flexikern.kernels.patch_embed): reads x in place, resizes the kernel
    inside the launch, adds bias/pos_embed/size_embed in the epilogue. CUDA, or CPU tensors under
    TRITON_INTERPRET=1 when forced."""

    op, name = "patch_embed", "triton"
    requires = ("triton",)
    devices = ("cuda", "cpu")
    auto_on_cpu = False

    def not_supported_reasons(self, **inputs):
        x, weight = inputs["x"], inputs["weight"]
        return triton_reasons(
            self, x, {"weight": weight, "bias": inputs.get("bias"),
                      "weight_delta": inputs.get("weight_delta")},
            {"patch_size": tuple(inputs["patch_size"]), "kernel": tuple(weight.shape[2:])})

    def __call__(self, **inputs):
        from flexikern.kernels.patch_embed import patch_embed_triton
        return patch_embed_triton(**autocast_inputs(inputs, ("x", "weight", "bias", "weight_delta")))


@register
class TorchPatchEmbed(Backend):
    op, name = "patch_embed", "torch"

    def __call__(self, **inputs):
        return patch_embed_reference(**inputs)


def patch_embed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                patch_size: int | tuple[int, int], pos_embed: torch.Tensor | None = None,
                size_embed: torch.Tensor | None = None,
                weight_delta: torch.Tensor | None = None) -> torch.Tensor:
    """Embed (N, C, H, W) into tokens (N, H/ph * W/pw, D).

    Args:
        x: the latent, (N, C, H, W), contiguous or channels_last.
        weight: the underlying kernel (D, C, kh, kw) of any size; PI-resized to `patch_size`.
        bias: (D,) or None.
        patch_size: an int or (ph, pw) dividing H and W.
        pos_embed: (T, D) positional table, added to every sample, or None.
        size_embed: (D,) patch-size embedding added to every token, or None.
        weight_delta: (D, C, ph, pw) added to the resized kernel (a merged LoRA delta), or None.
    """
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4, device=x.device)
    patch = as_patch(patch_size, 2)
    check_divides("x", x.shape[2:], patch)
    d, c = weight.shape[:2]
    if x.shape[1] != c:
        raise ValueError(f"x: {x.shape[1]} channels, but weight {tuple(weight.shape)} expects {c}")
    tokens = (x.shape[2] // patch[0]) * (x.shape[3] // patch[1])
    for name, t, shape in (("bias", bias, (d,)), ("pos_embed", pos_embed, (tokens, d)),
                           ("size_embed", size_embed, (d,)),
                           ("weight_delta", weight_delta, (d, c, *patch))):
        if t is not None:
            check_tensor(name, t, device=x.device)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return dispatch("patch_embed", x=x, weight=weight, bias=bias, patch_size=patch,
                    pos_embed=pos_embed, size_embed=size_embed, weight_delta=weight_delta)
