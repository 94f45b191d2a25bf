"""The flexible parts of a FlexiDiT, each small and named for what it does.

Every per-patch-size parameter is keyed by `size_key(patch)`, e.g. "4x4". A module that has no
entry for a key behaves exactly like the original DiT layer, which is what keeps the original
patch size bit-identical under the LoRA adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern import ops
from flexikern.flexi.resize import lift_deembed, lift_embed, pi_resize
from flexikern.ops.de_embed import deembed_weight

__all__ = ["size_key", "parse_size_key", "LoRALinear", "SizeLayerNorm", "FlexiPatchEmbed",
           "FlexiDeEmbed"]

SHARED = "shared"


def size_key(patch: tuple[int, int]) -> str:
    """The name of a patch size in parameter dicts: (4, 4) -> "4x4"."""
    return f"{patch[0]}x{patch[1]}"


def parse_size_key(key: str) -> tuple[int, int]:
    ph, pw = key.split("x")
    return (int(ph), int(pw))


def _kernel_size(patch_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    return (max(p[0] for p in patch_sizes), max(p[1] for p in patch_sizes))


class LoRALinear(nn.Linear):
    """nn.Linear plus one low-rank adapter per weak patch size (base weight frozen by the model).

    `forward(x, key)` adds `B(A(x)) * alpha / rank` only when `key` has an adapter, so the original
    size runs exactly `F.linear(x, weight, bias)`. For packed token sequences `key` may be a list
    of (key, start, end) segments along dim 0.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_scale: dict[str, float] = {}

    def add_adapter(self, key: str, rank: int, alpha: float | None = None) -> None:
        a = torch.empty(rank, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[key] = nn.Parameter(a)
        self.lora_B[key] = nn.Parameter(torch.zeros(self.out_features, rank, device=a.device, dtype=a.dtype))
        self.lora_scale[key] = (alpha if alpha is not None else rank) / rank

    def _delta(self, x: torch.Tensor, key: str) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[key]), self.lora_B[key]) * self.lora_scale[key]

    def forward(self, x: torch.Tensor, key: str | list[tuple[str, int, int]] | None = None) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if isinstance(key, str):
            if key in self.lora_A:
                out = out + self._delta(x, key)
        elif key is not None and any(k in self.lora_A for k, _, _ in key):
            # Packed segments cover all tokens; out-of-place so autograd can differentiate it.
            out = torch.cat([out[start:end] + self._delta(x[start:end], k) if k in self.lora_A
                             else out[start:end] for k, start, end in key])
        return out


class SizeLayerNorm(nn.Module):
    """LayerNorm without affine (DiT's), plus an optional affine per patch size (identity at init).

    The shared adapter gives every patch size its own affine; without one a key runs the plain
    affine-free LayerNorm.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()

    def add_affine(self, key: str, device=None, dtype=None) -> None:
        self.weight[key] = nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))
        self.bias[key] = nn.Parameter(torch.zeros(self.hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, key: str | list[tuple[str, int, int]] | None = None) -> torch.Tensor:
        if isinstance(key, str):
            if key in self.weight:
                return F.layer_norm(x, (self.hidden_size,), self.weight[key], self.bias[key], self.eps)
            return F.layer_norm(x, (self.hidden_size,), None, None, self.eps)
        out = F.layer_norm(x, (self.hidden_size,), None, None, self.eps)
        if key is None or not any(k in self.weight for k, _, _ in key):
            return out
        return torch.cat([out[start:end] * self.weight[k] + self.bias[k] if k in self.weight
                          else out[start:end] for k, start, end in key])

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, affine sizes={list(self.weight.keys())}"


class _Resized(nn.Module):
    """Underlying kernels in groups (the original one, one per LoRA weak size, or one shared).

    In inference (no gradient needed) the kernel resized to each patch size is cached, keyed by
    the parameter's storage and version, so a sampling step allocates nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        self.kernel_size: dict[str, tuple[int, int]] = {}
        self._cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def group(self, key: str) -> str:
        return SHARED if SHARED in self.weight else key

    def _resize(self, weight, bias, kernel, patch):
        raise NotImplementedError

    def _lift(self, weight, bias, kernel, size):
        """The smallest-norm (weight, bias) at `size` that resizes back exactly to the given ones."""
        raise NotImplementedError

    def flexify(self, original: tuple[int, int], patch_sizes: list[tuple[int, int]], shared: bool) -> None:
        """Derive the kernels of `patch_sizes` from the original one (DESIGN.md's initialisation):
        one shared kernel, or one per weak size, at the largest size, lifted from the original."""
        okey = size_key(original)
        w0, b0 = self.weight[okey].detach(), self.bias[okey].detach()
        kernel = _kernel_size(patch_sizes)
        if shared:
            del self.weight[okey], self.bias[okey]
        for group in [SHARED] if shared else [size_key(p) for p in patch_sizes if p != original]:
            self._set(group, *self._lift(w0, b0, original, kernel), kernel)

    def weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """(weight, bias, kernel size) to run patch size `key` with.

        When a gradient can flow, the underlying kernel itself: the op resizes it on the fly (the
        fused kernels do so inside the launch). Otherwise the kernel resized to `key`, cached.
        """
        group = self.group(key)
        weight, bias = self.weight[group], self.bias[group]
        kernel, patch = self.kernel_size[group], parse_size_key(key)
        if kernel == patch or (torch.is_grad_enabled() and (weight.requires_grad or bias.requires_grad)):
            return weight, bias, kernel
        stamp = (weight.data_ptr(), weight._version, bias._version, weight.dtype, weight.device)
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.inference_mode(False), torch.no_grad():
                hit = (stamp, *self._resize(weight, bias, kernel, patch))
            self._cache[key] = hit
        return hit[1], hit[2], patch

    def _set(self, group: str, weight: torch.Tensor, bias: torch.Tensor, kernel: tuple[int, int]) -> None:
        self.weight[group] = nn.Parameter(weight)
        self.bias[group] = nn.Parameter(bias)
        self.kernel_size[group] = tuple(kernel)
        self._cache.clear()


class FlexiPatchEmbed(_Resized):
    """Patch embedding at any patch size from PI-resized underlying kernels (+ patch-size embedding)."""

    def __init__(self, in_channels: int, hidden_size: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.in_channels, self.hidden_size = in_channels, hidden_size
        key = size_key(patch)
        self._set(key, torch.empty(hidden_size, in_channels, *patch), torch.zeros(hidden_size), patch)
        self.size_embed = nn.ParameterDict()

    def _resize(self, weight, bias, kernel, patch):
        return pi_resize(weight, patch), bias

    def _lift(self, weight, bias, kernel, size):
        return lift_embed(weight, size), bias.clone()

    def flexify(self, original: tuple[int, int], patch_sizes: list[tuple[int, int]], shared: bool) -> None:
        super().flexify(original, patch_sizes, shared)
        for patch in patch_sizes:
            if patch != original:
                self.size_embed[size_key(patch)] = nn.Parameter(torch.zeros_like(self.bias[self.group(size_key(patch))]))

    def forward(self, x: torch.Tensor, key: str, pos_embed: torch.Tensor) -> torch.Tensor:
        weight, bias, _ = self.weights(key)
        return ops.patch_embed(x, weight, bias, parse_size_key(key), pos_embed=pos_embed,
                               size_embed=self.size_embed[key] if key in self.size_embed else None)


class FlexiDeEmbed(_Resized):
    """The final linear D -> ph*pw*C_out at any patch size, with unpatchify into (N, C_out, H, W).

    Weights are stored like DiT's `final_layer.linear`: (kh*kw*C_out, D), rows ordered
    (kh, kw, C_out); other sizes come from a bilinear resize of each output map.
    """

    def __init__(self, hidden_size: int, out_channels: int, patch: tuple[int, int]) -> None:
        super().__init__()
        self.hidden_size, self.out_channels = hidden_size, out_channels
        n = patch[0] * patch[1] * out_channels
        self._set(size_key(patch), torch.empty(n, hidden_size), torch.zeros(n), patch)

    def _resize(self, weight, bias, kernel, patch):
        return deembed_weight(weight, bias, kernel, patch)

    def _lift(self, weight, bias, kernel, size):
        # (kh*kw*C, D) -> maps (C, D, kh, kw) -> lifted -> back to rows (KH, KW, C)
        kh, kw = kernel
        c, d = self.out_channels, self.hidden_size
        w = lift_deembed(weight.reshape(kh, kw, c, d).permute(2, 3, 0, 1), size)
        b = lift_deembed(bias.reshape(kh, kw, c).permute(2, 0, 1), size)
        return w.permute(2, 3, 0, 1).reshape(-1, d).contiguous(), b.permute(1, 2, 0).reshape(-1).contiguous()

    def forward(self, x: torch.Tensor, key: str, size: tuple[int, int]) -> torch.Tensor:
        weight, bias, kernel = self.weights(key)
        return ops.de_embed(x, weight, bias, kernel, parse_size_key(key), size)
