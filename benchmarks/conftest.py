import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# reference_dit.py (the independent plain-PyTorch DiT) lives in tests/; _results.py beside this file.
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)
if not torch.cuda.is_available():
    # Toy CPU sizes on a shared machine: one thread gives steadier medians than contended two.
    torch.set_num_threads(1)


def pytest_benchmark_update_machine_info(config, machine_info):
    """File every result under its device and versions (torch, triton, CUDA, flexikern git sha)."""
    from _results import metadata
    machine_info["flexikern"] = metadata()
