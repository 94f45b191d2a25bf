"""Packed (varlen) attention: our Triton kernel against every backend, and packing against the
alternatives, for FlexiDiT's guidance step.

    pytest benchmarks/test_bench_attention.py

Shapes (CUDA): DiT-XL/2's attention, head_dim 72, 16 heads, bf16, 32 image pairs each packed as a
256-token (p=2, the powerful conditional branch) and a 64-token (p=4, the weak guidance branch)
sequence: 10240 tokens, 64 sequences.

(a) `test_bench_varlen_backends`: `fk.ops.varlen_attention` forced to each backend, forward and
    forward+backward. Rows that a backend cannot run skip with its reasons; these rows are what
    confirm or reorder the backend priority in flexikern/ops/varlen_attention.py.
(b) `test_bench_guidance_attention`: ONE attention layer of one guidance step (the model runs 28;
    test_bench_e2e.py times whole steps), forward, three ways:
    * packed: one varlen call over the 32 x (256 + 64) tokens (per backend);
    * separate: two batched SDPA calls, (32, 256) and (32, 64), as two model passes would;
    * padded: the weak branch padded to 256 tokens, one SDPA call on (64, 256) with a
      key-padding mask (what a packed batch costs without a varlen kernel).
    Each starts from the layout its model would produce (a fused qkv projection) and ends with
    (tokens, heads * head_dim) ready for the output projection.

No host sync in the timed calls: the public op validates cu_seqlens by reading it on the host
(a sync per call), so the varlen calls pass `cu_seqlens_host=` (the boundaries as a tuple, read
once at set-up) when `ops.varlen_attention` takes it, and otherwise call the dispatcher directly,
i.e. what runs after that validation (`entry` in extra_info says which). Backends that need the
boundaries on the host (`reads_cu_seqlens_on_host`: flex, torch, xformers) take them from
`cu_seqlens_host`; only on the fallback path do they read cu_seqlens back (a sync per call).
Timing: benchmarks/_timing.py (CUDA events, median of rounds of many calls).

Every row's extra_info: the useful attention FLOPs (4 * sum(L^2) * heads * head_dim for the
forward, 2.5x that more for the backward), the FLOPs computed (padding included), achieved
TFLOP/s and `fraction_of_gemm` (against the bf16 GEMM measured in the same run). FlexAttention
rows run last in the session (`late`): their first call compiles for tens of seconds. On CPU: tiny
shapes with the backends that run there (the torch reference and FlexAttention, forward only);
our Triton kernel runs CPU tensors only under the interpreter, so its rows skip.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
import torch.nn.functional as F

import _timing
import flexikern.ops as ops
from _timing import CUDA, DEVICE
from flexikern.ops._dispatch import dispatch, triton_interpreting

pytestmark = _timing.MARK

if CUDA:
    PAIRS, HEADS, HEAD_DIM, POWERFUL, WEAK, DTYPE = 32, 16, 72, 256, 64, torch.bfloat16
else:
    PAIRS, HEADS, HEAD_DIM, POWERFUL, WEAK, DTYPE = 2, 2, 72, 64, 16, torch.float32
LENGTHS = [POWERFUL, WEAK] * PAIRS  # each pair: conditional (powerful) + guidance (weak)
BACKENDS = [b.name for b in ops.backends("varlen_attention")]
COMPILES_FIRST = {"flex"}           # first call compiles (torch.compile): run after everything else
HOST_ARGUMENT = "cu_seqlens_host" in inspect.signature(ops.varlen_attention).parameters


def _backend_param(name: str, value=None):
    return pytest.param(value or name, marks=[pytest.mark.late] if name in COMPILES_FIRST else [],
                        id=value or name)


def _attention_flops(lengths, backward: bool = False) -> float:
    forward = sum(4.0 * n * n * HEADS * HEAD_DIM for n in lengths)  # QK^T and PV, 2 FLOPs/MAC
    return forward * (3.5 if backward else 1.0)  # the backward is ~2.5x the forward


def _skip_unless_runs(name: str, inputs: dict, grad: bool) -> None:
    if name == "triton" and (not CUDA or triton_interpreting()):
        pytest.skip("the Triton backend needs CUDA here: on CPU it runs only under the "
                    "interpreter (TRITON_INTERPRET=1), an emulation whose speed means nothing")
    backend = ops.backends("varlen_attention")[BACKENDS.index(name)]
    probe = dict(inputs)
    if grad:
        probe.update({k: probe[k].detach().requires_grad_() for k in ("q", "k", "v")})
    with torch.enable_grad() if grad else torch.no_grad():
        reasons = backend.not_supported_reasons(**probe)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")


def _varlen(name: str, inputs: dict):
    """(one varlen call forced to backend `name` without a host sync of our own, how it enters)."""
    if HOST_ARGUMENT:
        host = tuple(int(b) for b in inputs["cu_seqlens"].tolist())   # once, at set-up

        def call():
            with ops.use_backend(varlen_attention=name):
                return ops.varlen_attention(**inputs, cu_seqlens_host=host)
        return call, "ops.varlen_attention(cu_seqlens_host=...)"

    def call():   # what ops.varlen_attention runs after its validation (which syncs)
        with ops.use_backend(varlen_attention=name):
            return dispatch("varlen_attention", **inputs)
    return call, "dispatch after validation"


def _record(benchmark, timing, flops_useful: float, flops_computed: float, **info) -> None:
    _timing.record(benchmark, timing, flops=flops_useful, suite="attention",
                   dtype=str(DTYPE).replace("torch.", ""), pairs=PAIRS, heads=HEADS,
                   head_dim=HEAD_DIM, lengths=f"{POWERFUL}+{WEAK}",
                   computed_gflop=flops_computed / 1e9, **info)


def _packed_qkv(requires_grad: bool = False) -> dict:
    """varlen inputs as the packed model makes them: slices of one (total, 3, heads, head_dim)."""
    total = sum(LENGTHS)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    q, k, v = (qkv[:, i].detach().requires_grad_(requires_grad) for i in range(3))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32,
                              device=DEVICE)
    return dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max(LENGTHS), scale=None)


def _reads_on_host(name: str) -> bool:
    backend = ops.backends("varlen_attention")[BACKENDS.index(name)]
    return bool(getattr(backend, "reads_cu_seqlens_on_host", False))


# --- (a) backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("name", [_backend_param(n) for n in BACKENDS])
def test_bench_varlen_backends(benchmark, name, mode):
    grad = mode != "forward"
    inputs = _packed_qkv(requires_grad=grad)
    _skip_unless_runs(name, inputs, grad)
    leaves = [inputs[k] for k in ("q", "k", "v")]
    dout = torch.randn_like(inputs["q"])
    attention, entry = _varlen(name, inputs)

    def step():
        out = attention()
        if grad:
            torch.autograd.grad(out, leaves, dout)

    benchmark.group = f"varlen_attention {mode}"
    with torch.enable_grad() if grad else torch.no_grad():
        timing = _timing.run(benchmark, step)
    flops = _attention_flops(LENGTHS, backward=grad)
    _record(benchmark, timing, flops, flops, provider=name, mode=mode, entry=entry,
            reads_cu_seqlens_on_host=_reads_on_host(name))


# --- (b) one guidance step's attention: packed vs separate vs padded ---------------------------


def _to_tokens(out: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim) for the projection."""
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], HEADS * HEAD_DIM)


def _batched_qkv(batch: int, tokens: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)


def _sdpa(qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (batch, heads, tokens, dim)
    return _to_tokens(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


STRATEGIES = [_backend_param(name, f"packed:{name}") for name in BACKENDS] + ["separate", "padded"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bench_guidance_attention(benchmark, strategy):
    useful = _attention_flops(LENGTHS)
    computed = useful
    info = {}
    if strategy.startswith("packed:"):
        name = strategy.split(":", 1)[1]
        inputs = _packed_qkv()
        _skip_unless_runs(name, inputs, grad=False)
        attention, entry = _varlen(name, inputs)
        info = dict(entry=entry, reads_cu_seqlens_on_host=_reads_on_host(name))

        def step():
            out = attention()
            return out.reshape(out.shape[0], HEADS * HEAD_DIM)
    elif strategy == "separate":
        powerful, weak = _batched_qkv(PAIRS, POWERFUL), _batched_qkv(PAIRS, WEAK)

        def step():
            return _sdpa(powerful), _sdpa(weak)
    else:  # padded: both branches in one (2 * PAIRS, POWERFUL) batch, weak keys masked
        qkv = _batched_qkv(2 * PAIRS, POWERFUL)
        lengths = torch.tensor(LENGTHS, device=DEVICE)
        keep = torch.arange(POWERFUL, device=DEVICE)[None, :] < lengths[:, None]
        mask = keep[:, None, None, :]  # (batch, 1, 1, keys): padding keys are never attended
        computed = _attention_flops([POWERFUL] * len(LENGTHS))

        def step():
            return _sdpa(qkv, mask)

    benchmark.group = "one guidance step, one attention layer (forward)"
    with torch.no_grad():
        timing = _timing.run(benchmark, step)
    _record(benchmark, timing, useful, computed, strategy=strategy, mode="forward",
            wasted_fraction=1.0 - useful / computed, **info)
