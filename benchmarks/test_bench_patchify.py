"""patchify / unpatchify: the extension (flexikern._C) against the torch reference
(reshape + permute + contiguous), as bandwidth against the device copy.

    pytest benchmarks/test_bench_patchify.py

Timing and regimes: benchmarks/_timing.py (CUDA events, median of rounds of many calls).
* past_l2: batch sized so that a call moves >= 8x the L2 cache (`_timing.past_l2_batch`): DiT's
  4x32x32 latent at p=2 and p=4, and a video latent 16x16x64x64 (C, F, H, W) at (1, 2, 2) and
  (2, 2, 2). These GB/s are DRAM bandwidth.
* graph / eager: DiT-XL/2's batch of 32 latents at p=2 and p=4, captured in a CUDA graph of
  `_timing.GRAPH_CALLS` calls (the per-call device time inside a graphed step; L2-resident) or
  eager (per-call cost with dispatch and launch).
unpatchify runs on the de-embedded tokens of DiT's learn_sigma output (8 channels per pixel).
bf16 on CUDA; on CPU fp32 at tiny sizes, a smoke test.

Every row's extra_info: bytes moved per call (read + write), achieved GB/s, the copy's GB/s in the
same run and `fraction_of_copy` (see `_timing.record`).
"""

from __future__ import annotations

import math

import pytest
import torch

import _timing
import flexikern.ops as ops
from _timing import CUDA, DEVICE, REGIMES
from flexikern import _ext

pytestmark = _timing.MARK

if CUDA:
    DTYPE, DIT_BATCH, IMAGE, VIDEO = torch.bfloat16, 32, (4, 32, 32), (16, 16, 64, 64)
else:
    DTYPE, DIT_BATCH, IMAGE, VIDEO = torch.float32, 2, (4, 32, 32), (4, 4, 16, 16)
OUT_CHANNELS = 8   # DiT's learn_sigma output: 2 x 4 channels
ELEMENT = torch.finfo(DTYPE).bits // 8
PROVIDERS = ["ext", "torch"]
# (per-item shape (C, *size), patch, regime)
CASES = ([(IMAGE, (p, p), regime) for p in (2, 4) for regime in REGIMES]
         + [(VIDEO, patch, "past_l2") for patch in ((1, 2, 2), (2, 2, 2))])


def _id(case) -> str:
    item, patch, regime = case
    return f"{regime}-{'x'.join(map(str, item))}-p{''.join(map(str, patch))}"


def _batch(regime: str, bytes_per_item: int) -> int:
    return _timing.past_l2_batch(bytes_per_item) if regime == "past_l2" else DIT_BATCH


def _skip_unless_runnable(provider: str, op: str, **inputs) -> None:
    backend = next(b for b in ops.backends(op) if b.name == provider)
    reasons = backend.not_supported_reasons(**inputs)
    if reasons:
        pytest.skip(f"{provider}: {'; '.join(reasons)}")


def _time(benchmark, provider: str, op: str, regime: str, call, moved: int, **info) -> None:
    """Time `call` (one op call, forced to `provider`) in `regime` and record its bandwidth."""
    benchmark.group = f"{op} {regime} {info['shape']} p={info['patch']}"
    with torch.no_grad():
        timing = _timing.run_regime(benchmark, regime, call)
    _timing.record(benchmark, timing, bytes_moved=moved, suite="patchify", op=op, provider=provider,
                   regime=regime, dtype=str(DTYPE).replace("torch.", ""),
                   build=_ext.build_info().get("cuda_archs"), **info)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_patchify(benchmark, provider, case):
    item, patch, regime = case
    n = _batch(regime, 2 * math.prod(item) * ELEMENT)   # read the latent, write its tokens
    x = torch.randn(n, *item, device=DEVICE, dtype=DTYPE)
    _skip_unless_runnable(provider, "patchify", x=x, patch_size=patch)

    def call():
        with ops.use_backend(patchify=provider):
            # The torch backend may return a view for trivial patches; a model needs dense tokens.
            return ops.patchify(x, patch).contiguous()

    _time(benchmark, provider, "patchify", regime, call, 2 * x.numel() * ELEMENT,
          shape=str((n, *item)), patch=str(patch), batch=n)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_unpatchify(benchmark, provider, case):
    (_, *size), patch, regime = case
    image = (OUT_CHANNELS, *size)
    n = _batch(regime, 2 * math.prod(image) * ELEMENT)
    tokens = ops.patchify(torch.randn(n, *image, device=DEVICE, dtype=DTYPE), patch).contiguous()
    _skip_unless_runnable(provider, "unpatchify", tokens=tokens, patch_size=patch, size=tuple(size))

    def call():
        with ops.use_backend(unpatchify=provider):
            return ops.unpatchify(tokens, patch, tuple(size)).contiguous()

    _time(benchmark, provider, "unpatchify", regime, call, 2 * tokens.numel() * ELEMENT,
          shape=str((n, *image)), patch=str(patch), batch=n)

