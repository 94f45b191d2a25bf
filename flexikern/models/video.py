"""Video FlexiDiT: Latte's architecture (diffusers `LatteTransformer3DModel` numerics) at 3-D patch sizes.

Latte embeds each frame with (1, p, p) patches, then alternates SPATIAL blocks (PixArt blocks:
self-attention within a frame, cross-attention to the text, MLP) and TEMPORAL blocks
(self-attention across the frames at each spatial position, MLP), all modulated by one shared
adaLN-single. A fixed 1-D sin-cos table over frames is added before the first temporal block.

A weak patch (pt, ph, pw) merges pt frames and ph x pw pixels into one token: the spatial blocks
see F/pt frame groups of (H/ph)(W/pw) tokens, the temporal blocks see F/pt tokens per position.
Positions are the original grid's patch CENTRES: spatially as in 2-D FlexiDiT, temporally
`pt*j + (pt-1)/2` (a merged frame pair sits between its two frames).

Initialisation of a weak size from the original (D, C, 1, p, p) kernel `w0` (and bias `b0`):

* embedding: spatially `lift_embed` (the 2-D rule), then the kernel is DUPLICATED over the pt
  frames and divided by pt: `w[:, :, k] = lift(w0) / pt`. So the token of a frame group is the
  original token of the groups' temporal MEAN (b0 unchanged).
* de-embedding: spatially `lift_deembed` (replicate over each block), then duplicated over the pt
  frames WITHOUT scaling: each frame of the group gets the same prediction.

Hence, with zero LoRA and patch-size embeddings, the weak model at init IS the original model run
on the temporally (and spatially) averaged video with centre positions, its output replicated back
(tested exactly in tests/test_video.py). Flexibility uses the paper's LoRA recipe only.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern import ops
from flexikern.flexi.pos_embed import sincos_2d_scaled, sincos_frames
from flexikern.flexi.resize import lift_deembed, lift_embed
from flexikern.models.dit import TimestepEmbedder
from flexikern.models.base import add_adapters, check_timesteps, group_samples
from flexikern.models.pixart import (CaptionEmbedder, PixArtBlock, PixArtFinalLayer, TextConditioned,
                                     text_model_flops)
from flexikern.runtime.packing import Packing

__all__ = ["FlexiLatte", "video_key", "as_video_patch", "FlexiPatchEmbed3d", "FlexiDeEmbed3d"]

Patch3 = tuple[int, int, int]


def video_key(patch: Patch3) -> str:
    """The name of a 3-D patch size in parameter dicts: (2, 2, 2) -> "2x2x2"."""
    return "x".join(str(p) for p in patch)


def as_video_patch(patch, name: str = "patch_size") -> Patch3:
    """(pt, ph, pw) from a triple of positive ints; a clear error otherwise."""
    if (not isinstance(patch, (tuple, list)) or len(patch) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise ValueError(f"{name}={patch!r}: expected a video patch (pt, ph, pw) of positive ints")
    return tuple(int(p) for p in patch)


class FlexiPatchEmbed3d(nn.Module):
    """(N, C, F, H, W) -> tokens (N, F/pt, (H/ph)(W/pw), D): `fk.ops.patchify` (pt, ph, pw) + a linear.

    One kernel (D, C, pt, ph, pw) per patch size (LoRA recipe), plus a patch-size embedding per weak size.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch: Patch3) -> None:
        super().__init__()
        self.in_channels, self.hidden_size = in_channels, hidden_size
        self.weight = nn.ParameterDict({video_key(patch): nn.Parameter(torch.empty(hidden_size, in_channels, *patch))})
        self.bias = nn.ParameterDict({video_key(patch): nn.Parameter(torch.zeros(hidden_size))})
        self.size_embed = nn.ParameterDict()

    def add_size(self, original: Patch3, patch: Patch3) -> None:
        """The kernel of `patch` from the original (1, p, p) one: spatial lift, duplicated over time / pt."""
        w0, b0 = self.weight[video_key(original)].detach(), self.bias[video_key(original)].detach()
        w = lift_embed(w0[:, :, 0], patch[1:])[:, :, None].repeat(1, 1, patch[0], 1, 1) / patch[0]
        key = video_key(patch)
        self.weight[key] = nn.Parameter(w.contiguous())
        self.bias[key] = nn.Parameter(b0.clone())
        self.size_embed[key] = nn.Parameter(torch.zeros_like(b0))

    def forward(self, x: torch.Tensor, key: str, patch: Patch3, pos_embed: torch.Tensor) -> torch.Tensor:
        n, _, f, h, w = x.shape
        weight = self.weight[key]
        tokens = ops.patchify(x, patch)                                   # features (pt, ph, pw, C)
        out = F.linear(tokens, weight.permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1), self.bias[key])
        out = out.reshape(n, f // patch[0], -1, weight.shape[0]) + pos_embed
        return out + self.size_embed[key] if key in self.size_embed else out


class FlexiDeEmbed3d(nn.Module):
    """Tokens (N, T, D) -> (N, C_out, F, H, W): a linear D -> pt*ph*pw*C_out then `fk.ops.unpatchify`."""

    def __init__(self, hidden_size: int, out_channels: int, patch: Patch3) -> None:
        super().__init__()
        self.hidden_size, self.out_channels = hidden_size, out_channels
        n = math.prod(patch) * out_channels
        self.weight = nn.ParameterDict({video_key(patch): nn.Parameter(torch.empty(n, hidden_size))})
        self.bias = nn.ParameterDict({video_key(patch): nn.Parameter(torch.zeros(n))})

    def add_size(self, original: Patch3, patch: Patch3) -> None:
        """Rows (pt, ph, pw, C): the original (p, p, C) rows spatially lifted, duplicated over pt frames."""
        w0, b0 = self.weight[video_key(original)].detach(), self.bias[video_key(original)].detach()
        p, c, d = original[1:], self.out_channels, self.hidden_size
        maps = lift_deembed(w0.reshape(*p, c, d).permute(2, 3, 0, 1), patch[1:])     # (C, D, ph, pw)
        bias = lift_deembed(b0.reshape(*p, c).permute(2, 0, 1), patch[1:])           # (C, ph, pw)
        w = maps.permute(2, 3, 0, 1).reshape(1, -1, d).repeat(patch[0], 1, 1).reshape(-1, d)
        b = bias.permute(1, 2, 0).reshape(1, -1).repeat(patch[0], 1).reshape(-1)
        key = video_key(patch)
        self.weight[key] = nn.Parameter(w.contiguous())
        self.bias[key] = nn.Parameter(b.contiguous())

    def forward(self, x: torch.Tensor, key: str, size: tuple[int, int, int]) -> torch.Tensor:
        return ops.unpatchify(F.linear(x, self.weight[key], self.bias[key]), _parse_video_key(key), size)


def _parse_video_key(key: str) -> Patch3:
    return tuple(int(v) for v in key.split("x"))


class FlexiLatte(TextConditioned, nn.Module):
    """Latte (spatial + temporal transformer blocks, text cross-attention) at any configured 3-D patch size.

    `forward(x, t, y, patch_size)` with x (N, C, F, H, W) and y a `TextCondition`; pre-trained
    patch (1, p, p), weak sizes e.g. (2, p, p) (frames merged) or (1, 2p, 2p).
    """

    checkpoint_format = "flexikern.FlexiLatte"

    def __init__(self, input_size: int = 32, num_frames: int = 16, patch_size: Patch3 = (1, 2, 2),
                 in_channels: int = 4, hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, caption_channels: int = 4096, text_len: int = 120,
                 learn_sigma: bool = True, interpolation_scale: float | None = None, norm_eps: float = 1e-6,
                 patch_sizes: Iterable[Patch3] | None = None, adapter: str = "lora", lora_rank: int = 32) -> None:
        super().__init__()
        patch = as_video_patch(tuple(patch_size))
        if patch[0] != 1 or patch[1] != patch[2]:
            raise ValueError(f"patch_size={patch}: the pre-trained (Latte) patch is (1, p, p)")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if interpolation_scale is None:
            interpolation_scale = max(input_size // 64, 1)
        self.config = dict(input_size=input_size, num_frames=num_frames, patch_size=patch,
                           in_channels=in_channels, hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, caption_channels=caption_channels, text_len=text_len,
                           learn_sigma=learn_sigma, interpolation_scale=interpolation_scale, norm_eps=norm_eps)
        self.input_size, self.num_frames, self.in_channels = input_size, num_frames, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_heads = learn_sigma, num_heads
        self.caption_channels, self.text_len = caption_channels, text_len
        self.base_size = input_size // patch[1]
        self.original_patch_size: Patch3 = patch
        self.patch_sizes: tuple[Patch3, ...] = (patch,)
        self.adapter: str | None = None
        self.lora_rank: int | None = None
        self.gradient_checkpointing = False

        self.x_embedder = FlexiPatchEmbed3d(in_channels, hidden_size, patch)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=0)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, text_len)
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps,
                                                          cross_attention=False) for _ in range(depth)])
        self.final_layer = PixArtFinalLayer(hidden_size, patch, self.out_channels,
                                            linear=FlexiDeEmbed3d(hidden_size, self.out_channels, patch))
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (self.in_channels, self.num_frames, self.input_size, self.input_size)

    def initialize_weights(self) -> None:
        """Latte/PixArt's initialisation: xavier linears, small embedders, zero output and cross-attn proj."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        key = video_key(self.original_patch_size)
        w = self.x_embedder.weight[key]
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.cross_attn.proj.weight, 0)
            nn.init.constant_(block.cross_attn.proj.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight[key], 0)
        nn.init.constant_(self.final_layer.linear.bias[key], 0)

    # ------------------------------------------------------------------ flexibility
    def flexify(self, patch_sizes: Iterable[Patch3], adapter: str = "lora", lora_rank: int = 32) -> "FlexiLatte":
        """Add weak 3-D patch sizes initialised from the original (module docstring); LoRA only. Returns self."""
        sizes = tuple(dict.fromkeys(as_video_patch(tuple(p), "patch_sizes") for p in patch_sizes))
        if self.patch_sizes != (self.original_patch_size,):
            raise RuntimeError(f"this model is already flexible (patch_sizes={self.patch_sizes})")
        if self.original_patch_size not in sizes:
            raise ValueError(f"patch_sizes={sizes} must include the original patch size {self.original_patch_size}")
        if adapter != "lora":
            raise ValueError(f"adapter={adapter!r}: the video model supports 'lora' (the paper's video recipe)")
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r}: expected a positive int")
        for p in sizes:
            if self.input_size % p[1] or self.input_size % p[2] or self.num_frames % p[0]:
                raise ValueError(f"patch size {p} does not divide (num_frames, input_size) = "
                                 f"({self.num_frames}, {self.input_size})")
        self.patch_sizes = tuple(sorted(sizes))
        if len(sizes) == 1:
            return self
        self.adapter, self.lora_rank = adapter, lora_rank
        for p in sizes:
            if p != self.original_patch_size:
                self.x_embedder.add_size(self.original_patch_size, p)
                self.final_layer.linear.add_size(self.original_patch_size, p)
        add_adapters(self, [video_key(p) for p in sizes], video_key(self.original_patch_size),
                 [self.x_embedder, self.final_layer.linear], adapter, lora_rank)
        return self

    # ------------------------------------------------------------------ forward
    def _patch(self, patch_size) -> Patch3:
        if patch_size is None:
            return self.original_patch_size
        patch = as_video_patch(tuple(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size)
        if patch not in self.patch_sizes:
            raise ValueError(f"patch_size={patch_size!r} is not configured; this model has "
                             f"patch_sizes={list(self.patch_sizes)} (make it flexible with flexify)")
        return patch

    def _check_x(self, x: torch.Tensor, patch: Patch3, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"{name}: expected a video (N, C, F, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: {x.shape[1]} channels, but the model expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if x.shape[2] % patch[0]:
            raise ValueError(f"{name}: {x.shape[2]} frames are not a multiple of the temporal patch {patch[0]} "
                             f"(patch_size {patch})")
        if x.shape[3] % patch[1] or x.shape[4] % patch[2]:
            raise ValueError(f"{name}: H, W = {tuple(x.shape[3:])} are not multiples of patch_size {patch[1:]}")

    def spatial_pos_embed(self, size: tuple[int, int], patch: Patch3, device=None, dtype=torch.float32):
        """Latte's per-frame table (PixArt's base-size normalisation) at original-grid patch centres."""
        o = self.original_patch_size
        grid = (size[0] // patch[1], size[1] // patch[2])
        return sincos_2d_scaled(self.config["hidden_size"], grid, (patch[1] / o[1], patch[2] / o[2]),
                                self.base_size, self.config["interpolation_scale"], device=device, dtype=dtype)

    def temporal_pos_embed(self, frames: int, patch: Patch3, device=None, dtype=torch.float32):
        """(F/pt, D): Latte's `temp_pos_embed` at the centres of the merged frames."""
        return sincos_frames(self.config["hidden_size"], frames // patch[0], patch[0], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y, patch_size: Patch3 | None = None) -> torch.Tensor:
        """Latte's forward at a 3-D patch size.

        Args:
            x: (N, C, F, H, W) latents; F, H, W multiples of the patch size.
            t: (N,) timesteps (or a scalar).
            y: a `TextCondition` with N rows (or (N, L, C_text) embeddings, or (embeds, mask)).
            patch_size: one of `patch_sizes`; default the original (1, p, p).
        Returns:
            (N, out_channels, F, H, W).
        """
        patch = self._patch(patch_size)
        self._check_x(x, patch)
        n, _, f, hgt, wid = x.shape
        t = check_timesteps(t, n, x.device)
        cond = self.check_condition(y, n, x.device)
        key, dtype = video_key(patch), self.embed_dtype
        h = self.x_embedder(x, key, patch, self.spatial_pos_embed((hgt, wid), patch, x.device, dtype))
        frames, spatial, d = h.shape[1:]
        t_emb, t6, text, bias = self._conditioning(t, cond)
        t6_spatial, t6_temporal = t6.repeat_interleave(frames, 0), t6.repeat_interleave(spatial, 0)
        for i, (block, temporal) in enumerate(zip(self.blocks, self.temporal_blocks)):
            h = block(h.reshape(n * frames, spatial, d), t6_spatial, key, text, bias)
            h = h.reshape(n, frames, spatial, d).transpose(1, 2).reshape(n * spatial, frames, d)
            if i == 0 and frames > 1:
                h = h + self.temporal_pos_embed(f, patch, x.device, dtype)
            h = temporal(h, t6_temporal, key)
            h = h.reshape(n, spatial, frames, d).transpose(1, 2)
        return self.final_layer(h.reshape(n, frames * spatial, d), t_emb, key, (f, hgt, wid))

    def forward_packed(self, xs: list[torch.Tensor], t: torch.Tensor, y, patch_sizes: list[Patch3 | None]
                       ) -> list[torch.Tensor]:
        """Videos of different patch sizes (and sizes) as ONE packed sequence; equal to `forward` per sample.

        Spatial blocks: one varlen sequence per (sample, frame group); temporal blocks: the tokens
        permuted so each (sample, position) is one sequence; per-token adaLN; each sample's
        queries cross-attend to its own text.
        """
        if not isinstance(xs, (list, tuple)) or not xs:
            raise ValueError("xs: expected a non-empty list of (C, F, H, W) latents")
        if len(patch_sizes) != len(xs):
            raise ValueError(f"patch_sizes: {len(patch_sizes)} entries for {len(xs)} samples")
        patches = [self._patch(p) for p in patch_sizes]
        for i, (x, p) in enumerate(zip(xs, patches)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise ValueError(f"xs[{i}]: expected (C, F, H, W), got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            self._check_x(x[None], p, f"xs[{i}]")
        device, dtype = xs[0].device, self.embed_dtype
        t = check_timesteps(t, len(xs), device)
        cond = self.check_condition(y, len(xs), device)
        runs, order, spatial_packing, temporal_packing, perm, inverse = self._packed_layout(
            [(p, tuple(x.shape[1:])) for p, x in zip(patches, xs)], device)
        tokens, temporal_pos = [], []
        for p, size, members in runs:
            h = self.x_embedder(torch.stack([xs[i] for i in members]), video_key(p), p,
                                self.spatial_pos_embed(size[1:], p, device, dtype))
            m, frames, spatial, d = h.shape
            tokens.append(h.reshape(-1, d))
            # In temporal order (position-major, frame-minor); none for one frame group, as unpacked.
            table = self.temporal_pos_embed(size[0], p, device, dtype)
            temporal_pos.append((table if frames > 1 else torch.zeros_like(table)).repeat(m * spatial, 1))
        t_emb, t6, text, bias = self._conditioning(t[order], cond[order])
        h, pos_t, groups = torch.cat(tokens), torch.cat(temporal_pos), spatial_packing.groups
        for i, (block, temporal) in enumerate(zip(self.blocks, self.temporal_blocks)):
            h = block(h, t6, groups, text, bias, spatial_packing)
            h = h[perm]
            if i == 0:
                h = h + pos_t
            h = temporal(h, t6, groups, packing=temporal_packing)[inverse]
        h = self.final_layer.modulated(h, t_emb, groups, spatial_packing)
        outputs: list[torch.Tensor | None] = [None] * len(xs)
        start = 0
        for p, size, members in runs:
            count = len(members) * (size[0] // p[0]) * (size[1] // p[1]) * (size[2] // p[2])
            out = self.final_layer.linear(h[start:start + count].reshape(len(members), -1, h.shape[-1]),
                                          video_key(p), size)
            for j, i in enumerate(members):
                outputs[i] = out[j]
            start += count
        return outputs

    def _packed_layout(self, samples: list[tuple[Patch3, tuple[int, int, int]]], device: torch.device):
        """(runs, packed order, spatial `Packing`, temporal `Packing`, perm, inverse) for videos'
        (patch size, (F, H, W)); cached per signature, so a step builds and copies nothing.

        Spatial: one sequence per (sample, frame group), tokens in embedding order (frame-major);
        temporal: one per (sample, position) after `h[perm]` (position-major); `h[inverse]` undoes
        it. Both give each token its SAMPLE's adaLN row and cross-attention text.
        """
        def build():
            runs, order = group_samples(samples)
            lengths, keys, frame_groups, positions, perm, offset = [], [], [], [], [], 0
            for p, size, members in runs:
                frames, spatial = size[0] // p[0], (size[1] // p[1]) * (size[2] // p[2])
                local = (torch.arange(frames)[None, :] * spatial + torch.arange(spatial)[:, None]).reshape(-1)
                for _ in members:
                    perm.append(local + offset)
                    offset += frames * spatial
                    lengths.append(frames * spatial)
                    keys.append(video_key(p))
                    frame_groups.append(frames)
                    positions.append(spatial)
            perm = torch.cat(perm)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm))
            return (runs, torch.tensor(order, device=device),
                    Packing.from_lengths(lengths, keys, device, sequences=frame_groups),
                    Packing.from_lengths(lengths, keys, device, sequences=positions),
                    perm.to(device), inverse.to(device))
        return self._cached_packing((tuple(samples), device), build)

    def prepare(self, patch_sizes: list, size: tuple[int, int, int], device: torch.device,
                packed: bool = False) -> None:
        """`FlexibleModel.prepare` for videos of `size` (F, H, W): the spatial and temporal
        positional tables of each patch size (3-D kernels are not resized) and, with `packed`,
        the packed layout of one `forward_packed` call of one video per patch size, in order."""
        patches = [self._patch(p) for p in patch_sizes]
        for patch in dict.fromkeys(patches):
            self.spatial_pos_embed(tuple(size[1:]), patch, device, self.embed_dtype)
            self.temporal_pos_embed(size[0], patch, device, self.embed_dtype)
        if packed:
            self._packed_layout([(p, tuple(size)) for p in patches], device)

    # ------------------------------------------------------------------ accounting
    def flops(self, patch_size: Patch3 | None = None, batch: int = 1, num_frames: int | None = None,
              input_size: int | None = None, text_len: int | None = None) -> int:
        """Analytic forward FLOPs (multiply-add = 2): spatial, temporal and cross-attention, LoRA."""
        patch = self._patch(patch_size)
        f, s = num_frames or self.num_frames, input_size or self.input_size
        frames = f // patch[0]
        tokens = frames * (s // patch[1]) * (s // patch[2])
        return int(batch * text_model_flops(self, tokens, math.prod(patch), patch, text_len or self.text_len,
                                            frames=frames, temporal_depth=self.config["depth"]))

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", lora_rank: int = 32,
                       null_caption: torch.Tensor | None = None) -> "FlexiLatte":
        """Convert a diffusers `LatteTransformer3DModel` (or a directory saved by it); see convert.py."""
        from flexikern.models.convert import latte_from_diffusers
        return latte_from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter,
                                    lora_rank=lora_rank, null_caption=null_caption)
