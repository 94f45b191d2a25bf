"""varlen_attention: block-diagonal, non-causal attention over packed sequences.

Layout (flash-attn's varlen convention): q, k, v are (total, heads, head_dim); int32
`cu_seqlens` (B+1,) holds the sequence boundaries; `max_seqlen` bounds every length. A token
attends only to tokens of its own sequence.

Backends, in priority order (the first that supports the inputs runs):

1. `flash_attn` — `flash_attn.flash_attn_varlen_func` (FlashAttention-2, hand-written CUDA).
   The published reference for this exact op: the FA2 paper reports about 2x over
   FlashAttention-1, which was already faster than xformers' CUTLASS kernel; tuned backward.
   Needs the package, CUDA sm80+, fp16/bf16, head_dim <= 256 (a multiple of 8).
2. `torch_varlen` — `torch.nn.attention.varlen.varlen_attn` (recent torch; in 2.13): the same
   FA2 kernels vendored into aten, always present in CUDA builds of torch. After `flash_attn`
   only because a separately installed flash-attn is the user's deliberate (and usually newer)
   choice. Same limits: CUDA sm80+, fp16/bf16, head_dim <= 256, a multiple of 8.
3. `xformers` — `memory_efficient_attention` with a `BlockDiagonalMask`: dispatches inside to its
   own FA2/FA3 or CUTLASS kernels, so it also covers fp32 on CUDA, but needs a mask object built
   from host lengths (cached per packing).
4. `triton` — ours (flexikern.kernels.varlen_attention): FA2 forward and backward in Triton,
   any CUDA GPU Triton supports, fp32/fp16/bf16, head_dim a multiple of 8 up to 128 (72 runs as a
   64-wide part and a 16-wide tail, where FlexAttention pads it to 128). Untuned tile shapes, so below the hand-tuned
   CUDA kernels; first for fp32 only where xformers is absent. CPU only when forced, under the
   interpreter (`auto_on_cpu=False`).
5. `flex` — FlexAttention with a document mask: compiled on CUDA (Triton underneath), it works
   on 128x128 blocks of the whole packed sequence, so blocks that straddle a sequence boundary
   evaluate the mask per element, and each new packing builds (and caches) a block mask; ours
   tiles each sequence from its own start instead. On CPU it runs eager: unfused (it
   materialises total x total scores) and forward-only, hence `auto_on_cpu=False`.
6. `torch` — the reference (SDPA per sequence, a Python loop over sequences): runs everywhere,
   the ground truth in tests, and the automatic choice on CPU.

`xformers`, `flex` and `torch` need the boundaries on the host, so they decline inside a CUDA
graph capture; `flash_attn`, `torch_varlen` and `triton` take cu_seqlens on the device.

Host synchronisation: without `cu_seqlens_host`, every call reads cu_seqlens back once to
validate it (and the host-side backends read it again), a device sync per attention layer. A
caller that keeps the boundaries on the host too (a cached `flexikern.flexi.packing.Packing`
does) passes them as `cu_seqlens_host`, like xformers' `seqstart_py`: then validation and the
backends read the tuple and the call never synchronises.

This order is reasoned from the libraries' published characteristics, not measured here (no GPU
was available when it was written); `pytest benchmarks/test_bench_attention.py` on a GPU is what
confirms or reorders it.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from flexikern.ops._cache import constant_while_tracing, tensor_cache
from flexikern.ops._checks import check_positive_int, check_tensor, is_finite, is_int
from flexikern.ops._dispatch import Backend, dispatch, triton_interpreting

__all__ = ["varlen_attention", "varlen_attention_reference", "check_cu_seqlens",
           "VARLEN_ATTENTION_BACKENDS"]


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
    """The plain-torch ground truth: SDPA per sequence (bounds from `cu_seqlens_host` when given)."""
    out = torch.empty_like(q)
    bounds = _host_bounds(cu_seqlens, cu_seqlens_host)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
    return out


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int,
                     device: torch.device, cu_seqlens_host=None) -> None:
    """Reject malformed boundaries with a message naming what is wrong.

    The values checked are `cu_seqlens_host` when given (no device read; that it equals
    cu_seqlens is the caller's promise), else cu_seqlens' own, read back (a device sync; skipped
    during a CUDA graph capture, where they were checked before).
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens: on {cu_seqlens.device}, but q is on {device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected length B+1 >= 2, got {cu_seqlens.numel()}")
    if cu_seqlens_host is not None:
        if not isinstance(cu_seqlens_host, (tuple, list)):
            raise TypeError(f"cu_seqlens_host: expected a tuple of ints (cu_seqlens' values on the "
                            f"host), got {type(cu_seqlens_host).__name__}")
        if len(cu_seqlens_host) != cu_seqlens.numel():
            raise ValueError(f"cu_seqlens_host: {len(cu_seqlens_host)} entries, but cu_seqlens has "
                             f"{cu_seqlens.numel()}; it must hold the same boundaries")
        wrong = [b for b in cu_seqlens_host if not is_int(b)]
        if wrong:
            raise TypeError(f"cu_seqlens_host: expected a tuple of ints, got the entry {wrong[0]!r} "
                            f"({type(wrong[0]).__name__})")
        # Cached: a sampling step passes its packing's tuple to every attention layer (torch.compile
        # traces the check itself, once per graph).
        check = _check_bounds.__wrapped__ if torch.compiler.is_compiling() else _check_bounds
        check("cu_seqlens_host", tuple(map(int, cu_seqlens_host)), total, max_seqlen)
    elif torch.compiler.is_compiling():
        raise ValueError("cu_seqlens_host: required under torch.compile (reading cu_seqlens' values would "
                         "break the graph); pass the boundaries as a tuple of ints too, e.g. "
                         "cu_seqlens_host=tuple(cu_seqlens.tolist()) computed outside the compiled function")
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # reading values would synchronise; they were checked before capture
    else:
        _check_bounds("cu_seqlens", tuple(cu_seqlens.tolist()), total, max_seqlen)


@functools.lru_cache(maxsize=64)
def _check_bounds(name: str, bounds: tuple, total: int, max_seqlen: int) -> None:
    """The values of boundaries `bounds` (ints, named `name` in errors): from 0, non-decreasing, to
    `total`, no sequence longer than `max_seqlen`."""
    if bounds[0] != 0:
        raise ValueError(f"{name}: must start at 0, starts at {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    bad = [i for i, n in enumerate(lengths) if n < 0]
    if bad:
        raise ValueError(f"{name}: must be non-decreasing; decreases at index {bad[0] + 1} "
                         f"({bounds[bad[0]]} -> {bounds[bad[0] + 1]})")
    if bounds[-1] != total:
        raise ValueError(f"{name}: last entry {bounds[-1]} must equal the number of packed "
                         f"tokens, q.shape[0] = {total}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence "
                         f"({max(lengths)}, sequence {lengths.index(max(lengths))})")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None, *,
                     cu_seqlens_host: tuple[int, ...] | None = None) -> torch.Tensor:
    """Attention within each packed sequence.

    Args:
        q, k, v: (total, heads, head_dim), one dtype and device.
        cu_seqlens: int32 (B+1,): 0, then the running total of the sequence lengths.
        max_seqlen: the longest sequence length (an int).
        scale: the softmax scale; default 1/sqrt(head_dim).
        cu_seqlens_host: the same boundaries on the host, a tuple of B+1 ints (xformers'
            `seqstart_py`); it must equal cu_seqlens. When given, validation (start 0,
            non-decreasing, last = total, lengths <= max_seqlen) and the backends that need host
            values read it, so the call never synchronises; without it cu_seqlens is read back.
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
    max_seqlen = check_positive_int(max_seqlen, "max_seqlen", "a positive int (e.g. seqlens.max().item())")
    if scale is not None:
        if not is_finite(scale) or scale <= 0:
            raise ValueError(f"scale={scale!r}: expected a positive finite float (the softmax scale), or None "
                             f"for 1/sqrt(head_dim)")
        scale = float(scale)
    check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen, q.device, cu_seqlens_host)
    return dispatch("varlen_attention", q=q, k=k, v=v, cu_seqlens=cu_seqlens,
                    max_seqlen=max_seqlen, scale=scale, cu_seqlens_host=cu_seqlens_host)


# ---------------------------------------------------------------------------------------------
# Backends; their priority list, VARLEN_ATTENTION_BACKENDS, follows them (the module docstring
# says why this order).


class _VarlenBackend(Backend):
    """A varlen_attention backend with declared limits, checked on q (k and v match it).

    Called as `backend(q=, k=, v=, cu_seqlens=, max_seqlen=, scale=, cu_seqlens_host=)`; the
    host boundaries may be None (then a backend that needs them reads cu_seqlens back).
    """

    op = "varlen_attention"
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    min_cuda_capability: tuple[int, int] | None = None
    # Backends that need the boundaries on the host (cu_seqlens_host, or cu_seqlens.tolist())
    # are not captured in a CUDA graph; the kernels that take cu_seqlens on the device can be.
    reads_cu_seqlens_on_host: bool = False

    def not_supported_reasons(self, **inputs) -> list[str]:
        q = inputs["q"]
        reasons = []
        unavailable = self.unavailable_reason()
        if unavailable:
            reasons.append(unavailable)
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type} not in {self.devices}")
        if reasons:
            return reasons
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} not in {self.dtypes}")
        head_dim = q.shape[-1]
        if self.max_head_dim is not None and head_dim > self.max_head_dim:
            reasons.append(f"head_dim {head_dim} > {self.max_head_dim}")
        if head_dim % self.head_dim_multiple:
            reasons.append(f"head_dim {head_dim} is not a multiple of {self.head_dim_multiple}")
        if self.min_cuda_capability is not None and q.device.type == "cuda":
            capability = _capability(q.device)
            if capability < self.min_cuda_capability:
                reasons.append(f"CUDA capability {capability} < {self.min_cuda_capability}")
        # (torch.compile traces outside any capture: its graphs read the host boundaries as
        # constants, so they can be captured later.)
        if (self.reads_cu_seqlens_on_host and q.device.type == "cuda" and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            reasons.append("reads cu_seqlens on the host, which a CUDA graph capture forbids")
        return reasons


@constant_while_tracing
def _capability(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability of `device` (torch.compile reads it while tracing)."""
    return torch.cuda.get_device_capability(device)


def _host_bounds(cu_seqlens: torch.Tensor, cu_seqlens_host: tuple[int, ...] | None) -> tuple[int, ...]:
    """The boundaries on the host: `cu_seqlens_host`, or cu_seqlens read back (a device sync)."""
    return tuple(cu_seqlens.tolist()) if cu_seqlens_host is None else tuple(cu_seqlens_host)


class FlashAttnVarlenAttention(_VarlenBackend):
    """flash-attn's FA2 varlen kernel (forward and backward)."""

    name = "flash_attn"
    requires = ("flash_attn",)
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    max_head_dim, head_dim_multiple, min_cuda_capability = 256, 8, (8, 0)

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
        from flash_attn import flash_attn_varlen_func
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      dropout_p=0.0, softmax_scale=scale, causal=False)


class TorchVarlenAttention(_VarlenBackend):
    """torch.nn.attention.varlen.varlen_attn: aten's FA2 (forward and backward)."""

    name = "torch_varlen"
    requires = ("torch.nn.attention.varlen",)
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)
    max_head_dim, head_dim_multiple, min_cuda_capability = 256, 8, (8, 0)

    def not_supported_reasons(self, **inputs) -> list[str]:
        reasons = super().not_supported_reasons(**inputs)
        if not reasons and not torch.backends.cuda.is_flash_attention_available():
            reasons.append("this torch build has no flash attention kernels")
        return reasons

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)


class XformersVarlenAttention(_VarlenBackend):
    """xformers' memory_efficient_attention with a block-diagonal mask; xformers picks its own
    kernel (FA2/FA3/CUTLASS) inside and raises its own detailed error if none fits."""

    name = "xformers"
    requires = ("xformers.ops",)
    devices = ("cuda",)
    reads_cu_seqlens_on_host = True  # the mask is built from host lengths

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
        from xformers.ops import memory_efficient_attention
        mask = _block_diagonal_mask(_host_bounds(cu_seqlens, cu_seqlens_host))
        # xformers wants (batch, tokens, heads, head_dim): the packed tokens are one batch row.
        return memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask,
                                          scale=scale)[0]


@tensor_cache(maxsize=16)
def _block_diagonal_mask(bounds: tuple[int, ...]):
    """xformers' mask for one packing (cached: its seqstart tensor is built from host lengths,
    so a sampling loop does not rebuild and copy it in every layer and step)."""
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    # Empty sequences hold no tokens, and the mask expects positive lengths.
    return BlockDiagonalMask.from_seqlens([b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a])


class TritonVarlenAttention(_VarlenBackend):
    """Ours: flexikern.kernels.varlen_attention (FA2 forward and backward in Triton). CUDA, or
    CPU tensors under TRITON_INTERPRET=1 when forced."""

    name = "triton"
    requires = ("triton",)
    auto_on_cpu = False
    max_head_dim, head_dim_multiple = 128, 8  # the kernel's MAX_HEAD_DIM; tiles pad to pow2

    def not_supported_reasons(self, **inputs) -> list[str]:
        if inputs["q"].device.type == "cpu" and not triton_interpreting():
            return ["CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"]
        return super().not_supported_reasons(**inputs)

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
        out, _ = torch.ops.flexikern.varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale)
        return out


# Our Triton kernels (flexikern.kernels.varlen_attention) as torch.library custom ops with fake
# kernels, so torch.compile keeps each as one opaque call: `flexikern::varlen_attention_triton`,
# the FA2 forward, returning the output and the logsumexp it saves; and
# `flexikern::varlen_attention_triton_backward`, the backward from the saved output and
# logsumexp. Differentiable in q, k and v.


def _allocated_like(t: torch.Tensor) -> torch.Tensor:
    """The fake of a buffer the launches allocate with `empty_like` of `t` as they read it: `t`
    itself when its head_dim is contiguous (with head_dim a multiple of 8 that fits them), else a
    contiguous copy (`flexikern.kernels.varlen_attention._aligned`)."""
    return torch.empty_like(t) if t.stride(-1) == 1 else t.new_empty(t.shape)


@torch.library.custom_op(
    "flexikern::varlen_attention_triton", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, int max_seqlen, float? scale) "
           "-> (Tensor, Tensor)")
def _varlen_attention_op(q, k, v, cu_seqlens, max_seqlen, scale):
    """(out (total, heads, head_dim), lse (heads, total) fp32): the forward kernel."""
    from flexikern.kernels.varlen_attention import varlen_attention_forward
    return varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale,
                                    interpret=triton_interpreting())


@_varlen_attention_op.register_fake
def _varlen_attention_fake(q, k, v, cu_seqlens, max_seqlen, scale):
    total, heads, _ = q.shape
    return _allocated_like(q), q.new_empty((heads, total), dtype=torch.float32)


@torch.library.custom_op(
    "flexikern::varlen_attention_triton_backward", mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
           "Tensor cu_seqlens, int max_seqlen, float? scale) -> (Tensor, Tensor, Tensor)")
def _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    """(dq, dk, dv) of `flexikern::varlen_attention_triton` (FA2's backward)."""
    from flexikern.kernels.varlen_attention import varlen_attention_backward
    return varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale,
                                     interpret=triton_interpreting())


@_varlen_attention_backward_op.register_fake
def _varlen_attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return _allocated_like(q), _allocated_like(k), _allocated_like(v)


def _varlen_attention_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _varlen_attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.flexikern.varlen_attention_triton_backward(
        dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_attention_op.register_autograd(_varlen_attention_backward,
                                       setup_context=_varlen_attention_setup)


@tensor_cache(maxsize=16)
def _document_block_mask(bounds: tuple[int, ...], device: torch.device):
    """FlexAttention's block mask for one packing (cached: a sampling loop reuses its packing
    in every layer and step)."""
    from torch.nn.attention.flex_attention import create_block_mask
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    sequence_of = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def same_sequence(batch, head, q_index, kv_index):
        return sequence_of[q_index] == sequence_of[kv_index]

    return create_block_mask(same_sequence, None, None, bounds[-1], bounds[-1], device=device)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


class FlexVarlenAttention(_VarlenBackend):
    """FlexAttention with a document mask: compiled on CUDA; eager and forward-only on CPU."""

    name = "flex"
    requires = ("torch.nn.attention.flex_attention",)
    auto_on_cpu = False  # eager on CPU materialises the total x total scores
    reads_cu_seqlens_on_host = True  # the block mask is looked up by the boundaries' values

    def not_supported_reasons(self, **inputs) -> list[str]:
        reasons = super().not_supported_reasons(**inputs)
        q = inputs["q"]
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(
                inputs[name].requires_grad for name in ("q", "k", "v")):
            reasons.append("FlexAttention has no backward on CPU (inputs require grad)")
        if q.device.type == "cuda":
            try:
                import triton  # noqa: F401  (torch.compile's CUDA code generator)
            except ImportError as e:
                reasons.append(f"compiling FlexAttention on CUDA needs triton ({e})")
        return reasons

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, scale=None, cu_seqlens_host=None):
        mask = _document_block_mask(_host_bounds(cu_seqlens, cu_seqlens_host), q.device)
        # FlexAttention takes (batch, heads, tokens, head_dim): one batch row of packed tokens.
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        if q.device.type == "cuda":
            out = _compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale)
        else:
            from torch.nn.attention.flex_attention import flex_attention
            with warnings.catch_warnings():  # eager on CPU is this backend's declared choice
                warnings.filterwarnings("ignore", message=".*without torch.compile")
                out = flex_attention(q, k, v, block_mask=mask, scale=scale)
        return out[0].transpose(0, 1).contiguous()


class TorchReferenceVarlenAttention(_VarlenBackend):
    """The reference: SDPA per sequence. Runs everything; last, as the fallback."""

    name = "torch"
    reads_cu_seqlens_on_host = True  # a Python loop over the sequences

    def __call__(self, **inputs):
        return varlen_attention_reference(**inputs)


VARLEN_ATTENTION_BACKENDS = (FlashAttnVarlenAttention(), TorchVarlenAttention(),
                             XformersVarlenAttention(), TritonVarlenAttention(),
                             FlexVarlenAttention(), TorchReferenceVarlenAttention())
