"""What every flexible model family shares (class-conditional DiT, PixArt, Latte).

`FlexibleModel` is the one base: patch-size resolution and input checks, `flexify` (the weak
sizes' kernels and adapters), DiT's initialisation, `from_config`, the packed path (embedding and
de-embedding through `fk.ops` per (patch size, resolution) group), `prepare` and checkpoints.
A family file holds only what differs: its blocks, its conditioning and its positional tables.

The sampler's view of a model is declared in `flexikern.diffusion.protocol.FlexibleDenoiser`;
every `FlexibleModel` implements it.

Host synchronisation: a forward reads nothing back from the device (and copies nothing to it)
once its caches are built (`FlexibleModel.prepare` builds them ahead) and its conditions' values
are trusted: checking class labels' range reads them on the host, so forwards skip it inside
`conditions_checked()`, which `fk.sample` enters after validating its conditions once. (A text
condition's 0/1 mask is checked once, when the `TextCondition` is built.) Shapes and dtypes (host
metadata) are always checked.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from flexikern.flexi.layers import LoRALinear, SizeLayerNorm
from flexikern.ops.patch_size import PatchSize
from flexikern.flexi.packing import Packing

__all__ = ["FlexibleModel", "check_timesteps", "conditions_checked", "condition_values_trusted",
           "group_samples"]

_CONDITIONS_CHECKED = contextvars.ContextVar("flexikern_conditions_checked", default=False)


@contextlib.contextmanager
def conditions_checked() -> Iterator[None]:
    """Inside: model forwards trust the VALUES of their conditions (class labels in range) and
    skip checking them, which would read the tensors back (a device sync per forward). For a
    caller that validated its conditions itself: `fk.sample` does, once, and enters this around
    its denoising loop. Shapes and dtypes are still checked. A context variable: it applies to
    this thread (and asyncio task) only.
    """
    token = _CONDITIONS_CHECKED.set(True)
    try:
        yield
    finally:
        _CONDITIONS_CHECKED.reset(token)


def condition_values_trusted(device: torch.device) -> bool:
    """Whether a forward on `device` must skip reading its conditions' values: inside
    `conditions_checked()`, or while capturing a CUDA graph (checked before capture)."""
    return _CONDITIONS_CHECKED.get() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_timesteps(t, n: int, device) -> torch.Tensor:
    """`t` as an (n,) tensor on `device` (a scalar is broadcast)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"t: expected shape ({n},) to match x's batch, got {tuple(t.shape)}")
    return t if t.device == device else t.to(device)   # already there (a sampling step): no call


def group_samples(samples: list[tuple]) -> tuple[list[tuple], list[int]]:
    """(runs, packed order) of samples' (patch size, resolution): the order sorts equal samples
    together; a run is (patch size, resolution, [input indices]), embedded in one batched call."""
    order = sorted(range(len(samples)), key=lambda i: samples[i])
    runs: list[tuple] = []
    for i in order:
        if runs and runs[-1][:2] == samples[i]:
            runs[-1][2].append(i)
        else:
            runs.append((*samples[i], [i]))
    return runs, order


def _describe(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


class FlexibleModel(nn.Module):
    """A DiT-family model runnable at any configured patch size (2-D images or 3-D videos).

    A family's `__init__` calls `_setup(...)`, builds `x_embedder` (`FlexiPatchEmbed`),
    `t_embedder`, its blocks and `final_layer` (whose `.linear` is a `FlexiDeEmbed`), then
    `initialize_weights()` and, with `patch_sizes`, `flexify(...)`. It defines `pos_embed(size,
    patch)`, `forward`, `forward_packed`, `flops`, the conditions (`check_condition`,
    `null_condition`, `has_null_class`) and the class attributes below.
    """

    checkpoint_format: str = ""               # "flexikern.FlexiDiT", ...
    configs: dict[str, dict[str, Any]] = {}   # `from_config` names
    adapters: tuple[str, ...] = ("lora", "shared")

    def _setup(self, config: dict[str, Any], patch_size, ndim: int, in_channels: int, hidden_size: int,
               num_heads: int, learn_sigma: bool) -> PatchSize:
        """The attributes every family has; returns the original patch size."""
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        patch = PatchSize.parse(patch_size, ndim)
        self.config = {**config, "patch_size": patch}
        self.in_channels, self.num_heads, self.learn_sigma = in_channels, num_heads, learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.original_patch_size = patch
        self.patch_sizes: tuple[PatchSize, ...] = (patch,)
        self.adapter: str | None = None
        self.lora_rank: int | None = None
        self.gradient_checkpointing = False
        return patch

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent: (C, H, W) (videos: (C, F, H, W))."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def embed_dtype(self) -> torch.dtype:
        """The dtype tokens are embedded in (positional tables included): the model's weights'."""
        return self.t_embedder.mlp[0].weight.dtype

    # ------------------------------------------------------------------ initialisation
    def _normal_init(self) -> list[nn.Module]:
        """Modules whose weight DiT's initialisation draws from N(0, 0.02), in drawing order."""
        raise NotImplementedError

    def _zero_init(self) -> list[nn.Module]:
        """Modules whose weight and bias start at zero (adaLN-Zero, output projections)."""
        raise NotImplementedError

    def initialize_weights(self) -> None:
        """DiT's initialisation (PixArt's and Latte's too): xavier-uniform linears with zero bias,
        the patch embedding xavier-uniform as a linear, small embedders, zero-initialised
        modulation and output (the original patch size's kernels)."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        name = self.original_patch_size.name
        w = self.x_embedder.weight[name]
        nn.init.xavier_uniform_(w.data.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias[name], 0)
        for module in self._normal_init():
            nn.init.normal_(module.weight, std=0.02)
        for module in self._zero_init():
            nn.init.constant_(module.weight, 0)
            nn.init.constant_(module.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight[name], 0)
        nn.init.constant_(self.final_layer.linear.bias[name], 0)

    # ------------------------------------------------------------------ flexibility
    def flexify(self, patch_sizes: Iterable, adapter: str = "lora", lora_rank: int = 32):
        """Add weak patch sizes to a single-size model, initialised from its weights (in place).

        `adapter="lora"`: everything frozen; per weak size LoRA on every `LoRALinear`
        (self-attention, MLP; cross-attention gets none, the paper's T2I/video recipe), its own
        embed/de-embed and patch-size embedding, trainable. `"shared"`: all trainable, one
        underlying embed/de-embed kernel, per-size norm affines (identity). The original size must
        be among `patch_sizes`. Returns self.
        """
        original = self.original_patch_size
        sizes = tuple(dict.fromkeys(PatchSize.parse(p, original.ndim, "patch_sizes") for p in patch_sizes))
        if self.patch_sizes != (original,):
            raise RuntimeError(f"this model is already flexible (patch_sizes={self.patch_sizes})")
        if original not in sizes:
            raise ValueError(f"patch_sizes={sizes} must include the original patch size {original}")
        if adapter not in self.adapters:
            raise ValueError(f"adapter={adapter!r}: {type(self).__name__} supports {self.adapters}")
        if not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1:
            raise ValueError(f"lora_rank={lora_rank!r}: expected a positive int")
        latent = self.latent_shape[1:]
        for p in sizes:
            if any(s % q for s, q in zip(latent, p)):
                raise ValueError(f"patch size {p} does not divide the latent size {latent}")
        self.patch_sizes = tuple(sorted(sizes))
        if len(sizes) == 1:
            return self
        self.adapter, self.lora_rank = adapter, (lora_rank if adapter == "lora" else None)
        embedders = [self.x_embedder, self.final_layer.linear]
        for layer in embedders:
            layer.flexify(original, list(sizes), adapter == "shared")
        weak = [p for p in sizes if p != original]
        ref = next(self.parameters())
        if adapter == "shared":
            for norm in (m for m in self.modules() if isinstance(m, SizeLayerNorm)):
                for p in sizes:
                    norm.add_affine(p, device=ref.device, dtype=ref.dtype)
            return self
        for param in self.parameters():
            param.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, LoRALinear):
                for p in weak:
                    module.add_adapter(p, lora_rank)
        for p in weak:
            for layer in embedders:
                layer.weight[p.name].requires_grad_(True)
                layer.bias[p.name].requires_grad_(True)
            self.x_embedder.size_embed[p.name].requires_grad_(True)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ checks
    def _patch(self, patch_size) -> PatchSize:
        if patch_size is None:
            return self.original_patch_size
        kind = "an int or (ph, pw)" if self.original_patch_size.ndim == 2 else "a video patch (pt, ph, pw)"
        try:
            patch = PatchSize.parse(patch_size, self.original_patch_size.ndim)
        except ValueError:
            raise ValueError(f"patch_size={patch_size!r}: expected {kind} of positive ints, one of "
                             f"{list(self.patch_sizes)}") from None
        if patch not in self.patch_sizes:
            raise ValueError(f"patch_size={patch_size!r} is not configured; this model has "
                             f"patch_sizes={list(self.patch_sizes)} (make it flexible with .flexify(...) "
                             "or the converters' patch_sizes=)")
        return patch

    def _check_x(self, x: torch.Tensor, patch: PatchSize, name: str = "x") -> None:
        layout = "(N, C, H, W)" if patch.ndim == 2 else "a video (N, C, F, H, W)"
        if not isinstance(x, torch.Tensor) or x.dim() != patch.ndim + 2:
            raise ValueError(f"{name}: expected {layout}, got {_describe(x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: {x.shape[1]} channels, but the model expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if patch.ndim == 3 and x.shape[2] % patch[0]:
            raise ValueError(f"{name}: {x.shape[2]} frames are not a multiple of the temporal patch "
                             f"{patch[0]} (patch_size {patch})")
        if x.shape[-2] % patch[-2] or x.shape[-1] % patch[-1]:
            raise ValueError(f"{name}: H, W = {tuple(x.shape[-2:])} are not multiples of patch_size "
                             f"{tuple(patch[-2:])}")

    def _check_packed(self, xs: list[torch.Tensor], patch_sizes: list) -> list[PatchSize]:
        """Validate a packed batch (B latents without batch dim, B patch sizes); its patch sizes."""
        layout = "(C, H, W)" if self.original_patch_size.ndim == 2 else "(C, F, H, W)"
        if not isinstance(xs, (list, tuple)) or not xs:
            raise ValueError(f"xs: expected a non-empty list of {layout} latents")
        if len(patch_sizes) != len(xs):
            raise ValueError(f"patch_sizes: {len(patch_sizes)} entries for {len(xs)} samples")
        patches = [self._patch(p) for p in patch_sizes]
        for i, (x, p) in enumerate(zip(xs, patches)):
            if not isinstance(x, torch.Tensor) or x.dim() != p.ndim + 1:
                raise ValueError(f"xs[{i}]: expected {layout}, got {_describe(x)}")
            self._check_x(x[None], p, f"xs[{i}]")
        return patches

    def _run_block(self, block: nn.Module, *args) -> torch.Tensor:
        """A block's forward, under activation checkpointing when `gradient_checkpointing` trains."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------ packed batches
    def _embed_packed(self, xs: list[torch.Tensor], runs: list[tuple]) -> torch.Tensor:
        """Tokens (total, D) of a packed batch: each (patch size, resolution) run embedded in one
        batched `fk.ops.patch_embed` call, with its positions, in packed order."""
        device, dtype, tokens = xs[0].device, self.embed_dtype, []
        for p, size, members in runs:
            pos = self.pos_embed(size, p, device=device, dtype=dtype)
            h = self.x_embedder(torch.stack([xs[i] for i in members]), p, pos)
            tokens.append(h.reshape(-1, h.shape[-1]))
        return torch.cat(tokens)

    def _unpack(self, h: torch.Tensor, runs: list[tuple]) -> list[torch.Tensor]:
        """De-embed packed (modulated) tokens run by run, back to per-sample outputs in input order."""
        outputs: list[torch.Tensor | None] = [None] * sum(len(members) for _, _, members in runs)
        start = 0
        for p, size, members in runs:
            n = len(members) * p.tokens(size)
            out = self.final_layer.linear(h[start:start + n].reshape(len(members), -1, h.shape[-1]), p, size)
            for j, i in enumerate(members):
                outputs[i] = out[j]
            start += n
        return outputs

    def _packed_layout(self, samples: list[tuple[PatchSize, tuple[int, ...]]], device: torch.device):
        """The layout one `forward_packed` call of these (patch size, resolution) samples uses:
        (runs, packed order, `Packing`), one attention sequence per sample (runs: see
        `group_samples`); cached. A family with another layout (Latte) overrides it."""
        def build():
            runs, order = group_samples(samples)
            lengths = [p.tokens(size) for p, size in (samples[i] for i in order)]
            patches = [samples[i][0] for i in order]
            return runs, torch.tensor(order, device=device), Packing.from_lengths(lengths, patches, device)
        return self._cached_packing((tuple(samples), device), build)

    def _cached_packing(self, signature, build: Callable[[], tuple]):
        """`build()`'s packed layout for a batch signature, cached (the 16 latest): after the first
        call nothing is copied between host and device (so a step neither syncs nor breaks a
        CUDA graph capture)."""
        cache = self.__dict__.setdefault("_packings", {})
        hit = cache.get(signature)
        if hit is None:
            hit = build()
            while len(cache) >= 16:
                cache.pop(next(iter(cache)))
            cache[signature] = hit
        return hit

    def _position_tables(self, size: tuple[int, ...], patch: PatchSize, device) -> list[torch.Tensor]:
        """The positional tables a forward at `patch` on latents of `size` reads (built and cached)."""
        return [self.pos_embed(size, patch, device=device, dtype=self.embed_dtype)]

    def prepare(self, patch_sizes: list, size: tuple[int, ...], device: torch.device,
                packed: bool = False) -> list[torch.Tensor]:
        """Build now what forwards at `patch_sizes` on latents of spatial `size` build on first use:
        positional tables and kernels resized to each patch size and, with `packed`, the packing
        of one `forward_packed` call of one latent per patch size, in this order. Those forwards
        then copy nothing between host and device; `fk.sample` calls this for every phase of its
        schedule before the first step, under the grad mode of its steps (inference).

        Returns the device tensors built (a CUDA graph that reads them keeps them alive).
        """
        patches = [self._patch(p) for p in patch_sizes]
        built: list[torch.Tensor] = []
        for patch in dict.fromkeys(patches):
            built += self._position_tables(tuple(size), patch, device)
            for layer in (self.x_embedder, self.final_layer.linear):
                built += [t for t in layer.weights(patch)[:2] if t is not None]
        if packed:
            layout = self._packed_layout([(p, tuple(size)) for p in patches], device)
            built += [t for t in _tensors(layout)]
        return built

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_config(cls, name: str, patch_sizes=None, adapter: str = "lora", **overrides):
        """A randomly initialised model from a registry name (`cls.configs`), with its defaults."""
        if name not in cls.configs:
            raise ValueError(f"unknown config {name!r}; known: {sorted(cls.configs)}")
        return cls(**{**cls.configs[name], **overrides}, patch_sizes=patch_sizes, adapter=adapter)

    def save_pretrained(self, directory) -> None:
        """Write `config.json` and `model.safetensors` (flexible parts and adapters included)."""
        from flexikern.models.convert import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        """Load a directory written by `save_pretrained` (kwargs, e.g. device/dtype, go to `.to()`)."""
        from flexikern.models.convert import from_pretrained
        return from_pretrained(cls, directory, **kwargs)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested layout (tuples, lists, packings)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Packing):
        yield from (value.segment_ids, value.cu_seqlens)
