"""The sampling loop: `sample(model, y, schedule, guidance, sampler=...)`.

One denoising step is `DenoisingLoop.step(x, k, noise, cond_size, guid_size) -> x_next`: a function
of tensors (`k` is a 0-dim long device tensor; timesteps and coefficients are gathered from
per-step device tables) for fixed patch sizes, so a CUDA-graph runner can capture one step per
patch-size phase (`DenoisingLoop.phases`) and replay it.

Randomness: sample i draws its initial noise and every step's noise from its own CPU
`torch.Generator` seeded `seed + i` (or `seed[i]`), then moves it to the device. Samples therefore
do not depend on the device, the batch they are in, or how a run is sharded across processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flexikern.diffusion.gaussian import _Sampler, make_sampler
from flexikern.diffusion.guidance import Guidance, GuidedDenoiser
from flexikern.diffusion.schedule import Schedule

__all__ = ["sample", "DenoisingLoop", "sample_seeds", "LATENT_SCALE"]

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
    """A schedule, a guidance rule and a sampler bound to one model and one batch of labels."""

    def __init__(self, model: Any, y: torch.Tensor, schedule: Schedule, guidance: Guidance | None,
                 sampler: _Sampler):
        if schedule.num_steps != sampler.num_steps:
            raise ValueError(f"schedule has {schedule.num_steps} steps but the {sampler.name} sampler has "
                             f"{sampler.num_steps}; build both with the same step count")
        self.model, self.schedule, self.sampler = model, schedule.validate(model), sampler
        self.guidance = guidance or Guidance(1.0, "none")
        self.denoiser = GuidedDenoiser(model, y, self.guidance)
        self.guided = self.guidance.active_steps(sampler.model_timesteps)
        self.phases = schedule.phases(self.guided)   # [(start, stop, cond size, guidance size or None)]

    def step(self, x: torch.Tensor, k: torch.Tensor, noise: torch.Tensor | None,
             cond_size: tuple[int, int], guid_size: tuple[int, int] | None) -> torch.Tensor:
        """x_{k+1} from x_k: the guided model output at step k, then the sampler's update."""
        t = self.sampler.model_timesteps[k].expand(x.shape[0])
        return self.sampler.step(self.denoiser(x, t, cond_size, guid_size), x, k, noise)

    def flops(self, batch: int) -> int:
        """Forward FLOPs this loop spends for `batch` samples (guidance interval included)."""
        return self.schedule.flops(self.model, batch, self.guided)


def _labels(model: Any, y: Any, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y, dtype=torch.long).reshape(-1)
    if y.numel() == 0:
        raise ValueError("y: expected at least one class label")
    bad = y[(y < 0) | (y > model.num_classes)]
    if bad.numel():
        raise ValueError(f"y: labels {bad.tolist()} out of range; expected 0..{model.num_classes - 1} "
                         f"(or {model.num_classes} = the null class for unconditional samples)")
    return y.to(device)


def sample(model: Any, y: Any, schedule: Schedule, guidance: Guidance | None = None,
           sampler: str | _Sampler = "ddpm", seed: int | Sequence[int] = 0, progress: bool = True,
           vae: Any = None, eta: float = 0.0, noise: torch.Tensor | None = None,
           shift: float = 1.0) -> torch.Tensor:
    """Sample from a (flexible) DiT with a patch-size schedule.

    Args:
        model: a FlexiDiT (or anything with its interface); run in eval mode, restored after.
        y: class labels, (N,) ints.
        schedule: per-step patch sizes (`Schedule`); its step count is the sampler's.
        guidance: `Guidance(scale, mode)`; None = the conditional branch only.
        sampler: "ddpm" (DiT's ancestral sampler), "ddim" (with `eta`), "flow" (rectified-flow
            Euler for velocity models, with `shift`) or a sampler object.
        seed: an int (sample i uses seed + i) or one seed per sample.
        progress: show a tqdm bar.
        vae: if given, returns `vae.decode(latents / 0.18215)` (its `.sample` if it has one).
        noise: the initial noise (N, C, H, W) instead of drawing it.
    Returns:
        (N, C, H, W) latents on the model's device, or the decoded images.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected a flexikern.Schedule (e.g. Schedule.static(250, 2)), "
                        f"got {type(schedule).__name__}")
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    y = _labels(model, y, device)
    n = y.shape[0]
    if isinstance(sampler, str):
        sampler = make_sampler(sampler, schedule.num_steps, eta=eta, shift=shift)
    sampler.to(device)
    loop = DenoisingLoop(model, y, schedule, guidance, sampler)

    shape = (model.in_channels, model.input_size, model.input_size)
    generators = [torch.Generator().manual_seed(s) for s in sample_seeds(seed, n)]
    if noise is None:
        x = torch.stack([torch.randn(shape, generator=g) for g in generators])
    else:
        if tuple(noise.shape) != (n, *shape):
            raise ValueError(f"noise: expected shape {(n, *shape)}, got {tuple(noise.shape)}")
        x = noise.float()
    x = x.to(device)
    step_noise = torch.empty((n, *shape)) if sampler.stochastic else None
    ks = torch.arange(sampler.num_steps, device=device)

    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()   # DiT's label embedder drops labels at random in training mode
    try:
        with torch.inference_mode(), tqdm(total=sampler.num_steps, disable=not progress,
                                          desc=f"sampling {schedule!r}", leave=False) as bar:
            for start, stop, cond_size, guid_size in loop.phases:
                for k in range(start, stop):
                    noise_k = None
                    if step_noise is not None:
                        for i, g in enumerate(generators):
                            torch.randn(shape, generator=g, out=step_noise[i])
                        noise_k = step_noise.to(device)
                    x = loop.step(x, ks[k], noise_k, cond_size, guid_size)
                    bar.update(1)
            if vae is not None:
                x = decode(vae, x)
    finally:
        model.train(was_training)
    return x


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode(latents / 0.18215)`, unwrapping a `.sample` attribute (diffusers' AutoencoderKL)."""
    out = vae.decode(latents / LATENT_SCALE)
    return out.sample if hasattr(out, "sample") else out
