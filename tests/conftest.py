"""Test set-up: the `gpu` marker, hidden optional packages, reference_dit on sys.path.

* `@pytest.mark.gpu` marks every test that needs a CUDA GPU. `pytest -m gpu` selects exactly
  them (that is what `benchmarks/gpu_check.sh` runs on a GPU machine); without CUDA each one
  skips with the reason.
* `FLEXIKERN_HIDE_MODULES=diffusers,flash_attn,xformers` makes those packages fail to import, as
  on a machine without them (the GPU machine has none of the three): tests that need one must
  skip with a reason, never fail at collection. The CPU rehearsal of gpu_check.sh sets it.
"""

import importlib.abc
import os
import sys

import pytest
import torch

# reference_dit.py (the independent DiT) is imported by tests and benchmarks.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

CUDA = torch.cuda.is_available()


class _HiddenModules(importlib.abc.MetaPathFinder):
    """Import fails for these top-level packages (and their submodules), as if not installed."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by FLEXIKERN_HIDE_MODULES)",
                                      name=fullname)
        return None


_HIDDEN = {n.strip() for n in os.environ.get("FLEXIKERN_HIDE_MODULES", "").split(",") if n.strip()}
if _HIDDEN:
    for _name in [m for m in sys.modules if m.split(".")[0] in _HIDDEN]:
        del sys.modules[_name]
    sys.meta_path.insert(0, _HiddenModules(_HIDDEN))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (selected by `pytest -m gpu`; skips without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here); "
                                   "on a GPU machine: bash benchmarks/gpu_check.sh")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request):
    """Where a Triton test module's kernels run: CPU tensors under the interpreter (CI), or
    compiled on the GPU (`-m gpu`). A process is one or the other (TRITON_INTERPRET is read when
    the kernels are defined), and the module's DEVICE says which: the other parameter skips.
    Use it as `pytestmark = pytest.mark.usefixtures("kernel_device")`."""
    device = torch.device(request.module.DEVICE).type
    if request.param != device:
        mode = "in the Triton interpreter on CPU" if device == "cpu" else "compiled on the GPU"
        pytest.skip(f"the kernels run {mode} in this process (TRITON_INTERPRET="
                    f"{os.environ.get('TRITON_INTERPRET', 'unset')})")
    return device


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (tiny models: a second thread of a busy shared CPU only
    adds contention). Use it as `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
