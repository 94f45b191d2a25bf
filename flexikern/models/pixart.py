"""Text-conditioned FlexiDiT: PixArt-alpha's architecture (diffusers numerics) at any patch size.

Only what is PixArt's own lives here (its configs, positions, the model); the adaLN-single block
and final layer are in `models.layers`, the text condition and caption embedder in `models.text`,
which Latte shares. What differs from the class-conditional `FlexiDiT`:

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

from typing import Iterable

import torch

from flexikern.flexi.layers import FlexiDeEmbed
from flexikern.flexi.pos_embed import sincos_2d_scaled
from flexikern.models.base import check_timesteps
from flexikern.models.layers import PixArtFinalLayer
from flexikern.models.text import TextCondition, TextConditioned, text_model_flops
from flexikern.ops.patch_size import PatchSize

__all__ = ["FlexiPixArt", "PIXART_CONFIGS", "TextCondition"]

PIXART_CONFIGS: dict[str, dict] = {
    # PixArt-alpha XL/2 at 256 and 512 (T5-XXL captions, 120 tokens); 1024 needs size conditions.
    "PixArt-XL/2-256": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                            caption_channels=4096, text_len=120),
    "PixArt-XL/2-512": dict(input_size=64, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                            caption_channels=4096, text_len=120),
}


class FlexiPixArt(TextConditioned):
    """PixArt-alpha (adaLN-single, cross-attention to text) runnable at any configured patch size.

    `forward(x, t, y, patch_size)` with `y` a `TextCondition` (or embeddings (N, L, C_text), or an
    (embeds, mask) pair). `null_condition(y)` is the guidance branch's condition.

    C_text is `caption_channels`, projected to `hidden_size` by the caption MLP; with
    `caption_channels=None` there is no projection and the embeddings, of `cross_attention_dim`
    channels (default `hidden_size`), go to the cross-attention as they are (diffusers' options of
    the same names). `attention_bias=False`: the attentions' q, k, v have no biases.
    """

    checkpoint_format = "flexikern.FlexiPixArt"
    configs = PIXART_CONFIGS

    def __init__(self, input_size: int = 32, patch_size: int | tuple[int, int] = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 caption_channels: int | None = 4096, text_len: int = 120, learn_sigma: bool = True,
                 interpolation_scale: float | None = None, norm_eps: float = 1e-6,
                 cross_attention_dim: int | None = None, attention_bias: bool = True,
                 patch_sizes: Iterable[int | tuple[int, int]] | None = None, adapter: str = "lora",
                 lora_rank: int = 32) -> None:
        super().__init__()
        if interpolation_scale is None:
            interpolation_scale = max(input_size // 64, 1)   # diffusers' default
        patch = self._setup(dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden_size,
                                 depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                 caption_channels=caption_channels, text_len=text_len,
                                 learn_sigma=learn_sigma, interpolation_scale=interpolation_scale,
                                 norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
                                 attention_bias=attention_bias),
                            patch_size, 2, in_channels, hidden_size, num_heads, learn_sigma)
        self.input_size = input_size
        self.base_size = input_size // patch[0]
        self._build_text_model(patch, in_channels, hidden_size, depth, num_heads, mlp_ratio, caption_channels,
                               text_len, norm_eps, cross_attention_dim, attention_bias)
        self.final_layer = PixArtFinalLayer(hidden_size, FlexiDeEmbed(hidden_size, self.out_channels, patch))
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    def pos_embed(self, size: tuple[int, int], patch: PatchSize, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """PixArt's table for an (H, W) latent at `patch` (one of `patch_sizes`, dividing the size),
        at original-grid patch centres."""
        patch = self._patch(patch)
        size = self._check_size(size, patch)
        o = self.original_patch_size
        grid = (size[0] // patch[0], size[1] // patch[1])
        return sincos_2d_scaled(self.config["hidden_size"], grid, (patch[0] / o[0], patch[1] / o[1]),
                                self.base_size, self.config["interpolation_scale"], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y, patch_size: int | tuple[int, int] | None = None
                ) -> torch.Tensor:
        """PixArt's forward at a patch size.

        Args:
            x: (N, C, H, W) latents, any float dtype (cast to the model's dtype, as diffusers'
                pipelines prepare latents in `transformer.dtype`); H, W multiples of the patch size.
            t: (N,) timesteps, int or float (or a scalar).
            y: a `TextCondition` with N rows (or (N, L, C_text) embeddings, or (embeds, mask)).
            patch_size: one of `patch_sizes`; default the original.
        Returns:
            (N, out_channels, H, W), in the model's dtype.
        """
        patch = self._patch(patch_size)
        x = self._check_x(x, patch)
        t = check_timesteps(t, x.shape[0], x.device)
        cond = self.check_condition(y, x.shape[0], x.device)
        size = tuple(x.shape[2:])
        h = self.x_embedder(x, patch, self.pos_embed(size, patch, device=x.device, dtype=self.embed_dtype))
        t_emb, t6, text, bias = self._conditioning(t, cond)
        for block in self.blocks:
            h = self._run_block(block, h, t6, patch, text, bias)
        return self.final_layer(h, t_emb, patch, size)

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
        xs, patches = self._check_packed(xs, patch_sizes)
        t = check_timesteps(t, len(xs), xs[0].device)
        cond = self.check_condition(y, len(xs), xs[0].device)
        runs, order, packing = self._packed_layout([(p, tuple(x.shape[1:])) for p, x in zip(patches, xs)], xs[0].device)
        h = self._embed_packed(xs, runs)
        t_emb, t6, text, bias = self._conditioning(t[order], cond[order])
        for block in self.blocks:
            h = block(h, t6, packing.groups, text, bias, packing)
        return self._unpack(self.final_layer.modulated(h, t_emb, packing.groups, packing), runs)

    def flops(self, patch_size: int | tuple[int, int] | None = None, batch: int = 1,
              input_size: int | tuple[int, int] | None = None, text_len: int | None = None) -> int:
        """Analytic forward FLOPs (multiply-add = 2): self- and cross-attention, caption projection (if
        any), LoRA.

        `text_len` defaults to the model's `text_len` (every token is computed; masks do not save work).
        """
        patch, batch, size = self._flops_args(patch_size, batch, input_size)
        return int(batch * text_model_flops(self, patch.tokens(size), patch.volume, patch,
                                            self._text_len(text_len), frames=1))

    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", lora_rank: int = 32,
                       null_caption: torch.Tensor | None = None, subfolder: str | None = None) -> "FlexiPixArt":
        """Convert a diffusers `PixArtTransformer2DModel` (or a pipeline holding one, or a folder or Hub
        id of either; `subfolder` names its folder), in eval mode; see convert.py."""
        from flexikern.models.convert import pixart_from_diffusers
        return pixart_from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter,
                                     lora_rank=lora_rank, null_caption=null_caption, subfolder=subfolder)

    def to_diffusers(self):
        """The original patch size as a diffusers `PixArtTransformer2DModel`, exact; see convert.py."""
        from flexikern.models.convert import text_to_diffusers
        return text_to_diffusers(self)
