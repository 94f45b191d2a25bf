"""How every micro-benchmark in benchmarks/ is timed, and the two ceilings its figures are compared with.

Timing: `run(benchmark, fn)` times `fn()` with pytest-benchmark's `pedantic` and `TIMER`, which each
suite installs with `pytestmark = _timing.MARK`.

* CUDA: `TIMER` reads the device clock. Each read records a CUDA event on the current stream,
  waits for it, and returns the seconds since the first event. A round is `iterations`
  back-to-back calls of `fn` between two reads, so nothing inside a round waits for the GPU: the
  calls queue as a program would queue them, and the round's time is device time. `iterations`
  is calibrated so that a round lasts about `ROUND_S`, which makes the event resolution (~0.5 us)
  and the one launch gap at a round's start negligible. After `WARMUP_ROUNDS` rounds
  (compilation, autotuning, the allocator), `ROUNDS` rounds are kept; a row's median, q1 and q3
  are over rounds, each round's figure being its time / iterations.
  The host's time to issue a round is logged too: a row whose `host_seconds_per_call` reaches
  its device time is `launch_bound` (the GPU waited for Python; the figure is the launch rate,
  not the kernel's speed).
* CPU (no CUDA): the same rounds with `time.perf_counter`, few of them, at tiny sizes. CPU rows are
  smoke tests of the benchmarks (`smoke=True`); they say nothing about a GPU.

Regimes for memory-bound ops (patchify, patch_embed, de_embed, the copy):
* "past_l2": the batch is sized (`past_l2_batch`) so that one call moves >= `STREAM_BYTES`
  (8x the L2 cache, >= 256 MiB) through DRAM (HBM); eager calls back to back. These GB/s are
  DRAM bandwidth, comparable with the copy's.
* "graph": DiT-XL/2's batch-32 shape, `GRAPH_CALLS` calls captured in one CUDA graph (`graphed`)
  and replayed: the per-call device time without launch overhead, i.e. what the op costs inside
  a graphed sampling step. The data are (mostly) L2-resident, so these GB/s can exceed the copy's.
* "eager": the same shape, eager calls back to back: per-call cost including Python dispatch and
  launch (usually `launch_bound`), what the op costs in an eager step.

Ceilings, each measured once per process (cached) with the same timer, rounds and median:
* `copy_bandwidth()`: bytes/s of `dst.copy_(src)` (read + write), `STREAM_BYTES` moved per call;
* `gemm_rate()`: FLOP/s of `F.linear` in bf16 at DiT-XL/2's MLP shape for a guided batch of 32,
  (16384 tokens, 1152) x (1152, 4608) (fp32 and tiny on CPU).
`record(benchmark, timing, bytes_moved=..., flops=...)` writes a row's figures into its
`extra_info`: achieved GB/s and `fraction_of_copy`, achieved TFLOP/s and `fraction_of_gemm`, with
both ceilings of this run (`copy_gb_s`, `gemm_tflop_s`) in every row.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from _results import device_name

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SMOKE = not CUDA                          # CPU rows are smoke tests, not speeds
if CUDA:
    ROUNDS, WARMUP_ROUNDS, ROUND_S, MAX_ITERATIONS = 20, 2, 2e-3, 10_000
    L2_BYTES = int(getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 0) or 64 << 20)
    STREAM_BYTES = max(8 * L2_BYTES, 256 << 20)
    GEMM_SHAPE, GEMM_DTYPE = (2 * 32 * 256, 1152, 4 * 1152), torch.bfloat16
else:
    ROUNDS, WARMUP_ROUNDS, ROUND_S, MAX_ITERATIONS = 5, 1, 1e-3, 1_000
    L2_BYTES = None
    STREAM_BYTES = 1 << 20
    GEMM_SHAPE, GEMM_DTYPE = (256, 128, 512), torch.float32
GRAPH_CALLS = 100                         # op calls per captured graph in the "graph" regime
REGIMES = ("past_l2", "graph", "eager")


class CudaEventTimer:
    """pytest-benchmark timer on the device clock: seconds since its first read (see above).

    `log` holds (host time on entry, host time on return) of every read, for the host's issue time.
    """

    __name__ = "cuda_event_timer"   # how pytest-benchmark names a timer

    def __init__(self) -> None:
        self._base: torch.cuda.Event | None = None
        self.log: list[tuple[float, float]] = []

    def __call__(self) -> float:
        entered = time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        if self._base is None:
            self._base = event
        self.log.append((entered, time.perf_counter()))
        return self._base.elapsed_time(event) / 1e3


class HostTimer:
    """pytest-benchmark timer on CPU: `time.perf_counter`, with the same `log` as CudaEventTimer."""

    __name__ = "perf_counter"

    def __init__(self) -> None:
        self.log: list[tuple[float, float]] = []

    def __call__(self) -> float:
        now = time.perf_counter()
        self.log.append((now, now))
        return now


TIMER: CudaEventTimer | HostTimer = CudaEventTimer() if CUDA else HostTimer()
MARK = pytest.mark.benchmark(timer=TIMER)
METHOD = (f"CUDA events: median of {ROUNDS} rounds, each a calibrated number of back-to-back calls "
          f"(~{ROUND_S * 1e3:g} ms of device time), after {WARMUP_ROUNDS} warm-up rounds"
          if CUDA else f"perf_counter, {ROUNDS} rounds (CPU smoke test: says nothing about a GPU)")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _round(fn: Callable[[], Any], iterations: int) -> float:
    """Seconds for `iterations` back-to-back calls, read exactly as pytest-benchmark reads TIMER."""
    start = TIMER()
    for _ in range(iterations):
        fn()
    return TIMER() - start


def calibrate(fn: Callable[[], Any]) -> int:
    """Calls per round so that a round lasts about ROUND_S (after one untimed call: compilation)."""
    fn()
    n = 1
    while True:
        elapsed = _round(fn, n)
        if elapsed >= ROUND_S / 4 or n >= MAX_ITERATIONS:
            break
        n = min(n * 10, MAX_ITERATIONS)
    return max(1, min(MAX_ITERATIONS, math.ceil(ROUND_S * n / max(elapsed, 1e-9))))


def measure(fn: Callable[[], Any]) -> float:
    """Median seconds per call, timed as `run` times (for figures that are not rows: the ceilings)."""
    iterations = calibrate(fn)
    for _ in range(WARMUP_ROUNDS):
        _round(fn, iterations)
    return statistics.median(_round(fn, iterations) / iterations for _ in range(ROUNDS))


@dataclass
class Timing:
    """One timed row: seconds per op call (median, q1, q3 over rounds) and how it was obtained."""

    seconds_per_call: float
    q1_per_call: float
    q3_per_call: float
    iterations: int
    calls_per_iteration: int
    host_seconds_per_call: float


def run(benchmark, fn: Callable[[], Any], calls_per_iteration: int = 1) -> Timing | None:
    """Time `fn()` with pytest-benchmark: TIMER, calibrated iterations, ROUNDS rounds.

    `calls_per_iteration`: op calls inside one `fn()` (a graph replay of GRAPH_CALLS calls).
    Returns None under --benchmark-disable (fn then ran once, untimed).
    """
    if getattr(benchmark, "_timer", TIMER) is not TIMER:
        raise RuntimeError("this suite must be marked `pytestmark = _timing.MARK` (the device timer)")
    iterations = calibrate(fn)
    TIMER.log.clear()
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=iterations)
    if not benchmark.stats:
        return None
    stats = benchmark.stats.stats
    reads = TIMER.log[-2 * ROUNDS:]   # (start, end) per timed round; the warm-up rounds come first
    host = statistics.median(end[0] - start[1] for start, end in zip(reads[::2], reads[1::2]))
    calls = iterations * calls_per_iteration
    return Timing(stats.median / calls_per_iteration, stats.q1 / calls_per_iteration,
                  stats.q3 / calls_per_iteration, iterations, calls_per_iteration, host / calls)


def graphed(fn: Callable[[], Any], calls: int = GRAPH_CALLS) -> Callable[[], None]:
    """`calls` back-to-back calls of `fn` captured in one CUDA graph; returns its replay.

    Warms up on a side stream first (compilation, allocator, library workspaces), as CUDA graph
    capture requires. Skips the test, with the error, when `fn` cannot be captured.
    """
    if not CUDA:
        pytest.skip("the graph regime needs CUDA graphs, i.e. a CUDA device")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    stream = torch.cuda.current_stream()
    stream.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as e:
        torch.cuda.set_stream(stream)   # a failed capture_end leaves the capture stream current
        pytest.skip(f"CUDA graph capture failed: {str(e)[:300]}")
    return graph.replay


def run_regime(benchmark, regime: str, call: Callable[[], Any]) -> Timing | None:
    """Time one op call in a regime (see the module docstring): "graph" captures GRAPH_CALLS
    calls and times their replay; "past_l2" and "eager" time eager calls (the caller sizes them)."""
    if regime == "graph":
        return run(benchmark, graphed(call), calls_per_iteration=GRAPH_CALLS)
    return run(benchmark, call)


def past_l2_batch(bytes_per_item: int) -> int:
    """The batch whose calls move >= STREAM_BYTES (DRAM, not cache) at `bytes_per_item` each."""
    return max(1, math.ceil(STREAM_BYTES / bytes_per_item))


# --- the ceilings ------------------------------------------------------------------------------


def copy_case() -> tuple[Callable[[], Any], int]:
    """The device copy: (call, bytes moved per call = read + write = STREAM_BYTES)."""
    src = torch.randn(STREAM_BYTES // 2 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def gemm_case() -> tuple[Callable[[], Any], int]:
    """The reference GEMM: (call, FLOPs per call) for F.linear at GEMM_SHAPE (m, k, n)."""
    m, k, n = GEMM_SHAPE
    x = torch.randn(m, k, device=DEVICE, dtype=GEMM_DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=GEMM_DTYPE) * k ** -0.5
    return (lambda: F.linear(x, w)), 2 * m * k * n


@functools.cache
def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy past L2 (read + write): the roof for memory-bound ops."""
    fn, moved = copy_case()
    return moved / measure(fn)


@functools.cache
def gemm_rate() -> float:
    """FLOP/s of the reference GEMM (GEMM_SHAPE, GEMM_DTYPE): the roof for the model and attention."""
    fn, flops = gemm_case()
    return flops / measure(fn)


def record(benchmark, timing: Timing | None, *, bytes_moved: int | None = None,
           flops: float | None = None, **info: Any) -> None:
    """Write a row's figures into `benchmark.extra_info` (nothing when it was not timed).

    `bytes_moved`: what an ideal kernel reads + writes per call -> achieved_gb_s, fraction_of_copy.
    `flops`: useful FLOPs per call (multiply-add = 2) -> achieved_tflop_s, fraction_of_gemm.
    """
    if timing is None:
        return
    seconds = timing.seconds_per_call
    copy, gemm = copy_bandwidth(), gemm_rate()
    extra: dict[str, Any] = dict(
        device=device_name(), smoke=SMOKE, timing=METHOD, seconds_per_call=seconds,
        q1_per_call=timing.q1_per_call, q3_per_call=timing.q3_per_call,
        iterations=timing.iterations, calls_per_iteration=timing.calls_per_iteration,
        host_seconds_per_call=timing.host_seconds_per_call,
        copy_gb_s=copy / 1e9, gemm_tflop_s=gemm / 1e12, **info)
    if CUDA and timing.calls_per_iteration == 1:
        extra["launch_bound"] = timing.host_seconds_per_call >= 0.9 * seconds
    if bytes_moved is not None:
        extra.update(bytes_moved=int(bytes_moved), achieved_gb_s=bytes_moved / seconds / 1e9,
                     fraction_of_copy=bytes_moved / seconds / copy)
    if flops is not None:
        extra.update(gflop=flops / 1e9, achieved_tflop_s=flops / seconds / 1e12,
                     fraction_of_gemm=flops / seconds / gemm)
    benchmark.extra_info.update(extra)
