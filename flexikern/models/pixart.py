"""Text-conditioned FlexiDiT: PixArt-alpha's architecture (diffusers numerics) at any patch size.

Read like DiT's `models.py`: the text condition, the caption embedder, cross-attention, the block,
the final layer, the model. What differs from the class-conditional `FlexiDiT`:

* adaLN-single: ONE timestep MLP (`t_embedder` + `t_block`) makes 6*D modulation values shared by
  all blocks; each block adds its own learned `scale_shift_table` (6, D).
* every block cross-attends to text tokens (precomputed text-encoder embeddings plus a 0/1 mask,
  projected by `y_embedder`; no text encoder here). Guidance's null condition is PixArt's learned
  null caption `y_embedder.y_embedding`.
* positions follow PixArt's `base_size` / `interpolation_scale` normalisation.

Flexibility is the paper's LoRA recipe: per weak patch size, LoRA on self-attention (qkv, proj) and
the MLP (fc1, fc2), its own embed/de-embed and a patch-size embedding; cross-attention, the caption
and timestep embedders stay frozen WITHOUT LoRA. The original size runs the original tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flexikern.flexi.layers import (FlexiDeEmbed, FlexiPatchEmbed, SizeLayerNorm,
                                    size_key)
from flexikern.flexi.pos_embed import sincos_2d_scaled
from flexikern.flexi.resize import as_size
from flexikern.models.base import FlexibleModel, add_adapters, check_timesteps
from flexikern.models.dit import ADAPTERS, Attention, Mlp, TimestepEmbedder, modulate, per_token
from flexikern.runtime.packing import Packing

__all__ = ["TextCondition", "TextConditioned", "FlexiPixArt", "PIXART_CONFIGS", "MASK_BIAS",
           "as_text_condition", "text_model_flops"]

# diffusers turns a 0/1 text mask into this additive bias (not -inf: a fully masked row stays finite).
MASK_BIAS = -10000.0

PIXART_CONFIGS: dict[str, dict] = {
    # PixArt-alpha XL/2 at 256 and 512 (T5-XXL captions, 120 tokens); 1024 needs size conditions.
    "PixArt-XL/2-256": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                            caption_channels=4096, text_len=120),
    "PixArt-XL/2-512": dict(input_size=64, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                            caption_channels=4096, text_len=120),
}


#################################################################################
#                              The text condition                               #
#################################################################################

@dataclass(frozen=True)
class TextCondition:
    """Precomputed text-encoder embeddings (N, L, C_text) and a mask (N, L), True = a real token.

    `mask=None` means every token is real. This is the `y` of a text-conditioned model: the
    sampler and guidance batch it with `cat` and index it with `[...]` like a label tensor.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        e, m = self.embeds, self.mask
        if not isinstance(e, torch.Tensor) or e.dim() != 3 or not e.is_floating_point():
            raise ValueError(f"embeds: expected float text embeddings (N, L, C_text), got "
                             f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}"
                             f"{'' if not isinstance(e, torch.Tensor) else ' ' + str(e.dtype)}")
        if m is not None:
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(e.shape[:2]):
                raise ValueError(f"mask: expected shape {tuple(e.shape[:2])} (N, L) matching embeds, got "
                                 f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
            if m.dtype != torch.bool:
                if not bool(((m == 0) | (m == 1)).all()):
                    raise ValueError("mask: expected 0/1 (or bool) values, True/1 = a real token")
                object.__setattr__(self, "mask", m != 0)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    def full_mask(self) -> torch.Tensor:
        return (self.mask if self.mask is not None
                else torch.ones(self.embeds.shape[:2], dtype=torch.bool, device=self.embeds.device))

    def __getitem__(self, index) -> "TextCondition":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextCondition(self.embeds[index], None if self.mask is None else self.mask[index])

    def to(self, *args, **kwargs) -> "TextCondition":
        embeds = self.embeds.to(*args, **kwargs)
        return TextCondition(embeds, None if self.mask is None else self.mask.to(embeds.device))

    def cat(self, *others: "TextCondition") -> "TextCondition":
        """Concatenate along the batch; shorter texts are padded with masked-out zero tokens.

        Reads the mask back (is every token real?): a device sync, so sampling concatenates its
        conditions once (`GuidedDenoiser`), never per step."""
        items = (self, *others)
        length = max(c.embeds.shape[1] for c in items)
        embeds, masks = [], []
        for c in items:
            pad = length - c.embeds.shape[1]
            embeds.append(F.pad(c.embeds, (0, 0, 0, pad)))
            masks.append(F.pad(c.full_mask(), (0, pad), value=False))
        mask = torch.cat(masks)
        return TextCondition(torch.cat(embeds), None if bool(mask.all()) else mask)

    def repeat(self, n: int) -> "TextCondition":
        return self.cat(*([self] * (n - 1))) if n > 1 else self


def as_text_condition(y, name: str = "y") -> TextCondition:
    """A `TextCondition` from one, from an (N, L, C) tensor or from an (embeds, mask) pair."""
    if isinstance(y, TextCondition):
        return y
    if isinstance(y, torch.Tensor):
        return TextCondition(y)
    if isinstance(y, (tuple, list)) and len(y) == 2:
        return TextCondition(*y)
    raise ValueError(f"{name}: expected a TextCondition, text embeddings (N, L, C_text) or (embeds, mask), "
                     f"got {type(y).__name__}")


#################################################################################
#                     Caption embedding and cross-attention                     #
#################################################################################

class CaptionEmbedder(nn.Module):
    """Text-encoder embeddings -> D (PixArt's `y_proj`: Linear, GELU(tanh), Linear) + the null caption.

    `y_embedding` (text_len, C_text) is PixArt's learned null caption, the guidance branch's
    condition (`null`).
    """

    def __init__(self, caption_channels: int, hidden_size: int, text_len: int) -> None:
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = nn.Linear(caption_channels, hidden_size)
        self.y_proj.fc2 = nn.Linear(hidden_size, hidden_size)
        self.y_embedding = nn.Parameter(torch.randn(text_len, caption_channels) / caption_channels ** 0.5)
        self.caption_channels = caption_channels

    def null(self, n: int) -> TextCondition:
        return TextCondition(self.y_embedding[None].expand(n, -1, -1))

    def forward(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(projected tokens (N, L, D), additive mask bias (N, 1, 1, L) or None)."""
        h = self.y_proj.fc2(F.gelu(self.y_proj.fc1(cond.embeds.to(self.y_proj.fc1.weight.dtype)),
                                   approximate="tanh"))
        if cond.mask is None:
            return h, None
        bias = (1 - cond.mask.to(h.dtype)) * MASK_BIAS
        return h, bias[:, None, None, :]


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from text tokens. Frozen and LoRA-free under `flexify`.

    Unpacked, `x` is (B, T, D) and the text batch divides B: `repeats = B / len(text)` consecutive
    sequences share one text (Latte's frames). Packed, `x` is (total, D) and `bounds[i]` is the
    token range of text i, on the host (a packing's `sample_bounds`): one attention per text (keys
    differ per sample, so the block-diagonal varlen kernel does not apply; see docs/T2I_VIDEO.md).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, bias: torch.Tensor | None,
                bounds: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        n_text, length, dim = text.shape
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
#                                 Core model                                    #
#################################################################################

class PixArtBlock(nn.Module):
    """Self-attention, cross-attention (optional: Latte's temporal blocks have none), MLP; adaLN-single."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6,
                 cross_attention: bool = True) -> None:
        super().__init__()
        self.norm1 = SizeLayerNorm(hidden_size, eps=eps)
        self.attn = Attention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = SizeLayerNorm(hidden_size, eps=eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size ** 0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, key, text: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, packing: Packing | None = None) -> torch.Tensor:
        """t6: (B, 6D) shared adaLN-single output, one row per sequence (per sample when packed).

        Packed, each sample's tokens cross-attend to its own text (`packing.sample_bounds`)."""
        mod = per_token(self.scale_shift_table.reshape(1, -1) + t6, packing)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x, key), shift_msa, scale_msa), key, packing)
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, text, bias, None if packing is None else packing.sample_bounds)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x, key), shift_mlp, scale_mlp), key)
        return x


class PixArtFinalLayer(nn.Module):
    """Norm, modulation by the timestep embedding plus a learned (2, D) table, then de-embedding."""

    def __init__(self, hidden_size: int, patch: tuple[int, ...], out_channels: int,
                 linear: nn.Module | None = None) -> None:
        super().__init__()
        self.norm_final = SizeLayerNorm(hidden_size, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size ** 0.5)
        self.linear = linear if linear is not None else FlexiDeEmbed(hidden_size, out_channels, patch)

    def modulated(self, x: torch.Tensor, t_emb: torch.Tensor, key, packing: Packing | None = None) -> torch.Tensor:
        shift, scale = per_token(self.scale_shift_table.reshape(1, -1) + t_emb.repeat(1, 2), packing).chunk(2, -1)
        return modulate(self.norm_final(x, key), shift, scale)

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, key: str, size) -> torch.Tensor:
        return self.linear(self.modulated(x, t_emb, key), key, size)


class TextConditioned(FlexibleModel):
    """What PixArt and Latte share: text conditions, the null caption, the adaLN-single conditioning."""

    caption_channels: int

    def null_condition(self, y) -> TextCondition:
        """The guidance branch's condition for `y`'s batch: the learned null caption."""
        return self.y_embedder.null(len(as_text_condition(y))).to(self.y_embedder.y_embedding.device)

    def check_condition(self, y, n: int | None = None, device=None) -> TextCondition:
        """Validate text conditions: (n, L, caption_channels) embeddings, an (n, L) mask, L >= 1."""
        cond = as_text_condition(y)
        if n is not None and len(cond) != n:
            raise ValueError(f"y: {len(cond)} text embeddings for a batch of {n}")
        if cond.embeds.shape[2] != self.caption_channels:
            raise ValueError(f"y: text embeddings have {cond.embeds.shape[2]} channels, but the model's "
                             f"caption_channels={self.caption_channels}")
        if cond.embeds.shape[1] < 1:
            raise ValueError("y: expected at least one text token (L >= 1)")
        return cond.to(device) if device is not None and cond.device != torch.device(device) else cond

    def _conditioning(self, t: torch.Tensor, cond: TextCondition):
        """(timestep embedding (N, D), adaLN-single output (N, 6D), text tokens (N, L, D), mask bias)."""
        t_emb = self.t_embedder(t)
        text, bias = self.y_embedder(cond)
        return t_emb, self.t_block(t_emb), text, bias


class FlexiPixArt(TextConditioned, nn.Module):
    """PixArt-alpha (adaLN-single, cross-attention to text) runnable at any configured patch size.

    `forward(x, t, y, patch_size)` with `y` a `TextCondition` (or embeddings (N, L, C_text), or an
    (embeds, mask) pair). `null_condition(y)` is the guidance branch's condition.
    """

    checkpoint_format = "flexikern.FlexiPixArt"

    def __init__(self, input_size: int = 32, patch_size: int | tuple[int, int] = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 caption_channels: int = 4096, text_len: int = 120, learn_sigma: bool = True,
                 interpolation_scale: float | None = None, norm_eps: float = 1e-6,
                 patch_sizes: Iterable[int | tuple[int, int]] | None = None, adapter: str = "lora",
                 lora_rank: int = 32) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        patch = as_size(patch_size)
        if interpolation_scale is None:
            interpolation_scale = max(input_size // 64, 1)   # diffusers' default
        self.config = dict(input_size=input_size, patch_size=patch, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           caption_channels=caption_channels, text_len=text_len, learn_sigma=learn_sigma,
                           interpolation_scale=interpolation_scale, norm_eps=norm_eps)
        self.input_size, self.in_channels = input_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_heads = learn_sigma, num_heads
        self.caption_channels, self.text_len = caption_channels, text_len
        self.base_size = input_size // patch[0]
        self.original_patch_size = patch
        self.patch_sizes: tuple[tuple[int, int], ...] = (patch,)
        self.adapter: str | None = None
        self.lora_rank: int | None = None
        self.gradient_checkpointing = False

        self.x_embedder = FlexiPatchEmbed(in_channels, hidden_size, patch)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=0)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, text_len)
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.final_layer = PixArtFinalLayer(hidden_size, patch, self.out_channels)
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size, self.input_size)

    def initialize_weights(self) -> None:
        """PixArt's initialisation: xavier linears, small embedders, zero output and cross-attn proj."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        key = size_key(self.original_patch_size)
        w = self.x_embedder.weight[key]
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias[key], 0)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight[key], 0)
        nn.init.constant_(self.final_layer.linear.bias[key], 0)

    # ------------------------------------------------------------------ flexibility
    def flexify(self, patch_sizes: Iterable[int | tuple[int, int]], adapter: str = "lora",
                lora_rank: int = 32) -> "FlexiPixArt":
        """Add weak patch sizes initialised from the original (in place; see `flexify_`). Returns self."""
        sizes = tuple(dict.fromkeys(as_size(p, "patch_sizes") for p in patch_sizes))
        if self.patch_sizes != (self.original_patch_size,):
            raise RuntimeError(f"this model is already flexible (patch_sizes={self.patch_sizes})")
        if self.original_patch_size not in sizes:
            raise ValueError(f"patch_sizes={sizes} must include the original patch size {self.original_patch_size}")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter={adapter!r}: expected one of {ADAPTERS}")
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r}: expected a positive int")
        for p in sizes:
            if self.input_size % p[0] or self.input_size % p[1]:
                raise ValueError(f"patch size {p} does not divide input_size={self.input_size}")
        self.patch_sizes = tuple(sorted(sizes))
        if len(sizes) == 1:
            return self
        self.adapter, self.lora_rank = adapter, (lora_rank if adapter == "lora" else None)
        shared = adapter == "shared"
        self.x_embedder.flexify(self.original_patch_size, list(sizes), shared)
        self.final_layer.linear.flexify(self.original_patch_size, list(sizes), shared)
        add_adapters(self, [size_key(p) for p in sizes], size_key(self.original_patch_size),
                 [self.x_embedder, self.final_layer.linear], adapter, lora_rank)
        return self

    # ------------------------------------------------------------------ forward
    def pos_embed(self, size: tuple[int, int], patch: tuple[int, int], device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """PixArt's table for an (H, W) latent at `patch`, at original-grid patch centres."""
        o = self.original_patch_size
        grid = (size[0] // patch[0], size[1] // patch[1])
        return sincos_2d_scaled(self.config["hidden_size"], grid, (patch[0] / o[0], patch[1] / o[1]),
                                self.base_size, self.config["interpolation_scale"], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y, patch_size: int | tuple[int, int] | None = None
                ) -> torch.Tensor:
        """PixArt's forward at a patch size.

        Args:
            x: (N, C, H, W) latents; H, W multiples of the patch size.
            t: (N,) timesteps (or a scalar).
            y: a `TextCondition` with N rows (or (N, L, C_text) embeddings, or (embeds, mask)).
            patch_size: one of `patch_sizes`; default the original.
        Returns:
            (N, out_channels, H, W).
        """
        patch = self._patch(patch_size)
        self._check_x(x, patch)
        t = check_timesteps(t, x.shape[0], x.device)
        cond = self.check_condition(y, x.shape[0], x.device)
        key, size = size_key(patch), tuple(x.shape[2:])
        h = self.x_embedder(x, key, self.pos_embed(size, patch, device=x.device, dtype=self.embed_dtype))
        t_emb, t6, text, bias = self._conditioning(t, cond)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, t6, key, text, bias, use_reentrant=False)
            else:
                h = block(h, t6, key, text, bias)
        return self.final_layer(h, t_emb, key, size)

    def forward_packed(self, xs: list[torch.Tensor], t: torch.Tensor, y,
                       patch_sizes: list[int | tuple[int, int] | None]) -> list[torch.Tensor]:
        """Samples of different patch sizes and resolutions as ONE packed token sequence.

        Self-attention is block-diagonal (`fk.ops.varlen_attention`); each sample's queries
        cross-attend to that sample's own text tokens. Equal to `forward` per sample.

        Args:
            xs: B latents (C, H_i, W_i); t: (B,); y: a `TextCondition` with B rows;
            patch_sizes: B patch sizes (None = original).
        Returns:
            B outputs (out_channels, H_i, W_i) in input order.
        """
        patches = self._check_packed(xs, patch_sizes)
        t = check_timesteps(t, len(xs), xs[0].device)
        cond = self.check_condition(y, len(xs), xs[0].device)
        runs, order, packing, h = self._embed_packed(xs, patches, self.embed_dtype)
        t_emb, t6, text, bias = self._conditioning(t[order], cond[order])
        for block in self.blocks:
            h = block(h, t6, packing.groups, text, bias, packing)
        return self._unpack(self.final_layer.modulated(h, t_emb, packing.groups, packing), runs)

    # ------------------------------------------------------------------ accounting
    def flops(self, patch_size: int | tuple[int, int] | None = None, batch: int = 1,
              input_size: int | tuple[int, int] | None = None, text_len: int | None = None) -> int:
        """Analytic forward FLOPs (multiply-add = 2): self- and cross-attention, caption projection, LoRA.

        `text_len` defaults to the model's `text_len` (every token is computed; masks do not save work).
        """
        patch = self._patch(patch_size)
        h, w = as_size(input_size or self.input_size, "input_size")
        tokens = (h // patch[0]) * (w // patch[1])
        return int(batch * text_model_flops(self, tokens, patch[0] * patch[1], patch, text_len or self.text_len,
                                            frames=1))

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_config(cls, name: str, patch_sizes=None, adapter: str = "lora", **overrides) -> "FlexiPixArt":
        if name not in PIXART_CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {sorted(PIXART_CONFIGS)}")
        return cls(**{**PIXART_CONFIGS[name], **overrides}, patch_sizes=patch_sizes, adapter=adapter)

    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", lora_rank: int = 32,
                       null_caption: torch.Tensor | None = None) -> "FlexiPixArt":
        """Convert a diffusers `PixArtTransformer2DModel` (or a directory saved by it); see convert.py."""
        from flexikern.models.convert import pixart_from_diffusers
        return pixart_from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter,
                                     lora_rank=lora_rank, null_caption=null_caption)


def text_model_flops(model, tokens: int, volume: int, patch: tuple, text_len: int, frames: int,
                     temporal_depth: int = 0) -> int:
    """Per-sample FLOPs of a PixArt/Latte model with `tokens` image tokens of `volume` pixels each.

    `frames` token groups of tokens/frames attend spatially; with `temporal_depth`, as many temporal
    blocks attend across the frames at each spatial position.
    """
    cfg = model.config
    d, c_in, c_out = cfg["hidden_size"], model.in_channels, model.out_channels
    hidden = int(d * cfg["mlp_ratio"])
    rank = model.lora_rank if (model.adapter == "lora" and tuple(patch) != model.original_patch_size) else 0

    def linear(n_in, n_out, n=tokens, lora=True):
        return 2 * n * (n_in * n_out + (rank * (n_in + n_out) if (rank and lora) else 0))

    per_frame = tokens // frames
    self_part = linear(d, 3 * d) + linear(d, d) + linear(d, hidden) + linear(hidden, d)
    spatial = (self_part + 2 * 2 * frames * per_frame * per_frame * d            # q k^T, attn v per frame
               + linear(d, d, lora=False) + linear(d, 2 * d, n=text_len, lora=False)  # cross q, kv (once)
               + 2 * 2 * tokens * text_len * d + linear(d, d, lora=False))        # cross attention, proj
    temporal = self_part + 2 * 2 * per_frame * frames * frames * d
    return (2 * tokens * d * c_in * volume                                        # patch embedding
            + 2 * (model.t_embedder.frequency_embedding_size * d + d * d) + 2 * d * 6 * d   # adaLN-single
            + 2 * text_len * (model.caption_channels * d + d * d)                 # caption projection
            + cfg["depth"] * spatial + temporal_depth * temporal
            + 2 * tokens * d * volume * c_out)                                    # de-embedding
