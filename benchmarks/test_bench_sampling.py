"""Wall time follows FLOPs: the static schedule vs weak-first schedules at <= 0.6 of its FLOPs.

CPU (default; one thread, see conftest.py): a DiT-S/2-shaped FlexiDiT (depth 12, width 384, 6 heads,
32x32x4 latent, patch sizes (2, 4), LoRA, random weights), batch 2 with flexi guidance, 10 DDPM
steps. With CUDA: 50 steps, batch 8. The issue asks for a >= 1.5x speed-up at <= 0.6 relative FLOPs.

On CPU the timer is the process's CPU time: the development machine is shared by several
engineers, and with one thread CPU time is the wall time of an idle machine without the time
other processes take (wall times vary 2x between rounds there). Wall times are printed too. On
CUDA the timer is wall time with the device synchronised.

    pytest benchmarks/test_bench_sampling.py -s --benchmark-columns=min,median,max
"""

from __future__ import annotations

import time

import pytest
import torch

import _timing
from _results import device_name
from _timing import CUDA, DEVICE
from flexikern.diffusion import Guidance, Schedule, sample
from flexikern.models import FlexiDiT

STEPS, BATCH = (50, 8) if CUDA else (10, 2)
TIMER = time.perf_counter if CUDA else time.process_time
GUIDANCE = Guidance(1.5, "flexi")
RESULTS: dict[str, tuple[float, float]] = {}   # name -> (best timer seconds, best wall seconds)

SCHEDULES = {
    "static": lambda m: Schedule.static(STEPS, 2),
    # for_budget spends the budget on the most powerful steps: here weak guidance, powerful
    # conditional, i.e. two forwards of different sizes (batch 2 each) per step.
    "budget_0.6": lambda m: Schedule.for_budget(m, STEPS, 0.6),
    # x/x: both branches share a size at every step, so each step is one batched forward (batch 4).
    "budget_0.6_equal": lambda m: Schedule.for_budget(m, STEPS, 0.6, equal_branches=True),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = FlexiDiT.from_config("DiT-S/2", input_size=32, patch_sizes=(2, 4), adapter="lora")
    with torch.no_grad():   # DiT zero-initialises the output; random weights keep the work honest
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return m.to(DEVICE).eval()


def _run(model, schedule, walls):
    start = time.perf_counter()
    out = sample(model, list(range(BATCH)), schedule, GUIDANCE, seed=0, progress=False)
    _timing.sync()
    walls.append(time.perf_counter() - start)
    return out


@pytest.mark.benchmark(timer=TIMER)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sampling_time(benchmark, model, name):
    schedule = SCHEDULES[name](model)
    relative = schedule.relative_flops(model)
    assert relative <= (1.0 if name == "static" else 0.6)
    # Warm-up: every (size, batch) the schedules use, so first-call kernel set-up is not timed.
    _run(model, Schedule.from_list([2, 4, 2], guidance=[2, 4, 4]), [])
    walls: list[float] = []
    benchmark.pedantic(_run, args=(model, schedule, walls), rounds=2, iterations=1, warmup_rounds=0)
    best = benchmark.stats.stats.min
    RESULTS[name] = (best, min(walls))
    benchmark.extra_info.update(suite="sampling", smoke=_timing.SMOKE, schedule=repr(schedule),
                                relative_flops=relative, steps=STEPS, batch=BATCH,
                                timer="wall" if CUDA else "process CPU time, 1 thread", wall_min_s=min(walls),
                                device=device_name())
    timer = "wall" if CUDA else "CPU"
    print(f"\n{name}: {schedule!r}, relative FLOPs {relative:.3f}, {timer} time {best:.3f} s, "
          f"wall {min(walls):.3f} s")
    if name != "static" and "static" in RESULTS:
        speedup = RESULTS["static"][0] / best
        benchmark.extra_info["speedup_vs_static"] = speedup
        print(f"speed-up static / {name}: {speedup:.2f}x {timer} time, "
              f"{RESULTS['static'][1] / min(walls):.2f}x wall (FLOPs ratio {1 / relative:.2f}x; target >= 1.5x)")
