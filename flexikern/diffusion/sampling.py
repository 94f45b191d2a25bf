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
host boundaries, positional tables, resized kernels) for every phase. What is left: with the
default `noise_device="cpu"` on CUDA, a step waits on an event for the previous step's noise copy
before refilling the pinned buffer (`StepNoise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from flexikern.diffusion.gaussian import _Sampler, make_sampler
from flexikern.diffusion.guidance import Guidance, GuidedDenoiser
from flexikern.diffusion.protocol import FlexibleDenoiser, check_denoiser
from flexikern.diffusion.schedule import Schedule
from flexikern.models.base import conditions_checked
from flexikern.ops.patch_size import PatchSize

if TYPE_CHECKING:
    from flexikern.runtime.graphs import GraphRunner

__all__ = ["sample", "DenoisingLoop", "StepNoise", "sample_seeds", "LATENT_SCALE"]

LATENT_SCALE = 0.18215   # Stable Diffusion's VAE latent scale, as DiT samples


def sample_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """Per-sample seeds: `seed + i` for an int, the given list otherwise."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"seed: got {len(seeds)} seeds for {n} samples; pass an int or one seed per sample")
    return seeds


class DenoisingLoop:
    """A schedule, a guidance rule and a sampler bound to one model and one batch of conditions."""

    def __init__(self, model: FlexibleDenoiser, y: Any, schedule: Schedule, guidance: Guidance | None,
                 sampler: _Sampler, packed: bool | None = None):
        if schedule.num_steps != sampler.num_steps:
            raise ValueError(f"schedule has {schedule.num_steps} steps but the {sampler.name} sampler has "
                             f"{sampler.num_steps}; build both with the same step count")
        self.model, self.schedule, self.sampler = model, schedule.validate(model), sampler
        self.guidance = guidance or Guidance(1.0, "none")
        self.denoiser = GuidedDenoiser(model, y, self.guidance, packed)
        self.guided = self.guidance.active_steps(sampler.model_timesteps)
        self.phases = schedule.phases(self.guided)   # [(start, stop, cond size, guidance size or None)]
        if (not model.has_null_class
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
        return self.sampler.step(self.denoiser(x, t, cond_size, guid_size), x, k, noise)

    def flops(self, batch: int) -> int:
        """Forward FLOPs this loop spends for `batch` samples (guidance interval included)."""
        return self.schedule.flops(self.model, batch, self.guided)


def sample(model: FlexibleDenoiser, y: Any, schedule: Schedule, guidance: Guidance | None = None,
           sampler: str | _Sampler = "ddpm", seed: int | Sequence[int] = 0, progress: bool = True,
           vae: Any = None, eta: float = 0.0, noise: torch.Tensor | None = None,
           shift: float = 1.0, cuda_graphs: bool | GraphRunner = False, noise_device: str = "cpu",
           packed: bool | None = None) -> torch.Tensor:
    """Sample from a (flexible) DiT with a patch-size schedule.

    Args:
        model: a `FlexibleDenoiser` (FlexiDiT, FlexiPixArt, FlexiLatte); run in eval mode,
            restored after.
        y: the conditions, checked by `model.check_condition`: (N,) class labels, or a
            `TextCondition` for a text model.
        schedule: per-step patch sizes (`Schedule`); its step count is the sampler's.
        guidance: `Guidance(scale, mode)`; None = the conditional branch only.
        sampler: "ddpm" (DiT's ancestral sampler), "ddim" (with `eta`), "flow" (rectified-flow
            Euler for velocity models, with `shift`) or a sampler object.
        seed: an int (sample i uses seed + i) or one seed per sample.
        progress: show a tqdm bar.
        vae: if given, returns `decode(vae, latents)`.
        noise: the initial noise (N, C, H, W) instead of drawing it.
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
    Returns:
        (N, *model.latent_shape) latents on the model's device, or the decoded images.
    Raises:
        TypeError: `model` lacks part of the `FlexibleDenoiser` protocol (checked before any compute).
    """
    check_denoiser(model)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a flexikern.Schedule (e.g. Schedule.static(250, 2)), "
                        f"got {type(schedule).__name__}")
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    y = model.check_condition(y, device=device)
    n = len(y)
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, schedule.num_steps, eta=eta, shift=shift)
    sampler.to(device)
    loop = DenoisingLoop(model, y, schedule, guidance, sampler, packed)

    shape = tuple(model.latent_shape)
    generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, n)]
    if noise is None:
        x = torch.stack([torch.randn(shape, generator=g) for g in generators])
    else:
        if tuple(noise.shape) != (n, *shape):
            raise ValueError(f"noise: expected shape {(n, *shape)}, got {tuple(noise.shape)}")
        x = noise.float()
    x = x.to(device)
    step_noise = StepNoise(generators, (n, *shape), device, noise_device, sample_seeds(seed, n)[0])

    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()   # DiT's label embedder drops labels at random in training mode
    try:
        with torch.inference_mode(), conditions_checked(), tqdm(
                total=sampler.num_steps, disable=not progress, desc=f"sampling {schedule!r}", leave=False) as bar:
            loop.denoiser.prepare(x, loop.phases)
            if cuda_graphs is not False and cuda_graphs is not None:   # True or a GraphRunner
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
    finally:
        model.train(was_training)
    return x


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
