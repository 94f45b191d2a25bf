"""Video FlexiDiT: Latte's architecture (diffusers `LatteTransformer3DModel` numerics) at 3-D patch sizes.

Latte embeds each frame with (1, p, p) patches, then alternates SPATIAL blocks (PixArt blocks:
self-attention within a frame, cross-attention to the text, MLP) and TEMPORAL blocks
(self-attention across the frames at each spatial position, MLP), all modulated by one shared
adaLN-single. A fixed 1-D sin-cos table over frames is added before the first temporal block.

A weak patch (pt, ph, pw) merges pt frames and ph x pw pixels into one token: the spatial blocks
see F/pt frame groups of (H/ph)(W/pw) tokens, the temporal blocks see F/pt tokens per position.
Positions are the original grid's patch CENTRES: spatially as in 2-D FlexiDiT, temporally
`pt*j + (pt-1)/2` (a merged frame pair sits between its two frames).

Initialisation of a weak size from the original (D, C, 1, p, p) kernel `w0` (and bias `b0`), in
`flexi.layers.FlexiPatchEmbed` / `FlexiDeEmbed`:

* embedding: spatially `lift_embed` (the 2-D rule), then the kernel is DUPLICATED over the pt
  frames and divided by pt: `w[:, :, k] = lift(w0) / pt`. So the token of a frame group is the
  original token of the groups' temporal MEAN (b0 unchanged).
* de-embedding: spatially `lift_deembed` (replicate over each block), then duplicated over the pt
  frames WITHOUT scaling: each frame of the group gets the same prediction.

Hence, with zero LoRA and patch-size embeddings, the weak model at init IS the original model run
on the temporally (and spatially) averaged video with centre positions, its output replicated back
(tested exactly in tests/test_latte.py). Flexibility uses the paper's LoRA recipe only.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from flexikern.flexi.layers import FlexiDeEmbed
from flexikern.flexi.packing import Packing
from flexikern.flexi.pos_embed import sincos_2d_scaled, sincos_frames
from flexikern.models.base import check_timesteps, group_samples
from flexikern.models.layers import PixArtBlock, PixArtFinalLayer
from flexikern.models.text import TextConditioned, text_model_flops
from flexikern.ops.patch_size import PatchSize

__all__ = ["FlexiLatte"]


class FlexiLatte(TextConditioned):
    """Latte (spatial + temporal transformer blocks, text cross-attention) at any configured 3-D patch size.

    `forward(x, t, y, patch_size)` with x (N, C, F, H, W) and y a `TextCondition`; pre-trained
    patch (1, p, p), weak sizes e.g. (2, p, p) (frames merged) or (1, 2p, 2p).

    `enable_temporal_attentions=False` skips the temporal blocks and the temporal positions (each
    frame group is denoised on its own), as diffusers' forward argument of that name does; the
    forwards and `flops` take it per call too. Text channels, `cross_attention_dim` and
    `attention_bias` as in `FlexiPixArt`.
    """

    checkpoint_format = "flexikern.FlexiLatte"
    adapters = ("lora",)   # the paper's video recipe

    def __init__(self, input_size: int = 32, num_frames: int = 16, patch_size: tuple[int, int, int] = (1, 2, 2),
                 in_channels: int = 4, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, caption_channels: int | None = 4096, text_len: int = 120,
                 learn_sigma: bool = True, interpolation_scale: float | None = None, norm_eps: float = 1e-6,
                 cross_attention_dim: int | None = None, attention_bias: bool = True,
                 enable_temporal_attentions: bool = True,
                 patch_sizes: Iterable[tuple[int, int, int]] | None = None, adapter: str = "lora",
                 lora_rank: int = 32) -> None:
        super().__init__()
        if interpolation_scale is None:
            interpolation_scale = max(input_size // 64, 1)
        if not isinstance(enable_temporal_attentions, bool):
            raise ValueError(f"enable_temporal_attentions={enable_temporal_attentions!r}: expected True or False")
        patch = self._setup(dict(input_size=input_size, num_frames=num_frames, in_channels=in_channels,
                                 hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                                 mlp_ratio=mlp_ratio, caption_channels=caption_channels, text_len=text_len,
                                 learn_sigma=learn_sigma, interpolation_scale=interpolation_scale,
                                 norm_eps=norm_eps, cross_attention_dim=cross_attention_dim,
                                 attention_bias=attention_bias, enable_temporal_attentions=enable_temporal_attentions),
                            patch_size, 3, in_channels, hidden_size, num_heads, learn_sigma)
        if patch[0] != 1 or patch[1] != patch[2]:
            raise ValueError(f"patch_size={patch}: the pre-trained (Latte) patch is (1, p, p)")
        self.input_size, self.num_frames = input_size, num_frames
        self.base_size = input_size // patch[1]
        self._build_text_model(patch, in_channels, hidden_size, depth, num_heads, mlp_ratio, caption_channels,
                               text_len, norm_eps, cross_attention_dim, attention_bias)
        self.temporal_blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps,
                                                          cross_attention=False, qkv_bias=attention_bias)
                                              for _ in range(depth)])
        self.final_layer = PixArtFinalLayer(hidden_size, FlexiDeEmbed(hidden_size, self.out_channels, patch))
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.in_channels, self.num_frames, self.input_size, self.input_size)

    # ------------------------------------------------------------------ positions
    def pos_embed(self, size: tuple[int, int, int], patch: PatchSize, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(F/pt * (H/ph)(W/pw), D): Latte's per-frame table (PixArt's base-size normalisation) at
        original-grid patch centres, for each frame group. `patch` is one of `patch_sizes`, dividing
        the size."""
        patch = self._patch(patch)
        size = self._check_size(size, patch)
        o = self.original_patch_size
        grid = (size[1] // patch[1], size[2] // patch[2])
        return sincos_2d_scaled(self.config["hidden_size"], grid, (patch[1] / o[1], patch[2] / o[2]),
                                self.base_size, self.config["interpolation_scale"], device=device,
                                dtype=dtype, frames=size[0] // patch[0])

    def temporal_pos_embed(self, frames: int, patch: PatchSize, device=None, dtype=torch.float32):
        """(F/pt, D): Latte's `temp_pos_embed` at the centres of the merged frames."""
        return sincos_frames(self.config["hidden_size"], frames // patch[0], patch[0], device=device, dtype=dtype)

    def _position_tables(self, size, patch, device) -> list[torch.Tensor]:
        return [*super()._position_tables(size, patch, device),
                self.temporal_pos_embed(size[0], patch, device, self.embed_dtype)]

    # ------------------------------------------------------------------ forward
    def _temporal(self, enable_temporal_attentions: bool | None) -> bool:
        """Whether the temporal blocks run: the call's `enable_temporal_attentions`, else the model's
        (`config["enable_temporal_attentions"]`, read per call, so an edit of it is checked too)."""
        if enable_temporal_attentions is None:
            setting = self.config["enable_temporal_attentions"]
            if not isinstance(setting, bool):
                raise ValueError(f"config['enable_temporal_attentions']={setting!r}: expected True or False")
            return setting
        if not isinstance(enable_temporal_attentions, bool):
            raise ValueError(f"enable_temporal_attentions={enable_temporal_attentions!r}: expected True, False "
                             "or None (the model's setting)")
        return enable_temporal_attentions

    def forward(self, x: torch.Tensor, t: torch.Tensor, y, patch_size: tuple[int, int, int] | None = None,
                enable_temporal_attentions: bool | None = None) -> torch.Tensor:
        """Latte's forward at a 3-D patch size.

        Args:
            x: (N, C, F, H, W) latents, any float dtype (cast to the model's dtype, as diffusers'
                pipelines prepare latents in `transformer.dtype`); F, H, W multiples of the patch size.
            t: (N,) timesteps, int or float (or a scalar).
            y: a `TextCondition` with N rows (or (N, L, C_text) embeddings, or (embeds, mask)).
            patch_size: one of `patch_sizes`; default the original (1, p, p).
            enable_temporal_attentions: False skips the temporal blocks; default the model's setting.
        Returns:
            (N, out_channels, F, H, W), in the model's dtype.
        """
        temporal_on = self._temporal(enable_temporal_attentions)
        patch = self._patch(patch_size)
        x = self._check_x(x, patch)
        n, size = x.shape[0], tuple(x.shape[2:])
        t = check_timesteps(t, n, x.device)
        cond = self.check_condition(y, n, x.device)
        dtype = self.embed_dtype
        h = self.x_embedder(x, patch, self.pos_embed(size, patch, x.device, dtype))
        frames, d = size[0] // patch[0], h.shape[-1]
        spatial = h.shape[1] // frames
        t_emb, t6, text, bias = self._conditioning(t, cond)
        t6_spatial, t6_temporal = t6.repeat_interleave(frames, 0), t6.repeat_interleave(spatial, 0)
        for i, (block, temporal) in enumerate(zip(self.blocks, self.temporal_blocks)):
            h = block(h.reshape(n * frames, spatial, d), t6_spatial, patch, text, bias)
            if not temporal_on:
                continue
            h = h.reshape(n, frames, spatial, d).transpose(1, 2).reshape(n * spatial, frames, d)
            if i == 0 and frames > 1:
                h = h + self.temporal_pos_embed(size[0], patch, x.device, dtype)
            h = temporal(h, t6_temporal, patch)
            h = h.reshape(n, spatial, frames, d).transpose(1, 2)
        return self.final_layer(h.reshape(n, frames * spatial, d), t_emb, patch, size)

    def forward_packed(self, xs: list[torch.Tensor], t: torch.Tensor, y,
                       patch_sizes: list[tuple[int, int, int] | None],
                       enable_temporal_attentions: bool | None = None) -> list[torch.Tensor]:
        """Videos of different patch sizes (and sizes) as ONE packed sequence; equal to `forward` per sample.

        Spatial blocks: one varlen sequence per (sample, frame group); temporal blocks (unless
        `enable_temporal_attentions` is False, default the model's setting): the tokens permuted so
        each (sample, position) is one sequence; per-token adaLN; each sample's queries
        cross-attend to its own text.
        """
        temporal_on = self._temporal(enable_temporal_attentions)
        xs, patches = self._check_packed(xs, patch_sizes)
        device, dtype = xs[0].device, self.embed_dtype
        t = check_timesteps(t, len(xs), device)
        cond = self.check_condition(y, len(xs), device)
        runs, order, spatial_packing, temporal_packing, perm, inverse = self._packed_layout(
            [(p, tuple(x.shape[1:])) for p, x in zip(patches, xs)], device)
        h = self._embed_packed(xs, runs)
        temporal_pos = []
        for p, size, members in runs if temporal_on else ():
            # In temporal order (position-major, frame-minor); none for one frame group, as unpacked.
            table = self.temporal_pos_embed(size[0], p, device, dtype)
            positions = len(members) * (size[1] // p[1]) * (size[2] // p[2])
            temporal_pos.append((table if size[0] // p[0] > 1 else torch.zeros_like(table)).repeat(positions, 1))
        t_emb, t6, text, bias = self._conditioning(t[order], cond[order])
        groups = spatial_packing.groups
        for i, (block, temporal) in enumerate(zip(self.blocks, self.temporal_blocks)):
            h = block(h, t6, groups, text, bias, spatial_packing)
            if not temporal_on:
                continue
            h = h[perm]
            if i == 0:
                h = h + torch.cat(temporal_pos)
            h = temporal(h, t6, groups, packing=temporal_packing)[inverse]
        return self._unpack(self.final_layer.modulated(h, t_emb, groups, spatial_packing), runs)

    def _packed_layout(self, samples: list[tuple[PatchSize, tuple[int, int, int]]], device: torch.device):
        """(runs, packed order, spatial `Packing`, temporal `Packing`, perm, inverse) for videos'
        (patch size, (F, H, W)); cached per signature, so a step builds and copies nothing.

        Spatial: one sequence per (sample, frame group), tokens in embedding order (frame-major);
        temporal: one per (sample, position) after `h[perm]` (position-major); `h[inverse]` undoes
        it. Both give each token its SAMPLE's adaLN row and cross-attention text.
        """
        def build():
            runs, order = group_samples(samples)
            lengths, patches, frame_groups, positions, perm, offset = [], [], [], [], [], 0
            for p, size, members in runs:
                frames, spatial = size[0] // p[0], (size[1] // p[1]) * (size[2] // p[2])
                local = (torch.arange(frames)[None, :] * spatial + torch.arange(spatial)[:, None]).reshape(-1)
                for _ in members:
                    perm.append(local + offset)
                    offset += frames * spatial
                    lengths.append(frames * spatial)
                    patches.append(p)
                    frame_groups.append(frames)
                    positions.append(spatial)
            perm = torch.cat(perm)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm))
            return (runs, torch.tensor(order, device=device),
                    Packing.from_lengths(lengths, patches, device, sequences=frame_groups),
                    Packing.from_lengths(lengths, patches, device, sequences=positions),
                    perm.to(device), inverse.to(device))
        return self._cached_packing((tuple(samples), device), build)

    # ------------------------------------------------------------------ accounting
    def flops(self, patch_size: tuple[int, int, int] | None = None, batch: int = 1, num_frames: int | None = None,
              input_size: int | None = None, text_len: int | None = None,
              enable_temporal_attentions: bool | None = None) -> int:
        """Analytic forward FLOPs (multiply-add = 2): spatial, temporal (unless disabled, as in
        `forward`) and cross-attention, LoRA."""
        temporal_depth = self.config["depth"] if self._temporal(enable_temporal_attentions) else 0
        patch, batch, size = self._flops_args(patch_size, batch, input_size, num_frames)
        frames, tokens = size[0] // patch[0], patch.tokens(size)
        return int(batch * text_model_flops(self, tokens, patch.volume, patch, self._text_len(text_len),
                                            frames=frames, temporal_depth=temporal_depth))

    # ------------------------------------------------------------------ loading and saving
    def to_diffusers(self):
        """The original patch size as a diffusers `LatteTransformer3DModel`, exact; see convert.py."""
        from flexikern.models.convert import text_to_diffusers
        return text_to_diffusers(self)

    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", lora_rank: int = 32,
                       null_caption: torch.Tensor | None = None, enable_temporal_attentions: bool = True,
                       subfolder: str | None = None) -> "FlexiLatte":
        """Convert a diffusers `LatteTransformer3DModel` (or a pipeline holding one, or a folder or Hub
        id of either; `subfolder` names its folder), in eval mode. `enable_temporal_attentions` is
        the model's setting (diffusers passes it per call). See convert.py."""
        from flexikern.models.convert import latte_from_diffusers
        return latte_from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter,
                                    lora_rank=lora_rank, null_caption=null_caption,
                                    enable_temporal_attentions=enable_temporal_attentions, subfolder=subfolder)
