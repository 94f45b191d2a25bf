"""What the text-conditioned families (PixArt-alpha, Latte) share: the text condition, the
caption embedder with PixArt's learned null caption, adaLN-single conditioning, and the FLOP count.

A text condition is precomputed text-encoder embeddings plus a 0/1 mask (no text encoder here).
Guidance's null condition is PixArt's learned null caption `y_embedder.y_embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern.flexi.layers import FlexiPatchEmbed
from flexikern.models.base import FlexibleModel, assert_on_device
from flexikern.models.layers import MASK_BIAS, PixArtBlock, TimestepEmbedder
from flexikern.ops._checks import check_positive_int

__all__ = ["TextCondition", "as_text_condition", "CaptionEmbedder", "TextConditioned", "text_model_flops"]


@dataclass(frozen=True)
class TextCondition:
    """Precomputed text-encoder embeddings (N, L, C_text) and a mask (N, L), True = a real token.

    `mask=None` means every token is real. This is the `y` of a text-conditioned model: the
    sampler and guidance batch it with `cat` and index it with `[...]` like a label tensor.

    `embeds` may have any float dtype (the model casts them to its own); `mask` is bool, or 0/1
    ints or floats (stored as bool), on the embeddings' device. Building one checks the mask's
    values (a device sync on CUDA), once. Raises ValueError naming `embeds` or `mask`, the value
    and what was expected.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        e, m = self.embeds, self.mask
        if not isinstance(e, torch.Tensor) or e.dim() != 3:
            got = f"shape {tuple(e.shape)}" if isinstance(e, torch.Tensor) else type(e).__name__
            raise ValueError(f"embeds: expected text embeddings (N, L, C_text), got {got}")
        if not e.is_floating_point():
            raise ValueError(f"embeds: expected float text embeddings, got {e.dtype}; pass the text "
                             f"encoder's output (a float tensor)")
        if m is None:
            return
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(e.shape[:2]):
            got = f"shape {tuple(m.shape)}" if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mask: expected shape {tuple(e.shape[:2])} (N, L) matching embeds, got {got}")
        if m.device != e.device:
            raise ValueError(f"mask: on {m.device}, but embeds are on {e.device}; move both to one device")
        if m.is_complex():
            raise ValueError(f"mask: expected bool or 0/1 values, got {m.dtype}")
        if m.dtype != torch.bool:
            valid = (m == 0) | (m == 1)
            if torch.compiler.is_compiling():   # no host read inside a graph
                assert_on_device(valid, "mask: expected 0/1 (or bool) values, True/1 = a real token")
            elif not bool(valid.all()):
                bad = m[~valid].unique()[:8].tolist()
                raise ValueError(f"mask: expected 0/1 (or bool) values, True/1 = a real token; got "
                                 f"values {bad}")
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
        if isinstance(index, int):   # keep the batch axis; -1 is the last row
            index = slice(index, index + 1 if index != -1 else None)
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
        """The batch `n` times over (n a positive int)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n={n!r}: expected a positive int")
        return self.cat(*([self] * (n - 1))) if n > 1 else self


def as_text_condition(y, name: str = "y") -> TextCondition:
    """A `TextCondition` from one, from an (N, L, C) tensor or from an (embeds, mask) pair, with
    at least one row. Raises ValueError naming `name` (and `embeds` or `mask`)."""
    if isinstance(y, TextCondition):
        cond = y
    elif isinstance(y, torch.Tensor):
        cond = TextCondition(y)
    elif isinstance(y, (tuple, list)) and len(y) == 2:
        cond = TextCondition(*y)
    else:
        got = f"a {type(y).__name__} of length {len(y)}" if isinstance(y, (tuple, list)) else type(y).__name__
        raise ValueError(f"{name}: expected a TextCondition, text embeddings (N, L, C_text) or (embeds, mask), "
                         f"got {got}")
    if len(cond) == 0:
        raise ValueError(f"{name}: no text conditions (N=0); pass at least one")
    return cond


class CaptionEmbedder(nn.Module):
    """Text-encoder embeddings (N, L, C_text) -> cross-attention tokens, plus the null caption.

    With `project` (PixArt's `y_proj`: Linear, GELU(tanh), Linear), C_text -> D; without
    (diffusers' `caption_channels=None`), the embeddings are the tokens, `y_proj` is None.
    `y_embedding` (text_len, C_text) is PixArt's learned null caption, the guidance branch's
    condition (`null`).
    """

    def __init__(self, text_channels: int, hidden_size: int, text_len: int, project: bool = True) -> None:
        super().__init__()
        self.y_proj = None
        if project:
            self.y_proj = nn.Module()
            self.y_proj.fc1 = nn.Linear(text_channels, hidden_size)
            self.y_proj.fc2 = nn.Linear(hidden_size, hidden_size)
        self.y_embedding = nn.Parameter(torch.randn(text_len, text_channels) / text_channels ** 0.5)

    def null(self, n: int) -> TextCondition:
        return TextCondition(self.y_embedding[None].expand(n, -1, -1))

    def forward(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text tokens (N, L, D or C_text), additive mask bias (N, 1, 1, L) or None)."""
        h = cond.embeds.to(self.y_embedding.dtype)
        if self.y_proj is not None:
            h = self.y_proj.fc2(F.gelu(self.y_proj.fc1(h), approximate="tanh"))
        if cond.mask is None:
            return h, None
        bias = (1 - cond.mask.to(h.dtype)) * MASK_BIAS
        return h, bias[:, None, None, :]


class TextConditioned(FlexibleModel):
    """What PixArt and Latte share: text conditions, the null caption, adaLN-single conditioning,
    PixArt's initialisation. Flexibility is the paper's LoRA recipe: cross-attention, the caption
    and timestep embedders stay frozen WITHOUT LoRA."""

    text_channels: int      # C_text of the text embeddings `y`
    has_null_class = True   # the learned null caption

    def _build_text_model(self, patch, in_channels: int, hidden_size: int, depth: int, num_heads: int,
                          mlp_ratio: float, caption_channels: int | None, text_len: int, norm_eps: float,
                          cross_attention_dim: int | None, attention_bias: bool) -> None:
        """The modules PixArt and Latte share, in their checkpoints' order: patch embedding,
        adaLN-single timestep MLP (`t_embedder`, `t_block`), caption embedder, spatial blocks.

        Text embeddings have `caption_channels` channels, projected to `hidden_size` for the
        cross-attention; with `caption_channels=None` they go to it unprojected, with
        `cross_attention_dim` channels (default `hidden_size`), which its keys and values project from.

        Raises:
            ValueError: `cross_attention_dim` other than `hidden_size` together with a caption projection.
        """
        if caption_channels is not None and cross_attention_dim not in (None, hidden_size):
            raise ValueError(f"cross_attention_dim={cross_attention_dim}: the caption projection "
                             f"(caption_channels={caption_channels}) makes text tokens of hidden_size="
                             f"{hidden_size} channels, so cross-attention reads {hidden_size}; pass "
                             f"cross_attention_dim=None (or {hidden_size}), or caption_channels=None to "
                             f"cross-attend to {cross_attention_dim}-channel embeddings unprojected")
        context_dim = cross_attention_dim or hidden_size
        self.text_channels, self.text_len = caption_channels or context_dim, text_len
        self.x_embedder = FlexiPatchEmbed(in_channels, hidden_size, patch)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=0)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(self.text_channels, hidden_size, text_len,
                                          project=caption_channels is not None)
        self.blocks = nn.ModuleList([PixArtBlock(hidden_size, num_heads, mlp_ratio, norm_eps, context_dim=context_dim,
                                                 qkv_bias=attention_bias) for _ in range(depth)])

    def _normal_init(self) -> list[nn.Module]:
        proj = self.y_embedder.y_proj
        return [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                *([] if proj is None else [proj.fc1, proj.fc2])]

    def _zero_init(self) -> list[nn.Module]:
        return [block.cross_attn.proj for block in self.blocks]

    def null_condition(self, y) -> TextCondition:
        """The guidance branch's condition for `y`'s batch: the learned null caption."""
        return self.y_embedder.null(len(as_text_condition(y))).to(self.y_embedder.y_embedding.device)

    def check_condition(self, y, n: int | None = None, device=None) -> TextCondition:
        """Validate text conditions: (n, L, text_channels) embeddings, an (n, L) mask, L >= 1."""
        cond = as_text_condition(y)
        if n is not None and len(cond) != n:
            raise ValueError(f"y: {len(cond)} text embeddings for a batch of {n}")
        if cond.embeds.shape[2] != self.text_channels:
            takes = ("caption_channels" if self.y_embedder.y_proj is not None
                     else "cross_attention_dim (no caption projection)")
            raise ValueError(f"y: text embeddings have {cond.embeds.shape[2]} channels, but the model takes "
                             f"{takes}={self.text_channels}")
        if cond.embeds.shape[1] < 1:
            raise ValueError("y: expected at least one text token (L >= 1)")
        return cond.to(device) if device is not None and cond.device != torch.device(device) else cond

    def _text_len(self, text_len) -> int:
        """`flops`' text length: a positive int, default the model's `text_len`."""
        return self.text_len if text_len is None else check_positive_int(text_len, "text_len")

    def _conditioning(self, t: torch.Tensor, cond: TextCondition):
        """(timestep embedding (N, D), adaLN-single output (N, 6D), text tokens (N, L, D), mask bias)."""
        t_emb = self.t_embedder(t)
        text, bias = self.y_embedder(cond)
        return t_emb, self.t_block(t_emb), text, bias


def text_model_flops(model, tokens: int, volume: int, patch: tuple, text_len: int, frames: int,
                     temporal_depth: int = 0) -> int:
    """Per-sample FLOPs of a PixArt/Latte model with `tokens` image tokens of `volume` pixels each.

    `frames` token groups of tokens/frames attend spatially; with `temporal_depth`, as many temporal
    blocks attend across the frames at each spatial position. Cross-attention keys and values
    project from `cross_attention_dim` channels; the caption projection counts only when the model has one.
    """
    cfg = model.config
    d, c_in, c_out = cfg["hidden_size"], model.in_channels, model.out_channels
    context = model.blocks[0].cross_attn.kv_linear.in_features
    projection = 0 if model.y_embedder.y_proj is None else 2 * text_len * (model.text_channels * d + d * d)
    hidden = int(d * cfg["mlp_ratio"])
    rank = model.lora_rank if (model.adapter == "lora" and tuple(patch) != model.original_patch_size) else 0

    def linear(n_in, n_out, n=tokens, lora=True):
        return 2 * n * (n_in * n_out + (rank * (n_in + n_out) if (rank and lora) else 0))

    per_frame = tokens // frames
    self_part = linear(d, 3 * d) + linear(d, d) + linear(d, hidden) + linear(hidden, d)
    spatial = (self_part + 2 * 2 * frames * per_frame * per_frame * d            # q k^T, attn v per frame
               + linear(d, d, lora=False) + linear(context, 2 * d, n=text_len, lora=False)  # cross q, kv once
               + 2 * 2 * tokens * text_len * d + linear(d, d, lora=False))        # cross attention, proj
    temporal = self_part + 2 * 2 * per_frame * frames * frames * d
    return (2 * tokens * d * c_in * volume                                        # patch embedding
            + 2 * (model.t_embedder.frequency_embedding_size * d + d * d) + 2 * d * 6 * d   # adaLN-single
            + projection                                                          # caption projection
            + cfg["depth"] * spatial + temporal_depth * temporal
            + 2 * tokens * d * volume * c_out)                                    # de-embedding
