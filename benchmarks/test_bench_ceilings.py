"""The two ceilings every other figure is compared with, as rows of their own.

    pytest benchmarks/test_bench_ceilings.py

* `test_bench_copy`: `dst.copy_(src)` on the device, moving `_timing.STREAM_BYTES` per call
  (read + write; >= 8x the L2 cache on CUDA): the DRAM bandwidth a memory-bound op can reach.
* `test_bench_gemm`: `F.linear` at DiT-XL/2's MLP shape for a guided batch of 32 in bf16,
  `_timing.GEMM_SHAPE`: the matmul rate the model and attention are compared with.

Both are timed like every other row (`_timing.run`). Every row of every suite also carries the
ceilings as measured once in its own process (`_timing.copy_bandwidth()`, `_timing.gemm_rate()`),
so here `fraction_of_copy` / `fraction_of_gemm` compare two measurements of the same call: a check
that the timing repeats (expect ~1.0). On CPU: tiny sizes, smoke test only.
"""

from __future__ import annotations

import _timing

pytestmark = _timing.MARK


def test_bench_copy(benchmark):
    fn, moved = _timing.copy_case()
    benchmark.group = "ceilings"
    _timing.record(benchmark, _timing.run(benchmark, fn), bytes_moved=moved, suite="ceiling",
                   op="copy", provider="torch", regime="past_l2", dtype="float32")


def test_bench_gemm(benchmark):
    fn, flops = _timing.gemm_case()
    m, k, n = _timing.GEMM_SHAPE
    benchmark.group = "ceilings"
    _timing.record(benchmark, _timing.run(benchmark, fn), flops=flops, suite="ceiling", op="gemm",
                   provider="torch", shape=f"({m}, {k}) x ({k}, {n})",
                   dtype=str(_timing.GEMM_DTYPE).replace("torch.", ""))
