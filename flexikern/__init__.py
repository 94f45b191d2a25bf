"""flexikern: sample Diffusion Transformers with less compute (FlexiDiT, arXiv 2502.20126).

`import flexikern` is light: triton, diffusers and the compiled extension load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"   # the one place: pyproject.toml reads it from here

_LAZY = {
    "FlexiDiT": "flexikern.models",
    "DIT_CONFIGS": "flexikern.models",
    "FlexiPixArt": "flexikern.models",
    "FlexiLatte": "flexikern.models",
    "TextCondition": "flexikern.models",
    "Schedule": "flexikern.diffusion",
    "Guidance": "flexikern.diffusion",
    "sample": "flexikern.diffusion",
    "FlexibleDenoiser": "flexikern.diffusion",
    "PatchSize": "flexikern.ops",
    "ops": None,
    "flexi": None,
    "models": None,
    "diffusion": None,
    "runtime": None,
    "train": None,
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'flexikern' has no attribute {name!r}")
    module = _LAZY[name]
    value = (importlib.import_module(f"flexikern.{name}") if module is None
             else getattr(importlib.import_module(module), name))
    globals()[name] = value
    return value
