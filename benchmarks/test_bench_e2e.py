"""End-to-end sampling throughput (images/s): plain-PyTorch DiT vs flexikern, eager vs CUDA graphs.

    pytest benchmarks/test_bench_e2e.py --benchmark-json out.json && python benchmarks/render.py out.json

Providers (all through `fk.sample`: the same DDPM loop, noise and guidance for everyone):
* reference: the independent plain-PyTorch DiT (`tests/reference_dit.DiT`), static p=2, eager,
  behind a thin adapter that gives it FlexiDiT's sampling interface;
* static: FlexiDiT with the SAME weights (`FlexiDiT.from_dit`), static p=2, flexikern's kernels;
* flexi_0.6: FlexiDiT with `Schedule.for_budget(model, steps, 0.6)` (weak p=4 first);
* static+graphs, flexi_0.6+graphs: the same with `cuda_graphs=True` (one graph per phase), and
  flexi_0.6+graphs+device_noise with `noise_device="model"` (CUDA only).
Guidance: `Guidance(1.5, "flexi")` on every step (at equal patch sizes that is DiT's CFG, one
batched forward of 2N).

Sizes. CUDA: DiT-XL/2-shaped random weights (28 blocks, width 1152, 16 heads, 1000 classes,
learn_sigma), bf16, 256px = 4x32x32 latents, batch 1, 8 and 32. DiT samples with 250 DDPM steps;
to fit a GPU check of a few minutes the timed runs use FLEXIKERN_BENCH_STEPS (default 25) steps
of the same kind of schedule (`for_budget` at that step count: the same weak/powerful proportions,
its relative FLOPs recorded next to the 250-step one) and images/s is extrapolated as per-step
throughput: `images_per_s = batch / (seconds_per_step * 250)`. Set FLEXIKERN_BENCH_STEPS=250 to
time the full schedule. CPU (default without CUDA): a 2-block toy model, batch 2, 4 steps, fp32;
graph rows skip. CPU figures are CPU figures; they say nothing about a GPU.

Each row's extra_info: provider, batch, steps, schedule, relative FLOPs, seconds per step,
images/s, model TFLOP/s (analytic FLOPs of the run / its median time: `Schedule.flops`, the
model's forward FLOPs, multiply-add = 2) and graph captures. `test_bench_matmul` measures the bf16
GEMM of DiT-XL's MLP (fc1) at the largest batch's token count in the same session, the ceiling the
model's TFLOP/s is compared with. `benchmarks/_results.goals` computes the issue's ratios from
these rows; `benchmarks/render.py` prints them.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _results import TARGET_STEPS
from flexikern.diffusion import Guidance, Schedule, sample
from flexikern.models import FlexiDiT
from flexikern.runtime.graphs import GraphRunner
from reference_dit import DiT

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    MODEL_NAME, DTYPE = "DiT-XL/2", torch.bfloat16
    CONFIG = dict(input_size=32, depth=28, hidden_size=1152, num_heads=16, num_classes=1000)
    BATCHES, STEPS = (1, 8, 32), int(os.environ.get("FLEXIKERN_BENCH_STEPS", "25"))
    ROUNDS = {1: 5, 8: 3, 32: 3}
    MATMUL_REPEATS = 20
else:
    MODEL_NAME, DTYPE = "toy (2 blocks, width 64)", torch.float32
    CONFIG = dict(input_size=16, depth=2, hidden_size=64, num_heads=4, num_classes=10)
    BATCHES, STEPS = (2,), int(os.environ.get("FLEXIKERN_BENCH_STEPS", "4"))
    ROUNDS = {2: 10}
    MATMUL_REPEATS = 2
GUIDANCE = Guidance(1.5, "flexi")

# provider: (model, schedule, CUDA graphs, noise_device)
PROVIDERS = {
    "reference": ("reference", "static", False, "cpu"),
    "static": ("flexi", "static", False, "cpu"),
    "flexi_0.6": ("flexi", "budget", False, "cpu"),
    "static+graphs": ("flexi", "static", True, "cpu"),
    "flexi_0.6+graphs": ("flexi", "budget", True, "cpu"),
    "flexi_0.6+graphs+device_noise": ("flexi", "budget", True, "model"),
}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class ReferenceForSampling(nn.Module):
    """The plain DiT behind FlexiDiT's sampling interface (the attributes `fk.sample` reads);
    FLOPs come from the FlexiDiT with the same architecture."""

    def __init__(self, dit: DiT, like: FlexiDiT):
        super().__init__()
        self.dit = dit
        self.num_classes, self.in_channels, self.input_size = like.num_classes, like.in_channels, like.input_size
        self.patch_sizes = self.original_patch_size_tuple = (like.original_patch_size,)
        self.original_patch_size, self._like = like.original_patch_size, [like]

    def flops(self, patch_size=None, batch: int = 1, input_size=None) -> int:
        return self._like[0].flops(patch_size, batch, input_size)

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
    # fp32 (TF32 convolutions on a GPU allow ~1e-3), before the cast to the benchmark dtype.
    x = torch.randn(2, 4, CONFIG["input_size"], CONFIG["input_size"], device=DEVICE)
    t, y = torch.tensor([10, 900], device=DEVICE), torch.tensor([1, 3], device=DEVICE)
    with torch.inference_mode():
        expected, actual = dit(x, t, y), flexi(x, t, y)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error < (1e-2 if CUDA else 1e-4), f"FlexiDiT vs reference DiT: relative error {error:.2e}"
    flexi, dit = flexi.to(DTYPE), dit.to(DTYPE)
    print(f"\nbuilt {MODEL_NAME} models in {time.perf_counter() - start:.1f} s")
    return {"reference": ReferenceForSampling(dit, flexi), "flexi": flexi}


def _schedule(kind: str, flexi: FlexiDiT, steps: int) -> Schedule:
    return Schedule.static(steps, 2) if kind == "static" else Schedule.for_budget(flexi, steps, 0.6)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("batch", BATCHES)
def test_bench_e2e(benchmark, models, batch, provider):
    model_key, kind, graphs, noise_device = PROVIDERS[provider]
    if graphs and not CUDA:
        pytest.skip("CUDA graphs need a CUDA device; on CPU cuda_graphs=True runs eagerly")
    if noise_device != "cpu" and not CUDA:
        pytest.skip("noise on the device is a GPU throughput option")
    flexi, model = models["flexi"], models[model_key]
    schedule = _schedule(kind, flexi, STEPS)
    flops = schedule.flops(flexi, batch, guidance=True)
    labels = torch.arange(batch) % CONFIG["num_classes"]
    runner = GraphRunner() if graphs else False

    def run():
        out = sample(model, labels, schedule, GUIDANCE, seed=0, progress=False, cuda_graphs=runner,
                     noise_device=noise_device)
        _sync()
        return out

    benchmark.group = f"e2e {MODEL_NAME} batch={batch}"
    benchmark.pedantic(run, rounds=ROUNDS[batch], warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    per_step = median / STEPS
    benchmark.extra_info.update(
        suite="e2e", provider=provider, model=MODEL_NAME, device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE).replace("torch.", ""), batch=batch, steps=STEPS, target_steps=TARGET_STEPS,
        schedule=repr(schedule), relative_flops=schedule.relative_flops(flexi),
        relative_flops_at_target=_schedule(kind, flexi, TARGET_STEPS).relative_flops(flexi),
        seconds_per_step=per_step, images_per_s=batch / (per_step * TARGET_STEPS),
        model_tflops=flops / median / 1e12, graph_captures=runner.captures if graphs else 0,
        noise_device=noise_device)
    if graphs:
        runner.release()   # the next provider starts from free memory


def test_bench_matmul(benchmark):
    """The GEMM ceiling: DiT's fc1 (tokens x D) @ (D x 4D) in the model dtype, at the token count of
    the largest batch's guided step (2 * batch * 256 tokens at p=2 on CUDA)."""
    d = CONFIG["hidden_size"]
    tokens = 2 * max(BATCHES) * (CONFIG["input_size"] // 2) ** 2
    x = torch.randn(tokens, d, device=DEVICE, dtype=DTYPE)
    w = torch.randn(4 * d, d, device=DEVICE, dtype=DTYPE) * d ** -0.5

    def run():
        for _ in range(MATMUL_REPEATS):
            F.linear(x, w)
        _sync()

    benchmark.group = f"matmul {MODEL_NAME} MLP"
    benchmark.pedantic(run, rounds=10 if CUDA else 3, warmup_rounds=2, iterations=1)
    flops = 2 * tokens * d * 4 * d * MATMUL_REPEATS
    benchmark.extra_info.update(
        suite="matmul", provider="matmul", model=MODEL_NAME, device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE).replace("torch.", ""), shape=f"({tokens}, {d}) x ({d}, {4 * d})",
        tflops=flops / benchmark.stats.stats.median / 1e12)
