"""Check the GPU build without a GPU: the extension's CUDA kernels, and every Triton kernel of
kernels/ compiled for sm_90 (H100) at the DiT-XL/2 launch shapes, with its register and shared
memory use.

Run by `benchmarks/cuda_build_check.sh`, in a venv with the GPU machine's torch and triton and with
flexikern installed from the tree with its extension built for sm_90a:

1. extension: `flexikern._C` was built with CUDA and every op it registers in the `flexikern`
   namespace (csrc/ops.cpp) has a CUDA kernel in the dispatcher;
2. Triton kernels: the Triton backends' entry points (`patch_embed_triton`, `de_embed_triton`
   of flexikern.ops, forward and backward through their custom ops) and the varlen
   attention launches (forward and backward) run on CPU tensors at DiT-XL/2 shapes with every
   kernel launch intercepted. Each launch is compiled ahead of time for GPUTarget("cuda", 90, 32)
   with the JIT's own specialisation of its arguments (dtypes, 16-byte alignment, integers equal
   to 1) and the block sizes and warps that the host function chose, i.e. the cubin a GPU would
   run. `ptxas -v` (triton's own, with triton's flags) on its PTX gives registers and spills.
   Each launch is also compiled for sm_80 (A100), which must compile and fit an A100 block's
   shared memory.

Writes benchmarks/results/sm90-compile.json (one entry per launch) and prints a table. Exits 1 when
an op lacks its CUDA kernel, a kernel does not compile or is never launched, a kernel needs more
shared memory than an H100 (A100) block may have, or a kernel spills registers without an entry in
EXPLAINED_SPILLS (each explained in benchmarks/README.md, "sm_90 compile table"); an entry that
no longer spills fails too, so the list stays true.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Compile, do not interpret: the interpreter replaces the kernels when they are decorated.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import flexikern  # noqa: E402
from flexikern.kernels import _common, varlen_attention  # noqa: E402
from flexikern.ops.de_embed import de_embed_triton  # noqa: E402
from flexikern.ops.patch_embed import patch_embed_triton  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sm90-compile.json"
SM90, SM80 = GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)
KERNEL_MODULES = (_common, varlen_attention)

# DiT-XL/2 at 256px: 4x32x32 latents, width 1152, 16 heads of 72, batch 32. FlexiDiT stores 4x4
# kernels and runs them at p=2 (resized inside the launch) and p=4; the de-embedding has 8 output
# channels (learn_sigma). Guidance packs each sample's p=2 and p=4 passes: 32 x (256 + 64) tokens.
BATCH, CHANNELS, LATENT, HIDDEN, HEADS, HEAD_DIM = 32, 4, 32, 1152, 16, 72
STORED_KERNEL, OUT_CHANNELS, PATCHES = (4, 4), 8, (2, 4)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# An H100 SM's limits (CUDA's occupancy rules for sm_90), and the most shared memory a block may
# have on an H100 and an A100.
SM_REGISTERS, SM_PARTITIONS, SM_WARPS, SM_BLOCKS = 65536, 4, 64, 32
SM_SHARED, BLOCK_SHARED_RESERVED = 228 * 1024, 1024
BLOCK_SHARED_MAX = {SM90.arch: 227 * 1024, SM80.arch: 163 * 1024}

# Launches ("case: kernel", as in the table) allowed to spill, each explained in
# benchmarks/README.md, "sm_90 compile table".
EXPLAINED_SPILLS: dict[str, str] = {}


@dataclass
class Launch:
    """One intercepted kernel launch: the kernel, its grid and its arguments, and what it is for."""
    case: str
    shape: dict
    kernel: JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return f"{self.case}: {self.kernel.fn.__name__}"


@dataclass
class Recorder:
    """Stands in for every `*_kernel` of KERNEL_MODULES (the kernels that host functions launch;
    the helpers they call stay): `kernel[grid](*args, **kwargs)` records a Launch under the
    current case instead of running."""
    case: str = ""
    shape: dict = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)
    saved: list[tuple] = field(default_factory=list)  # (module, name, kernel) to put back

    def __enter__(self) -> "Recorder":
        self.saved = [(module, name, value) for module in KERNEL_MODULES
                      for name, value in vars(module).items()
                      if isinstance(value, JITFunction) and name.endswith("_kernel")]
        for module, name, kernel in self.saved:
            setattr(module, name, _Intercepted(kernel, self))
        return self

    def __exit__(self, *exc) -> None:
        for module, name, kernel in self.saved:
            setattr(module, name, kernel)

    def kernels(self) -> list[JITFunction]:
        return [kernel for _, _, kernel in self.saved]


@dataclass
class _Intercepted:
    """One kernel's stand-in: `[grid]` gives a function that records the launch."""
    kernel: JITFunction
    recorder: Recorder

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.recorder.launches.append(Launch(self.recorder.case, dict(self.recorder.shape),
                                                 self.kernel, tuple(grid), args, kwargs))
        return record


def record_launches() -> tuple[list[Launch], list[JITFunction]]:
    """Every kernel launch of the embedding, de-embedding and attention forward and backward at
    DiT-XL/2 shapes, and every kernel that could have been launched. No kernel runs, so the
    tensors are left uninitialised."""
    with Recorder() as recorder:
        for dtype_name, dtype in DTYPES.items():
            for patch in PATCHES:
                _embed_launches(recorder, dtype_name, dtype, (patch, patch))
            _attention_launches(recorder, dtype_name, dtype)
    return recorder.launches, recorder.kernels()


def _embed_launches(recorder: Recorder, dtype_name: str, dtype: torch.dtype,
                    patch: tuple[int, int]) -> None:
    grid = (LATENT // patch[0], LATENT // patch[1])
    tokens = grid[0] * grid[1]
    shape = dict(batch=BATCH, latent=[CHANNELS, LATENT, LATENT], hidden=HIDDEN,
                 stored_kernel=list(STORED_KERNEL), patch=list(patch))
    x = torch.empty(BATCH, CHANNELS, LATENT, LATENT, dtype=dtype, requires_grad=True)
    weight = torch.empty(HIDDEN, CHANNELS, *STORED_KERNEL, dtype=dtype)
    vector = torch.empty(HIDDEN, dtype=dtype)
    recorder.case, recorder.shape = f"patch_embed fwd p={patch[0]} {dtype_name}", shape
    out = patch_embed_triton(x, weight, vector, patch, size_embed=vector,
                             pos_embed=torch.empty(tokens, HIDDEN, dtype=dtype))
    recorder.case = f"patch_embed bwd p={patch[0]} {dtype_name}"
    torch.autograd.grad(out, x, torch.empty_like(out))

    stored = STORED_KERNEL[0] * STORED_KERNEL[1] * OUT_CHANNELS
    y = torch.empty(BATCH, tokens, HIDDEN, dtype=dtype, requires_grad=True)
    recorder.case = f"de_embed fwd p={patch[0]} {dtype_name}"
    recorder.shape = dict(shape, latent=[OUT_CHANNELS, LATENT, LATENT])
    image = de_embed_triton(y, torch.empty(stored, HIDDEN, dtype=dtype),
                            torch.empty(stored, dtype=dtype), STORED_KERNEL, patch,
                            (LATENT, LATENT))
    recorder.case = f"de_embed bwd p={patch[0]} {dtype_name}"
    torch.autograd.grad(image, y, torch.empty_like(image))


def _attention_launches(recorder: Recorder, dtype_name: str, dtype: torch.dtype) -> None:
    lengths = [(LATENT // 2) ** 2, (LATENT // 4) ** 2] * BATCH
    total = sum(lengths)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    # q, k, v are views of the fused qkv projection, as in the model's attention.
    qkv = torch.empty(total, 3, HEADS, HEAD_DIM, dtype=dtype)
    q, k, v = qkv.unbind(1)
    recorder.shape = dict(sequences=f"{BATCH} x (256 + 64)", total_tokens=total, heads=HEADS,
                          head_dim=HEAD_DIM)
    recorder.case = f"varlen_attention fwd {dtype_name}"
    out, lse = varlen_attention.varlen_attention_forward(q, k, v, cu_seqlens, max(lengths),
                                                         interpret=False)
    recorder.case = f"varlen_attention bwd {dtype_name}"
    varlen_attention.varlen_attention_backward(torch.empty_like(out), q, k, v, out, lse,
                                               cu_seqlens, max(lengths), interpret=False)


def compile_launch(launch: Launch, target: GPUTarget):
    """The launch compiled for `target` as JITFunction.run would: the same binder and packing of
    the arguments into a signature, constexprs and specialisation attributes."""
    backend = make_backend(target)
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack frame of the PTX's kernel, from `ptxas -v` run the way
    triton's make_cubin runs it (same ptxas, -lineinfo, the "a" arch)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "kernel.ptx")
        source.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v",
             f"--gpu-name={sm_arch_from_capability(capability)}", str(source),
             "-o", str(source.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    if registers is None or frame is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    stack, stores, loads = (int(g) for g in frame.groups())
    return dict(registers=int(registers.group(1)), spill_stores=stores, spill_loads=loads,
                stack_frame=stack)


def blocks_per_sm(registers: int, num_warps: int, shared: int) -> int:
    """Resident blocks per H100 SM: registers are allocated per warp in units of 256 from four
    sub-partitions of 16K; at most 64 warps and 32 blocks; 1 KB of shared memory is reserved
    per block."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    warps_by_registers = SM_PARTITIONS * (SM_REGISTERS // SM_PARTITIONS // per_warp)
    return min(SM_BLOCKS, SM_WARPS // num_warps, warps_by_registers // num_warps,
               SM_SHARED // (shared + BLOCK_SHARED_RESERVED))


def describe(launch: Launch, compiled, sm80_shared: int) -> dict:
    """The JSON entry of one launch compiled for sm_90 (and needing `sm80_shared` on sm_80)."""
    names = launch.kernel.arg_names
    meta = compiled.metadata
    usage = ptxas_usage(compiled.asm["ptx"], SM90.arch)
    blocks = blocks_per_sm(usage["registers"], meta.num_warps, meta.shared)
    constexprs = {names[i]: launch.kwargs[names[i]] for i in launch.kernel.constexprs
                  if names[i] in launch.kwargs}
    return dict(name=launch.name, case=launch.case, kernel=launch.kernel.fn.__name__,
                shape=launch.shape, grid=list(launch.grid), constexprs=constexprs,
                num_warps=meta.num_warps, num_stages=meta.num_stages, **usage,
                shared_bytes=meta.shared, blocks_per_sm=blocks,
                occupancy=round(blocks * meta.num_warps / SM_WARPS, 3),
                sm80_shared_bytes=sm80_shared)


def check_extension() -> list[str]:
    """Problems with the extension: not built with CUDA, or a flexikern op without a CUDA kernel."""
    import flexikern._C as extension

    print(f"extension: {extension.__file__}")
    if not extension.cuda_built:
        return ["flexikern._C was built without CUDA"]
    from flexikern import _ext
    kernels = _ext.kernels_by_device()
    if not kernels:
        return ["flexikern._C registered no ops in the flexikern namespace"]
    missing = [n for n, devices in kernels.items() if not devices["CUDA"]]
    print(f"extension: {len(kernels) - len(missing)} of {len(kernels)} flexikern ops have a CUDA "
          "kernel")
    return [f"{n} has no CUDA kernel" for n in missing]


def check_spills(entries: list[dict]) -> list[str]:
    """Spilling launches missing from EXPLAINED_SPILLS, and entries of it that no longer spill."""
    spilling = {e["name"] for e in entries if e["spill_stores"] or e["spill_loads"]}
    return ([f"{n} spills registers (explain it in benchmarks/README.md and EXPLAINED_SPILLS)"
             for n in sorted(spilling - set(EXPLAINED_SPILLS))]
            + [f"EXPLAINED_SPILLS lists {n}, which no longer spills (remove it)"
               for n in sorted(set(EXPLAINED_SPILLS) - spilling)])


def print_table(entries: list[dict]) -> None:
    header = f"{'case: kernel':58} {'warps':>5} {'regs':>4} {'spill':>5} {'smem KB':>7} " \
             f"{'blocks/SM':>9} {'occupancy':>9}"
    print(header)
    print("-" * len(header))
    for e in entries:
        print(f"{e['name']:58} {e['num_warps']:>5} {e['registers']:>4} {e['spill_stores']:>5} "
              f"{e['shared_bytes'] / 1024:>7.1f} {e['blocks_per_sm']:>9} {e['occupancy']:>9.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"JSON output (default {RESULTS})")
    args = parser.parse_args()

    failures = check_extension()
    launches, kernels = record_launches()
    failures += [f"{kernel.fn.__name__} was never launched" for kernel in kernels
                 if all(launch.kernel is not kernel for launch in launches)]
    entries = []
    for launch in launches:
        try:
            sm80_shared = compile_launch(launch, SM80).metadata.shared
            entries.append(describe(launch, compile_launch(launch, SM90), sm80_shared))
        except Exception as e:  # a compile error names the launch, then the next one is tried
            failures.append(f"{launch.name} does not compile: {type(e).__name__}: {e}")
    for arch, key in ((SM90.arch, "shared_bytes"), (SM80.arch, "sm80_shared_bytes")):
        limit = BLOCK_SHARED_MAX[arch]
        failures += [f"{e['name']} needs {e[key]} bytes of shared memory on sm_{arch} > {limit}"
                     for e in entries if e[key] > limit]
    failures += check_spills(entries)

    ptxas = subprocess.run([get_ptxas(SM90.arch).path, "--version"], capture_output=True,
                           text=True, check=True).stdout.strip().splitlines()[-1]
    record = dict(target=sm_arch_from_capability(SM90.arch),
                  torch=torch.__version__, triton=triton.__version__, ptxas=ptxas,
                  flexikern=flexikern.__version__, kernels=entries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print_table(entries)
    print(f"torch {torch.__version__}, triton {triton.__version__}, ptxas {ptxas}; "
          f"written to {args.out}")
    for failure in failures:
        print(f"FAIL: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
