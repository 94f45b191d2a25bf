"""Packed (varlen) attention: our Triton kernel against every backend, and packing against the
alternatives, for FlexiDiT's guidance step.

    pytest benchmarks/test_bench_attention.py --benchmark-only

(a) `test_bench_varlen_backends`: `fk.ops.varlen_attention` forced to each backend, forward and
    forward+backward, at DiT-XL/2 shapes on CUDA: head_dim 72, 16 heads, 32 image pairs each
    packed as a 256-token (p=2, the powerful conditional branch) and a 64-token (p=4, the weak
    guidance branch) sequence, bf16. Rows that a backend cannot run skip with its reasons; these
    rows are what confirm or reorder the backend priority in flexikern/ops/varlen_attention.py.
(b) `test_bench_guidance_attention`: ONE attention layer of one guidance step (the model runs
    28 of them; the lead's model benchmark times whole steps), three ways:
    * packed: one varlen call over the 32 x (256 + 64) tokens (per backend);
    * separate: two batched SDPA calls, (32, 256) and (32, 64), as two model passes would;
    * padded: the weak branch padded to 256 tokens, one SDPA call on (64, 256) with a
      key-padding mask (what a packed batch costs without a varlen kernel).
    Each starts from the layout its model would produce (a fused qkv projection) and ends with
    (tokens, heads * head_dim) ready for the output projection.

Every row's extra_info holds the useful attention FLOPs (4 * sum(L^2) * heads * head_dim for the
forward, 2.5x that for the backward), the FLOPs actually computed (padding included) and the
achieved TFLOP/s. On CPU: tiny shapes with the backends that run there (the torch reference and
FlexAttention, forward only); our Triton kernel runs CPU tensors only under the interpreter, an
emulation whose speed means nothing, so its rows skip. No GPU number is recorded in this file.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import flexikern.ops as ops
from flexikern.ops._dispatch import triton_interpreting

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    PAIRS, HEADS, HEAD_DIM, POWERFUL, WEAK, DTYPE = 32, 16, 72, 256, 64, torch.bfloat16
    ROUNDS, WARMUP = 30, 5
else:
    PAIRS, HEADS, HEAD_DIM, POWERFUL, WEAK, DTYPE = 2, 2, 72, 64, 16, torch.float32
    ROUNDS, WARMUP = 5, 1
BACKENDS = [b.name for b in ops.backends("varlen_attention")]
LENGTHS = [POWERFUL, WEAK] * PAIRS  # each pair: conditional (powerful) + guidance (weak)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


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
    reasons = backend.not_supported_reasons(**probe)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")


def _record(benchmark, flops_useful: float, flops_computed: float, **info) -> None:
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed
        return
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE), pairs=PAIRS,
        heads=HEADS, head_dim=HEAD_DIM, lengths=f"{POWERFUL}+{WEAK}",
        useful_gflop=flops_useful / 1e9, computed_gflop=flops_computed / 1e9,
        achieved_tflop_s=flops_useful / median / 1e12, **info)


def _packed_qkv(requires_grad: bool = False) -> dict:
    """varlen inputs as the packed model makes them: slices of one (total, 3, heads, head_dim)."""
    total = sum(LENGTHS)
    qkv = torch.randn(total, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    q, k, v = (qkv[:, i].detach().requires_grad_(requires_grad) for i in range(3))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(LENGTHS)], dtype=torch.int32,
                              device=DEVICE)
    return dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max(LENGTHS), scale=None)


# --- (a) backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("name", BACKENDS)
def test_bench_varlen_backends(benchmark, name, mode):
    grad = mode != "forward"
    inputs = _packed_qkv(requires_grad=grad)
    _skip_unless_runs(name, inputs, grad)
    leaves = [inputs[k] for k in ("q", "k", "v")]
    dout = torch.randn_like(inputs["q"])

    def step():
        with ops.use_backend(varlen_attention=name):
            out = ops.varlen_attention(**inputs)
        if grad:
            torch.autograd.grad(out, leaves, dout)
        _sync()

    benchmark.group = f"varlen_attention {mode}"
    with torch.enable_grad() if grad else torch.no_grad():
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    flops = _attention_flops(LENGTHS, backward=grad)
    _record(benchmark, flops, flops, provider=name, mode=mode)


# --- (b) one guidance step's attention: packed vs separate vs padded ---------------------------


def _to_tokens(out: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim) for the projection."""
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], HEADS * HEAD_DIM)


def _batched_qkv(batch: int, tokens: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)


def _sdpa(qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (batch, heads, tokens, dim)
    return _to_tokens(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


STRATEGIES = [f"packed:{name}" for name in BACKENDS] + ["separate", "padded"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bench_guidance_attention(benchmark, strategy):
    useful = _attention_flops(LENGTHS)
    computed = useful
    if strategy.startswith("packed:"):
        name = strategy.split(":", 1)[1]
        inputs = _packed_qkv()
        _skip_unless_runs(name, inputs, grad=False)

        def step():
            with ops.use_backend(varlen_attention=name):
                out = ops.varlen_attention(**inputs)
            out.reshape(out.shape[0], HEADS * HEAD_DIM)
            _sync()
    elif strategy == "separate":
        powerful, weak = _batched_qkv(PAIRS, POWERFUL), _batched_qkv(PAIRS, WEAK)

        def step():
            _sdpa(powerful)
            _sdpa(weak)
            _sync()
    else:  # padded: both branches in one (2 * PAIRS, POWERFUL) batch, weak keys masked
        qkv = _batched_qkv(2 * PAIRS, POWERFUL)
        lengths = torch.tensor(LENGTHS, device=DEVICE)
        keep = torch.arange(POWERFUL, device=DEVICE)[None, :] < lengths[:, None]
        mask = keep[:, None, None, :]  # (batch, 1, 1, keys): padding keys are never attended
        computed = _attention_flops([POWERFUL] * len(LENGTHS))

        def step():
            _sdpa(qkv, mask)
            _sync()

    benchmark.group = "one guidance step, one attention layer"
    with torch.no_grad():
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    _record(benchmark, useful, computed, strategy=strategy,
            wasted_fraction=1.0 - useful / computed)
