"""torch.compile for sampling: a model's forwards compiled once per layout, for `fk.sample(compile=...)`.

The paper measured its latencies with `torch.compile(fullgraph=True)`. Every flexikern model
compiles with `fullgraph=True` at every patch size (no graph break: value checks become device
assertions, per-size constants are traced or embedded, see `flexikern.models.base`), so
`compiled_forwards(model, options)` wraps `model.forward` and `model.forward_packed` in
`torch.compile(..., fullgraph=True, dynamic=False)`.

Dynamic shapes policy: none. A *layout*, the (patch size, batch) of a forward or the (patch
sizes, batch) of a packed forward, compiles one static graph on first use; a weak-first schedule
has at most four: both branches weak (one batch of 2N), the two branches at their own sizes (two
forwards of N, or one packed forward), both powerful (2N). Patch and latent sizes are always
static, even under a user's own `torch.compile(model)` with dynamic shapes: the models
specialise them (`operator.index`), so each size compiles at most once there too.

Dynamo keeps a code object's graphs in one cache of at most `torch._dynamo.config.recompile_limit`
entries (8 by default), shared by every model of a class; past it, it silently runs the frame
eagerly. `run_compiled` therefore raises that limit, for its calls only, to the number of
layouts compiled in this process (each compiles once), and sets `fail_on_recompile_limit_hit`,
so a compiled run never falls back to eager without saying so.

When to use what (CUDA): flexikern's CUDA graphs (`cuda_graphs=True`) remove the launch cost of
a whole step (model, guidance and sampler update) and cost one warm-up per phase, no compile
time; torch.compile fuses the elementwise work between the GEMMs and can autotune them
("max-autotune") at a compile cost of seconds to minutes per layout. They combine: compile for
the kernels (a mode without its own CUDA graphs: "default" or "max-autotune-no-cudagraphs"),
flexikern's graphs for the launches. On CPU only compile applies.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

__all__ = ["CompiledForwards", "compiled_forwards", "compile_options", "CUDAGRAPH_MODES"]

# torch.compile modes that capture CUDA graphs themselves (inductor's cudagraph trees): they
# cannot run inside flexikern's graph capture.
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_OPTION_NAMES = ("mode", "backend", "options")

_LOCK = threading.Lock()
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, CompiledForwards]]" = weakref.WeakKeyDictionary()
_LAYOUTS: set[tuple] = set()   # every layout compiled in this process (for the recompile limit)


def compile_options(compile: Any) -> dict[str, Any] | None:
    """`sample`'s `compile` argument as torch.compile keyword arguments, or None (no compile).

    False: None. True: {} (inductor, default mode). A mode string: {"mode": ...}, one of
    `MODES`. A dict: torch.compile's `mode`, `backend` and `options` (e.g. {"backend":
    "aot_eager"}); `fullgraph` and `dynamic` are flexikern's (True, False).

    Raises:
        TypeError, ValueError: anything else, naming the value and what was expected.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, str):
        if compile not in MODES:
            raise ValueError(f"compile={compile!r}: expected True, False, one of torch.compile's modes "
                             f"{list(MODES)}, or a dict of torch.compile arguments")
        return {"mode": compile}
    if isinstance(compile, dict):
        unknown = sorted(set(compile) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(f"compile={compile!r}: unknown torch.compile arguments {unknown}; expected some of "
                             f"{list(_OPTION_NAMES)} (fullgraph=True and dynamic=False are always used)")
        if compile.get("mode") is not None and compile["mode"] not in MODES:
            raise ValueError(f"compile: mode={compile['mode']!r}; expected one of {list(MODES)}")
        return dict(compile)
    raise TypeError(f"compile={compile!r}: expected True, False, a torch.compile mode (e.g. "
                    f"'max-autotune-no-cudagraphs') or a dict of torch.compile arguments")


class CompiledForwards:
    """`model.forward` and `model.forward_packed` under `torch.compile(fullgraph=True,
    dynamic=False, **options)`; the compiled graphs live in dynamo's cache (keyed by the model
    and the layout), so a later run with the same layouts compiles nothing."""

    def __init__(self, model: nn.Module, options: dict[str, Any]):
        self.options = dict(options)
        self.forward = torch.compile(model.forward, fullgraph=True, dynamic=False, **options)
        self.forward_packed = torch.compile(model.forward_packed, fullgraph=True, dynamic=False, **options)

    @contextlib.contextmanager
    def running(self, layouts: set[tuple]) -> Iterator[None]:
        """Inside: calls of these `layouts` compile (once each) without hitting dynamo's recompile
        limit, and fail rather than fall back to eager if they would (module docstring)."""
        with _LOCK:
            _LAYOUTS.update(layouts)
            needed = len(_LAYOUTS)
        import torch._dynamo
        limit = max(torch._dynamo.config.recompile_limit, needed)
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            yield


def compiled_forwards(model: nn.Module, options: dict[str, Any]) -> CompiledForwards:
    """The compiled forwards of `model` under `options` (`compile_options`), made once per model
    and options and dropped with the model."""
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if key not in per_model:
            per_model[key] = CompiledForwards(model, options)
        return per_model[key]
