"""The transformer blocks the model families share, read like DiT's `models.py`.

DiT, PixArt and Latte are made of the same parts: a timestep embedder, self-attention (packed
sequences through `fk.ops.varlen_attention`), an MLP, adaLN modulation; PixArt and Latte add
cross-attention to text and adaLN-single blocks. The per-patch-size parts (LoRA, per-size norms,
embeddings) are `flexikern.flexi.layers`; a layer's `patch` argument is a `PatchSize` or, packed,
a list of (PatchSize, start, end) token ranges.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern import ops
from flexikern.flexi.layers import LoRALinear, SizeLayerNorm
from flexikern.flexi.packing import Packing

__all__ = ["modulate", "per_token", "TimestepEmbedder", "Attention", "Mlp", "CrossAttention",
           "PixArtBlock", "PixArtFinalLayer", "MASK_BIAS"]

# diffusers turns a 0/1 text mask into this additive bias (not -inf: a fully masked row stays finite).
MASK_BIAS = -10000.0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def per_token(mod: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """adaLN outputs (N, k*D) -> broadcastable over tokens: (N, 1, k*D), or (total, k*D) packed."""
    return mod.unsqueeze(1) if packing is None else mod[packing.segment_ids]


#################################################################################
#                          Embedding Layers for Timesteps                       #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies then an MLP.

    `freq_shift` is 0 for facebookresearch/DiT and 1 for diffusers (which divides by half - 1).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size, bias=True), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    def timestep_embedding(self, t: torch.Tensor, max_period: int = 10000) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / (half - self.freq_shift))
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.frequency_embedding_size % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t).to(self.mlp[0].weight.dtype))


#################################################################################
#                                 Attention and MLP                             #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention; packed (total, D) tokens attend block-diagonally per sequence.

    `qkv_bias=False`: q, k, v without bias (diffusers' `attention_bias=False`); `proj` always has one.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LoRALinear(dim, dim * 3, bias=qkv_bias)
        self.proj = LoRALinear(dim, dim)

    def forward(self, x: torch.Tensor, patch, packing: Packing | None = None) -> torch.Tensor:
        if packing is not None:  # (total, C): block-diagonal attention over the packed samples
            total, C = x.shape
            q, k, v = self.qkv(x, patch).reshape(total, 3, self.num_heads, C // self.num_heads).unbind(1)
            x = ops.varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen,
                                     cu_seqlens_host=packing.cu_seqlens_host)
            return self.proj(x.reshape(total, C), patch)
        B, N, C = x.shape
        qkv = self.qkv(x, patch).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C), patch)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden)
        self.fc2 = LoRALinear(hidden, dim)

    def forward(self, x: torch.Tensor, patch) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, patch), approximate="tanh"), patch)


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from text tokens. Frozen and LoRA-free under `flexify`.

    Unpacked, `x` is (B, T, D) and the text batch divides B: `repeats = B / len(text)` consecutive
    sequences share one text (Latte's frames). Packed, `x` is (total, D) and `bounds[i]` is the
    token range of text i, on the host (a packing's `sample_bounds`): one attention per text (keys
    differ per sample, so the block-diagonal varlen kernel does not apply; see docs/T2I_VIDEO.md).

    `text` is (N_text, L, context_dim): keys and values project from `context_dim` channels (D by
    default; diffusers' `cross_attention_dim`). `qkv_bias=False`: q, k, v without bias.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim or dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, bias: torch.Tensor | None,
                bounds: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        n_text, length, dim = *text.shape[:2], self.proj.out_features
        heads, hd = self.num_heads, dim // self.num_heads
        k, v = self.kv_linear(text).reshape(n_text, length, 2, heads, hd).permute(2, 0, 3, 1, 4)
        if bounds is not None:
            q = self.q_linear(x).reshape(-1, heads, hd).transpose(0, 1)          # (H, total, hd)
            out = torch.empty_like(q)
            for i, (start, end) in enumerate(bounds):
                out[:, start:end] = F.scaled_dot_product_attention(
                    q[:, start:end], k[i], v[i], attn_mask=None if bias is None else bias[i, 0])
            return self.proj(out.transpose(0, 1).reshape(-1, dim))
        b, n, _ = x.shape
        repeats = b // n_text
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)
            bias = None if bias is None else bias.repeat_interleave(repeats, 0)
        q = self.q_linear(x).reshape(b, n, heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


#################################################################################
#                           adaLN-single blocks (PixArt, Latte)                 #
#################################################################################

class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (optional: Latte's temporal blocks have none), MLP; adaLN-single.

    `context_dim`: the channels of the text tokens cross-attended to (default `hidden_size`);
    `qkv_bias`: whether the attentions' q, k, v have biases (diffusers' `attention_bias`).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 cross_attention: bool = True, context_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = SizeLayerNorm(hidden_size, eps=eps)
        self.attn = Attention(hidden_size, num_heads, qkv_bias)
        self.cross_attn = CrossAttention(hidden_size, num_heads, context_dim, qkv_bias) if cross_attention else None
        self.norm2 = SizeLayerNorm(hidden_size, eps=eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, patch, text: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, packing: Packing | None = None) -> torch.Tensor:
        """t6: (B, 6D) shared adaLN-single output, one row per sequence (per sample when packed).

        Packed, each sample's tokens cross-attend to its own text (`packing.sample_bounds`)."""
        mod = per_token(self.scale_shift_table.reshape(1, -1) + t6, packing)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x, patch), shift_msa, scale_msa), patch, packing)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, text, bias, None if packing is None else packing.sample_bounds)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x, patch), shift_mlp, scale_mlp), patch)
        return x


class PixArtFinalLayer(nn.Module):
    """Norm, modulation by the timestep embedding plus a learned (2, D) table, then de-embedding."""

    def __init__(self, hidden_size: int, linear: nn.Module) -> None:
        super().__init__()
        self.norm_final = SizeLayerNorm(hidden_size, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.linear = linear

    def modulated(self, x: torch.Tensor, t_emb: torch.Tensor, patch, packing: Packing | None = None) -> torch.Tensor:
        shift, scale = per_token(self.scale_shift_table.reshape(1, -1) + t_emb.repeat(1, 2), packing).chunk(2, -1)
        return modulate(self.norm_final(x, patch), shift, scale)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, patch, size) -> torch.Tensor:
        return self.linear(self.modulated(x, t_emb, patch), patch, size)
