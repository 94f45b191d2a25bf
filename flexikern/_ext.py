"""The compiled extension `flexikern._C`, loaded on first use (never by `import flexikern`).

`load()` imports it, or returns None when it is not built or does not load; then flexikern runs
on its torch paths and `unavailable_reason()` says why. Loading the library registers the ops
`torch.ops.flexikern.{patchify, unpatchify}` and their `_out` forms with the dispatcher
(csrc/ops.cpp); this module adds what torch.compile and autograd need: fake (meta)
implementations and the backward of each op, which is its adjoint (patchify <-> unpatchify).
"""

from __future__ import annotations

import importlib
import json
import math
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["load", "unavailable_reason", "build_info", "cuda_built", "kernels_by_device"]

_LOCK = threading.Lock()
_state: dict[str, Any] = {"tried": False, "module": None, "error": None}


def load() -> ModuleType | None:
    """The extension module (importing it once), or None when it cannot be loaded.

    After the first call this is a dictionary read. torch.compile does not trace the first call:
    the ops ask through `flexikern.ops.patchify._extension_unavailable`, which it runs for real
    while tracing, so a model compiles with fullgraph=True before any eager call.
    """
    if not _state["tried"]:
        _load_once()
    return _state["module"]


def _load_once() -> None:
    import torch

    @torch.compiler.disable
    def locked_load() -> None:
        with _LOCK:
            if _state["tried"]:
                return
            try:
                module = importlib.import_module("flexikern._C")
                _register_fake_and_autograd()
                _state["module"] = module
            except Exception as e:  # ImportError, or a broken build raising anything else
                _state["error"] = (f"flexikern._C did not load ({type(e).__name__}: {e}); "
                                   "build it with `pip install --no-build-isolation -e .`")
            _state["tried"] = True

    locked_load()


def unavailable_reason() -> str | None:
    """Why the extension cannot be used here, or None when it loads."""
    return None if load() is not None else _state["error"]


def build_info() -> dict[str, Any]:
    """How the extension was built (torch, CUDA or None, archs, compiler, time), from
    flexikern/_build_info.json written by setup.py; {} when there is no build record."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def cuda_built() -> bool:
    """True when the loaded extension has its CUDA kernels."""
    module = load()
    return bool(module is not None and module.cuda_built)


def kernels_by_device() -> dict[str, dict[str, bool]]:
    """Every `flexikern::` op the loaded extension registers -> {"CPU": has a kernel, "CUDA": ...}.

    Read from the dispatcher, so it needs no GPU: a CUDA build on a CPU machine lists CUDA kernels
    too. Empty when the extension does not load.
    """
    import torch
    from torch._library.custom_ops import OPDEFS  # ops defined in Python, by torch.library.custom_op
    if load() is None:
        return {}
    # The Triton backends' ops (`flexikern::patch_embed_triton`, ...) share the namespace; they
    # are custom ops defined in Python, not the extension's.
    names = sorted(n for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("flexikern::") and n not in OPDEFS)
    return {n: {key: torch._C._dispatch_has_kernel_for_dispatch_key(n, key) for key in ("CPU", "CUDA")}
            for n in names}


# ---- fake implementations and autograd (registered once, when the library loads) ----------


def _grid_and_volume(sizes, patch) -> tuple[Any, int]:
    return math.prod([s // p for s, p in zip(sizes, patch)]), math.prod(patch)


def _register_fake_and_autograd() -> None:
    import torch

    ops = torch.ops.flexikern

    @torch.library.register_fake("flexikern::patchify")
    def _patchify_fake(x, patch_size):
        n, c, *sizes = x.shape
        grid, volume = _grid_and_volume(sizes, patch_size)
        return x.new_empty((n, grid, volume * c))

    @torch.library.register_fake("flexikern::unpatchify")
    def _unpatchify_fake(tokens, patch_size, size):
        n, _, features = tokens.shape
        return tokens.new_empty((n, features // math.prod(patch_size), *size))

    @torch.library.register_fake("flexikern::patchify_out")
    def _patchify_out_fake(x, patch_size, out):
        return None

    @torch.library.register_fake("flexikern::unpatchify_out")
    def _unpatchify_out_fake(tokens, patch_size, out):
        return None

    # patchify and unpatchify are permutations, so each one's backward is the other.
    def _patchify_setup(ctx, inputs, output):
        x, patch_size = inputs
        ctx.patch_size, ctx.size = list(patch_size), list(x.shape[2:])

    def _patchify_backward(ctx, grad):
        return ops.unpatchify(grad, ctx.patch_size, ctx.size), None

    def _unpatchify_setup(ctx, inputs, output):
        ctx.patch_size = list(inputs[1])

    def _unpatchify_backward(ctx, grad):
        return ops.patchify(grad, ctx.patch_size), None, None

    torch.library.register_autograd("flexikern::patchify", _patchify_backward,
                                    setup_context=_patchify_setup)
    torch.library.register_autograd("flexikern::unpatchify", _unpatchify_backward,
                                    setup_context=_unpatchify_setup)
