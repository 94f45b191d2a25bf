"""Packing a mixed batch (different patch sizes and resolutions) into one token sequence.

NaViT's "Patch n' Pack" for FlexiDiT (paper App. B.2): instead of padding a 64-token weak
sequence to 256 or running a second pass, all samples' tokens are concatenated; attention is
block-diagonal (`fk.ops.varlen_attention`) and every token gets its own sample's adaLN
modulation through `segment_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Packing"]


@dataclass(frozen=True)
class Packing:
    """Where each sample's tokens sit in the packed sequence.

    segment_ids: (total,) long, the (packed-order) sample index of each token.
    cu_seqlens: (B+1,) int32 sequence boundaries, for varlen attention.
    max_seqlen: the longest sequence.
    groups: (key, start, end) token ranges sharing a patch-size key, for per-size layers.
    """

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    groups: list[tuple[str, int, int]]

    @classmethod
    def from_lengths(cls, lengths: list[int], keys: list[str], device: torch.device) -> "Packing":
        """Samples in packed order with their token counts and patch-size keys."""
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        groups: list[tuple[str, int, int]] = []
        for key, start, end in zip(keys, bounds[:-1], bounds[1:]):
            if groups and groups[-1][0] == key and groups[-1][2] == start:
                groups[-1] = (key, groups[-1][1], end)
            else:
                groups.append((key, start, end))
        segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return cls(segment_ids=segment_ids.to(device),
                   cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
                   max_seqlen=max(lengths), groups=groups)
