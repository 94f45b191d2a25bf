"""The fused Triton patch_embed / de_embed against plain torch, as bandwidth against the device copy.

    pytest benchmarks/test_bench_embed.py

Shapes: DiT-XL/2 (4x32x32 latent, width 1152, 8 output channels with learn_sigma, the stored
kernel at FlexiDiT's largest patch 4x4) at p=2 and p=4, bf16. Providers:
* triton: `flexikern.kernels` through dispatch (one launch per op in the forward);
* torch: the reference, conv2d + flatten + adds (patch_embed) and linear + unpatchify (de_embed),
  each with its small weight resize.
Timing and regimes: benchmarks/_timing.py (CUDA events, median of rounds of many calls).
* past_l2, forward and forward+backward: batch sized so that a forward moves >= 8x the L2 cache;
  these GB/s are DRAM bandwidth;
* graph, eager (forward): DiT-XL/2's batch of 32, in a CUDA graph of `_timing.GRAPH_CALLS` calls
  (the per-call device time in a graphed step; L2-resident) or eager (with dispatch and launch).
`bytes_moved` is what an ideal kernel must move (read each input once, write the output once; the
backward reads grad_out and x and writes grad x; parameter grads are small); `fraction_of_copy`
compares the achieved GB/s with the device copy measured in the same run.
On CPU: tiny shapes, torch only (the Triton backend runs CPU tensors only under the interpreter,
an emulation whose speed means nothing): a smoke test.
"""

from __future__ import annotations

import pytest
import torch

import _timing
import flexikern.ops as ops
from _timing import CUDA, DEVICE, REGIMES
from flexikern.ops._dispatch import triton_interpreting

pytestmark = _timing.MARK

if CUDA:
    DIT_BATCH, CHANNELS, SIZE, WIDTH, OUT_CHANNELS, DTYPE = 32, 4, 32, 1152, 8, torch.bfloat16
else:
    DIT_BATCH, CHANNELS, SIZE, WIDTH, OUT_CHANNELS, DTYPE = 2, 4, 16, 64, 8, torch.float32
ELEMENT = torch.finfo(DTYPE).bits // 8
STORED_KERNEL = (4, 4)
PROVIDERS = ["triton", "torch"]
# (patch, regime, mode): both modes past L2; the DiT-shape regimes time the sampling forward.
CASES = [(p, regime, mode) for p in ((2, 2), (4, 4)) for regime, mode in
         [("past_l2", "forward"), ("past_l2", "forward+backward"), ("graph", "forward"), ("eager", "forward")]]


def _id(case) -> str:
    patch, regime, mode = case
    return f"p{patch[0]}-{regime}-{mode}"


def _skip_unless_runnable(provider: str) -> None:
    if provider == "triton" and (not CUDA or triton_interpreting()):
        pytest.skip("the Triton backend needs CUDA here: on CPU it runs only under the "
                    "interpreter (TRITON_INTERPRET=1), an emulation whose speed means nothing")


def _tokens(patch) -> int:
    return (SIZE // patch[0]) * (SIZE // patch[1])


def _batch(regime: str, bytes_per_item: int) -> int:
    return _timing.past_l2_batch(bytes_per_item) if regime == "past_l2" else DIT_BATCH


def _param(*shape, requires_grad: bool) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)


def _time(benchmark, provider: str, op: str, inputs: dict, regime: str, mode: str, moved: int,
          batch: int, patch) -> None:
    """Time `op` forced to `provider` (forward, or forward + backward) and record its bandwidth."""
    backward = mode == "forward+backward"
    grad_inputs = [v for v in inputs.values() if torch.is_tensor(v) and v.requires_grad]

    def forward():
        with ops.use_backend(**{op: provider}):
            return getattr(ops, op)(**inputs)

    with torch.enable_grad() if backward else torch.no_grad():
        if backward:
            grad_output = torch.randn_like(forward())

            def call():
                torch.autograd.grad(forward(), grad_inputs, grad_output)
        else:
            call = forward
        benchmark.group = f"{op} {regime} {mode} p={patch}"
        timing = _timing.run_regime(benchmark, regime, call)
    _timing.record(benchmark, timing, bytes_moved=moved, suite="embed", op=op, provider=provider,
                   regime=regime, mode=mode, dtype=str(DTYPE).replace("torch.", ""), batch=batch,
                   width=WIDTH, patch=str(patch))


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_patch_embed(benchmark, provider, case):
    patch, regime, mode = case
    _skip_unless_runnable(provider)
    grad = mode != "forward"
    image_bytes = CHANNELS * SIZE * SIZE * ELEMENT
    out_bytes = _tokens(patch) * WIDTH * ELEMENT
    n = _batch(regime, image_bytes + out_bytes)
    inputs = dict(x=_param(n, CHANNELS, SIZE, SIZE, requires_grad=grad),
                  weight=_param(WIDTH, CHANNELS, *STORED_KERNEL, requires_grad=grad),
                  bias=_param(WIDTH, requires_grad=grad), patch_size=patch,
                  pos_embed=_param(_tokens(patch), WIDTH, requires_grad=False),
                  size_embed=_param(WIDTH, requires_grad=grad))
    moved = n * (image_bytes + out_bytes) + (inputs["weight"].numel() + inputs["pos_embed"].numel()) * ELEMENT
    if grad:   # read grad_out and x again, write grad x
        moved += n * (out_bytes + 2 * image_bytes)
    _time(benchmark, provider, "patch_embed", inputs, regime, mode, moved, n, patch)


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_de_embed(benchmark, provider, case):
    patch, regime, mode = case
    _skip_unless_runnable(provider)
    grad = mode != "forward"
    stored = STORED_KERNEL[0] * STORED_KERNEL[1] * OUT_CHANNELS
    tokens_bytes = _tokens(patch) * WIDTH * ELEMENT
    image_bytes = OUT_CHANNELS * SIZE * SIZE * ELEMENT
    n = _batch(regime, tokens_bytes + image_bytes)
    inputs = dict(x=_param(n, _tokens(patch), WIDTH, requires_grad=grad),
                  weight=_param(stored, WIDTH, requires_grad=grad),
                  bias=_param(stored, requires_grad=grad), kernel_size=STORED_KERNEL,
                  patch_size=patch, size=(SIZE, SIZE))
    moved = n * (tokens_bytes + image_bytes) + inputs["weight"].numel() * ELEMENT
    if grad:   # read the grad image and the tokens (weight grad), write grad tokens
        moved += n * (image_bytes + 2 * tokens_bytes)
    _time(benchmark, provider, "de_embed", inputs, regime, mode, moved, n, patch)
