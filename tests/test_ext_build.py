"""The extension's packaging: lazy loading, the build record, the torch fallback without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flexikern import _ext

REASON = _ext.unavailable_reason()


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_lazy_import_and_torch_fallback():
    # `import flexikern` (and listing backends) leaves the extension unloaded; with a broken or
    # missing build, load() gives None with a reason and dispatch falls back to torch.
    out = _python(
        "import sys, torch, flexikern as fk\n"
        "fk.ops.backends('patchify')\n"
        "assert 'flexikern._C' not in sys.modules, 'import flexikern loaded the extension'\n"
        "sys.modules['flexikern._C'] = None\n"
        "from flexikern import _ext\n"
        "assert _ext.load() is None and 'flexikern._C did not load' in _ext.unavailable_reason()\n"
        "x = torch.randn(1, 3, 4, 4)\n"
        "print(fk.ops.select('patchify', x=x, patch_size=(2, 2)).name)\n"
        "assert torch.equal(fk.ops.unpatchify(fk.ops.patchify(x, 2), 2, (4, 4)), x)\n")
    assert out.strip() == "torch"


@pytest.mark.skipif(REASON is not None, reason=f"extension not built: {REASON}")
def test_build_record():
    info = _ext.build_info()
    assert info["torch"] == torch.__version__
    assert {"cuda", "cuda_archs", "cxx", "built_at"} <= set(info)
    assert (info["cuda"] is not None) == _ext.cuda_built()
    assert _ext.load().max_patch == 8


def test_every_op_has_a_cpu_kernel():
    if REASON is not None:
        pytest.skip(f"extension not built: {REASON}")
    kernels = _ext.kernels_by_device()
    assert len(kernels) == 4 and all(k["CPU"] for k in kernels.values()), kernels


@pytest.mark.gpu
def test_every_op_has_a_cuda_kernel():
    # On a GPU machine a build without CUDA kernels must fail loudly: the other GPU tests would
    # otherwise run the torch fallbacks and prove nothing about csrc/.
    assert _ext.cuda_built(), f"flexikern._C was built without CUDA: {_ext.build_info()}"
    missing = [name for name, k in _ext.kernels_by_device().items() if not k["CUDA"]]
    assert not missing, f"ops without a CUDA kernel: {missing}"
