"""torch.compile for sampling: a model's forwards compiled once per layout, for `fk.sample(compile=...)`.

The paper measured its latencies with `torch.compile(fullgraph=True)`. Every flexikern model
compiles with `fullgraph=True` at every patch size (no graph break: value checks become device
assertions, per-size constants are traced or embedded, see `flexikern.models.base`), so
`compiled_forwards(model, options)` runs `forward` and `forward_packed` under
`torch.compile(..., fullgraph=True, dynamic=False)`.

Dynamic shapes policy: none. A *layout*, the (patch size, batch) of a forward or the (patch
sizes, batch) of a packed forward, compiles one static graph on first use; a weak-first schedule
has at most four: both branches weak (one batch of 2N), the two branches at their own sizes (two
forwards of N, or one packed forward), both powerful (2N). The graphs are the class's: the
compiled functions are `type(model).forward` and `forward_packed`, whose parameters are graph
inputs, so another model of the same class and configuration reuses them, and nothing here keeps
a model alive. Patch and latent sizes are static under a user's own `torch.compile(model)` too,
with any dynamic-shapes setting: the models specialise them (`operator.index`); only the batch
may be dynamic there (`dynamic=False` makes every layout one static graph, as here).

Dynamo keeps a function's graphs in one cache of at most `torch._dynamo.config.recompile_limit`
entries (8 by default), shared by every model of a class and every compile setting; past it, it
warns and runs the function eagerly. `CompiledForwards.running` therefore raises that limit, for
its calls only, to the number of layouts compiled in this process (per compile setting; each
compiles once) and sets `fail_on_recompile_limit_hit`, so a compiled run never falls back to
eager without an error. (`torch._dynamo.config` is global: two threads sampling with compile at
once share it.)

When to use what (CUDA): flexikern's CUDA graphs (`cuda_graphs=True`) remove the launch cost of
a whole step (model, guidance and sampler update) and cost one warm-up per phase, no compile
time; torch.compile fuses the elementwise work between the GEMMs and can autotune them
("max-autotune") at a compile cost of seconds to minutes per layout. They combine: compile for
the kernels (a mode without CUDA graphs of its own: "default" or "max-autotune-no-cudagraphs"),
flexikern's graphs for the launches. On CPU only compile applies.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["CompiledForwards", "compiled_forwards", "compile_options", "captures_cuda_graphs", "MODES"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_OPTION_NAMES = ("mode", "backend", "options")

_LOCK = threading.Lock()
_FUNCTIONS: dict[tuple, tuple[Any, Any]] = {}   # (model class, options key) -> compiled functions
_LAYOUTS: set[tuple] = set()   # every (options key, model id, layout) compiled in this process


def compile_options(compile: Any) -> dict[str, Any] | None:
    """`sample`'s `compile` argument as torch.compile keyword arguments, or None (no compile).

    False: None. True or "default": {} (inductor, default mode). Another mode string: {"mode":
    ...}, one of `MODES`. A dict: torch.compile's `mode` or `options` (exclusive, as torch.compile
    has them) and `backend` (e.g. {"backend": "aot_eager"}); `fullgraph` and `dynamic` are
    flexikern's (True, False).

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
        return {} if compile == "default" else {"mode": compile}
    if isinstance(compile, dict):
        unknown = sorted(set(compile) - set(_OPTION_NAMES))
        if unknown:
            raise ValueError(f"compile={compile!r}: unknown torch.compile arguments {unknown}; expected some of "
                             f"{list(_OPTION_NAMES)} (fullgraph=True and dynamic=False are always used)")
        mode = compile.get("mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"compile: mode={mode!r}; expected one of {list(MODES)}")
        if mode is not None and compile.get("options") is not None:
            raise ValueError(f"compile={compile!r}: give `mode` or `options`, not both (torch.compile takes "
                             f"one); a mode is a preset of options")
        return {k: v for k, v in compile.items() if v is not None and not (k == "mode" and v == "default")}
    raise TypeError(f"compile={compile!r}: expected True, False, a torch.compile mode (e.g. "
                    f"'max-autotune-no-cudagraphs') or a dict of torch.compile arguments")


def captures_cuda_graphs(options: dict[str, Any]) -> bool:
    """Whether compiling with `options` (`compile_options`) captures CUDA graphs of its own, which
    cannot run inside flexikern's: inductor's "reduce-overhead" and "max-autotune" modes, its
    `triton.cudagraphs` option, or the "cudagraphs" backend."""
    return (options.get("mode") in ("reduce-overhead", "max-autotune")
            or bool((options.get("options") or {}).get("triton.cudagraphs"))
            or options.get("backend") == "cudagraphs")


def _key(options: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


class CompiledForwards:
    """One model's `forward` and `forward_packed` under `torch.compile(fullgraph=True,
    dynamic=False, **options)`: the compiled functions are its class's (`compiled_forwards`)."""

    def __init__(self, model: nn.Module, functions: tuple[Any, Any], options: dict[str, Any]):
        self.model, self.options = model, dict(options)
        self._forward, self._forward_packed = functions

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(self.model, *args, **kwargs)

    def forward_packed(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward_packed(self.model, *args, **kwargs)

    @contextlib.contextmanager
    def running(self, layouts: set[tuple]) -> Iterator[None]:
        """Inside: calls of these `layouts` (`GuidedDenoiser.layouts`) compile (once each) without
        hitting dynamo's recompile limit, and raise rather than fall back to eager if they would
        (module docstring). Counted per compile setting and model (an upper bound: models of one
        class and configuration share graphs)."""
        import torch._dynamo
        key = (_key(self.options), id(self.model))
        with _LOCK:
            _LAYOUTS.update((*key, *layout) for layout in layouts)
            needed = len(_LAYOUTS)
        limit = max(torch._dynamo.config.recompile_limit, needed)
        try:
            with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
                yield
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                f"compile: torch.compile reached its recompile limit ({limit} graphs per function) for "
                f"{type(self.model).__name__}'s forward; this run needs {len(layouts)} layouts. Free the "
                f"compiled graphs (torch._dynamo.reset()) or raise torch._dynamo.config.recompile_limit") from e


def compiled_forwards(model: nn.Module, options: dict[str, Any]) -> CompiledForwards:
    """`model`'s forwards compiled with `options` (`compile_options`); the compiled functions are
    made once per model class and options, and hold no model."""
    cls, key = type(model), _key(options)
    with _LOCK:
        functions = _FUNCTIONS.get((cls, key))
        if functions is None:
            functions = _FUNCTIONS[(cls, key)] = (
                torch.compile(cls.forward, fullgraph=True, dynamic=False, **options),
                torch.compile(cls.forward_packed, fullgraph=True, dynamic=False, **options))
    return CompiledForwards(model, functions, options)
