"""The flexible parts of a FlexiDiT, each small and named for what it does.

Per-patch-size parameters live in parameter dicts named by the size (`PatchSize.name`, "4x4",
"1x2x2": the checkpoints' key names). Layers are called with the `PatchSize` itself, or, for a
packed sequence, with a list of (PatchSize, start, end) token ranges. A module that has no entry
for a size behaves exactly like the original DiT layer, which is what keeps the original patch
size bit-identical under the LoRA adapter.
"""

from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern import ops
from flexikern.ops.patch_size import PatchSize
from flexikern.ops.resize import (compute_dtype, lift_deembed_weight, lift_embed, pi_resize_matrix,
                                  resize_matrix)

__all__ = ["LoRALinear", "SizeLayerNorm", "FlexiPatchEmbed", "FlexiDeEmbed", "SHARED_KERNEL"]

# The name of the one underlying kernel that every patch size resizes under the "shared" adapter.
SHARED_KERNEL = "shared"

# What a per-size layer is called with: one patch size, or packed (patch size, start, end) ranges.
Sizes = Union[PatchSize, list[tuple[PatchSize, int, int]], None]


class LoRALinear(nn.Linear):
    """nn.Linear plus one low-rank adapter per weak patch size (base weight frozen by the model).

    `forward(x, patch)` adds `B(A(x)) * alpha / rank` only when `patch` has an adapter, so the
    original size runs exactly `F.linear(x, weight, bias)`. For packed token sequences `patch` is a
    list of (patch, start, end) ranges along dim 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scale: dict[str, float] = {}

    def add_adapter(self, patch: PatchSize, rank: int, alpha: float | None = None) -> None:
        a = torch.empty(rank, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[patch.name] = nn.Parameter(a)
        self.lora_B[patch.name] = nn.Parameter(torch.zeros(self.out_features, rank, device=a.device, dtype=a.dtype))
        self.lora_scale[patch.name] = (alpha if alpha is not None else rank) / rank

    def _delta(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name]) * self.lora_scale[name]

    def forward(self, x: torch.Tensor, patch: Sizes = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if isinstance(patch, PatchSize):
            if patch.name in self.lora_A:
                out = out + self._delta(x, patch.name)
        elif patch is not None and any([p.name in self.lora_A for p, _, _ in patch]):
            # Packed ranges cover all tokens; out-of-place so autograd can differentiate it.
            out = torch.cat([out[start:end] + self._delta(x[start:end], p.name) if p.name in self.lora_A
                             else out[start:end] for p, start, end in patch])
        return out


class SizeLayerNorm(nn.Module):
    """LayerNorm without affine (DiT's), plus an optional affine per patch size (identity at init).

    The shared adapter gives every patch size its own affine; without one a size runs the plain
    affine-free LayerNorm.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()

    def add_affine(self, patch: PatchSize, device=None, dtype=None) -> None:
        self.weight[patch.name] = nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))
        self.bias[patch.name] = nn.Parameter(torch.zeros(self.hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, patch: Sizes = None) -> torch.Tensor:
        if isinstance(patch, PatchSize):
            if patch.name in self.weight:
                return F.layer_norm(x, (self.hidden_size,), self.weight[patch.name], self.bias[patch.name],
                                    self.eps)
            return F.layer_norm(x, (self.hidden_size,), None, None, self.eps)
        out = F.layer_norm(x, (self.hidden_size,), None, None, self.eps)
        if patch is None or not any([p.name in self.weight for p, _, _ in patch]):
            return out
        return torch.cat([out[start:end] * self.weight[p.name] + self.bias[p.name] if p.name in self.weight
                          else out[start:end] for p, start, end in patch])

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, affine sizes={list(self.weight.keys())}"


class _Resized(nn.Module):
    """Underlying embedding kernels: the original one, one per weak size (LoRA), or one shared.

    `weight`/`bias` hold the kernels by name: a patch size's own kernel under its `.name`, the
    shared adapter's under `SHARED_KERNEL`. `kernels` says which kernel each configured patch
    size runs. A weak size's own kernel is stored at its own size; the shared kernel at the
    largest, PI-resized on the fly to each size (2-D only: video kernels are never resized).

    Nothing derived from the weights is cached: every forward resizes the kernel it runs (the
    fused Triton kernels inside their launch; the torch backend by one small matmul with a cached
    constant resize matrix, a new tensor per forward), so any change to the weights (an optimizer
    step, `load_state_dict`, a write through `.data`, an EMA swap) is in the next forward, and a
    CUDA graph reads the live parameters. `resize_matrices` builds the constants ahead.
    """

    def __init__(self, patch: PatchSize) -> None:
        super().__init__()
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.kernel_size: dict[str, PatchSize] = {}
        self.kernels: dict[PatchSize, str] = {patch: patch.name}

    def _resize_matrix(self, kernel: PatchSize, patch: PatchSize, device, dtype) -> torch.Tensor:
        """The constant matrix the ops resize `kernel` to `patch` with (cached in `fk.ops.resize`)."""
        raise NotImplementedError

    def _lift(self, weight, bias, kernel: PatchSize, size: PatchSize):
        """The smallest-norm (weight, bias) at `size` that resizes back exactly to the given ones."""
        raise NotImplementedError

    def flexify(self, original: PatchSize, patch_sizes: list[PatchSize], shared: bool) -> None:
        """Derive the kernels of `patch_sizes` from the original one: each weak size's own kernel,
        or one shared kernel at the largest size, lifted from the original (FlexiDiT, arXiv
        2502.20126, Sec. 3.2: at initialisation a weak token is the original token of the
        average-pooled patch)."""
        w0, b0 = self.weight[original.name].detach(), self.bias[original.name].detach()
        if shared:
            kernel = PatchSize.parse(tuple(max(sizes) for sizes in zip(*patch_sizes)))
            del self.weight[original.name], self.bias[original.name]
            self._set(SHARED_KERNEL, *self._lift(w0, b0, original, kernel), kernel)
            self.kernels = {p: SHARED_KERNEL for p in patch_sizes}
            return
        for p in patch_sizes:
            if p != original:
                self._set(p.name, *self._lift(w0, b0, original, p), p)
                self.kernels[p] = p.name

    def weights(self, patch) -> tuple[torch.Tensor, torch.Tensor, PatchSize]:
        """(weight, bias, kernel size) that run `patch`: the underlying parameters themselves, at
        the size they are stored at; the op resizes them to `patch` on the fly."""
        name = self.kernels[PatchSize.parse(patch)]
        return self.weight[name], self.bias[name], self.kernel_size[name]

    def resize_matrices(self, patch) -> list[torch.Tensor]:
        """The constant matrices a forward at `patch` resizes its kernel with, built now (none
        when the kernel is stored at `patch`): what `FlexibleModel.prepare` builds ahead, so
        that a sampling step copies nothing to the device."""
        patch = PatchSize.parse(patch)
        weight, _, kernel = self.weights(patch)
        if kernel == patch:
            return []
        return [self._resize_matrix(kernel, patch, weight.device, compute_dtype(weight.dtype))]

    def _set(self, name: str, weight: torch.Tensor, bias: torch.Tensor, kernel: PatchSize) -> None:
        self.weight[name] = nn.Parameter(weight)
        self.bias[name] = nn.Parameter(bias)
        self.kernel_size[name] = kernel


class FlexiPatchEmbed(_Resized):
    """Patch embedding at any patch size (`fk.ops.patch_embed`), images or videos, plus a learned
    patch-size embedding per weak size.

    Kernels (D, C, *patch), like DiT's `x_embedder.proj` (and Latte's, per frame). A video's weak
    kernel (pt, ph, pw) is the original (1, p, p) one lifted spatially, duplicated over the pt
    frames and divided by pt: the token of a frame group is the original token of its temporal mean.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch: PatchSize) -> None:
        super().__init__(patch)
        self.in_channels, self.hidden_size = in_channels, hidden_size
        self._set(patch.name, torch.empty(hidden_size, in_channels, *patch), torch.zeros(hidden_size), patch)
        self.size_embed = nn.ParameterDict()

    def _resize_matrix(self, kernel, patch, device, dtype):
        return pi_resize_matrix(kernel, patch, device, dtype)   # `pi_resize`'s

    def _lift(self, weight, bias, kernel, size):
        if size.ndim == 3:   # (D, C, 1, p, p) -> spatial lift, duplicated over pt frames / pt
            spatial = lift_embed(weight[:, :, 0], size[1:])
            return (spatial[:, :, None].repeat(1, 1, size[0], 1, 1) / size[0]).contiguous(), bias.clone()
        return lift_embed(weight, size), bias.clone()

    def flexify(self, original: PatchSize, patch_sizes: list[PatchSize], shared: bool) -> None:
        super().flexify(original, patch_sizes, shared)
        for patch in patch_sizes:
            if patch != original:
                self.size_embed[patch.name] = nn.Parameter(torch.zeros_like(self.bias[self.kernels[patch]]))

    def forward(self, x: torch.Tensor, patch: PatchSize, pos_embed: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) or (N, C, F, H, W) -> tokens (N, T, D), positions and size embedding added."""
        weight, bias, _ = self.weights(patch)
        size_embed = self.size_embed[patch.name] if patch.name in self.size_embed else None
        return ops.patch_embed(x, weight, bias, patch, pos_embed=pos_embed, size_embed=size_embed)


class FlexiDeEmbed(_Resized):
    """The final linear D -> prod(patch)*C_out at any patch size, with unpatchify into the latent
    layout (`fk.ops.de_embed`), images or videos.

    Weights are stored like DiT's `final_layer.linear`: (prod(kernel)*C_out, D), rows ordered
    (*kernel, C_out); other 2-D sizes come from a bilinear resize of each output map. A video's
    weak de-embedding is the original one lifted spatially and duplicated over the pt frames.
    """

    def __init__(self, hidden_size: int, out_channels: int, patch: PatchSize) -> None:
        super().__init__(patch)
        self.hidden_size, self.out_channels = hidden_size, out_channels
        n = patch.volume * out_channels
        self._set(patch.name, torch.empty(n, hidden_size), torch.zeros(n), patch)

    def _resize_matrix(self, kernel, patch, device, dtype):
        return resize_matrix(kernel, patch, device, dtype)   # `deembed_weight`'s (its transpose)

    def _lift(self, weight, bias, kernel, size):
        # Videos: the (1, p, p) kernel's rows lifted spatially, then repeated over the pt frames.
        w, b = lift_deembed_weight(weight, bias, kernel[-2:], size[-2:])
        if size.ndim == 3:
            w, b = w.repeat(size[0], 1), b.repeat(size[0])
        return w, b

    def forward(self, x: torch.Tensor, patch: PatchSize, size: tuple[int, ...]) -> torch.Tensor:
        """Tokens (N, T, D) -> (N, C_out, *size)."""
        weight, bias, kernel = self.weights(patch)
        return ops.de_embed(x, weight, bias, kernel, patch, size)
