"""CUDA graphs per patch-size phase: one captured graph runs a whole denoising step.

A FlexiDiT schedule is a few *phases*, runs of steps with the same (conditional patch size,
guidance patch size); with the batch, the dtypes and the guidance rule fixed, every step of a
phase launches the same kernels on the same shapes. `GraphRunner` captures ONE graph per phase
(model forward(s), guidance combine and the sampler update) and replays it for each of the
phase's steps, so a step costs one `replay()` instead of hundreds of kernel launches from Python.

How (the stable-fast / vLLM recipe):
* Static inputs: the state `x`, the step's noise, the model timestep and the sampler's
  coefficient row are device buffers owned by the graph; the runner copies the step's values in
  (`copy_`, device to device) before `replay()`. The sampler runs at "step 0" of a one-row view of
  its tables, so no step index is read on the host: indexing a table with a 0-dim device tensor
  calls `.item()`, a host sync that breaks capture and would bake one step into the graph.
* The conditions are static buffers too: exactly the denoiser's declared `conditions` (class
  labels, or the tensors of a text condition: the fields of a dataclass), so repeated sampling
  with new labels replays the same graphs (count: `GraphRunner.captures`); their shapes are part
  of the key. Nothing else of the denoiser is an input: an attribute it does not declare is
  read at capture time like any constant, so it is part of the key (below).
* Inside a graph the two branches of a mixed-size step run as two forwards, never packed:
  building a `Packing` copies host lists to the device, which capture does not allow (and graphs
  already remove the launch overhead packing saves).
* The model builds a phase's per-size caches first (`model.prepare`: positional tables, the
  kernels' resize matrices: constants, none derived from the weights); the graph reads them in
  place, so it keeps the tensors `prepare` returns alive.
  Warm-up runs on a side stream (Triton autotuning, cuBLAS/attention workspaces), then capture
  into one memory pool per runner (`torch.cuda.graph_pool_handle()`); a model lives on one
  device, so that is one pool per device.
* The cache is an LRU of at most `max_graphs` graphs, keyed by `GraphRunner.key`: the patch
  sizes, batch and dtypes, and the full state of everything the captured step reads, derived
  rather than listed (`state_of`): every attribute of the sampler (but its per-step tables,
  static inputs), of the denoiser (but its model and conditions; its guidance as `guidance`,
  left out of a conditional-only step, which reads only its rule) and of the loop (but what
  `step` does not read: the schedule and its phases), and of every module of the model its type,
  mode (`training`), public attributes and hooks, and the global torch settings that choose the
  captured kernels (`_torch_settings`: autocast, TF32 and reduced-precision matmul flags, SDPA's
  enabled backends). A tensor among them counts by its values on the host, by its identity (the
  address a graph reads) on the device. `release()` (or dropping the runner) frees the graphs.
  Phases shorter than `min_phase_steps` run eagerly: capturing costs about `warmup + 1` steps.
* Captured graphs read the model's parameters and buffers in place, and nothing derived from
  them is baked (the model resizes its kernels inside the step), so a change in place (an
  optimizer step, `load_state_dict`, a write through `.data`, an EMA swap) is in the next replay.
  A parameter given new storage (`.to()`, `p.data = t`, a new model) changes its address: the
  runner notices and recaptures. Dispatch happens at capture time; the forced backends are part
  of the key.

On a CPU model `cuda_graphs=True` warns once per process and runs the same phase bodies (static
buffers and all) eagerly, with results equal to plain sampling.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from flexikern.ops._checks import is_int
from flexikern.ops.patch_size import PatchSize

# The sampler's objects, by the names of their classes in `flexikern.diffusion` (which imports
# this module: the runtime never imports the sampler back).
DenoisingLoop = GuidedDenoiser = FlexibleDenoiser = Any

__all__ = ["GraphRunner", "GraphKey", "graph_key", "plan_phases", "runner_for", "release_graphs",
           "run_graphed", "state_of"]

# The sampler's per-step tables: static inputs of a graph (refilled per step), not constants.
STATIC_SAMPLER_TABLES = ("model_timesteps", "table")
# What `DenoisingLoop.step` does not read (the phases say which sizes a step runs at).
LOOP_NOT_READ_BY_STEP = ("schedule", "phases", "guided")


@dataclass(frozen=True)
class GraphKey:
    """What changes a captured step's kernels (or the Python constants baked into it)."""

    cond_size: PatchSize
    guid_size: PatchSize | None
    rule: str                    # the denoiser's rule: "cond", "cfg" or "weak"
    guidance: Any                # the guidance's state (its scales are constants in the graph); None for "cond"
    batch: int
    state_dtype: torch.dtype     # the sampling state x (float32)
    model_dtype: torch.dtype
    sampler: tuple               # the sampler's state (`state_of`: class, settings, table shapes)
    device: str
    backends: tuple              # forced backends at capture time
    conditions: tuple = ()       # (name, shapes and dtypes) of the denoiser's declared conditions
    settings: tuple = ()         # the state of the rest of the loop, the denoiser and the model


def graph_key(cond_size: PatchSize, guid_size: PatchSize | None, *, rule: str, guidance: Any, batch: int,
              state_dtype: torch.dtype, model_dtype: torch.dtype, sampler: tuple, device: str,
              backends: tuple = (), conditions: tuple = (), settings: tuple = ()) -> GraphKey:
    """The cache key of one phase. A conditional-only step ("cond") ignores the guidance settings,
    so such graphs are shared across guidance scales and modes."""
    if rule == "cond":
        guid_size, guidance = None, None
    return GraphKey(cond_size, guid_size, rule, guidance, int(batch), state_dtype, model_dtype, tuple(sampler),
                    str(device), tuple(backends), tuple(conditions), tuple(settings))


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def state_of(value: Any, static: frozenset = frozenset(), _seen: frozenset = frozenset()) -> Any:
    """A hashable description of what a captured step can bake in from `value`, derived from all
    of it: plain values as they are; containers and objects (their class and every attribute,
    dataclasses included) item by item; a tensor by its metadata and, on the host, its values
    (read at capture as constants) or, on a device, its identity (a graph reads its address,
    and its values live). A tensor whose id is in `static` (a static input, refilled per run)
    counts by its metadata only. Modules: see `_module_state`; functions by identity.
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_state(value, id(value) in static)
    if id(value) in _seen:
        return ("<cycle>", _type_name(value))
    seen = _seen | {id(value)}
    if isinstance(value, nn.Module):
        return _module_state(value)
    if isinstance(value, (tuple, list)):
        return (_type_name(value), tuple(state_of(v, static, seen) for v in value))
    if isinstance(value, (set, frozenset)):
        return (_type_name(value), tuple(sorted((state_of(v, static, seen) for v in value), key=repr)))
    if isinstance(value, dict):
        return ("dict", tuple(sorted(((state_of(k, static, seen), state_of(v, static, seen))
                                      for k, v in value.items()), key=repr)))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type)):
        return ("callable", getattr(value, "__qualname__", ""), id(value))
    attributes = _attributes(value)
    if attributes is not None:
        return (_type_name(value), state_of(attributes, static, seen))
    return (_type_name(value), repr(value))


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _attributes(value: Any) -> dict[str, Any] | None:
    """An object's attributes (`__dict__` and `__slots__`), or None for an object without any."""
    found = dict(getattr(value, "__dict__", {}))
    for cls in type(value).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(value, name):
                found[name] = getattr(value, name)
    return found if found or hasattr(value, "__dict__") else None


def _tensor_state(t: torch.Tensor, static: bool) -> tuple:
    meta = (tuple(t.shape), t.dtype, str(t.device))
    if static:
        return ("static tensor", meta)
    if t.device.type == "cpu":
        data = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        return ("tensor", meta, hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest())
    return ("device tensor", meta, t.stride(), t.data_ptr())


def _module_state(model: nn.Module) -> tuple:
    """Every module's name, type, mode and public attributes (sizes, settings, LoRA scales), and
    its hooks: what a forward reads besides its parameters and buffers (which a graph reads in
    place; their addresses are `_weights_stamp`)."""
    return tuple((name, _type_name(module), module.training,
                  state_of({k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}),
                  tuple(module._forward_hooks), tuple(module._forward_pre_hooks))
                 for name, module in model.named_modules())


def plan_phases(phases: Sequence[tuple], key: Callable[[PatchSize, PatchSize | None], GraphKey],
                min_phase_steps: int = 2,
                graphable: Callable[[GraphKey], bool] = lambda key: True) -> list[tuple[int, int, GraphKey | None]]:
    """(start, stop, key or None) per phase: None = run eagerly (too short to repay a capture, or
    not graphable). Phases come from `DenoisingLoop.phases`: (start, stop, cond size, guid size)."""
    plan = []
    for start, stop, cond_size, guid_size in phases:
        k = key(cond_size, guid_size)
        graphed = stop - start >= min_phase_steps and graphable(k)
        plan.append((start, stop, k if graphed else None))
    return plan


def _forced_backends() -> tuple:
    from flexikern.ops._dispatch import backends, forced_backend
    return tuple((op, forced_backend(op)) for op in sorted(backends()) if forced_backend(op))


def _condition_tensors(name: str, value: Any) -> dict[str, torch.Tensor | None]:
    """The tensors of a declared condition: {"": t} for a tensor, {field: tensor or None} for a
    dataclass of tensors (a TextCondition: embeds, mask), {} for None (no such condition)."""
    if value is None:
        return {}
    if isinstance(value, torch.Tensor):
        return {"": value}
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if all(v is None or isinstance(v, torch.Tensor) for v in fields.values()):
            return fields
    raise TypeError(f"condition {name}: expected a tensor or a dataclass of tensors (e.g. a TextCondition), "
                    f"got {type(value).__name__}")


def _clone_condition(name: str, value: Any) -> Any:
    """A copy of a condition with its own tensors (the static buffers a graph reads)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.clone()
    clone = copy.copy(value)
    for field, tensor in _condition_tensors(name, value).items():
        object.__setattr__(clone, field, None if tensor is None else tensor.clone())   # frozen dataclasses too
    return clone


def _conditions(denoiser: GuidedDenoiser) -> dict[str, dict[str, torch.Tensor | None]]:
    """The tensors of the denoiser's declared per-run conditions (`GuidedDenoiser.conditions`)."""
    return {name: _condition_tensors(name, value) for name, value in denoiser.conditions.items()}


def _conditions_signature(denoiser: GuidedDenoiser) -> tuple:
    return tuple((name, tuple((field, None if t is None else (tuple(t.shape), t.dtype))
                              for field, t in sorted(tensors.items())))
                 for name, tensors in sorted(_conditions(denoiser).items()))


def _torch_settings() -> tuple:
    """The global torch settings a captured step's kernels are chosen by (baked at capture):
    autocast (on and its dtype, per device type), float32 matmul precision and the TF32 and
    reduced-precision flags (cuBLAS, cuDNN), SDPA's enabled backends, deterministic algorithms."""
    cuda = torch.backends.cuda
    autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda"))
    return (autocast, torch.get_float32_matmul_precision(), cuda.matmul.allow_tf32,
            cuda.matmul.allow_fp16_reduced_precision_reduction, cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, cuda.flash_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(), cuda.cudnn_sdp_enabled(),
            torch.are_deterministic_algorithms_enabled())


def _weights_stamp(model: FlexibleDenoiser) -> tuple:
    """Where the model's parameters and buffers are: graphs read them in place (their values live,
    so a change in place needs no recapture), at these addresses."""
    return tuple((name, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, str(t.device))
                 for named in (model.named_parameters(), model.named_buffers()) for name, t in named)


class _PhaseGraph:
    """The static buffers of one phase and its captured step (or, on CPU, the step run eagerly)."""

    def __init__(self, loop: DenoisingLoop, x: torch.Tensor, cond_size: PatchSize, guid_size: PatchSize | None,
                 stochastic: bool):
        sampler = loop.sampler
        self.x = x.clone()
        self.noise = torch.zeros_like(x) if stochastic else None
        self.t = sampler.model_timesteps[:1].clone()
        self.coefficients = sampler.table[:1].clone()
        # A one-row view of the sampler's tables (`STATIC_SAMPLER_TABLES`): the step runs at k = 0 of it.
        static_sampler = copy.copy(sampler)
        static_sampler.model_timesteps, static_sampler.table = self.t, self.coefficients
        # The denoiser on its own copies of its declared conditions, refilled per run (`bind`);
        # unpacked: see the module docstring.
        conditions = {name: _clone_condition(name, value) for name, value in loop.denoiser.conditions.items()}
        denoiser = loop.denoiser.with_conditions(conditions, packed=False)
        self.conditions = _conditions(denoiser)
        step_loop = copy.copy(loop)
        step_loop.sampler, step_loop.denoiser = static_sampler, denoiser
        self._step = lambda: self.x.copy_(step_loop.step(self.x, 0, self.noise, cond_size, guid_size))
        self.graph: torch.cuda.CUDAGraph | None = None
        # The model's per-size caches the graph reads in place (positional tables and resize
        # matrices, in LRU caches): kept alive as long as the graph.
        self.keepalive = list(denoiser.prepare_step(x, cond_size, guid_size))

    def capture(self, pool: Any, warmup: int) -> None:
        """Warm up on a side stream, then capture the step into `pool`."""
        saved = self.x.clone()
        stream = torch.cuda.Stream(device=self.x.device)
        stream.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(self.x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self._step()
        self.graph = graph
        self.x.copy_(saved)
        # The Python step (and through it the model) is no longer needed: drop the references so
        # that a runner registered per model does not keep its model alive.
        self._step = None

    def bind(self, loop: DenoisingLoop, x: torch.Tensor) -> None:
        """Copy this run's state and conditions into the static buffers."""
        self.x.copy_(x)
        current = _conditions(loop.denoiser)
        for name, buffers in self.conditions.items():
            for field, buffer in buffers.items():
                if buffer is not None:
                    buffer.copy_(current[name][field])

    def run_step(self, loop: DenoisingLoop, k: int,
                 draw_noise: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        sampler = loop.sampler
        self.t.copy_(sampler.model_timesteps[k:k + 1])
        self.coefficients.copy_(sampler.table[k:k + 1])
        if self.noise is not None:
            draw_noise(self.noise)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = self._step = None
        self.keepalive.clear()


_warned_cpu = False


def _warn_cpu_once(device: torch.device) -> None:
    global _warned_cpu
    if not _warned_cpu:
        _warned_cpu = True
        warnings.warn(f"cuda_graphs=True: the model is on {device}; CUDA graphs need a CUDA device, "
                      f"so sampling runs eagerly (same results). Shown once per process.",
                      RuntimeWarning, stacklevel=4)


class GraphRunner:
    """Captures and replays one CUDA graph per schedule phase (see the module docstring).

    Args:
        max_graphs: the LRU bound on cached graphs (a weak-first schedule with guidance needs 2-3
            per batch size); 0 = never capture.
        min_phase_steps: phases with fewer steps run eagerly.
        warmup: warm-up steps on a side stream before each capture.
    Counters: `captures`, `replays`, `eager_steps`.
    """

    def __init__(self, max_graphs: int = 8, min_phase_steps: int = 2, warmup: int = 2):
        for name, value, low in (("max_graphs", max_graphs, 0), ("min_phase_steps", min_phase_steps, 1),
                                 ("warmup", warmup, 1)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name}={value!r}: expected an int >= {low}")
        self.max_graphs, self.min_phase_steps, self.warmup = max_graphs, min_phase_steps, warmup
        self._graphs: OrderedDict[GraphKey, _PhaseGraph] = OrderedDict()
        self._pool = None
        self._stamp: tuple | None = None
        self._lock = threading.Lock()   # one run at a time: runs share the graphs, buffers and pool
        self.captures = self.replays = self.eager_steps = 0

    def __len__(self) -> int:
        return sum(entry.graph is not None for entry in self._graphs.values())

    def keys(self) -> list[GraphKey]:
        """The cached phases, least recently used first."""
        return list(self._graphs)

    def release(self) -> None:
        """Free every graph, its static buffers and the memory pool."""
        for entry in self._graphs.values():
            entry.release()
        self._graphs.clear()
        self._pool = None

    # The two CUDA-only calls, methods so that the caching logic can be tested without a GPU.
    def _can_capture(self, x: torch.Tensor) -> bool:
        return x.device.type == "cuda"

    def _new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def key(self, loop: DenoisingLoop, x: torch.Tensor, cond_size: PatchSize, guid_size: PatchSize | None,
            backends: tuple = (), states: tuple | None = None) -> GraphKey:
        """The key of the phase (`cond_size`, `guid_size`) of `loop` from state `x` (see the module
        docstring); `states`: `loop_states(loop)` when already derived (once per run)."""
        denoiser = loop.denoiser
        sampler_state, guidance_state, settings = states if states is not None else self.loop_states(loop)
        return graph_key(cond_size, guid_size, rule=denoiser.rule(cond_size, guid_size),
                         guidance=guidance_state, batch=x.shape[0], state_dtype=x.dtype,
                         model_dtype=denoiser.dtype, sampler=sampler_state,
                         device=str(x.device), backends=backends,
                         conditions=_conditions_signature(denoiser), settings=settings)

    @staticmethod
    def loop_states(loop: DenoisingLoop) -> tuple:
        """(sampler state, guidance state, the rest): `state_of` everything a captured step of
        `loop` reads, but its per-step tables, conditions and weights (static inputs, or read in
        place)."""
        sampler, denoiser = loop.sampler, loop.denoiser
        tables = frozenset(id(getattr(sampler, name)) for name in STATIC_SAMPLER_TABLES)
        skip_loop = {"model", "sampler", "denoiser", "guidance", *LOOP_NOT_READ_BY_STEP}
        skip_denoiser = {"model", "guidance", *denoiser.conditions}
        settings = (state_of({k: v for k, v in vars(loop).items() if k not in skip_loop}),
                    state_of({k: v for k, v in vars(denoiser).items() if k not in skip_denoiser}),
                    (_type_name(denoiser), _type_name(loop)),
                    _module_state(loop.model), _torch_settings())
        return state_of(sampler, tables), state_of(denoiser.guidance), settings

    def _entry(self, key: GraphKey, loop: DenoisingLoop, x: torch.Tensor, cond_size: PatchSize,
               guid_size: PatchSize | None, capture: bool) -> _PhaseGraph:
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            return entry
        entry = _PhaseGraph(loop, x, cond_size, guid_size, loop.sampler.stochastic)
        if capture:
            if self._pool is None:
                self._pool = self._new_pool()
            entry.capture(self._pool, self.warmup)
            self.captures += 1
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)[1].release()
        return entry

    def run(self, loop: DenoisingLoop, x: torch.Tensor, draw_noise: Callable[[torch.Tensor], torch.Tensor] | None,
            on_step: Callable[[], None] | None = None) -> torch.Tensor:
        """Run every step of `loop` from the state `x`; returns the final state (a new tensor).

        `draw_noise(out)` fills `out` with the next step's noise (called once per stochastic step,
        in order); `on_step()` is called after each step (a progress bar). Runs from several
        threads take turns (they would capture into one pool and share the static buffers).
        """
        with self._lock:
            return self._run(loop, x, draw_noise, on_step)

    def _run(self, loop: DenoisingLoop, x: torch.Tensor, draw_noise: Callable[[torch.Tensor], torch.Tensor] | None,
             on_step: Callable[[], None] | None) -> torch.Tensor:
        on_cuda = self._can_capture(x)
        if not on_cuda:
            _warn_cpu_once(x.device)
        stamp = _weights_stamp(loop.model)
        if stamp != self._stamp:   # new weights (or a new model): the graphs read stale tensors
            self.release()
            self._stamp = stamp
        backends, states = _forced_backends(), self.loop_states(loop)
        plan = plan_phases(loop.phases, lambda c, g: self.key(loop, x, c, g, backends, states),
                           self.min_phase_steps, lambda key: self.max_graphs > 0 or not on_cuda)
        with torch.inference_mode():
            for (start, stop, cond_size, guid_size), (_, _, key) in zip(loop.phases, plan):
                if key is None:   # eager, exactly as `sample` steps
                    for k in range(start, stop):
                        noise = draw_noise(torch.empty_like(x)) if loop.sampler.stochastic else None
                        x = loop.step(x, k, noise, cond_size, guid_size)
                        self.eager_steps += 1
                        if on_step:
                            on_step()
                    continue
                entry = self._entry(key, loop, x, cond_size, guid_size, capture=on_cuda)
                entry.bind(loop, x)
                for k in range(start, stop):
                    entry.run_step(loop, k, draw_noise)
                    if on_cuda:
                        self.replays += 1
                    else:
                        self.eager_steps += 1
                    if on_step:
                        on_step()
                x = entry.x
            return x.clone()


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_for(model: FlexibleDenoiser) -> GraphRunner:
    """The default runner of `model` (used by `sample(..., cuda_graphs=True)`); freed with the model."""
    runner = _RUNNERS.get(model)
    if runner is None:
        runner = _RUNNERS[model] = GraphRunner()
    return runner


def release_graphs(model: FlexibleDenoiser | None = None) -> None:
    """Free the default runners' graphs: `model`'s, or every model's."""
    for m in ([model] if model is not None else list(_RUNNERS.keys())):
        runner = _RUNNERS.pop(m, None)
        if runner is not None:
            runner.release()


def run_graphed(loop: DenoisingLoop, x: torch.Tensor, draw_noise: Callable[[torch.Tensor], torch.Tensor] | None,
                runner: GraphRunner | bool = True, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """`sample`'s graphed path: `runner=True` uses the model's default runner."""
    if not isinstance(runner, GraphRunner):
        runner = runner_for(loop.model)
    return runner.run(loop, x, draw_noise, on_step)
