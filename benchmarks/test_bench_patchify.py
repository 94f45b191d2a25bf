"""patchify / unpatchify: the extension (flexikern._C) against the torch reference
(reshape + permute + contiguous), as achieved bandwidth against a device-to-device copy.

    pytest benchmarks/test_bench_patchify.py --benchmark-only

On CUDA: DiT-XL/2's latent (batch 32 and 64, 4 x 32 x 32, p = 2 and 4) for patchify, its
1152-wide model's de-embedded tokens (8 channels: learn_sigma) for unpatchify, and a video
latent (4, 16, 16, 64, 64) with patches (1, 2, 2) and (2, 2, 2), bf16. On CPU: tiny shapes, fp32.
Every row's extra_info holds bytes moved (read + written), achieved GB/s, the GB/s of
`torch.empty_like(x).copy_(x)` on the same bytes, measured in the same run, and the fraction of it
reached. No GPU number is recorded in this file.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

import flexikern.ops as ops
from flexikern import _ext

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    DTYPE, ROUNDS, WARMUP = torch.bfloat16, 50, 5
    IMAGE_CASES = [((n, 4, 32, 32), (p, p)) for n in (32, 64) for p in (2, 4)]
    VIDEO_CASES = [((4, 16, 16, 64, 64), (1, 2, 2)), ((4, 16, 16, 64, 64), (2, 2, 2))]
    OUT_CHANNELS = 8
else:
    DTYPE, ROUNDS, WARMUP = torch.float32, 10, 2
    IMAGE_CASES = [((4, 4, 32, 32), (2, 2)), ((4, 4, 32, 32), (4, 4))]
    VIDEO_CASES = [((1, 4, 4, 16, 16), (1, 2, 2))]
    OUT_CHANNELS = 8
PROVIDERS = ["ext", "torch"]
_COPY_CACHE: dict[tuple, float] = {}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _skip_unless_runnable(provider: str, op: str, **inputs) -> None:
    backend = next(b for b in ops.backends(op) if b.name == provider)
    reasons = backend.not_supported_reasons(**inputs)
    if reasons:
        pytest.skip(f"{provider}: {'; '.join(reasons)}")


def copy_bandwidth(x: torch.Tensor) -> float:
    """Bytes/s of a device-to-device copy of `x` (read + write), the roof for a permutation."""
    key = (tuple(x.shape), x.dtype, x.device.type)
    if key not in _COPY_CACHE:
        out = torch.empty_like(x)
        times = []
        for i in range(WARMUP + ROUNDS):
            _sync()
            start = time.perf_counter()
            out.copy_(x)
            _sync()
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        _COPY_CACHE[key] = 2 * x.numel() * x.element_size() / statistics.median(times)
    return _COPY_CACHE[key]


def _run(benchmark, provider: str, op: str, fn, x: torch.Tensor, **info) -> None:
    def step():
        fn()
        _sync()

    with ops.use_backend(**{op: provider}):
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    moved = 2 * x.numel() * x.element_size()
    median = benchmark.stats.stats.median
    copy = copy_bandwidth(x)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE), op=op,
        provider=provider, build=_ext.build_info().get("cuda_archs"), bytes_moved=moved,
        achieved_gb_s=moved / median / 1e9, copy_gb_s=copy / 1e9,
        fraction_of_copy=moved / median / copy, **info)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # The torch backend may return a view for trivial patches; a model needs dense tokens.
    return t.contiguous()


@pytest.mark.parametrize("shape,patch", IMAGE_CASES + VIDEO_CASES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_patchify(benchmark, provider, shape, patch):
    x = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    _skip_unless_runnable(provider, "patchify", x=x, patch_size=patch)
    benchmark.group = f"patchify {shape} p={patch}"
    _run(benchmark, provider, "patchify", lambda: _contiguous(ops.patchify(x, patch)), x,
         shape=str(shape), patch=str(patch))


@pytest.mark.parametrize("shape,patch", IMAGE_CASES + VIDEO_CASES, ids=str)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_unpatchify(benchmark, provider, shape, patch):
    # The de-embedded output: OUT_CHANNELS per pixel (DiT's learn_sigma doubles 4 -> 8).
    n, _, *size = shape
    image_shape = (n, OUT_CHANNELS, *size)
    tokens = ops.patchify(torch.randn(image_shape, device=DEVICE, dtype=DTYPE), patch).contiguous()
    _skip_unless_runnable(provider, "unpatchify", tokens=tokens, patch_size=patch, size=size)
    benchmark.group = f"unpatchify {tuple(tokens.shape)} p={patch}"
    _run(benchmark, provider, "unpatchify",
         lambda: _contiguous(ops.unpatchify(tokens, patch, tuple(size))), tokens,
         shape=str(image_shape), patch=str(patch))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_patchify_packed(benchmark, provider):
    # FlexiDiT's guidance step: conditional at p=2 and guidance at p=4, packed together.
    n = IMAGE_CASES[0][0][0]
    xs = [torch.randn(n, 4, 32, 32, device=DEVICE, dtype=DTYPE) for _ in range(2)]
    patches = [(2, 2), (4, 4)]
    _skip_unless_runnable(provider, "patchify_packed", xs=xs, patch_sizes=patches)
    benchmark.group = f"patchify_packed 2x{tuple(xs[0].shape)} p=2+4"
    _run(benchmark, provider, "patchify_packed", lambda: ops.patchify_packed(xs, patches),
         torch.cat(xs), shape=str(tuple(xs[0].shape)), patch="2+4")
