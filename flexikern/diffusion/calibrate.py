"""Calibration: measure, per step, how far a model's weak prediction is from its powerful one.

FlexiDiT (arXiv 2502.20126, Fig. 4) shows that the gap between the weak and the powerful
prediction is small at the early, noisy steps, which is why weak-first schedules work. Calibration
measures that gap for one model instead of assuming its shape:

* `gap_profile(model, steps)`: along the static (powerful) sampling trajectory, per step k, how
  much running step k at the weak size would change that step's update;
* `Schedule.calibrate(model, steps, budget=... | tolerance=...)` (in schedule.py) builds the
  schedule whose weak steps are the steps with the smallest gaps.

Any `FlexibleDenoiser` works (class or text conditions, image or video latents); a text model
needs its conditions passed as `y`.
"""

from __future__ import annotations

from typing import Any

import torch

from flexikern.ops._checks import check_positive_int, check_seed
from flexikern.diffusion.gaussian import make_sampler
from flexikern.diffusion.protocol import check_denoiser, eval_mode
from flexikern.ops.patch_size import PatchSize

__all__ = ["gap_profile", "weak_size"]


def weak_size(model: Any, powerful: PatchSize, caller: str) -> PatchSize:
    """The model's default weak patch size: the next larger than `powerful` (by area)."""
    weak = powerful.next_larger(model.patch_sizes)
    if weak is None:
        raise ValueError(f"{caller}: the model has no patch size larger than {powerful} "
                         f"(patch_sizes={list(model.patch_sizes)}); flexify it with a weak size first")
    return weak


@torch.no_grad()
def gap_profile(model: Any, steps: int | str, num_samples: int = 16, seed: int = 0, sampler: str = "ddim",
                weak: Any = None, y: Any = None, clip_denoised: bool = True) -> list[float]:
    """Per step k (0 = noisiest), how far the weak prediction is from the powerful one.

    Runs the static (powerful) sampler on `num_samples` noise draws; at each step it also runs
    the weak size on the same x_k and records mean ||update(eps_weak) - update(eps_powerful)||^2,
    the change running this one step weak would make to x_{k+1} (the eps gap weighted by the
    sampler's coefficient at that step, which is what a sample sees). Deterministic given `seed`.

    Args:
        model: a `FlexibleDenoiser`; run in eval mode (`eval_mode`), restored after.
        steps: the sampler's steps (`make_sampler`).
        y: `num_samples` conditions (`model.check_condition`); None = class labels 0, 1, ...
            cycling over the classes, for a class-conditional model (a text model needs `y`).
        weak: the weak size (default: the next larger than `model.original_patch_size`).
        clip_denoised: clip the predicted x0 to [-1, 1] (DDPM and DDIM; the flow sampler has no
            x0 to clip).
    Returns:
        one float per step.
    Raises:
        TypeError: `model` is not a `FlexibleDenoiser`. ValueError: a bad argument, named.
    """
    check_denoiser(model, "gap_profile")
    check_positive_int(num_samples, "num_samples")
    seed = check_seed(seed, "seed")
    powerful = PatchSize.parse(model.original_patch_size, name="original_patch_size")
    weak = (weak_size(model, powerful, "gap_profile") if weak is None
            else PatchSize.parse(weak, ndim=powerful.ndim, name="weak"))
    if weak not in set(model.patch_sizes):
        raise ValueError(f"weak={weak.name}: not one of the model's patch sizes "
                         f"{[s.name for s in model.patch_sizes]}")
    clip = clip_denoised if sampler != "flow" else False   # the flow sampler has no x0 to clip
    sampler_obj = make_sampler(sampler, steps, clip_denoised=clip)
    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    dtype = params.dtype if params is not None else torch.float32
    if y is None:
        if not isinstance(getattr(model, "num_classes", None), int):
            raise ValueError(f"y: gap_profile needs {num_samples} conditions for {type(model).__name__}, whose "
                             f"conditions are not class labels; pass y (e.g. a TextCondition of {num_samples} "
                             f"captions' embeddings)")
        y = torch.arange(num_samples) % model.num_classes
    y = model.check_condition(y, n=num_samples, device=device)
    sampler_obj.to(device)
    g = torch.Generator().manual_seed(seed)
    shape = (num_samples, *model.latent_shape)
    x = torch.randn(shape, generator=g).to(device)
    gaps = []
    with eval_mode(model):
        for k in range(sampler_obj.num_steps):
            kt = torch.tensor(k, device=device)
            t = sampler_obj.model_timesteps[k].expand(num_samples)
            out_p = model(x.to(dtype), t, y, patch_size=powerful).float()
            out_w = model(x.to(dtype), t, y, patch_size=weak).float()
            noise = torch.randn(shape, generator=g).to(device) if sampler_obj.stochastic else None
            zero = torch.zeros_like(x) if noise is not None else None
            nxt_p = sampler_obj.step(out_p, x, kt, zero)
            nxt_w = sampler_obj.step(out_w, x, kt, zero)
            gaps.append(float((nxt_w - nxt_p).pow(2).flatten(1).sum(1).mean()))
            x = nxt_p if noise is None else sampler_obj.step(out_p, x, kt, noise)
    return gaps
