"""What every flexible model family shares (class-conditional DiT, PixArt, Latte).

`FlexibleModel` resolves and checks patch sizes and images, caches packings per batch signature,
and `add_adapters` turns a single-size model into a LoRA or shared flexible one. The families
differ in blocks and conditioning, not in these.

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
from typing import Callable, Iterator

import torch
import torch.nn as nn

from flexikern.flexi.layers import LoRALinear, SizeLayerNorm, size_key
from flexikern.flexi.resize import as_size
from flexikern.runtime.packing import Packing

__all__ = ["FlexibleModel", "add_adapters", "check_timesteps", "conditions_checked",
           "condition_values_trusted"]

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


def add_adapters(model: nn.Module, keys: list[str], original: str, embedders: list[nn.Module],
                 adapter: str, lora_rank: int) -> None:
    """Give a model's weak patch sizes their adapters, in place (embedders already flexified).

    "lora": everything frozen; per weak size LoRA on every `LoRALinear` (self-attention, MLP; a
    cross-attention made of plain `nn.Linear` gets none, the paper's T2I/video recipe), its own
    embed/de-embed and patch-size embedding, trainable. "shared": all trainable, per-size norm
    affines (identity). `embedders[0]` holds the patch-size embeddings.
    """
    weak = [k for k in keys if k != original]
    ref = next(model.parameters())
    if adapter == "shared":
        for norm in (m for m in model.modules() if isinstance(m, SizeLayerNorm)):
            for key in keys:
                norm.add_affine(key, device=ref.device, dtype=ref.dtype)
        return
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for key in weak:
                module.add_adapter(key, lora_rank)
    for key in weak:
        for layer in embedders:
            layer.weight[key].requires_grad_(True)
            layer.bias[key].requires_grad_(True)
        embedders[0].size_embed[key].requires_grad_(True)


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


class FlexibleModel:
    """Mixin for 2-D flexible models: needs `original_patch_size`, `patch_sizes`, `in_channels`,
    `x_embedder` (FlexiPatchEmbed), `pos_embed(size, patch)`, `t_embedder` (TimestepEmbedder) and
    `final_layer.linear` (FlexiDeEmbed)."""

    @property
    def embed_dtype(self) -> torch.dtype:
        """The dtype tokens are embedded in (positional tables included): the model's weights'."""
        return self.t_embedder.mlp[0].weight.dtype

    def _patch(self, patch_size) -> tuple[int, int]:
        if patch_size is None:
            return self.original_patch_size
        patch = as_size(patch_size)
        if patch not in self.patch_sizes:
            raise ValueError(f"patch_size={patch_size!r} is not configured; this model has "
                             f"patch_sizes={list(self.patch_sizes)} (make it flexible with .flexify(...) "
                             "or the converters' patch_sizes=)")
        return patch

    def _check_x(self, x: torch.Tensor, patch: tuple[int, int], name: str = "x") -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"{name}: {x.shape[1]} channels, but the model expects in_channels={self.in_channels}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
        if x.shape[2] % patch[0] or x.shape[3] % patch[1]:
            raise ValueError(f"{name}: H, W = {tuple(x.shape[2:])} are not multiples of patch_size {patch}")

    def _check_packed(self, xs: list[torch.Tensor], patch_sizes: list) -> list[tuple[int, int]]:
        """Validate a packed batch (B latents (C, H, W) and B patch sizes); its patch sizes."""
        if not isinstance(xs, (list, tuple)) or not xs:
            raise ValueError("xs: expected a non-empty list of (C, H, W) latents")
        if len(patch_sizes) != len(xs):
            raise ValueError(f"patch_sizes: {len(patch_sizes)} entries for {len(xs)} samples")
        patches = [self._patch(p) for p in patch_sizes]
        for i, (x, p) in enumerate(zip(xs, patches)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError(f"xs[{i}]: expected (C, H, W), got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            self._check_x(x[None], p, f"xs[{i}]")
        return patches

    def _embed_packed(self, xs: list[torch.Tensor], patches: list[tuple[int, int]], dtype: torch.dtype):
        """(groups, packed order, `Packing`, tokens (total, D)) of a checked packed batch.

        Each (patch size, resolution) group is embedded in one batched call, with its positions.
        """
        device = xs[0].device
        runs, order, packing = self._packing([(p, tuple(x.shape[1:])) for p, x in zip(patches, xs)], device)
        tokens = []
        for p, size, members in runs:
            pos = self.pos_embed(size, p, device=device, dtype=dtype)
            h = self.x_embedder(torch.stack([xs[i] for i in members]), size_key(p), pos)
            tokens.append(h.reshape(-1, h.shape[-1]))
        return runs, order, packing, torch.cat(tokens)

    def _unpack(self, h: torch.Tensor, runs) -> list[torch.Tensor]:
        """De-embed packed (modulated) tokens group by group, back to per-sample outputs in input order."""
        outputs: list[torch.Tensor | None] = [None] * sum(len(members) for _, _, members in runs)
        start = 0
        for p, size, members in runs:
            n = len(members) * (size[0] // p[0]) * (size[1] // p[1])
            out = self.final_layer.linear(h[start:start + n].reshape(len(members), -1, h.shape[-1]),
                                          size_key(p), size)
            for j, i in enumerate(members):
                outputs[i] = out[j]
            start += n
        return outputs

    def _packing(self, samples: list[tuple[tuple[int, int], tuple[int, int]]], device: torch.device):
        """(runs, packed order, `Packing`) for samples' (patch size, resolution) (runs: see
        `group_samples`); cached."""
        def build():
            runs, order = group_samples(samples)
            lengths = [(s[0] // p[0]) * (s[1] // p[1]) for p, s in (samples[i] for i in order)]
            keys = [size_key(samples[i][0]) for i in order]
            return runs, torch.tensor(order, device=device), Packing.from_lengths(lengths, keys, device)
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

    def prepare(self, patch_sizes: list, size: tuple[int, ...], device: torch.device,
                packed: bool = False) -> None:
        """Build now what forwards at `patch_sizes` on latents of spatial `size` build on first use:
        positional tables and kernels resized to each patch size and, with `packed`, the packing
        of one `forward_packed` call of one latent per patch size, in this order. Those forwards
        then copy nothing between host and device; `fk.sample` calls this for every phase of its
        schedule before the first step, under the grad mode of its steps (inference).
        """
        patches = [self._patch(p) for p in patch_sizes]
        for patch in dict.fromkeys(patches):
            self.pos_embed(tuple(size), patch, device=device, dtype=self.embed_dtype)
            for layer in (self.x_embedder, self.final_layer.linear):
                layer.weights(size_key(patch))
        if packed:
            self._packing([(p, tuple(size)) for p in patches], device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    checkpoint_format: str = ""   # each model class names its own: "flexikern.FlexiDiT", ...

    def save_pretrained(self, directory) -> None:
        """Write `config.json` and `model.safetensors` (flexible parts and adapters included)."""
        from flexikern.models.convert import save_pretrained
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, **kwargs):
        """Load a directory written by `save_pretrained` (kwargs, e.g. device/dtype, go to `.to()`)."""
        from flexikern.models.convert import from_pretrained
        return from_pretrained(cls, directory, **kwargs)
