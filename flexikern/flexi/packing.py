"""Packing a mixed batch (different patch sizes and resolutions) into one token sequence.

NaViT's "Patch n' Pack" for FlexiDiT (paper App. B.2): instead of padding a 64-token weak
sequence to 256 or running a second pass, all samples' tokens are concatenated; attention is
block-diagonal (`fk.ops.varlen_attention`) and every token gets its own sample's adaLN
modulation through `segment_ids`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from flexikern.ops.patch_size import PatchSize

__all__ = ["Packing"]


@dataclass(frozen=True)
class Packing:
    """Where each sample's tokens sit in the packed sequence, on the device and on the host.

    segment_ids: (total,) long, the (packed-order) sample index of each token (its adaLN row).
    cu_seqlens: (S+1,) int32 boundaries of the S attention sequences, for varlen attention.
    cu_seqlens_host: the same boundaries as Python ints, for what must not read the device
        (`varlen_attention(..., cu_seqlens_host=)`'s validation and host-side backends).
    max_seqlen: the longest sequence.
    groups: (patch size, start, end): the token ranges of consecutive samples sharing a patch
        size, for per-size layers (LoRA adapters, norms).
    sample_bounds: (start, end) token range of each sample, on the host (per-sample
        cross-attention).

    Built once per batch signature and cached by the models, so a step never rebuilds one.
    """

    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    groups: list[tuple[PatchSize, int, int]]
    cu_seqlens_host: tuple[int, ...]
    sample_bounds: tuple[tuple[int, int], ...]

    @classmethod
    def from_lengths(cls, lengths: list[int], patches: list[PatchSize], device: torch.device,
                     sequences: list[int] | None = None) -> "Packing":
        """Samples in packed order with their token counts and patch sizes.

        Each sample is one attention sequence or, with `sequences`, sample i is split into
        `sequences[i]` sequences of equal length (a video's frames, or its positions across frames).
        """
        counts = sequences if sequences is not None else [1] * len(lengths)
        if any(n % c for n, c in zip(lengths, counts)):
            raise ValueError(f"lengths {lengths} do not split into {counts} equal sequences")
        starts = list(itertools.accumulate(lengths, initial=0))
        groups: list[tuple[PatchSize, int, int]] = []
        for patch, start, end in zip(patches, starts[:-1], starts[1:]):
            if groups and groups[-1][0] == patch:
                groups[-1] = (patch, groups[-1][1], end)
            else:
                groups.append((patch, start, end))
        seqlens = [n // c for n, c in zip(lengths, counts) for _ in range(c)]
        bounds = tuple(itertools.accumulate(seqlens, initial=0))
        segment_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths),
                                              output_size=starts[-1])   # a size torch.compile knows
        return cls(segment_ids=segment_ids.to(device),
                   cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
                   max_seqlen=max(seqlens), groups=groups, cu_seqlens_host=bounds,
                   sample_bounds=tuple(zip(starts[:-1], starts[1:])))
