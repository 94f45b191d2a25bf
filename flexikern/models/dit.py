"""FlexiDiT: the DiT architecture (facebookresearch/DiT numerics) runnable at any patch size.

Read top to bottom like DiT's `models.py`: the label embedder, the block, the final layer, the
model. The blocks' parts shared with PixArt and Latte (timestep embedder, attention, MLP) are in
`models.layers`; the flexible parts (PI-resized embed/de-embed, positional tables at
original-grid coordinates, LoRA, per-size norms) in `flexikern.flexi`, switched by the
`PatchSize` each layer is called with.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
import torch.nn as nn

from flexikern.flexi.layers import FlexiDeEmbed, FlexiPatchEmbed, SizeLayerNorm
from flexikern.flexi.pos_embed import sincos_2d, sincos_2d_scaled
from flexikern.models.base import FlexibleModel, check_labels, check_timesteps, condition_values_trusted
from flexikern.models.layers import Attention, Mlp, TimestepEmbedder, modulate, per_token
from flexikern.ops._checks import check_positive_int
from flexikern.ops.patch_size import PatchSize
from flexikern.flexi.packing import Packing

__all__ = ["FlexiDiT", "DIT_CONFIGS"]

DIT_CONFIGS: dict[str, dict[str, int]] = {}
for _name, (_depth, _hidden, _heads) in {"XL": (28, 1152, 16), "L": (24, 1024, 16),
                                        "B": (12, 768, 12), "S": (12, 384, 6)}.items():
    for _p in (2, 4, 8):
        DIT_CONFIGS[f"DiT-{_name}/{_p}"] = dict(depth=_depth, hidden_size=_hidden, num_heads=_heads,
                                                patch_size=_p)


#################################################################################
#                      Embedding Layer for Class Labels                         #
#################################################################################

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


class ConditionEmbedder(nn.Module):
    """One block's own timestep and class embedders (a diffusers DiT block's `norm1.emb`):
    (t, y) -> (N, D) conditioning `t_embedder(t) + y_embedder(y)`."""

    def __init__(self, hidden_size: int, num_classes: int, null_class: bool, freq_shift: int) -> None:
        super().__init__()
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, null_class)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t_embedder(t) + self.y_embedder(y)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, norm2_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = SizeLayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = SizeLayerNorm(hidden_size, eps=norm2_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, patch, packing: Packing | None = None) -> torch.Tensor:
        mod = per_token(self.adaLN_modulation(c), packing)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x, patch), shift_msa, scale_msa), patch, packing)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x, patch), shift_mlp, scale_mlp), patch)
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then the (flexible) de-embedding and unpatchify."""

    def __init__(self, hidden_size: int, patch: PatchSize, out_channels: int) -> None:
        super().__init__()
        self.norm_final = SizeLayerNorm(hidden_size, eps=1e-6)
        self.linear = FlexiDeEmbed(hidden_size, out_channels, patch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, patch: PatchSize, size: tuple[int, int]) -> torch.Tensor:
        return self.linear(self.modulated(x, c, patch), patch, size)

    def modulated(self, x: torch.Tensor, c: torch.Tensor, patch, packing: Packing | None = None) -> torch.Tensor:
        shift, scale = per_token(self.adaLN_modulation(c), packing).chunk(2, dim=-1)
        return modulate(self.norm_final(x, patch), shift, scale)


class FlexiDiT(FlexibleModel):
    """Diffusion model with a Transformer backbone that runs each step at any configured patch size.

    With `patch_sizes=(patch_size,)` it is DiT. More sizes add weak modes through `adapter`:
    "lora" (base frozen; per weak size LoRA on qkv/proj/fc1/fc2, its own embed/de-embed and a
    patch-size embedding; the original size runs the original tensors) or "shared" (everything
    trainable; one underlying embed/de-embed kernel and per-size norm affines).

    The defaults are facebookresearch/DiT's numerics; `from_diffusers` records diffusers' where
    they differ: `timestep_freq_shift=1`, `norm2_eps`, `pos_base_size` (positions rescaled so every
    grid spans `pos_base_size` original patches, as diffusers' `PatchEmbed` does at sizes other than
    `sample_size`; None: DiT's table, positions are original-grid patch indices at every size) and
    `block_embedders` (blocks 1.. have their own timestep/class embedders, `block_embedders[str(i)]`,
    as a natively trained diffusers DiT; `t_embedder`/`y_embedder` condition block 0 and the final
    layer. False: one shared embedder, as DiT).
    """

    checkpoint_format = "flexikern.FlexiDiT"
    configs = DIT_CONFIGS

    def __init__(self, input_size: int = 32, patch_size: int | tuple[int, int] = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 patch_sizes: Iterable[int | tuple[int, int]] | None = None, adapter: str = "lora",
                 lora_rank: int = 32, timestep_freq_shift: int = 0, norm2_eps: float = 1e-6,
                 pos_base_size: int | None = None, block_embedders: bool = False) -> None:
        super().__init__()
        if pos_base_size is not None:
            pos_base_size = check_positive_int(pos_base_size, "pos_base_size", "a positive int (diffusers' "
                                               "positions, scaled to that many original patches) or None (DiT's table)")
        patch = self._setup(dict(input_size=input_size, in_channels=in_channels, hidden_size=hidden_size,
                                 depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                 class_dropout_prob=class_dropout_prob, num_classes=num_classes,
                                 learn_sigma=learn_sigma, timestep_freq_shift=timestep_freq_shift,
                                 norm2_eps=norm2_eps, pos_base_size=pos_base_size,
                                 block_embedders=block_embedders),
                            patch_size, 2, in_channels, hidden_size, num_heads, learn_sigma)
        self.input_size, self.num_classes = input_size, num_classes
        self._checked_labels: list[tuple[weakref.ref, int]] = []

        self.x_embedder = FlexiPatchEmbed(in_channels, hidden_size, patch)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, null_class=class_dropout_prob > 0)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm2_eps) for _ in range(depth)])
        self.block_embedders = nn.ModuleDict({
            str(i): ConditionEmbedder(hidden_size, num_classes, class_dropout_prob > 0, timestep_freq_shift)
            for i in range(1, depth)}) if block_embedders else None
        self.final_layer = FinalLayer(hidden_size, patch, self.out_channels)
        self.initialize_weights()
        if patch_sizes is not None:
            self.flexify(patch_sizes, adapter=adapter, lora_rank=lora_rank)

    def _normal_init(self) -> list[nn.Module]:
        embedders = [self, *(self.block_embedders or {}).values()]
        return [m for e in embedders
                for m in (e.y_embedder.embedding_table, e.t_embedder.mlp[0], e.t_embedder.mlp[2])]

    def _zero_init(self) -> list[nn.Module]:
        return [m.adaLN_modulation[-1] for m in (*self.blocks, self.final_layer)]

    # ------------------------------------------------------------------ conditions
    @property
    def has_null_class(self) -> bool:
        """Whether label `num_classes` exists: the null class of classifier-free guidance (DiT
        trains it with class dropout, `class_dropout_prob > 0`)."""
        return self.y_embedder.embedding_table.num_embeddings > self.num_classes

    def check_condition(self, y: Any, n: int | None = None, device=None) -> torch.Tensor:
        """Class labels as a long (N,) tensor on `device`, validated by `base.check_labels`, the
        forwards' own check (ints or integer tensors/arrays only; values read once here, so a
        sampler's forwards then trust them). Label `num_classes` is the null class (unconditional
        samples), when the model has one."""
        y = check_labels(y, self.num_classes, self.has_null_class, n)
        return y if device is None else y.to(device)

    def null_condition(self, y: torch.Tensor) -> torch.Tensor:
        """The guidance branch's labels for `y`'s batch: the null class."""
        if not self.has_null_class:
            raise ValueError(f"classifier-free guidance needs the null class (label {self.num_classes}), "
                             f"which this model does not have: it was trained without class dropout "
                             f"(class_dropout_prob=0). Use a model trained with class dropout, or sample "
                             f"with Guidance(mode='none')")
        return torch.full_like(y, self.num_classes)

    def _check_conditions(self, t, y, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, y) as (n,) tensors on `device`; labels range-checked on every call (on the host) or
        once per device label tensor, and not at all where their values are trusted
        (`base.conditions_checked`, e.g. in `fk.sample`)."""
        t = check_timesteps(t, n, device)
        if torch.compiler.is_compiling():   # values asserted on the device; nothing remembered
            return t, check_labels(y, self.num_classes, self.has_null_class, n).to(device)
        tensor = isinstance(y, torch.Tensor)
        # Reading the values is a device sync on CUDA: done once per device label tensor. Host
        # labels are read every call (no sync), so a write through `.data`, which bumps no
        # version, cannot go unseen there.
        trusted = condition_values_trusted(y.device if tensor else device) or (
            tensor and y.device.type != "cpu" and self._labels_checked(y))
        labels = check_labels(y, self.num_classes, self.has_null_class, n, check_values=not trusted)
        if not trusted and tensor and not y.is_inference():
            self._checked_labels = [*self._checked_labels[-3:], (weakref.ref(y), y._version)]
        return t, (labels if labels.device == device else labels.to(device))

    def _labels_checked(self, y: torch.Tensor) -> bool:
        """Whether this very label tensor, unmodified (same version), was validated before."""
        return not y.is_inference() and any(ref() is y and version == y._version
                                            for ref, version in self._checked_labels)

    # ------------------------------------------------------------------ forward
    def pos_embed(self, size: tuple[int, int], patch: PatchSize, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (T, D) sin-cos table for an (H, W) latent at `patch`, at original-grid patch centres:
        DiT's, or with `pos_base_size` diffusers' `PatchEmbed`'s (positions scaled to that grid).
        `patch` is one of `patch_sizes` (an int too), and it divides `size`."""
        patch = self._patch(patch)
        size = self._check_size(size, patch)
        grid = (size[0] // patch[0], size[1] // patch[1])
        ratio = (patch[0] / self.original_patch_size[0], patch[1] / self.original_patch_size[1])
        base = self.config["pos_base_size"]
        if base is None:
            return sincos_2d(self.config["hidden_size"], grid, ratio, device=device, dtype=dtype)
        return sincos_2d_scaled(self.config["hidden_size"], grid, ratio, base, 1.0, device=device, dtype=dtype)

    def _conditions(self, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each block's (N, D) conditioning; the final layer takes block 0's. One shared vector
        `t_embedder(t) + y_embedder(y)` (DiT), or with `block_embedders` each block's own."""
        c = self.t_embedder(t) + self.y_embedder(y)
        if self.block_embedders is None:
            return [c] * len(self.blocks)
        return [c, *(embed(t, y) for embed in self.block_embedders.values())]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                patch_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """DiT's forward at a patch size.

        Args:
            x: (N, C, H, W) latents, any float dtype (cast to the model's dtype, as diffusers'
                pipelines prepare latents in `transformer.dtype`); H and W any multiples of the
                patch size.
            t: (N,) diffusion timesteps, int or float (or a scalar).
            y: (N,) integer class labels (a tensor of any int dtype, a list or numpy array; floats
                and bools are refused: `base.check_labels`); `num_classes` is the null class.
            patch_size: one of `patch_sizes` (int or (ph, pw)); default the original.
        Returns:
            (N, out_channels, H, W) in the model's dtype: eps (and the variance interpolation with
            learn_sigma).
        Raises:
            ValueError, TypeError: bad input, before any compute, naming the argument.
        """
        patch = self._patch(patch_size)
        x = self._check_x(x, patch)
        t, y = self._check_conditions(t, y, x.shape[0], x.device)
        size = tuple(x.shape[2:])
        h = self.x_embedder(x, patch, self.pos_embed(size, patch, device=x.device, dtype=self.embed_dtype))
        conditions = self._conditions(t, y)
        for block, c in zip(self.blocks, conditions):
            h = self._run_block(block, h, c, patch)
        return self.final_layer(h, conditions[0], patch, size)

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
        xs, patches = self._check_packed(xs, patch_sizes)
        t, y = self._check_conditions(t, y, len(xs), xs[0].device)
        runs, order, packing = self._packed_layout([(p, tuple(x.shape[1:])) for p, x in zip(patches, xs)], xs[0].device)
        h = self._embed_packed(xs, runs)
        conditions = self._conditions(t[order], y[order])
        for block, c in zip(self.blocks, conditions):
            h = block(h, c, packing.groups, packing)
        return self._unpack(self.final_layer.modulated(h, conditions[0], packing.groups, packing), runs)

    # ------------------------------------------------------------------ accounting
    def flops(self, patch_size: int | tuple[int, int] | None = None, batch: int = 1,
              input_size: int | tuple[int, int] | None = None) -> int:
        """Analytic forward FLOPs (a multiply-add counts 2), attention and LoRA included.

        Elementwise work (norms, activations, adds) is left out, as in DiT's own count. With
        `block_embedders` every block's timestep MLP counts.
        """
        patch, batch, size = self._flops_args(patch_size, batch, input_size)
        cfg = self.config
        d, c_in, c_out = cfg["hidden_size"], self.in_channels, self.out_channels
        hidden = int(d * cfg["mlp_ratio"])
        tokens, volume = patch.tokens(size), patch.volume
        rank = self.lora_rank if (self.adapter == "lora" and patch != self.original_patch_size) else 0
        linear = lambda n_in, n_out: 2 * tokens * (n_in * n_out + (rank * (n_in + n_out) if rank else 0))
        block = (2 * d * 6 * d                                   # adaLN modulation
                 + linear(d, 3 * d) + linear(d, d)              # qkv, proj
                 + 2 * 2 * tokens * tokens * d                  # q @ k^T and attn @ v
                 + linear(d, hidden) + linear(hidden, d))       # mlp
        embedders = 1 + len(self.block_embedders or ())
        total = (2 * tokens * d * c_in * volume                  # patch embedding
                 + embedders * 2 * (self.t_embedder.frequency_embedding_size * d + d * d)
                 + cfg["depth"] * block
                 + 2 * d * 2 * d + 2 * tokens * d * volume * c_out)  # final adaLN + de-embedding
        return int(batch * total)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_dit(cls, path_or_state_dict, patch_sizes=None, adapter: str = "lora", **kwargs) -> "FlexiDiT":
        """Load a facebookresearch/DiT checkpoint (release or training file, or a state dict), in eval mode."""
        from flexikern.models.convert import from_dit
        return from_dit(cls, path_or_state_dict, patch_sizes=patch_sizes, adapter=adapter, **kwargs)

    @classmethod
    def from_diffusers(cls, model_or_dir, patch_sizes=None, adapter: str = "lora", **kwargs) -> "FlexiDiT":
        """Convert a diffusers `DiTTransformer2DModel`, a `DiTPipeline`, or a folder or Hub id of either
        (`subfolder=` picks the model in it), keeping its numerics at every resolution; in eval mode."""
        from flexikern.models.convert import from_diffusers
        return from_diffusers(cls, model_or_dir, patch_sizes=patch_sizes, adapter=adapter, **kwargs)

    def to_diffusers(self):
        """The original patch size as a diffusers `DiTTransformer2DModel`, in eval mode."""
        from flexikern.models.convert import to_diffusers
        return to_diffusers(self)
