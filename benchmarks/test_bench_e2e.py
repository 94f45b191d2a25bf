"""End-to-end sampling throughput (images/s): the plain-PyTorch DiT vs flexikern, eager vs CUDA graphs.

    FLEXIKERN_BENCH_ROWS=e2e.jsonl pytest benchmarks/test_bench_e2e.py && python benchmarks/render.py e2e.jsonl

Providers (all through `fk.sample(..., progress=False)`: the same DDPM loop, noise and guidance):
* reference: the independent plain-PyTorch DiT (`tests/reference_dit.DiT`, SDPA attention), static
  p=2, eager, behind a thin adapter that gives it FlexiDiT's sampling interface;
* static: FlexiDiT with the SAME weights (`FlexiDiT.from_dit`), static p=2, flexikern's kernels;
* flexi_0.6: FlexiDiT with `Schedule.for_budget(model, steps, 0.6, equal_branches=False)` (the
  "most powerful steps" rule: weak p=4 guidance first, so that mixed steps and packing are timed),
  eager, the two branches of a mixed step as two forwards (`packed=False`);
* flexi_0.6+packed: the same, the two branches as ONE packed forward (`packed=True`, varlen attention);
* flexi_0.6+graphs, static+graphs: `cuda_graphs=` a GraphRunner (one graph per phase; inside a
  graph the branches run as two forwards). CUDA only.
* reference+compile: the plain DiT module under `torch.compile(fullgraph=True,
  **COMPILE_REFERENCE)`, the baseline a user would compare against (CUDA: mode
  "max-autotune-no-cudagraphs", autotuned GEMMs and fused kernels);
* flexi_0.6+compile: flexi_0.6 with `fk.sample(..., compile=COMPILE_FLEXI)` (each layout of the
  schedule, three at 10 steps, compiles once; CUDA: inductor's default mode, no autotuning, so
  that three layouts compile within gpu_check's time: against an autotuned baseline that can
  only understate FlexiDiT's ratio; FLEXIKERN_BENCH_COMPILE_MODE sets it); flexi_0.6+compile+graphs:
  the same compiled forwards inside flexikern's CUDA graphs (no further compile). These rows run
  last, and gpu_check runs them in a stage of their own (`-k compile`). CPU: backend "aot_eager"
  for both (traces the same fullgraph, no C++ compile: seconds; a smoke test of the path).
Guidance: `Guidance(1.5, "flexi")` on every step (at equal patch sizes that is DiT's CFG, one
batched forward of 2N).

Rows. CUDA: DiT-XL/2-shaped random weights (28 blocks, width 1152, 16 heads, 1000 classes,
learn_sigma), bf16, 256px = 4x32x32 latents. Batch 32: reference, static, flexi_0.6+graphs,
flexi_0.6, flexi_0.6+packed (the speed-up and GEMM-fraction goals); batch 1: static and
static+graphs (the graphs goal). CPU: a 2-block toy model, fp32, batch 2 (and 1), graph rows skip;
a smoke test that says nothing about a GPU.

Timing: whole sampling runs, host clock (perf_counter) with the device synchronised at the end of
each run (runs last tenths of seconds to seconds). One untimed warm-up run first, in which graphed
providers capture their graphs (`graph_captures`; `graph_captures_timed` must stay 0) and
compiled ones compile (`warmup_s`: that run's seconds, the compile time of a compile row). DiT samples
with 250 DDPM steps; to fit the GPU check the runs take FLEXIKERN_BENCH_STEPS steps (default 10 on
CUDA, 4 on CPU) of the same kind of schedule (`for_budget` at that step count: the same
weak/powerful proportions, its relative FLOPs recorded next to the 250-step one), and images/s is
per-step throughput extrapolated: `images_per_s = batch / (seconds_per_step * 250)`. Set
FLEXIKERN_BENCH_STEPS=250 to time the full schedule.

Each row's extra_info: provider, batch, steps, schedule, relative FLOPs, compile (torch.compile's
arguments or None), warm-up seconds, seconds per step, images/s,
model TFLOP/s (the run's analytic FLOPs, `Schedule.flops`, multiply-add = 2, / its median time) and
`fraction_of_gemm` (/ the bf16 GEMM rate measured in this process, `_timing.gemm_rate`).
`benchmarks/_results.goals` computes the issue's ratios from these rows; `render.py` prints them.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn as nn

import _timing
from _results import TARGET_STEPS, device_name
from _timing import CUDA, DEVICE
from flexikern.diffusion import Guidance, Schedule, sample
from flexikern.models import FlexiDiT
from flexikern.runtime.graphs import GraphRunner
from reference_dit import DiT

if CUDA:
    MODEL_NAME, DTYPE = "DiT-XL/2", torch.bfloat16
    CONFIG = dict(input_size=32, depth=28, hidden_size=1152, num_heads=16, num_classes=1000)
    LARGE, STEPS = 32, int(os.environ.get("FLEXIKERN_BENCH_STEPS", "10"))
    ROUNDS = {1: 5, 32: 3}
else:
    MODEL_NAME, DTYPE = "toy (2 blocks, width 64)", torch.float32
    CONFIG = dict(input_size=16, depth=2, hidden_size=64, num_heads=4, num_classes=10)
    LARGE, STEPS = 2, int(os.environ.get("FLEXIKERN_BENCH_STEPS", "4"))
    ROUNDS = {1: 3, 2: 5}
GUIDANCE = Guidance(1.5, "flexi")
BUDGET = 0.6
# torch.compile's arguments: the plain DiT's baseline mode is the issue's; FlexiDiT's (see the
# module docstring) is inductor's default unless FLEXIKERN_BENCH_COMPILE_MODE says otherwise.
# Neither captures CUDA graphs of its own, so flexikern's graphs can wrap FlexiDiT's.
if CUDA:
    COMPILE_REFERENCE = {"mode": "max-autotune-no-cudagraphs"}
    COMPILE_FLEXI = {"mode": os.environ.get("FLEXIKERN_BENCH_COMPILE_MODE", "default")}
else:   # a smoke test that must stay fast
    COMPILE_REFERENCE = COMPILE_FLEXI = {"backend": "aot_eager"}

# provider: (model, schedule, packed, CUDA graphs, compiled)
PROVIDERS = {
    "reference": ("reference", "static", False, False, False),
    "static": ("flexi", "static", False, False, False),
    "flexi_0.6": ("flexi", "budget", False, False, False),
    "flexi_0.6+packed": ("flexi", "budget", True, False, False),
    "static+graphs": ("flexi", "static", None, True, False),
    "flexi_0.6+graphs": ("flexi", "budget", None, True, False),
    "reference+compile": ("reference+compile", "static", False, False, True),
    "flexi_0.6+compile": ("flexi", "budget", False, False, True),
    "flexi_0.6+compile+graphs": ("flexi", "budget", None, True, True),
}
# (batch, provider), most needed first: a stage that runs out of time loses the last rows only.
# The compiled rows last (minutes of compiling on a GPU; gpu_check gives them a stage of their
# own): the compiled baseline first, then FlexiDiT compiled, then compiled inside CUDA graphs.
CASES = [(LARGE, "reference"), (LARGE, "static"), (LARGE, "flexi_0.6+graphs"), (1, "static"),
         (1, "static+graphs"), (LARGE, "flexi_0.6"), (LARGE, "flexi_0.6+packed"),
         (LARGE, "reference+compile"), (LARGE, "flexi_0.6+compile"), (LARGE, "flexi_0.6+compile+graphs")]


class ReferenceForSampling(nn.Module):
    """The plain DiT behind `fk.sample`'s model protocol (`flexikern.diffusion.FlexibleDenoiser`):
    its forward runs the reference DiT; conditions, shapes and FLOPs are those of the FlexiDiT of
    the same architecture. Static schedules only: no other patch size, no packed forward."""

    def __init__(self, dit: DiT, like: FlexiDiT):
        super().__init__()
        self.dit, self._like = dit, [like]
        self.in_channels, self.latent_shape = like.in_channels, like.latent_shape
        self.original_patch_size = like.original_patch_size
        self.patch_sizes = (like.original_patch_size,)
        self.has_null_class = like.has_null_class

    def check_condition(self, y, n=None, device=None):
        return self._like[0].check_condition(y, n, device)

    def null_condition(self, y):
        return self._like[0].null_condition(y)

    def flops(self, patch_size=None, batch: int = 1) -> int:
        return self._like[0].flops(patch_size, batch)

    def prepare(self, patch_sizes, size, device, packed=False) -> list[torch.Tensor]:
        return []   # the reference builds nothing per patch size

    def forward_packed(self, xs, t, y, patch_sizes):
        raise NotImplementedError("the reference DiT has no packed forward (sample with packed=False)")

    def forward(self, x, t, y, patch_size=None):
        return self.dit(x, t, y)


def _randomize_(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random non-zero weights on the model's device (DiT zero-initialises adaLN and the output)."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0.0, std, generator=generator)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    start = time.perf_counter()
    with torch.device(DEVICE):
        dit = DiT(patch_size=2, in_channels=4, learn_sigma=True, **CONFIG)
    _randomize_(dit)
    state = {k: v for k, v in dit.state_dict().items() if k != "pos_embed"}   # regenerated by flexikern
    flexi = FlexiDiT.from_dit(state, patch_sizes=(2, 4), adapter="lora", num_heads=CONFIG["num_heads"],
                              input_size=CONFIG["input_size"])
    with torch.no_grad():   # LoRA B starts at zero; random values keep the weak mode's work honest
        for name, p in flexi.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    flexi = flexi.to(DEVICE).eval()
    dit = dit.eval()
    # Both providers must compute the same function, or the comparison means nothing: checked in
    # fp32 with TF32 off (the reference's convolution would use it on a GPU), before the cast to
    # the benchmark dtype.
    x = torch.randn(2, 4, CONFIG["input_size"], CONFIG["input_size"], device=DEVICE)
    t, y = torch.tensor([10, 900], device=DEVICE), torch.tensor([1, 3], device=DEVICE)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            expected, actual = dit(x, t, y), flexi(x, t, y)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < (1e-2 if CUDA else 1e-4), f"FlexiDiT vs reference DiT: relative error {error:.2e}"
    flexi, dit = flexi.to(DTYPE), dit.to(DTYPE)
    print(f"\nbuilt {MODEL_NAME} models in {time.perf_counter() - start:.1f} s")
    # torch.compile is lazy: the compiled DiT (same weights) compiles on its first call only.
    compiled = torch.compile(dit, fullgraph=True, **COMPILE_REFERENCE)
    return {"reference": ReferenceForSampling(dit, flexi), "flexi": flexi,
            "reference+compile": ReferenceForSampling(compiled, flexi)}


def _schedule(kind: str, flexi: FlexiDiT, steps: int) -> Schedule:
    if kind == "static":
        return Schedule.static(steps, 2)
    return Schedule.for_budget(flexi, steps, BUDGET, equal_branches=False)


@pytest.mark.parametrize("batch,provider", CASES, ids=[f"{p}-batch{b}" for b, p in CASES])
def test_bench_e2e(benchmark, models, batch, provider):
    model_key, kind, packed, graphs, compiled = PROVIDERS[provider]
    if graphs and not CUDA:
        pytest.skip("CUDA graphs need a CUDA device; on CPU cuda_graphs=True runs eagerly")
    flexi, model = models["flexi"], models[model_key]
    schedule = _schedule(kind, flexi, STEPS)
    relative = schedule.relative_flops(flexi)
    assert kind == "static" or relative <= BUDGET, f"{schedule!r}: relative FLOPs {relative:.3f} > {BUDGET}"
    flops = schedule.flops(flexi, batch, guidance=True)
    labels = torch.arange(batch) % CONFIG["num_classes"]
    runner = GraphRunner() if graphs else False
    # The reference compiles as a module (above); FlexiDiT through `fk.sample(compile=...)`.
    compile = COMPILE_FLEXI if compiled and model_key == "flexi" else False

    def run():
        out = sample(model, labels, schedule, GUIDANCE, seed=0, progress=False, cuda_graphs=runner,
                     packed=packed, compile=compile)
        _timing.sync()
        return out

    start = time.perf_counter()
    run()   # warm-up, untimed: torch.compile, cuBLAS/attention workspaces, graph captures
    warmup_s = time.perf_counter() - start
    if compiled:
        print(f"\n{provider} batch {batch}: warm-up (compiling every layout) {warmup_s:.1f} s")
    captured = runner.captures if graphs else 0
    benchmark.group = f"e2e {MODEL_NAME} batch={batch}"
    benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=0, iterations=1)
    if benchmark.stats:
        median = benchmark.stats.stats.median
        per_step = median / STEPS
        tflop_s = flops / median / 1e12
        gemm = _timing.gemm_rate() / 1e12
        benchmark.extra_info.update(
            suite="e2e", provider=provider, model=MODEL_NAME, device=device_name(),
            smoke=_timing.SMOKE, dtype=str(DTYPE).replace("torch.", ""), batch=batch, steps=STEPS,
            target_steps=TARGET_STEPS, schedule=repr(schedule), relative_flops=relative,
            relative_flops_at_target=_schedule(kind, flexi, TARGET_STEPS).relative_flops(flexi),
            packed=packed, cuda_graphs=bool(graphs),
            compile=(COMPILE_FLEXI if model_key == "flexi" else COMPILE_REFERENCE) if compiled else None,
            warmup_s=warmup_s, seconds_per_step=per_step,
            images_per_s=batch / (per_step * TARGET_STEPS), model_tflop_s=tflop_s,
            gemm_tflop_s=gemm, fraction_of_gemm=tflop_s / gemm, graph_captures=captured,
            graph_captures_timed=(runner.captures - captured) if graphs else 0,
            timing="perf_counter around whole sampling runs, device synchronised; "
                   "one untimed warm-up run")
    if graphs:
        runner.release()   # the next provider starts from free memory
