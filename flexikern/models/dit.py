"""FlexiDiT: the DiT architecture (facebookresearch/DiT numerics) runnable at any patch size.

Read top to bottom like DiT's `models.py`: embedders, the block, the final layer, the model. The
flexible parts (PI-resized embed/de-embed, positional tables at original-grid coordinates, LoRA,
per-size norms) live in `flexikern.flexi` and are switched by a patch-size key ("4x4").
"""

from __future__ import annotations

import math
import weakref
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from flexikern import ops
from flexikern.flexi.layers import FlexiDeEmbed, FlexiPatchEmbed, LoRALinear, SizeLayerNorm, size_key
from flexikern.flexi.pos_embed import sincos_2d
from flexikern.flexi.resize import as_size
from flexikern.models.base import FlexibleModel, add_adapters, check_timesteps, condition_values_trusted
from flexikern.runtime.packing import Packing

__all__ = ["FlexiDiT", "DIT_CONFIGS", "ADAPTERS"]

ADAPTERS = ("lora", "shared")

DIT_CONFIGS: dict[str, dict[str, int]] = {}
for _name, (_depth, _hidden, _heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16),
                                        "B": (12, 768, 12), "S": (12, 384, 6)}.items():
    for _p in (2, 4, 8):
        DIT_CONFIGS[f"DiT-{_name}/{_p}"] = dict(depth=_depth, hidden_size=_hidden, num_heads=_heads,
                                                patch_size=_p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def per_token(mod: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """adaLN outputs (N, k*D) -> broadcastable over tokens: (N, 1, k*D), or (total, k*D) packed."""
    return mod.unsqueeze(1) if packing is None else mod[packing.segment_ids]


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
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


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` (when present) is the null class for guidance.

    Unlike DiT, forward never drops labels at random: training code does that explicitly.
    """

    def __init__(self, num_classes: int, hidden_size: int, null_class: bool = True) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(null_class), hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = LoRALinear(dim, dim * 3)
        self.proj = LoRALinear(dim, dim)

    def forward(self, x: torch.Tensor, key, packing: Packing | None = None) -> torch.Tensor:
        if packing is not None:  # (total, C): block-diagonal attention over the packed samples
            total, C = x.shape
            q, k, v = self.qkv(x, key).reshape(total, 3, self.num_heads, C // self.num_heads).unbind(1)
            x = ops.varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen,
                                     cu_seqlens_host=packing.cu_seqlens_host)
            return self.proj(x.reshape(total, C), key)
        B, N, C = x.shape
        qkv = self.qkv(x, key).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, C), key)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden)
        self.fc2 = LoRALinear(hidden, dim)

    def forward(self, x: torch.Tensor, key) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x, key), approximate="tanh"), key)


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm2_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = SizeLayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = SizeLayerNorm(hidden_size, eps=norm2_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key, packing: Packing | None = None) -> torch.Tensor:
        mod = per_token(self.adaLN_modulation(c), packing)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x, key), shift_msa, scale_msa), key, packing)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x, key), shift_mlp, scale_mlp), key)
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then the (flexible) de-embedding and unpatchify."""

    def __init__(self, hidden_size: int, patch: tuple[int, int], out_channels: int) -> None:
        super().__init__()
        self.norm_final = SizeLayerNorm(hidden_size, eps=1e-6)
        self.linear = FlexiDeEmbed(hidden_size, out_channels, patch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key: str, size: tuple[int, int]) -> torch.Tensor:
        return self.linear(self.modulated(x, c, key), key, size)

    def modulated(self, x: torch.Tensor, c: torch.Tensor, key, packing: Packing | None = None) -> torch.Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), packing).chunk(2, dim=-1)
        return modulate(self.norm_final(x, key), shift, scale)


class FlexiDiT(FlexibleModel, nn.Module):
    """Diffusion model with a Transformer backbone that runs each step at any configured patch size.

    With `patch_sizes=(patch_size,)` it is DiT. More sizes add weak modes through `adapter`:
    "lora" (base frozen; per weak size LoRA on qkv/proj/fc1/fc2, its own embed/de-embed and a
    patch-size embedding; the original size runs the original tensors) or "shared" (everything
    trainable; one underlying embed/de-embed kernel and per-size norm affines).
    """

    checkpoint_format = "flexikern.FlexiDiT"

    def __init__(self, input_size: int = 32, patch_size: int | tuple[int, int] = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 patch_sizes: Iterable[int | tuple[int, int]] | None = None, adapter: str = "lora",
                 lora_rank: int = 32, timestep_freq_shift: int = 0, norm2_eps: float = 1e-6) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.config = dict(input_size=input_size, patch_size=as_size(patch_size), in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                           learn_sigma=learn_sigma, timestep_freq_shift=timestep_freq_shift,
                           norm2_eps=norm2_eps)
        self.input_size, self.in_channels = input_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.num_heads = learn_sigma, num_classes, num_heads
        self.original_patch_size = as_size(patch_size)
        self.patch_sizes: tuple[tuple[int, int], ...] = (self.original_patch_size,)
        self.adapter: str | None = None
        self.lora_rank: int | None = None
        self.gradient_checkpointing = False
        self._checked_labels: list[tuple[weakref.ref, int]] = []

        self.x_embedder = FlexiPatchEmbed(in_channels, hidden_size, self.original_patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, null_class=class_dropout_prob > 0)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm2_eps) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, self.original_patch_size, self.out_channels)
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero adaLN and output (the original size only)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        key = size_key(self.original_patch_size)
        w = self.x_embedder.weight[key]
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias[key], 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight[key], 0)
        nn.init.constant_(self.final_layer.linear.bias[key], 0)

    # ------------------------------------------------------------------ flexibility
    def flexify(self, patch_sizes: Iterable[int | tuple[int, int]], adapter: str = "lora",
                lora_rank: int = 32) -> "FlexiDiT":
        """Add weak patch sizes to a plain (single-size) DiT, initialised from its weights (in place).

        The original size must be among `patch_sizes`. Returns self.
        """
        sizes = tuple(dict.fromkeys(as_size(p, "patch_sizes") for p in patch_sizes))
        if self.patch_sizes != (self.original_patch_size,):
            raise RuntimeError(f"this model is already flexible (patch_sizes={self.patch_sizes})")
        if self.original_patch_size not in sizes:
            raise ValueError(f"patch_sizes={sizes} must include the original patch size "
                             f"{self.original_patch_size}")
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter={adapter!r}: expected one of {ADAPTERS}")
        if not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r}: expected a positive int")
        for p in sizes:
            if self.input_size % p[0] or self.input_size % p[1]:
                raise ValueError(f"patch size {p} does not divide input_size={self.input_size}")
        self.patch_sizes = tuple(sorted(sizes))
        if len(sizes) == 1:
            return self
        self.adapter, shared = adapter, adapter == "shared"
        self.lora_rank = lora_rank if not shared else None
        self.x_embedder.flexify(self.original_patch_size, list(sizes), shared)
        self.final_layer.linear.flexify(self.original_patch_size, list(sizes), shared)
        add_adapters(self, [size_key(p) for p in sizes], size_key(self.original_patch_size),
                     [self.x_embedder, self.final_layer.linear], adapter, lora_rank)
        return self

    @property
    def has_null_class(self) -> bool:
        """Whether label `num_classes` exists: the null class of classifier-free guidance (DiT
        trains it with class dropout, `class_dropout_prob > 0`)."""
        return self.y_embedder.embedding_table.num_embeddings > self.num_classes

    # ------------------------------------------------------------------ forward
    def _check_conditions(self, t, y, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, y) as (n,) tensors on `device`; labels range-checked once per label tensor, and not
        at all where their values are trusted (`base.conditions_checked`, e.g. in `fk.sample`)."""
        t = check_timesteps(t, n, device)
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y, device=device)
        if y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y: expected integer class labels of shape ({n},), got "
                             f"{y.dtype} {tuple(y.shape)}")
        rows = self.y_embedder.embedding_table.num_embeddings
        if not condition_values_trusted(y.device) and not self._labels_checked(y):
            lo, hi = int(y.min()), int(y.max())   # a device sync on CUDA: done once per label tensor
            if lo < 0 or hi >= rows:
                null = f" ({self.num_classes} = the null class)" if rows > self.num_classes else ""
                raise ValueError(f"y: labels must be in [0, {rows - 1}]{null}; got values in [{lo}, {hi}]")
            if not y.is_inference():
                self._checked_labels = [*self._checked_labels[-3:], (weakref.ref(y), y._version)]
        return t, (y if y.device == device else y.to(device))

    def _labels_checked(self, y: torch.Tensor) -> bool:
        """Whether this very label tensor, unmodified, was validated before (a sampler reuses it)."""
        return not y.is_inference() and any(ref() is y and version == y._version
                                            for ref, version in self._checked_labels)

    def pos_embed(self, size: tuple[int, int], patch: tuple[int, int], device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (T, D) sin-cos table for an (H, W) latent at `patch`, at original-grid patch centres."""
        grid = (size[0] // patch[0], size[1] // patch[1])
        ratio = (patch[0] / self.original_patch_size[0], patch[1] / self.original_patch_size[1])
        return sincos_2d(self.config["hidden_size"], grid, ratio, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                patch_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """DiT's forward at a patch size.

        Args:
            x: (N, C, H, W) latents; H and W any multiples of the patch size.
            t: (N,) diffusion timesteps (or a scalar).
            y: (N,) class labels; `num_classes` is the null class.
            patch_size: one of `patch_sizes` (int or (ph, pw)); default the original.
        Returns:
            (N, out_channels, H, W): eps (and the variance interpolation with learn_sigma).
        """
        patch = self._patch(patch_size)
        self._check_x(x, patch)
        t, y = self._check_conditions(t, y, x.shape[0], x.device)
        key, size = size_key(patch), tuple(x.shape[2:])
        pos = self.pos_embed(size, patch, device=x.device, dtype=self.embed_dtype)
        h = self.x_embedder(x, key, pos)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, key, use_reentrant=False)
            else:
                h = block(h, c, key)
        return self.final_layer(h, c, key, size)

    def forward_packed(self, xs: list[torch.Tensor], t: torch.Tensor, y: torch.Tensor,
                       patch_sizes: list[int | tuple[int, int] | None]) -> list[torch.Tensor]:
        """Run samples of different patch sizes AND resolutions as ONE packed token sequence.

        Patch embedding and de-embedding run per (patch size, resolution) group; the blocks see
        all tokens at once, with per-token adaLN modulation and block-diagonal attention. Equal to
        `forward` on each sample alone, up to float rounding.

        Args:
            xs: B latents, each (C, H_i, W_i).
            t, y: (B,) timesteps and labels.
            patch_sizes: B patch sizes (None = the original).
        Returns:
            B outputs, each (out_channels, H_i, W_i), in input order.
        """
        patches = self._check_packed(xs, patch_sizes)
        t, y = self._check_conditions(t, y, len(xs), xs[0].device)
        runs, order, packing, h = self._embed_packed(xs, patches, self.embed_dtype)
        t, y = t[order], y[order]
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, packing.groups, packing)
        return self._unpack(self.final_layer.modulated(h, c, packing.groups, packing), runs)

    # ------------------------------------------------------------------ accounting
    def flops(self, patch_size: int | tuple[int, int] | None = None, batch: int = 1,
              input_size: int | tuple[int, int] | None = None) -> int:
        """Analytic forward FLOPs (a multiply-add counts 2), attention and LoRA included.

        Elementwise work (norms, activations, adds) is left out, as in DiT's own count.
        """
        patch = self._patch(patch_size)
        h, w = as_size(input_size or self.input_size, "input_size")
        cfg = self.config
        d, c_in, c_out = cfg["hidden_size"], self.in_channels, self.out_channels
        hidden = int(d * cfg["mlp_ratio"])
        tokens = (h // patch[0]) * (w // patch[1])
        volume = patch[0] * patch[1]
        rank = self.lora_rank if (self.adapter == "lora" and patch != self.original_patch_size) else 0
        linear = lambda n_in, n_out: 2 * tokens * (n_in * n_out + (rank * (n_in + n_out) if rank else 0))
        block = (2 * d * 6 * d                                   # adaLN modulation
                 + linear(d, 3 * d) + linear(d, d)              # qkv, proj
                 + 2 * 2 * tokens * tokens * d                  # q @ k^T and attn @ v
                 + linear(d, hidden) + linear(hidden, d))       # mlp
        total = (2 * tokens * d * c_in * volume                  # patch embedding
                 + 2 * (self.t_embedder.frequency_embedding_size * d + d * d)
                 + cfg["depth"] * block
                 + 2 * d * 2 * d + 2 * tokens * d * volume * c_out)  # final adaLN + de-embedding
        return int(batch * total)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_config(cls, name: str, patch_sizes=None, adapter: str = "lora", **overrides) -> "FlexiDiT":
        """A randomly initialised model from a registry name ("DiT-S/2"), with DiT's defaults."""
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown config {name!r}; known: {sorted(DIT_CONFIGS)}")
        return cls(**{**DIT_CONFIGS[name], **overrides}, patch_sizes=patch_sizes, adapter=adapter)

    @classmethod
    def from_dit(cls, path_or_state_dict, patch_sizes=None, adapter: str = "lora", **kwargs) -> "FlexiDiT":
        """Load a facebookresearch/DiT checkpoint (release or training file, or a state dict)."""
        from flexikern.models.convert import from_dit
        return from_dit(cls, path_or_state_dict, patch_sizes=patch_sizes, adapter=adapter, **kwargs)

    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", **kwargs) -> "FlexiDiT":
        """Convert a diffusers `DiTTransformer2DModel` (or a directory saved by it), keeping its numerics."""
        from flexikern.models.convert import from_diffusers
        return from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter, **kwargs)

    def to_diffusers(self):
        """The original patch size as a diffusers `DiTTransformer2DModel`."""
        from flexikern.models.convert import to_diffusers
        return to_diffusers(self)
