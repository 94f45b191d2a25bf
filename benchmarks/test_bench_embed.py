"""Throughput of the fused Triton patch_embed / de_embed against plain torch.

    pytest benchmarks/test_bench_embed.py --benchmark-only

On CUDA: DiT-XL/2 shapes (batch 64, 4x32x32 latent, D=1152, 8 output channels with learn_sigma,
the stored kernel at FlexiDiT's largest size 4x4) at p=2 and p=4 in bf16. Providers:
* triton: `flexikern.kernels` through dispatch (one launch per op in the forward);
* torch: the reference, conv2d + flatten + adds (patch_embed) and linear + unpatchify (de_embed),
  each with its small weight resize.
Each row's `extra_info` holds the bytes an ideal kernel must move (read inputs once, write the
output once), the achieved bandwidth for them, and the device-to-device copy bandwidth measured
in the same session, so "fraction_of_copy" says how close to memory-bound the op runs.
On CPU: tiny shapes, torch only (the Triton backend runs CPU tensors only under the interpreter,
which is an emulation, not a speed).
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch

import flexikern.ops as ops
from flexikern.ops._dispatch import triton_interpreting

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    BATCH, CHANNELS, SIZE, WIDTH, OUT_CHANNELS, DTYPE = 64, 4, 32, 1152, 8, torch.bfloat16
    ROUNDS, WARMUP = 50, 5
else:
    BATCH, CHANNELS, SIZE, WIDTH, OUT_CHANNELS, DTYPE = 2, 4, 16, 64, 8, torch.float32
    ROUNDS, WARMUP = 5, 1
STORED_KERNEL = (4, 4)
PATCH_SIZES = [(2, 2), (4, 4)]
PROVIDERS = ["triton", "torch"]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=1)
def copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth, bytes/s (read + write), median of 20 copies."""
    numel = (256 << 20) // 4 if CUDA else (16 << 20) // 4
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        _sync()
        start = time.perf_counter()
        dst.copy_(src)
        _sync()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times[2:])


def _skip_unless_runnable(provider: str) -> None:
    if provider == "triton" and (not CUDA or triton_interpreting()):
        pytest.skip("the Triton backend needs CUDA here: on CPU it runs only under the "
                    "interpreter (TRITON_INTERPRET=1), an emulation whose speed means nothing")


def _bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _run(benchmark, provider: str, op: str, inputs: dict, mode: str, moved: int) -> None:
    """Time `op` forced to `provider` (forward, or forward + backward), record bandwidths."""
    grad_inputs = [v for v in inputs.values() if torch.is_tensor(v) and v.requires_grad]

    def step():
        with ops.use_backend(**{op: provider}):
            out = getattr(ops, op)(**inputs)
        if mode == "forward+backward":
            torch.autograd.grad(out, grad_inputs, grad_output)
        _sync()

    with torch.no_grad() if mode == "forward" else torch.enable_grad():
        with ops.use_backend(**{op: provider}):
            grad_output = torch.randn_like(getattr(ops, op)(**inputs))
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    median = benchmark.stats.stats.median
    copy = copy_bandwidth()
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE), op=op,
        provider=provider, mode=mode, batch=BATCH, width=WIDTH, bytes_moved=moved,
        achieved_gb_s=moved / median / 1e9, copy_gb_s=copy / 1e9,
        fraction_of_copy=moved / median / copy)


def _param(*shape, requires_grad: bool) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("patch", PATCH_SIZES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_patch_embed(benchmark, provider, patch, mode):
    _skip_unless_runnable(provider)
    grad = mode != "forward"
    tokens = (SIZE // patch[0]) * (SIZE // patch[1])
    inputs = dict(x=_param(BATCH, CHANNELS, SIZE, SIZE, requires_grad=grad),
                  weight=_param(WIDTH, CHANNELS, *STORED_KERNEL, requires_grad=grad),
                  bias=_param(WIDTH, requires_grad=grad), patch_size=patch,
                  pos_embed=_param(tokens, WIDTH, requires_grad=False),
                  size_embed=_param(WIDTH, requires_grad=grad))
    out_bytes = BATCH * tokens * WIDTH * torch.finfo(DTYPE).bits // 8
    moved = _bytes(inputs["x"], inputs["weight"], inputs["pos_embed"]) + out_bytes
    if grad:  # read grad_out and x again, write grad x (parameter grads are tiny)
        moved += out_bytes + 2 * _bytes(inputs["x"])
    benchmark.group = f"patch_embed {mode} p={patch}"
    _run(benchmark, provider, "patch_embed", inputs, mode, moved)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("patch", PATCH_SIZES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_de_embed(benchmark, provider, patch, mode):
    _skip_unless_runnable(provider)
    grad = mode != "forward"
    tokens = (SIZE // patch[0]) * (SIZE // patch[1])
    stored = STORED_KERNEL[0] * STORED_KERNEL[1] * OUT_CHANNELS
    inputs = dict(x=_param(BATCH, tokens, WIDTH, requires_grad=grad),
                  weight=_param(stored, WIDTH, requires_grad=grad),
                  bias=_param(stored, requires_grad=grad), kernel_size=STORED_KERNEL,
                  patch_size=patch, size=(SIZE, SIZE))
    image_bytes = BATCH * OUT_CHANNELS * SIZE * SIZE * torch.finfo(DTYPE).bits // 8
    moved = _bytes(inputs["x"], inputs["weight"]) + image_bytes
    if grad:  # read grad image and the tokens (weight grad), write grad tokens
        moved += image_bytes + 2 * _bytes(inputs["x"])
    benchmark.group = f"de_embed {mode} p={patch}"
    _run(benchmark, provider, "de_embed", inputs, mode, moved)
