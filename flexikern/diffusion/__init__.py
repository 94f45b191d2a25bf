"""Noise schedules, patch-size schedules, guidance and the sampler loop.

`sample(model, y, Schedule.weak_first(...), Guidance(1.5, "flexi"))` is the entry point; see
`gaussian` (DDPM/DDIM/rectified-flow math), `schedule`, `guidance`, `sampling` and `protocol`
(`FlexibleDenoiser`: what all of them use of a model).
"""

from flexikern.diffusion.gaussian import (SAMPLERS, DDIMSampler, DDPMSampler, FlowEulerSampler,
                                          GaussianDiffusion, linear_betas, make_sampler, space_timesteps)
from flexikern.diffusion.guidance import GUIDANCE_MODES, Guidance, GuidedDenoiser
from flexikern.diffusion.protocol import FlexibleDenoiser, check_denoiser, eval_mode
from flexikern.diffusion.sampling import DenoisingLoop, decode, sample, sample_seeds
from flexikern.diffusion.schedule import Schedule

__all__ = ["Schedule", "Guidance", "sample", "GaussianDiffusion", "DDPMSampler", "DDIMSampler",
           "FlowEulerSampler", "make_sampler", "linear_betas", "space_timesteps", "GuidedDenoiser",
           "DenoisingLoop", "decode", "sample_seeds", "SAMPLERS", "GUIDANCE_MODES", "FlexibleDenoiser",
           "check_denoiser", "eval_mode"]
