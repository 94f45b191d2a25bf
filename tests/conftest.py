import os
import sys

import torch

# reference_dit.py (the independent DiT) is imported by tests and benchmarks.
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))
