"""varlen_attention: block-diagonal, non-causal attention over packed sequences.

Layout (flash-attn's varlen convention): q, k, v are (total, heads, head_dim); int32
`cu_seqlens` (B+1,) holds the sequence boundaries; `max_seqlen` bounds every length. A token
attends only to tokens of its own sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexikern.ops._checks import check_tensor
from flexikern.ops._dispatch import Backend, dispatch, register

__all__ = ["varlen_attention", "varlen_attention_reference", "check_cu_seqlens"]


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """The plain-torch ground truth: SDPA per sequence."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
    return out


@register
class TorchVarlenAttention(Backend):
    op, name = "varlen_attention", "torch"

    def __call__(self, **inputs):
        return varlen_attention_reference(**inputs)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int,
                     device: torch.device) -> None:
    """Reject malformed boundaries with a message naming what is wrong."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: on {cu_seqlens.device}, but q is on {device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected length B+1 >= 2, got {cu_seqlens.numel()}")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # reading values would synchronise; they were checked before capture
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, starts at {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    bad = [i for i, n in enumerate(lengths) if n < 0]
    if bad:
        raise ValueError(f"cu_seqlens: must be non-decreasing; decreases at index {bad[0] + 1} "
                         f"({bounds[bad[0]]} -> {bounds[bad[0] + 1]})")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens: last entry {bounds[-1]} must equal the number of packed "
                         f"tokens, q.shape[0] = {total}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence "
                         f"({max(lengths)}, sequence {lengths.index(max(lengths))})")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Attention within each packed sequence.

    Args:
        q, k, v: (total, heads, head_dim), one dtype and device.
        cu_seqlens: int32 (B+1,): 0, then the running total of the sequence lengths.
        max_seqlen: the longest sequence length (an int).
        scale: the softmax scale; default 1/sqrt(head_dim).
    Returns:
        (total, heads, head_dim), like q.
    """
    check_tensor("q", q, ndim=3)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.shape != q.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from q's {tuple(q.shape)} "
                             "(total, heads, head_dim must match)")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ValueError(f"max_seqlen={max_seqlen!r}: expected a positive int")
    check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device)
    return dispatch("varlen_attention", q=q, k=k, v=v, cu_seqlens=cu_seqlens,
                    max_seqlen=max_seqlen, scale=scale)
