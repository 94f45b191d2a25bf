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

head_dim: any multiple of 8 up to 128 (DiT-XL/2 uses 72). Tiles are powers of two (at least 16,
the smallest tl.dot), so a head dim that one tile would pad a lot runs as a main part and a
masked tail, two dots per product (72 = 64 + 16, where 128 would waste 44%: `_split_head_dim`).
Token and head strides must be multiples of 8 elements, so that rows load as aligned 16-byte
vectors; the host copies inputs whose strides are not. Dtypes fp32, fp16, bf16; every product is
accumulated in fp32 and fp32 inputs use IEEE (not TF32) dots, so fp32 results match the
reference to ~1e-5. Under TRITON_INTERPRET=1 (CPU tensors; the caller passes `interpret=True`),
operands are upcast to fp32 before every dot because the interpreter's bf16 dot is wrong, and one
small tile shape is used. The custom ops around these launches (torch.library, with fake
kernels and autograd) are in `flexikern.ops.varlen_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flexikern.kernels import _common

__all__ = ["varlen_attention_forward", "varlen_attention_backward", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
_MIN_DOT = 16  # tl.dot needs every dimension >= 16
LOG2E = 1.4426950408889634  # scores are kept in base 2 inside the kernels: exp2 is the fast path


@triton.jit
def _head_ptr(ptr, head, stride_h):
    """ptr + head * stride_h, telling the compiler that the offset is a multiple of 8 elements.

    The host makes every token and head stride a multiple of 8 (`_aligned`), which the JIT
    cannot see for a head stride of 72 (it only detects multiples of 16). With it, rows load as
    16-byte vectors and the loops' loads pipeline through shared memory (cp.async); without it
    every element goes through registers on its own.
    """
    return ptr + tl.multiple_of(head * stride_h, 8)


@triton.jit
def _row_ptrs(base, rows, stride_t, offs_d):
    """Pointers to a (len(rows), len(offs_d)) tile of one head (token stride a multiple of 8)."""
    return base + tl.multiple_of(rows.to(tl.int64) * stride_t, 8)[:, None] + offs_d[None, :]


@triton.jit
def _load_rows(base, rows, row_mask, stride_t, offs_d, HEAD_DIM: tl.constexpr,
               UPCAST: tl.constexpr):
    """A (len(rows), len(offs_d)) tile of one head; padded rows and columns read as 0."""
    tile = tl.load(_row_ptrs(base, rows, stride_t, offs_d),
                   mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_head(base, rows, row_mask, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
               BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr):
    """Rows of one head as (main, tail) tiles: columns [0, BLOCK_D0) and [BLOCK_D0, HEAD_DIM)
    padded to BLOCK_D1 (see `_split_head_dim`). Without a tail (BLOCK_D1 == 0) `tail` is `main`
    again, a placeholder that the kernels never use."""
    main = _load_rows(base, rows, row_mask, stride_t, tl.arange(0, BLOCK_D0), HEAD_DIM, UPCAST)
    tail = main
    if BLOCK_D1 > 0:
        tail = _load_rows(base, rows, row_mask, stride_t, BLOCK_D0 + tl.arange(0, BLOCK_D1),
                          HEAD_DIM, UPCAST)
    return main, tail


@triton.jit
def _store_head(base, rows, row_mask, stride_t, main, tail, HEAD_DIM: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """Store (main, tail) tiles of one head, split as `_load_head` splits them."""
    offs_d = tl.arange(0, BLOCK_D0)
    tl.store(_row_ptrs(base, rows, stride_t, offs_d), main.to(base.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))
    if BLOCK_D1 > 0:
        offs_d = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        tl.store(_row_ptrs(base, rows, stride_t, offs_d), tail.to(base.dtype.element_ty),
                 mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _zeros_head(ROWS: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """fp32 (main, tail) accumulators for ROWS rows of one head (tail = main without a tail)."""
    main = tl.zeros([ROWS, BLOCK_D0], dtype=tl.float32)
    tail = main
    if BLOCK_D1 > 0:
        tail = tl.zeros([ROWS, BLOCK_D1], dtype=tl.float32)
    return main, tail


@triton.jit
def _dot_nt(a_main, a_tail, b_main, b_tail, BLOCK_D1: tl.constexpr):
    """a @ b^T over the whole head dim: the main part's dot, plus the tail's when there is one."""
    s = tl.dot(a_main, tl.trans(b_main), input_precision="ieee")
    if BLOCK_D1 > 0:
        s = tl.dot(a_tail, tl.trans(b_tail), s, input_precision="ieee")
    return s


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_SEQLENS,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lse_h,
                qk_scale,  # softmax scale * log2(e)
                n_m_tiles,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_m_tiles
    m_start = (pid % n_m_tiles) * BLOCK_M
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if m_start >= seq_len:  # a tile past this sequence's end (the grid covers max_seqlen)
        return
    k_ptr = _head_ptr(K, head, stride_kh)
    v_ptr = _head_ptr(V, head, stride_vh)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    q, q_tail = _load_head(_head_ptr(Q, head, stride_qh), seq_start + offs_m, m_mask, stride_qt,
                           HEAD_DIM, BLOCK_D0, BLOCK_D1, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                 # running row sum of exp2
    acc, acc_tail = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
    # Every key block holds at least one real key (n_start < seq_len), so m_new stays finite
    # and padded query rows (zeros) compute harmless values that are never stored.
    for n_start in range(0, seq_len, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k, k_tail = _load_head(k_ptr, seq_start + offs_n, n_mask, stride_kt, HEAD_DIM, BLOCK_D0,
                               BLOCK_D1, UPCAST)
        v, v_tail = _load_head(v_ptr, seq_start + offs_n, n_mask, stride_vt, HEAD_DIM, BLOCK_D0,
                               BLOCK_D1, UPCAST)
        s = _dot_nt(q, q_tail, k, k_tail, BLOCK_D1) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        if BLOCK_D1 > 0:
            acc_tail = tl.dot(p.to(v.dtype), v_tail, acc_tail * alpha[:, None],
                              input_precision="ieee")
        m_i = m_new

    _store_head(_head_ptr(O, head, stride_oh), seq_start + offs_m, m_mask, stride_ot,
                acc / l_i[:, None], acc_tail / l_i[:, None], HEAD_DIM, BLOCK_D0, BLOCK_D1)
    # Base-2 logsumexp of the scaled scores, (heads, total), for the backward.
    tl.store(LSE + head * stride_lse_h + seq_start + offs_m, m_i + tl.log2(l_i), mask=m_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh,
                      stride_delta_h, total,
                      HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D0: tl.constexpr,
                      BLOCK_D1: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32); sequences do not matter here."""
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = rows < total
    o, o_tail = _load_head(_head_ptr(O, head, stride_oh), rows, mask, stride_ot, HEAD_DIM,
                           BLOCK_D0, BLOCK_D1, True)
    do, do_tail = _load_head(_head_ptr(DO, head, stride_doh), rows, mask, stride_dot, HEAD_DIM,
                             BLOCK_D0, BLOCK_D1, True)
    delta = tl.sum(o * do, 1)
    if BLOCK_D1 > 0:
        delta += tl.sum(o_tail * do_tail, 1)
    tl.store(DELTA + head * stride_delta_h + rows, delta, mask=mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_lse_h,
                     sm_scale, qk_scale, n_n_tiles,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV for one tile of BLOCK_N keys: loop over the sequence's query tiles."""
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_n_tiles
    n_start = (pid % n_n_tiles) * BLOCK_N
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if n_start >= seq_len:
        return
    q_ptr = _head_ptr(Q, head, stride_qh)
    do_ptr = _head_ptr(DO, head, stride_doh)

    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < seq_len
    key_rows = seq_start + offs_n
    k, k_tail = _load_head(_head_ptr(K, head, stride_kh), key_rows, n_mask, stride_kt, HEAD_DIM,
                           BLOCK_D0, BLOCK_D1, UPCAST)
    v, v_tail = _load_head(_head_ptr(V, head, stride_vh), key_rows, n_mask, stride_vt, HEAD_DIM,
                           BLOCK_D0, BLOCK_D1, UPCAST)
    dk, dk_tail = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
    dv, dv_tail = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
    for m_start in range(0, seq_len, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < seq_len
        rows = seq_start + offs_m
        q, q_tail = _load_head(q_ptr, rows, m_mask, stride_qt, HEAD_DIM, BLOCK_D0, BLOCK_D1,
                               UPCAST)
        do, do_tail = _load_head(do_ptr, rows, m_mask, stride_dot, HEAD_DIM, BLOCK_D0, BLOCK_D1,
                                 UPCAST)
        lse = tl.load(LSE + head * stride_lse_h + rows, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + head * stride_lse_h + rows, mask=m_mask, other=0.0)
        # Transposed scores (keys x queries) so that dV = P^T dO and dK = dS^T Q need no
        # transposes of the probabilities.
        s_t = _dot_nt(k, k_tail, q, q_tail, BLOCK_D1) * qk_scale
        # Padded query rows have q = 0 and lse = 0, which would give p = 1: zero them.
        p_t = tl.where(m_mask[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        if BLOCK_D1 > 0:
            dv_tail = tl.dot(p_t.to(do.dtype), do_tail, dv_tail, input_precision="ieee")
        dp_t = _dot_nt(v, v_tail, do, do_tail, BLOCK_D1)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision="ieee")
        if BLOCK_D1 > 0:
            dk_tail = tl.dot(ds_t, q_tail, dk_tail, input_precision="ieee")

    _store_head(_head_ptr(DK, head, stride_dkh), key_rows, n_mask, stride_dkt, dk * sm_scale,
                dk_tail * sm_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    _store_head(_head_ptr(DV, head, stride_dvh), key_rows, n_mask, stride_dvt, dv, dv_tail,
                HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_SEQLENS,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lse_h,
                   sm_scale, qk_scale, n_m_tiles,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, UPCAST: tl.constexpr):
    """dQ for one tile of BLOCK_M queries: loop over the sequence's key tiles."""
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    seq = pid // n_m_tiles
    m_start = (pid % n_m_tiles) * BLOCK_M
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_len = tl.load(CU_SEQLENS + seq + 1) - seq_start
    if m_start >= seq_len:
        return
    k_ptr = _head_ptr(K, head, stride_kh)
    v_ptr = _head_ptr(V, head, stride_vh)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seq_len
    rows = seq_start + offs_m
    q, q_tail = _load_head(_head_ptr(Q, head, stride_qh), rows, m_mask, stride_qt, HEAD_DIM,
                           BLOCK_D0, BLOCK_D1, UPCAST)
    do, do_tail = _load_head(_head_ptr(DO, head, stride_doh), rows, m_mask, stride_dot, HEAD_DIM,
                             BLOCK_D0, BLOCK_D1, UPCAST)
    lse = tl.load(LSE + head * stride_lse_h + rows, mask=m_mask, other=0.0)
    delta = tl.load(DELTA + head * stride_lse_h + rows, mask=m_mask, other=0.0)
    dq, dq_tail = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
    for n_start in range(0, seq_len, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        k, k_tail = _load_head(k_ptr, seq_start + offs_n, n_mask, stride_kt, HEAD_DIM, BLOCK_D0,
                               BLOCK_D1, UPCAST)
        v, v_tail = _load_head(v_ptr, seq_start + offs_n, n_mask, stride_vt, HEAD_DIM, BLOCK_D0,
                               BLOCK_D1, UPCAST)
        s = _dot_nt(q, q_tail, k, k_tail, BLOCK_D1) * qk_scale
        p = tl.where(n_mask[None, :], tl.exp2(s - lse[:, None]), 0.0)  # padded keys: p = 0
        dp = _dot_nt(do, do_tail, v, v_tail, BLOCK_D1)
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision="ieee")
        if BLOCK_D1 > 0:
            dq_tail = tl.dot(ds, k_tail, dq_tail, input_precision="ieee")
    _store_head(_head_ptr(DQ, head, stride_dqh), rows, m_mask, stride_dqt, dq * sm_scale,
                dq_tail * sm_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1)


@dataclass(frozen=True)
class _Launch:
    """Tile shape and launch options of one kernel."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class _Tiles:
    """How the attention kernels are launched for one head_dim/dtype."""
    block_d0: int  # the head dim's main part and tail (0: none), see _split_head_dim
    block_d1: int
    upcast: bool  # operands upcast to fp32 before every tl.dot (the interpreter)
    fwd: _Launch
    dkdv: _Launch
    dq: _Launch
    delta_rows: int  # rows per program of the backward's delta = rowsum(dO * O)


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): the head dim as a main part and a tail, each a power of two >= 16
    (tl.arange and tl.dot need that), the tail 0 when one part pads as little.

    One power-of-two tile pads 72 to 128 and wastes 44% of every dot; 64 + 16 (the tail's last
    8 columns masked) computes 80 columns. With a tail the kernels run two dots per product and
    keep one accumulator per part; it is selected at compile time (BLOCK_D1 > 0), so
    power-of-two head dims compile to one part as before.
    """
    single = max(_MIN_DOT, triton.next_power_of_2(head_dim))
    main = max(_MIN_DOT, 1 << (head_dim.bit_length() - 1))  # the largest power of two <= it
    tail = max(_MIN_DOT, triton.next_power_of_2(head_dim - main)) if head_dim > main else 0
    return (main, tail) if main + tail < single else (single, 0)


def _tiles(head_dim: int, dtype: torch.dtype, interpret: bool) -> _Tiles:
    block_d0, block_d1 = _split_head_dim(head_dim)
    if interpret:
        # The interpreter runs blocks as numpy arrays: the smallest legal tiles keep tests
        # quick and still cover several tiles per sequence with short sequences.
        small = _Launch(16, 16, 1, 1)
        return _Tiles(block_d0, block_d1, True, small, small, small, delta_rows=16)
    # Untuned choices that compile for sm_90 (and sm_80) without register spills and within
    # shared memory (benchmarks/sm90_compile.py measures them: benchmarks/README.md, "sm_90
    # compile table"); benchmarks/test_bench_attention.py is where to tune them on a GPU.
    if dtype == torch.float32:  # IEEE fp32 dots: a correctness path, not a fast one
        return _Tiles(block_d0, block_d1, False, _Launch(32, 32, 8, 2), _Launch(32, 16, 8, 1),
                      _Launch(32, 16, 8, 1), delta_rows=64)
    warps = 4 if block_d0 + block_d1 <= 64 else 8
    return _Tiles(block_d0, block_d1, False, _Launch(64, 64, warps, 2), _Launch(32, 64, warps, 2),
                  _Launch(64, 32, warps, 2), delta_rows=64)


def _strides_fit(t: torch.Tensor) -> bool:
    """Whether the kernels can read or write `t` in place: unit stride along head_dim, and token
    and head strides that are multiples of 8 elements (`_head_ptr`). Slices of a fused qkv
    projection (total, 3, heads, head_dim) fit."""
    return t.stride(-1) == 1 and all(stride % 8 == 0 or size == 1
                                     for size, stride in zip(t.shape[:2], t.stride()[:2]))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy when its strides do not fit the kernels (head_dim % 8 == 0
    makes every contiguous or freshly allocated tensor fit)."""
    return t if _strides_fit(t) else t.contiguous()


def _empty_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer like `t` (NaN-filled when `_common.POISON_OUTPUTS`, as in tests)."""
    out = torch.empty_like(t)
    if _common.POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def _check_buffers(*buffers: torch.Tensor) -> None:
    if not all(_strides_fit(b) for b in buffers):
        raise ValueError("output buffers need unit stride along head_dim and token and head "
                         "strides that are multiples of 8")


def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: torch.Tensor, max_seqlen: int,
                             scale: float | None = None, out: torch.Tensor | None = None, *,
                             interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel. Inputs are assumed validated (`fk.ops.varlen_attention` does it).

    Args:
        q, k, v: (total, heads, head_dim), head_dim a multiple of 8 up to 128.
        cu_seqlens: int32 (B+1,); max_seqlen: bounds every length (sizes the grid).
        scale: softmax scale, default 1/sqrt(head_dim).
        out: where to write the output (tests pass a NaN-filled buffer), with strides like
            q's (`_strides_fit`); allocated if None.
        interpret: launch in the Triton interpreter (TRITON_INTERPRET=1, CPU tensors).
    Returns:
        (out (total, heads, head_dim), lse (heads, total): fp32 logsumexp of each query row's
        scaled scores, in base 2 (log2 of the softmax denominator), for the backward).
    """
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v = (_aligned(t) for t in (q, k, v))
    cu_seqlens = cu_seqlens.contiguous()
    if out is None:
        out = _empty_like(q)
    _check_buffers(out)
    lse = _common.new_output((heads, total), torch.float32, q.device)
    if total == 0:
        return out, lse
    tiles = _tiles(head_dim, q.dtype, interpret)
    launch = tiles.fwd
    n_m_tiles = triton.cdiv(max_seqlen, launch.block_m)
    grid = ((cu_seqlens.numel() - 1) * n_m_tiles, heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * LOG2E, n_m_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D0=tiles.block_d0, BLOCK_D1=tiles.block_d1, UPCAST=tiles.upcast,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return out, lse


def varlen_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                              cu_seqlens: torch.Tensor, max_seqlen: int,
                              scale: float | None = None,
                              grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                              *, interpret: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv from the forward's `out` and `lse` (FA2). `grads` = (dq, dk, dv) buffers to
    write into (tests pass NaN-filled ones); allocated if None. `interpret`: as for the forward."""
    total, heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q, k, v, out, dout = (_aligned(t) for t in (q, k, v, out, dout))
    cu_seqlens = cu_seqlens.contiguous()
    dq, dk, dv = grads if grads is not None else (_empty_like(t) for t in (q, k, v))
    _check_buffers(dq, dk, dv)
    if total == 0:
        return dq, dk, dv
    tiles = _tiles(head_dim, q.dtype, interpret)
    n_seqs = cu_seqlens.numel() - 1

    delta = torch.empty_like(lse)
    _bwd_delta_kernel[(triton.cdiv(total, tiles.delta_rows), heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        delta.stride(0), total, HEAD_DIM=head_dim, BLOCK_T=tiles.delta_rows,
        BLOCK_D0=tiles.block_d0, BLOCK_D1=tiles.block_d1)

    launch = tiles.dkdv
    n_n_tiles = triton.cdiv(max_seqlen, launch.block_n)
    _bwd_dkdv_kernel[(n_seqs * n_n_tiles, heads)](
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        lse.stride(0), scale, scale * LOG2E, n_n_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D0=tiles.block_d0, BLOCK_D1=tiles.block_d1, UPCAST=tiles.upcast,
        num_warps=launch.num_warps, num_stages=launch.num_stages)

    launch = tiles.dq
    n_m_tiles = triton.cdiv(max_seqlen, launch.block_m)
    _bwd_dq_kernel[(n_seqs * n_m_tiles, heads)](
        q, k, v, dout, dq, lse, delta, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        scale, scale * LOG2E, n_m_tiles,
        HEAD_DIM=head_dim, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_D0=tiles.block_d0, BLOCK_D1=tiles.block_d1, UPCAST=tiles.upcast,
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return dq, dk, dv

