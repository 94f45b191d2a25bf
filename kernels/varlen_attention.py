"""Variable-length (packed) attention in Triton: flash-attention forward and backward.

Layout (flash-attn's varlen convention): q, k, v are (total, heads, head_dim), the sequences
packed one after another; int32 `cu_seqlens` (B+1,) holds their boundaries. Attention is
block-diagonal and non-causal: a token attends to every token of its own sequence and no other.

The forward is the flash-attention recipe: one program owns a tile of BLOCK_M queries of one
sequence and one head, walks that sequence's keys BLOCK_N at a time with an online softmax
(running max and sum, fp32 accumulator), and never holds more than a BLOCK_M x BLOCK_N block of
scores. It saves the logsumexp of each query row for the backward, which is the FA2 recipe:
    1. delta = rowsum(dO * O)                      (`_bwd_delta_kernel`)
    2. dK, dV: one program per key tile, looping over the sequence's query tiles
    3. dQ:     one program per query tile, looping over the sequence's key tiles
Separate dK/dV and dQ kernels recompute the scores twice but need no atomics, so the gradients
are deterministic.

How a program finds its sequence. The grid is (B * cdiv(max_seqlen, BLOCK), heads): program p
takes sequence p // cdiv(max_seqlen, BLOCK) and tile p % cdiv(max_seqlen, BLOCK) within it, reads
the sequence's bounds from `cu_seqlens`, and returns at once when the tile starts past the
sequence's end. We chose this over a per-tile table built on the host because it needs no
values of `cu_seqlens` on the host (no device sync, nothing to rebuild per call, and a CUDA
graph can replay it with new boundaries of the same count and max_seqlen), at the cost of idle
programs when lengths differ a lot: for FlexiDiT's packed guidance pair (256 + 64 tokens,
BLOCK_M 64) 3 of 8 programs exit after two loads. A batch with one very long and many short
sequences would waste more; a host-built table is the fix if a benchmark ever shows it.

head_dim: any multiple of 8 up to 128 (DiT-XL/2 uses 72); tiles are padded to the next power of
two (at least 16, the smallest tl.dot) and masked. Dtypes fp32, fp16, bf16; every product is
accumulated in fp32 and fp32 inputs use IEEE (not TF32) dots, so fp32 results match the
reference to ~1e-5. Under TRITON_INTERPRET=1 (CPU), operands are upcast to fp32 before every dot
because the interpreter's bf16 dot is wrong, and one small tile shape is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flexikern.ops._dispatch import triton_interpreting

__all__ = ["varlen_attention", "varlen_attention_forward", "varlen_attention_backward",
           "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is the fast path


@triton.jit
def _load_rows(base, rows, row_mask, stride_t, offs_d, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr):
    """A (len(rows), BLOCK_D) tile of one head; padded rows and columns read as 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    tile = tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_rows(base, rows, row_mask, stride_t, offs_d, value, HEAD_DIM: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lse_h,
                qk_scale,  # softmax scale * log2(e)
                n_m_tiles,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_m_tiles
    m_start = (pid % n_m_tiles) * BLOCK_M
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if m_start >= seq_len:  # a tile past this sequence's end (the grid covers max_seqlen)
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    q = _load_rows(Q + head * stride_qh, seq_start + offs_m, m_mask, stride_qt, offs_d,
                   HEAD_DIM, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Every key block holds at least one real key (n_start < seq_len), so m_new stays finite
    # and padded query rows (zeros) compute harmless values that are never stored.
    for n_start in range(0, seq_len, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k = _load_rows(K + head * stride_kh, seq_start + offs_n, n_mask, stride_kt, offs_d,
                       HEAD_DIM, UPCAST)
        v = _load_rows(V + head * stride_vh, seq_start + offs_n, n_mask, stride_vt, offs_d,
                       HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    acc = acc / l_i[:, None]
    _store_rows(O + head * stride_oh, seq_start + offs_m, m_mask, stride_ot, offs_d, acc,
                HEAD_DIM)
    # Base-2 logsumexp of the scaled scores, (heads, total), for the backward.
    tl.store(LSE + head * stride_lse_h + seq_start + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh,
                      stride_delta_h, total,
                      HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32); sequences do not matter here."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = rows < total
    o = _load_rows(O + head * stride_oh, rows, mask, stride_ot, offs_d, HEAD_DIM, True)
    do = _load_rows(DO + head * stride_doh, rows, mask, stride_dot, offs_d, HEAD_DIM, True)
    tl.store(DELTA + head * stride_delta_h + rows, tl.sum(o * do, 1), mask=mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_lse_h,
                     sm_scale, qk_scale, n_n_tiles,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV for one tile of BLOCK_N keys: loop over the sequence's query tiles."""
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_n_tiles
    n_start = (pid % n_n_tiles) * BLOCK_N
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if n_start >= seq_len:
        return

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < seq_len
    k = _load_rows(K + head * stride_kh, seq_start + offs_n, n_mask, stride_kt, offs_d,
                   HEAD_DIM, UPCAST)
    v = _load_rows(V + head * stride_vh, seq_start + offs_n, n_mask, stride_vt, offs_d,
                   HEAD_DIM, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for m_start in range(0, seq_len, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        rows = seq_start + offs_m
        q = _load_rows(Q + head * stride_qh, rows, m_mask, stride_qt, offs_d, HEAD_DIM, UPCAST)
        do = _load_rows(DO + head * stride_doh, rows, m_mask, stride_dot, offs_d, HEAD_DIM,
                        UPCAST)
        lse = tl.load(LSE + head * stride_lse_h + rows, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + head * stride_lse_h + rows, mask=m_mask, other=0.0)
        # Transposed scores (keys x queries) so that dV = P^T dO and dK = dS^T Q need no
        # transposes of the probabilities.
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        # Padded query rows have q = 0 and lse = 0, which would give p = 1: zero them.
        p_t = tl.where(m_mask[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")

    rows = seq_start + offs_n
    _store_rows(DK + head * stride_dkh, rows, n_mask, stride_dkt, offs_d, dk * sm_scale,
                HEAD_DIM)
    _store_rows(DV + head * stride_dvh, rows, n_mask, stride_dvt, offs_d, dv, HEAD_DIM)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h,
                   sm_scale, qk_scale, n_m_tiles,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dQ for one tile of BLOCK_M queries: loop over the sequence's key tiles."""
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_m_tiles
    m_start = (pid % n_m_tiles) * BLOCK_M
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if m_start >= seq_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_len
    rows = seq_start + offs_m
    q = _load_rows(Q + head * stride_qh, rows, m_mask, stride_qt, offs_d, HEAD_DIM, UPCAST)
    do = _load_rows(DO + head * stride_doh, rows, m_mask, stride_dot, offs_d, HEAD_DIM, UPCAST)
    lse = tl.load(LSE + head * stride_lse_h + rows, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + rows, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n_start in range(0, seq_len, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k = _load_rows(K + head * stride_kh, seq_start + offs_n, n_mask, stride_kt, offs_d,
                       HEAD_DIM, UPCAST)
        v = _load_rows(V + head * stride_vh, seq_start + offs_n, n_mask, stride_vt, offs_d,
                       HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.where(n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)  # padded keys: p = 0
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    _store_rows(DQ + head * stride_dqh, rows, m_mask, stride_dqt, offs_d, dq * sm_scale,
                HEAD_DIM)


@dataclass(frozen=True)
class _Launch:
    """Tile shape and launch options of one kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _Tiles:
    """How the three attention kernels are launched for one head_dim/dtype."""
    block_d: int
    upcast: bool  # operands upcast to fp32 before every tl.dot (the interpreter)
    fwd: _Launch
    dkdv: _Launch
    dq: _Launch


def _tiles(head_dim: int, dtype: torch.dtype) -> _Tiles:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if triton_interpreting():
        # The interpreter runs blocks as numpy arrays: the smallest legal tiles keep tests
        # quick and still cover several tiles per sequence with short sequences.
        small = _Launch(16, 16, 1, 1)
        return _Tiles(block_d, True, small, small, small)
    # Untuned choices that compile for sm80 and sm90 within their shared memory
    # (tests/test_varlen_attention.py compiles them) with at most ~100 bytes of register spill
    # on sm80 (cuobjdump); benchmarks/test_bench_attention.py is where to tune them on a GPU.
    if dtype == torch.float32:  # IEEE fp32 dots: a correctness path, not a fast one
        return _Tiles(block_d, False, _Launch(32, 32, 8, 2), _Launch(32, 16, 4, 1),
                      _Launch(32, 16, 4, 1))
    warps = 4 if block_d <= 64 else 8
    return _Tiles(block_d, False, _Launch(64, 64, warps, 2), _Launch(32, 64, warps, 2),
                  _Launch(64, 32, warps, 2))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take token and head strides but assume unit stride along head_dim, which
    # slices of a fused qkv projection (total, 3, heads, head_dim) already have.
    return t if t.stride(-1) == 1 else t.contiguous()


def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: torch.Tensor, max_seqlen: int,
                             scale: float | None = None,
                             out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel. Inputs are assumed validated (`fk.ops.varlen_attention` does it).

    Args:
        q, k, v: (total, heads, head_dim), head_dim a multiple of 8 up to 128.
        cu_seqlens: int32 (B+1,); max_seqlen: bounds every length (sizes the grid).
        scale: softmax scale, default 1/sqrt(head_dim).
        out: where to write the output (tests pass a NaN-filled buffer); allocated if None.
    Returns:
        (out (total, heads, head_dim), lse (heads, total): fp32 logsumexp of each query row's
        scaled scores, in base 2 (log2 of the softmax denominator), for the backward).
    """
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
    if total == 0:
        return out, lse
    tiles = _tiles(head_dim, q.dtype)
    launch = tiles.fwd
    n_m_tiles = triton.cdiv(max_seqlen, launch.block_m)
    grid = ((cu_seqlens.numel() - 1) * n_m_tiles, heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * LOG2E, n_m_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D=tiles.block_d, UPCAST=tiles.upcast, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return out, lse


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int,
                              scale: float | None = None,
                              grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv from the forward's `out` and `lse` (FA2). `grads` = (dq, dk, dv) buffers to
    write into (tests pass NaN-filled ones); allocated if None."""
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    cu_seqlens = cu_seqlens.contiguous()
    dq, dk, dv = grads if grads is not None else (torch.empty_like(t) for t in (q, k, v))
    if total == 0:
        return dq, dk, dv
    tiles = _tiles(head_dim, q.dtype)
    n_seqs = cu_seqlens.numel() - 1

    delta = torch.empty_like(lse)
    block_t = 16 if triton_interpreting() else 64
    _bwd_delta_kernel[(triton.cdiv(total, block_t), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), total, HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=tiles.block_d)

    launch = tiles.dkdv
    n_n_tiles = triton.cdiv(max_seqlen, launch.block_n)
    _bwd_dkdv_kernel[(n_seqs * n_n_tiles, heads)](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), scale, scale * LOG2E, n_n_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D=tiles.block_d, UPCAST=tiles.upcast, num_warps=launch.num_warps,
        num_stages=launch.num_stages)

    launch = tiles.dq
    n_m_tiles = triton.cdiv(max_seqlen, launch.block_m)
    _bwd_dq_kernel[(n_seqs * n_m_tiles, heads)](
        q, k, v, dout, dq, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale, scale * LOG2E, n_m_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D=tiles.block_d, UPCAST=tiles.upcast, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return dq, dk, dv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens,
                                               ctx.max_seqlen, ctx.scale)
        return dq, dk, dv, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Block-diagonal attention over packed sequences, differentiable in q, k and v.

    The Triton backend of `fk.ops.varlen_attention` (which validates the inputs first).
    """
    return _VarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen, scale)
