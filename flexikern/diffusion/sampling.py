"""The sampling loop: `sample(model, y, schedule, guidance, sampler=...)`.

One denoising step is `DenoisingLoop.step(x, k, noise, cond_size, guid_size) -> x_next`: a function
of tensors (timesteps and coefficients are gathered from per-step device tables at step `k`) for
fixed patch sizes. `flexikern.runtime.graphs` captures one step per patch-size phase
(`DenoisingLoop.phases`) at k = 0 of one-row static copies of those tables and replays it
(`sample(..., cuda_graphs=True)`).

Randomness: sample i draws its initial noise and every step's noise from its own CPU
`torch.Generator` seeded `seed + i` (or `seed[i]`), then moves it to the device. Samples therefore
do not depend on the device, the batch they are in, or how a run is sharded across processes.
(`noise_device="model"` trades that for speed: see `sample`.)

Host synchronisation: after the first step, a step reads nothing back from the device and copies
no host data to it, so the host queues the next step while the GPU runs this one (checked in
tests/test_nosync.py). `sample` validates its conditions once and runs the steps inside
`conditions_checked()` (forwards skip the value checks that would read them back); before the
first step `GuidedDenoiser.prepare` has the model build its per-size caches (packings with their
host boundaries, positional tables, the kernels' resize matrices) for every phase. What is left: with the
default `noise_device="cpu"` on CUDA, a step waits on an event for the previous step's noise copy
before refilling the pinned buffer (`StepNoise`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

import torch

from flexikern.ops._checks import check_flag, check_seed, max_seed
from flexikern.diffusion.gaussian import _Sampler, make_sampler
from flexikern.diffusion.guidance import Guidance, GuidedDenoiser
from flexikern.diffusion.protocol import FlexibleDenoiser, check_denoiser, eval_mode
from flexikern.diffusion.schedule import Schedule
from flexikern.diffusion.schedulers import SchedulerSampler, is_scheduler
from flexikern.models.base import conditions_checked
from flexikern.ops.patch_size import PatchSize

if TYPE_CHECKING:
    from flexikern.runtime.graphs import GraphRunner

__all__ = ["sample", "DenoisingLoop", "StepNoise", "sample_seeds", "LATENT_SCALE"]

LATENT_SCALE = 0.18215   # Stable Diffusion's VAE latent scale, as DiT samples


def sample_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-sample seeds: `seed + i` for an int, the given sequence otherwise.

    Every seed is an int in [0, 2**63) (`_checks.check_seed`: numpy ints are fine; bools, floats
    and strings are not).

    Raises:
        ValueError: naming the seed and what was expected, or a sequence of the wrong length.
    """
    if isinstance(seed, (Set, Mapping)):
        raise ValueError(f"seed={seed!r}: a {type(seed).__name__} has no order; pass an int or a list of "
                         f"seeds, one per sample")
    if isinstance(seed, (str, bytes)) or not isinstance(seed, Iterable) or getattr(seed, "ndim", None) == 0:
        first = check_seed(seed, "seed")
        if first > max_seed(n):
            raise ValueError(f"seed={seed!r}: sample i uses seed + i, which must stay below 2**63 for {n} "
                             f"samples; pass a smaller seed")
        return [first + i for i in range(n)]
    seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
    if len(seeds) != n:
        raise ValueError(f"seed: got {len(seeds)} seeds for {n} samples; pass an int or one seed per sample")
    return seeds


class DenoisingLoop:
    """A schedule, a guidance rule and a sampler bound to one model and one batch of conditions."""

    def __init__(self, model: FlexibleDenoiser, y: Any, schedule: Schedule, guidance: Guidance | float | None,
                 sampler: _Sampler, packed: bool | None = None, compiled: Any = None, y_null: Any = None):
        if schedule.num_steps != sampler.num_steps:
            evaluations = (f" ({sampler.num_steps} model evaluations for num_inference_steps="
                           f"{sampler.num_inference_steps}: a schedule has one step per evaluation)"
                           if isinstance(sampler, SchedulerSampler) else "")
            raise ValueError(f"schedule has {schedule.num_steps} steps but the {sampler.name} sampler has "
                             f"{sampler.num_steps}{evaluations}; build both with the same step count")
        self.model, self.schedule, self.sampler = model, schedule.validate(model), sampler
        self.guidance = Guidance.of(guidance)
        self.denoiser = GuidedDenoiser(model, y, self.guidance, packed, compiled, y_null=y_null)
        self.guided = self.guidance.active_steps(sampler.model_timesteps)
        _check_guidance(self.guidance, self.guided, sampler, model)
        self.phases = schedule.phases(self.guided)   # [(start, stop, cond size, guidance size or None)]
        if (self.denoiser.y_null is None
                and any(self.denoiser.rule(c, g) == "cfg" for _, _, c, g in self.phases)):
            raise ValueError(f"guidance={self.guidance.mode!r}: classifier-free guidance needs the null class, "
                             f"which this model does not have (trained without class dropout); sample "
                             f"with Guidance(mode='none')")

    def step(self, x: torch.Tensor, k: int | torch.Tensor, noise: torch.Tensor | None,
             cond_size: PatchSize, guid_size: PatchSize | None) -> torch.Tensor:
        """x_{k+1} from x_k: the guided model output at step k, then the sampler's update.

        `k`: an int or a 0-dim long tensor (on CUDA the latter syncs: tables index it with .item()).
        """
        t = self.sampler.model_timesteps[k].expand(x.shape[0])
        model_input = getattr(self.sampler, "model_input", None)   # diffusers' scale_model_input
        x_in = x if model_input is None else model_input(x, k)
        return self.sampler.step(self.denoiser(x_in, t, cond_size, guid_size), x, k, noise)

    def flops(self, batch: int) -> int:
        """Forward FLOPs this loop spends for `batch` samples (guidance interval included)."""
        return self.schedule.flops(self.model, batch, self.guided)


def sample(model: FlexibleDenoiser, y: Any, schedule: Schedule, guidance: Guidance | float | None = None,
           sampler: str | _Sampler = "ddpm", seed: int | Sequence[int] = 0, progress: bool = True,
           vae: Any = None, eta: float = 0.0, noise: torch.Tensor | None = None,
           shift: float = 1.0, cuda_graphs: bool | GraphRunner = False, noise_device: str = "cpu",
           packed: bool | None = None, compile: bool | str | dict = False, y_null: Any = None) -> torch.Tensor:
    """Sample from a (flexible) DiT with a patch-size schedule.

    Every argument is checked before any compute (see Raises).

    Args:
        model: a `FlexibleDenoiser` (FlexiDiT, FlexiPixArt, FlexiLatte); run in eval mode,
            restored after (`eval_mode`: threads may sample one model at once).
        y: the conditions, checked by `model.check_condition`: (N,) class labels, or a
            `TextCondition` for a text model.
        schedule: per-step patch sizes (`Schedule`); its step count is the sampler's. A schedule
            built for a budget (`Schedule.for_budget`, `calibrate`) warns when this run costs more
            than the budget (e.g. built for guidance, sampled without it).
        guidance: `Guidance(scale, mode)`; a number s = `Guidance(s)` (1 = no guidance, as
            diffusers' `guidance_scale`); None = the conditional branch only.
        sampler: "ddpm" (DiT's ancestral sampler), "ddim" (with `eta`), "flow" (rectified-flow
            Euler for velocity models, with `shift`), a sampler object (`make_sampler(...)`,
            which then holds its own eta and shift), or a diffusers scheduler (DDIM,
            DPMSolverMultistep, Euler, ...: `flexikern.diffusion.schedulers`), run for as many
            inference steps as make `schedule.num_steps` model evaluations (Heun: 9 for 5 steps),
            with `eta` where its step takes one
            and its step noise drawn from one CPU generator seeded with the first seed (so the
            noise of stochastic schedulers depends on the batch); wrap it in a
            `SchedulerSampler` to choose these. A scheduler's run cannot use `cuda_graphs`.
        seed: an int in [0, 2**63) (sample i uses seed + i) or one such seed per sample.
        progress: show a tqdm bar.
        vae: if given, an object with `decode` (diffusers' `AutoencoderKL`); returns
            `decode(vae, latents)`.
        noise: the initial noise (N, *model.latent_shape), a finite float tensor, instead of drawing it.
            Its spatial size may differ from the model's (another resolution) where every patch
            size of the schedule divides it. A diffusers scheduler's `init_noise_sigma` scales it.
        cuda_graphs: True (or a `flexikern.runtime.graphs.GraphRunner`) captures one CUDA graph
            per patch-size phase and replays it per step; the graphs are cached per model and
            reused by later calls. On CPU it warns once and runs eagerly (same results).
        noise_device: where each step's noise is drawn. "cpu" (default): sample i's own CPU
            generator, so samples do not depend on the device or batch (the initial noise is
            always drawn this way). "model": one generator on the model's device seeded with the
            first seed, for the whole batch: no per-sample host work or host-to-device copy per
            step (with graphs, the host's per-step draws for a large batch can become the limit),
            but the step noise then depends on the device, the batch composition and its order.
        packed: run a step's two branches of different patch sizes as one packed forward
            (`model.forward_packed`, varlen attention). None (default): on CUDA only, where a
            fused varlen kernel makes it pay; False: two forwards.
        compile: run the model's forwards under `torch.compile(fullgraph=True, dynamic=False)`:
            True (inductor, default mode), a mode ("max-autotune-no-cudagraphs", ...) or a dict
            of torch.compile's `mode`/`backend`/`options`. Each layout of the schedule (patch
            size and batch of a forward; a weak-first schedule has at most four) compiles once,
            on first use, and later runs reuse it; outputs equal eager sampling up to float
            rounding. With `cuda_graphs`, use a mode without its own CUDA graphs (not
            "reduce-overhead" or "max-autotune"). See `flexikern.runtime.compiled`.
        y_null: the guidance branch's condition instead of `model.null_condition(y)`, checked as
            `y` is (N rows): e.g. a negative prompt's text embeddings, as diffusers' PixArt
            pipeline guides with the empty prompt's encoding rather than the learned null caption.
    Returns:
        (N, *model.latent_shape) latents (`noise`'s shape when given) on the model's device, or the
            decoded images.
    Raises:
        TypeError: `model` lacks part of the `FlexibleDenoiser` protocol; `schedule`, `guidance`,
            `sampler` (a scheduler whose step cannot be driven: its class and what it lacks),
            `vae`, `noise` or a flag of the wrong type.
        ValueError: a bad value (conditions, `y_null`, seeds, eta, shift, noise shape, size or NaN,
            a schedule the model cannot run or of another length than the sampler's, CFG without
            a null condition, a guidance interval that guides no step, `first_channels` beyond the
            model's channels, `cuda_graphs` with a diffusers scheduler), naming the argument.
    """
    check_denoiser(model)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a flexikern.Schedule (e.g. Schedule.static(250, 2)), "
                        f"got {type(schedule).__name__}")
    guidance = Guidance.of(guidance)
    _check_options(progress, packed, cuda_graphs, vae)
    compile_kwargs = _check_compile(compile, cuda_graphs)
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    y = model.check_condition(y, device=device)
    n = len(y)
    if y_null is not None:
        y_null = model.check_condition(y_null, n, device=device)
    for name, condition in (("y", y), ("y_null", y_null)):
        embeds = getattr(condition, "embeds", None)   # text conditions; class labels are ints
        if embeds is not None and not bool(torch.isfinite(embeds).all()):   # once, before sampling
            raise ValueError(f"{name}: text embeddings contain NaN or inf; every sample would be NaN")
    seeds = sample_seeds(seed, n)
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, schedule.num_steps, eta=eta, shift=shift)
    elif is_scheduler(sampler):
        if not shift == 1:
            raise ValueError(f"shift={shift!r}: a diffusers scheduler takes its shift from its own config; "
                             f"leave shift at 1")
        sampler = SchedulerSampler.for_evaluations(sampler, schedule.num_steps, device=device,
                                                   generator=torch.Generator().manual_seed(seeds[0]),
                                                   eta=None if eta == 0 else eta)
    else:
        _check_sampler(sampler, eta, shift)
    if isinstance(sampler, SchedulerSampler) and cuda_graphs is not False:
        raise ValueError(f"cuda_graphs={cuda_graphs!r} with a diffusers {sampler.name}: its step keeps "
                         f"Python state between steps, which a replayed graph would not update; sample with "
                         f"cuda_graphs=False, or with a flexikern sampler ('ddpm', 'ddim', 'flow')")
    sampler.to(device)
    compiled = None
    if compile_kwargs is not None:
        from flexikern.runtime.compiled import compiled_forwards
        compiled = compiled_forwards(model, compile_kwargs)
    loop = DenoisingLoop(model, y, schedule, guidance, sampler, packed, compiled, y_null)
    shape = tuple(model.latent_shape)
    if noise is not None:
        _check_noise(noise, (n, *shape), schedule)
        shape = tuple(noise.shape[1:])
    _warn_over_budget(loop)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    step_noise = StepNoise(generators, (n, *shape), device, noise_device, seeds[0])
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]) if noise is None else noise.float()
    x = x.to(device)
    sigma = getattr(sampler, "init_noise_sigma", 1.0)   # a diffusers scheduler's (Euler: sigma_max)
    if not (isinstance(sigma, (int, float)) and sigma == 1):
        x = x * sigma
    if callable(getattr(sampler, "begin", None)):   # a diffusers scheduler starts afresh
        sampler.begin()

    from tqdm.auto import tqdm
    compiling = contextlib.nullcontext() if compiled is None else compiled.running(loop.denoiser.layouts(x, loop.phases))
    with eval_mode(model), torch.inference_mode(), conditions_checked(), compiling, tqdm(
            total=sampler.num_steps, disable=not progress, desc=f"sampling {schedule!r}", leave=False) as bar:
        x = x.clone()   # an inference tensor like every later step's state (one guard for compiled steps)
        loop.denoiser.prepare(x, loop.phases)
        if cuda_graphs is not False:   # True or a GraphRunner
            from flexikern.runtime.graphs import run_graphed
            x = run_graphed(loop, x, step_noise.draw if sampler.stochastic else None,
                            cuda_graphs, on_step=lambda: bar.update(1))
        else:
            for start, stop, cond_size, guid_size in loop.phases:
                for k in range(start, stop):
                    noise_k = step_noise.draw(torch.empty_like(x)) if sampler.stochastic else None
                    # A Python int: indexing a table with a 0-dim CUDA tensor calls .item(),
                    # a host sync per step.
                    x = loop.step(x, k, noise_k, cond_size, guid_size)
                    bar.update(1)
        if vae is not None:
            x = decode(vae, x)
    return x


def _check_options(progress: Any, packed: Any, cuda_graphs: Any, vae: Any) -> None:
    """`sample`'s flags and `vae`: their types, before any compute."""
    check_flag(progress, "progress")
    if packed is not None and not isinstance(packed, bool):
        raise TypeError(f"packed={packed!r}: expected True, False or None (auto: packed on CUDA)")
    if not isinstance(cuda_graphs, bool):
        from flexikern.runtime.graphs import GraphRunner
        if not isinstance(cuda_graphs, GraphRunner):
            raise TypeError(f"cuda_graphs={cuda_graphs!r}: expected True, False or a "
                            f"flexikern.runtime.graphs.GraphRunner")
    if vae is not None and not callable(getattr(vae, "decode", None)):
        raise TypeError(f"vae={vae!r}: expected a loaded VAE with a decode method, e.g. diffusers' "
                        f"AutoencoderKL.from_pretrained(path); got {type(vae).__name__} (a path is not "
                        f"loaded here)")


def _check_compile(compile: Any, cuda_graphs: Any) -> dict[str, Any] | None:
    """`sample`'s `compile` as torch.compile arguments (None: eager); refused with CUDA graphs
    when its mode captures graphs of its own."""
    from flexikern.runtime.compiled import captures_cuda_graphs, compile_options
    kwargs = compile_options(compile)
    if kwargs is not None and cuda_graphs is not False and captures_cuda_graphs(kwargs):
        raise ValueError(f"compile={compile!r} with cuda_graphs: it captures CUDA graphs of its own, which "
                         f"cannot run inside flexikern's; use compile='max-autotune-no-cudagraphs' (or True) "
                         f"with cuda_graphs, or this setting without cuda_graphs")
    return kwargs


def _check_guidance(guidance: Guidance, guided: list[bool], sampler: _Sampler, model: FlexibleDenoiser) -> None:
    """What `Guidance` cannot check alone: its interval selects a step of this sampler, and its
    `first_channels` are channels of this model."""
    if guidance.enabled and guidance.interval is not None and not any(guided):
        t = sampler.model_timesteps
        raise ValueError(f"interval={guidance.interval}: guides none of the {sampler.name} sampler's "
                         f"{len(guided)} steps, whose model timesteps run from {float(t[0]):g} to "
                         f"{float(t[-1]):g}; give it in those units (e.g. (0, 700)), not as fractions, or "
                         f"sample without guidance (guidance=None)")
    if guidance.first_channels is not None and guidance.first_channels > model.in_channels:
        raise ValueError(f"first_channels={guidance.first_channels}: the model has {model.in_channels} "
                         f"channels; expected at most {model.in_channels} (DiT guides 3 of its 4)")


def _check_sampler(sampler: Any, eta: Any, shift: Any) -> None:
    """A sampler object: what the loop uses of it; it holds its own eta and shift."""
    missing = [name for name in ("num_steps", "stochastic", "model_timesteps", "step", "to")
               if getattr(sampler, name, None) is None]
    if missing:
        raise TypeError(f"sampler={sampler!r}: expected one of 'ddpm', 'ddim', 'flow' or a sampler object "
                        f"(make_sampler(...)); a {type(sampler).__name__} lacks {', '.join(missing)}")
    if not (eta == 0 and shift == 1):
        raise ValueError(f"eta={eta!r}, shift={shift!r}: a sampler object holds its own; pass them to "
                         f"make_sampler(...) instead (or pass the sampler by name)")


def _check_noise(noise: Any, shape: tuple[int, ...], schedule: Schedule) -> None:
    """The initial noise: a finite float tensor of `shape`, or of another spatial size that every
    patch size of `schedule` divides."""
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise: expected a float tensor of shape {shape}, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.is_meta:
        raise ValueError("noise: a meta tensor, which holds no values; pass noise with values (e.g. torch.randn)")
    if noise.dim() != len(shape) or tuple(noise.shape[:2]) != shape[:2]:
        raise ValueError(f"noise: expected shape {shape} (N, *model.latent_shape; the spatial size may differ), "
                         f"got {tuple(noise.shape)}")
    spatial = tuple(noise.shape[2:])
    for size in sorted(schedule.sizes):
        if any(s % p for s, p in zip(spatial, size)):
            raise ValueError(f"noise: spatial size {spatial} is not a multiple of the schedule's patch size "
                             f"{size.name}; pass latents whose size every patch size divides (e.g. "
                             f"{tuple(shape[2:])})")
    if not bool(torch.isfinite(noise).all()):   # once, before sampling
        raise ValueError("noise: contains NaN or inf; every sample would be NaN")


def _warn_over_budget(loop: DenoisingLoop) -> None:
    """Warn when a schedule built for a FLOPs budget costs more in this run (another guidance setting)."""
    schedule = loop.schedule
    if schedule.budget is None:
        return
    achieved = schedule.relative_flops(loop.model, loop.guided)
    if achieved <= schedule.budget * (1 + 1e-9):
        return
    steps = sum(loop.guided)
    run = ("without guidance" if steps == 0 else f"with guidance at {steps} of {len(loop.guided)} steps"
           if steps < len(loop.guided) else "with guidance")
    warnings.warn(f"schedule: built for {schedule.budget:g} of the static FLOPs "
                  f"{'with' if schedule.budget_guidance else 'without'} guidance, but sampled {run} it "
                  f"costs {achieved:.2f}; build it for this run (Schedule.for_budget(..., "
                  f"guidance={steps > 0}))", stacklevel=3)


class StepNoise:
    """Each step's noise for a batch: `draw(out)` fills the device tensor `out` and returns it.

    "cpu": per-sample CPU generators (device- and batch-independent samples); the host buffer is
    pinned on CUDA and refilled only after its previous copy finished. "model": one generator on
    `device` seeded with `seed` (see `sample`'s `noise_device`).
    """

    def __init__(self, generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device,
                 noise_device: str = "cpu", seed: int = 0):
        if noise_device not in ("cpu", "model"):
            raise ValueError(f"noise_device={noise_device!r}: expected 'cpu' (per-sample CPU generators) "
                             f"or 'model' (one generator on the model's device)")
        self.generators, self.shape, self.mode = generators, shape, noise_device
        self.generator = torch.Generator(device).manual_seed(seed) if noise_device == "model" else None
        pin = noise_device == "cpu" and device.type == "cuda"
        self.host = torch.empty(shape, pin_memory=pin) if noise_device == "cpu" else None
        self.copied = torch.cuda.Event() if pin else None
        self.device = device

    def draw(self, out: torch.Tensor) -> torch.Tensor:
        if self.generator is not None:
            return torch.randn(self.shape, generator=self.generator, out=out)
        if self.copied is not None:
            self.copied.synchronize()   # the last async copy still reads the pinned buffer
        for i, g in enumerate(self.generators):
            torch.randn(self.shape[1:], generator=g, out=self.host[i])
        out.copy_(self.host, non_blocking=self.copied is not None)
        if self.copied is not None:
            self.copied.record(torch.cuda.current_stream(self.device))
        return out


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode(latents / 0.18215)`: a tensor, or diffusers' `DecoderOutput` (AutoencoderKL's
    return value), whose `.sample` holds the images."""
    out = vae.decode(latents / LATENT_SCALE)
    return out if isinstance(out, torch.Tensor) else out.sample
