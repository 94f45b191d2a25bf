"""Noise schedules and one-step samplers: DiT's Gaussian diffusion (DDPM, DDIM) and rectified flow.

DiT (facebookresearch/DiT, `diffusion/`, from OpenAI's ADM) trains with 1000 steps of linear betas,
1e-4 -> 0.02, predicts epsilon and, with `learn_sigma`, a per-pixel interpolation `v` in [-1, 1]
between the smallest and largest admissible log-variance of the reverse step:

    log_var = frac * log(beta_t) + (1 - frac) * log(posterior_variance_clipped_t),  frac = (v + 1) / 2

A model without learned sigma uses DiT's fixed small variance (the posterior variance). Sampling
with fewer steps ("respacing", `space_timesteps(1000, "250")`) keeps a subset of the training
steps and rebuilds betas from the kept `alphas_cumprod`: `beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}`.
The model is always called with the ORIGINAL timestep index k_i (DiT's `_WrappedModel`).

Each sampler here turns a model output into the next sample, `step(model_output, x, k, noise)`,
where `k` is the step index (0 = the first, noisiest step), a Python int. All coefficients are
precomputed (in float64, stored as float32 like ADM's `_extract_into_tensor`) in per-step device
tables and gathered with `table[k]`, so a whole step is a function of tensors. (Indexing with a
0-dim CUDA tensor would call `.item()`, a host sync that also fixes one step into a captured
graph: `flexikern.runtime.graphs` instead runs the step at k = 0 of a one-row copy of the tables
that it refills before each replay.) `model_timesteps[k]` is the timestep handed to the model.

Differences from diffusers' schedulers, where they compute the same thing (tests check each):

* `DDPMScheduler(beta_schedule="linear", variance_type="learned_range", clip_sample=False)` with
  `set_timesteps(timesteps=...)` set to our kept timesteps gives the same steps. Its default
  spacing ("leading": `arange(0, S) * (1000 // S)`) is not DiT's; DiT's `space_timesteps(1000,
  "S")` rounds `i * 999 / (S - 1)` and equals diffusers' `timestep_spacing="linspace"` (checked for
  the step counts in the tests). diffusers takes `log(clamp(posterior_variance, 1e-20))` as the
  minimum log-variance; ADM/DiT "clip" it by repeating the second entry at the last step. They
  differ only at the final step, where no noise is added, so the samples agree.
  diffusers computes its tables in float32, ADM in float64 (differences ~1e-6 relative).
* `DDIMScheduler(clip_sample=False, set_alpha_to_one=True)` assumes evenly spaced steps
  (`prev_t = t - 1000 // S`); it matches DiT's "ddimS" spacing (`space_timesteps(1000, "ddim50")`).
  ADM re-derives epsilon from the predicted x0; we use the predicted epsilon directly, which is
  the same number up to rounding (as diffusers does).
* No clipping of the predicted x0 by default (DiT samples with `clip_denoised=False`; latents are
  unbounded). Pixel-space models (data in [-1, 1]) can pass `clip_denoised=True` to the DDPM/DDIM
  samplers (ADM's pixel-space default).
* The rectified-flow sampler follows SD3 (not SiT): `x_t = (1 - t) x0 + t noise`, t = 1 is pure
  noise, the model predicts `v = noise - x0`, Euler steps from t = 1 to 0 on `linspace(1, 0, S+1)`
  (optionally shifted, `t' = shift t / (1 + (shift - 1) t)`, SD3's resolution shift), and the model
  sees `t * 1000`. SiT uses the opposite direction (`x_t = t x0 + (1 - t) noise`, `v = x0 - noise`,
  t = 0 is noise); a SiT model runs here behind a wrapper that calls it at `1000 - t` and negates
  its output.
* `make_sampler("ddim", 50)` spaces steps as DiT's `sample.py` does (`space_timesteps(1000, "50")`);
  pass `steps="ddim50"` for the DDIM paper's (and diffusers') even stride.
* One step ("1", or a last section of one step) keeps the noisiest training step, 999, where ADM,
  DiT and diffusers' "linspace" keep t = 0 and return the input noise as the sample (diffusers'
  "trailing" spacing keeps 999 too). Every spacing that already keeps 999 is DiT's exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flexikern.ops._checks import check_finite, check_flag, check_positive_int, is_finite, is_int, parse_counts

__all__ = ["linear_betas", "space_timesteps", "GaussianDiffusion", "DDPMSampler", "DDIMSampler",
           "FlowEulerSampler", "make_sampler", "SAMPLERS"]

def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """DiT/ADM's "linear" schedule: 1e-4 -> 0.02 for 1000 steps, both ends scaled by 1000/T (float64)."""
    check_positive_int(num_timesteps, "num_timesteps")
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """The training steps kept when sampling with fewer steps (ADM/DiT `space_timesteps`), ascending.

    `section_counts`: "250" or 250 (evenly spread, both ends kept), "10,15,20" (the steps split
    into equal sections, each spaced evenly with its own count) or "ddim50" (stride
    `num_timesteps // 50` from 0, the DDIM paper's and diffusers' "leading" spacing).

    One difference from ADM/DiT: the noisiest step, `num_timesteps - 1`, is always kept unless
    "ddimN" spacing is asked for. ADM keeps a one-step section's FIRST step, so one step ("1")
    keeps only t = 0 and the "sample" is the input noise; here a last section of one step keeps
    its last step instead ("1" keeps [999]: diffusers' "trailing" spacing). Every other
    spacing equals ADM/DiT's (and diffusers' "linspace" for one section).

    Raises:
        ValueError: naming `section_counts` and what was expected.
    """
    check_positive_int(num_timesteps, "num_timesteps")
    expected = "e.g. 250, '250', '10,15,20' or 'ddim50' (positive step counts)"
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = section_counts[len("ddim"):]
            if not (desired.isascii() and desired.isdigit()):
                raise ValueError(f"section_counts={section_counts!r}: expected 'ddimN' with N a positive int, "
                                 f"e.g. 'ddim50'")
            if int(desired) == 1:
                raise ValueError(f"section_counts={section_counts!r}: one strided step keeps only t = 0 (the "
                                 f"input noise would be the sample); pass 1 for one step at the noisiest t")
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == int(desired):
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts={section_counts!r}: cannot create exactly {desired} "
                             f"evenly strided steps out of {num_timesteps}")
        counts = parse_counts(section_counts, ",")
        if counts is None:
            raise ValueError(f"section_counts={section_counts!r}: expected {expected}")
    elif is_int(section_counts):
        counts = [section_counts]
    elif (isinstance(section_counts, Sequence) and section_counts
          and all(is_int(c) for c in section_counts)):
        counts = list(section_counts)
    else:
        raise ValueError(f"section_counts={section_counts!r}: expected {expected}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"section_counts={section_counts!r}: cannot take {count} steps out of a "
                             f"section of {size} (each count must be in [1, {size}])")
        if count == 1 and i == len(counts) - 1:   # keep the noisiest step (see the docstring)
            kept.append(start + size - 1)
        else:
            stride = 1 if count <= 1 else (size - 1) / (count - 1)
            cur = 0.0
            for _ in range(count):
                kept.append(start + round(cur))
                cur += stride
        start += size
    return sorted(set(kept))


class GaussianDiffusion:
    """The tables of a (possibly respaced) Gaussian diffusion, indexed by its own step t (0 = least noisy).

    `timestep_map[t]` is the original training step the model sees. Tables are float64 on CPU.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: Sequence[int] | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or len(betas) == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas: expected a non-empty 1-D tensor with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = torch.as_tensor(
            list(range(len(betas))) if timestep_map is None else list(timestep_map), dtype=torch.long)
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map: {len(self.timestep_map)} timesteps for {len(betas)} betas; expected "
                             f"the original timestep of each step")
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; ADM repeats the next value so the log is finite.
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) \
            if self.num_timesteps > 1 else self.betas.clone()
        self.posterior_log_variance_clipped = torch.log(clipped)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * torch.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def dit(cls, steps: int | str = 1000, num_train_timesteps: int = 1000) -> GaussianDiffusion:
        """DiT's diffusion (linear betas) respaced to `steps` ("250", 250, "ddim50", ...)."""
        base = cls(linear_betas(num_train_timesteps))
        return base if str(steps) == str(num_train_timesteps) else base.respace(steps)

    def respace(self, section_counts: str | int | Sequence[int]) -> GaussianDiffusion:
        """Keep the steps of `space_timesteps(T, section_counts)`; betas from the kept alphas_cumprod."""
        kept = space_timesteps(self.num_timesteps, section_counts)
        acp = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return GaussianDiffusion(1.0 - acp / prev, self.timestep_map[kept].tolist())

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t a (N,) tensor of this diffusion's steps."""
        acp = self.alphas_cumprod.to(x0.device)[t].float().view(-1, *[1] * (x0.dim() - 1))
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise


def _diffusion(steps: int | str | None, num_train_timesteps: int, diffusion: GaussianDiffusion | None,
               default_steps: int) -> GaussianDiffusion:
    """A sampler's diffusion: `diffusion` as given, or DiT's respaced to `steps` (None: `default_steps`)."""
    if diffusion is None:
        return GaussianDiffusion.dit(default_steps if steps is None else steps, num_train_timesteps)
    if not isinstance(diffusion, GaussianDiffusion):
        raise TypeError(f"diffusion={diffusion!r}: expected a GaussianDiffusion (e.g. GaussianDiffusion.dit(250)) "
                        f"or None")
    if steps is not None:
        raise ValueError(f"steps={steps!r} with a diffusion: the diffusion's {diffusion.num_timesteps} steps are "
                         f"the sampler's; pass one of them (e.g. diffusion=diffusion.respace({steps!r}))")
    return diffusion


def _split_output(model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance interpolation or None) from a C- or 2C-channel model output."""
    if model_output.shape[1] == channels:
        return model_output, None
    if model_output.shape[1] == 2 * channels:
        return model_output[:, :channels], model_output[:, channels:]
    raise ValueError(f"model_output: expected {channels} or {2 * channels} channels (x has {channels}), "
                     f"got {model_output.shape[1]}")


class _Sampler:
    """Shared by the samplers: per-step tables on a device, in sampling order (k = 0 is the noisiest)."""

    name: str
    stochastic: bool
    num_steps: int
    model_timesteps: torch.Tensor   # (S,) float32: what the model sees at step k
    table: torch.Tensor             # (S, K) float32 coefficients

    init_noise_sigma: float = 1.0   # the initial noise's std (x_T ~ N(0, 1) for DDPM, DDIM, flow)

    def to(self, device: torch.device | str) -> _Sampler:
        self.model_timesteps = self.model_timesteps.to(device)
        self.table = self.table.to(device)
        return self

    def begin(self) -> None:
        """Called by `fk.sample` before its first step (a diffusers scheduler resets its state)."""

    def model_input(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The model's input at step k from the state x (diffusers' `scale_model_input`; here x itself)."""
        return x

    def step(self, model_output: torch.Tensor, x: torch.Tensor, k: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class DDPMSampler(_Sampler):
    """Ancestral sampling (ADM/DiT `p_sample`, clip_denoised=False) on a respaced DiT diffusion.

    Learned-range variance when the model output has 2C channels, fixed small variance otherwise.
    """

    name = "ddpm"
    stochastic = True

    def __init__(self, steps: int | str | None = None, num_train_timesteps: int = 1000,
                 diffusion: GaussianDiffusion | None = None, clip_denoised: bool = False):
        """`steps` (default 250) respaces DiT's diffusion; or pass a `diffusion` instead."""
        d = _diffusion(steps, num_train_timesteps, diffusion, 250)
        self.diffusion, self.clip_denoised = d, check_flag(clip_denoised, "clip_denoised")
        self.num_steps = d.num_timesteps
        order = torch.arange(d.num_timesteps - 1, -1, -1)   # sampling runs t = S-1, ..., 0
        self.model_timesteps = d.timestep_map[order].float()
        nonzero = (order != 0).double()
        # The variance at the last step (t = 0) is never used: nonzero masks its noise.
        self.table = torch.stack([
            d.sqrt_recip_alphas_cumprod[order], d.sqrt_recipm1_alphas_cumprod[order],
            d.posterior_mean_coef1[order], d.posterior_mean_coef2[order],
            d.posterior_log_variance_clipped[order], torch.log(d.betas[order]), nonzero,
        ], dim=1).float()

    def step(self, model_output, x, k, noise):
        eps, v = _split_output(model_output, x.shape[1])
        recip, recipm1, coef1, coef2, min_log, max_log, nonzero = self.table[k].unbind()
        pred_x0 = recip * x - recipm1 * eps
        if self.clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = coef1 * pred_x0 + coef2 * x
        if v is None:
            log_var = min_log
        else:
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        return mean + nonzero * torch.exp(0.5 * log_var) * noise


class DDIMSampler(_Sampler):
    """DDIM (ADM/DiT `ddim_sample`, clip_denoised=False); `eta` = 0 is deterministic."""

    name = "ddim"

    def __init__(self, steps: int | str | None = None, num_train_timesteps: int = 1000, eta: float = 0.0,
                 diffusion: GaussianDiffusion | None = None, clip_denoised: bool = False):
        """`steps` (default 50) respaces DiT's diffusion; or pass a `diffusion` instead."""
        eta = check_finite(eta, "eta", "a finite float >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")
        if eta < 0:
            raise ValueError(f"eta={eta!r}: expected a finite float >= 0 (0 = deterministic DDIM, 1 = DDPM-like)")
        d = _diffusion(steps, num_train_timesteps, diffusion, 50)
        self.diffusion, self.eta, self.stochastic = d, eta, eta > 0
        self.clip_denoised = check_flag(clip_denoised, "clip_denoised")
        self.num_steps = d.num_timesteps
        order = torch.arange(d.num_timesteps - 1, -1, -1)
        self.model_timesteps = d.timestep_map[order].float()
        abar, abar_prev = d.alphas_cumprod[order], d.alphas_cumprod_prev[order]
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        self.table = torch.stack([
            d.sqrt_recip_alphas_cumprod[order], d.sqrt_recipm1_alphas_cumprod[order],
            torch.sqrt(abar_prev), torch.sqrt(torch.clamp(1 - abar_prev - sigma ** 2, min=0)),
            sigma * (order != 0).double(),
        ], dim=1).float()

    def step(self, model_output, x, k, noise):
        eps, _ = _split_output(model_output, x.shape[1])
        recip, recipm1, sqrt_abar_prev, direction, sigma = self.table[k].unbind()
        pred_x0 = recip * x - recipm1 * eps
        if self.clip_denoised:   # ADM: clip x0, then re-derive eps from it
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = (recip * x - pred_x0) / recipm1
        out = sqrt_abar_prev * pred_x0 + direction * eps
        return out if noise is None else out + sigma * noise


class FlowEulerSampler(_Sampler):
    """Euler steps of a rectified flow (SD3 convention, see the module docstring)."""

    name = "flow"
    stochastic = False

    def __init__(self, steps: int = 50, shift: float = 1.0):
        check_positive_int(steps, "steps", "a positive int for the flow sampler")
        shift = check_finite(shift, "shift", "a finite float > 0 (1 = no shift; SD3 uses 3)")
        if not shift > 0:
            raise ValueError(f"shift={shift!r}: expected a finite float > 0 (1 = no shift; SD3 uses 3)")
        t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        t = shift * t / (1 + (shift - 1) * t)
        self.num_steps, self.shift = steps, float(shift)
        self.times = t
        self.model_timesteps = (t[:-1] * 1000).float()
        self.table = (t[1:] - t[:-1]).float().unsqueeze(1)   # dt < 0

    def step(self, model_output, x, k, noise):
        velocity, _ = _split_output(model_output, x.shape[1])
        return x + self.table[k][0] * velocity


SAMPLERS = ("ddpm", "ddim", "flow")


def make_sampler(name: str, steps: int | str, eta: float = 0.0, shift: float = 1.0,
                 num_train_timesteps: int = 1000, clip_denoised: bool = False) -> _Sampler:
    """A sampler by name: "ddpm" (DiT's default), "ddim" or "flow", with `steps` steps.

    For "ddpm"/"ddim", `steps` is anything `space_timesteps` takes (250, "250", "ddim50", ...).

    Raises:
        ValueError: an unknown name, bad steps, or an option given to a sampler that does not use it
            (`eta` is DDIM's, `shift` the flow sampler's, `clip_denoised` and `num_train_timesteps`
            DDPM's and DDIM's: the flow sampler has no x0 to clip and always runs t in [0, 1]).
    """
    if name == "ddpm" or name == "flow":
        if not (is_finite(eta) and eta == 0):
            raise ValueError(f"eta={eta!r}: only the 'ddim' sampler takes eta; the {name!r} sampler has none "
                             f"(pass sampler='ddim', or leave eta at 0)")
    if name == "ddpm" or name == "ddim":
        if not (is_finite(shift) and shift == 1):
            raise ValueError(f"shift={shift!r}: only the 'flow' sampler takes shift; the {name!r} sampler has "
                             f"none (pass sampler='flow', or leave shift at 1)")
    if name == "flow" and (clip_denoised is not False or num_train_timesteps != 1000):
        raise ValueError(f"clip_denoised={clip_denoised!r}, num_train_timesteps={num_train_timesteps!r}: the "
                         f"'flow' sampler takes neither (it predicts velocity, not x0, and runs t from 1 to 0); "
                         f"leave them at False and 1000, or pass sampler='ddpm' or 'ddim'")
    if name == "ddpm":
        return DDPMSampler(steps, num_train_timesteps, clip_denoised=clip_denoised)
    if name == "ddim":
        return DDIMSampler(steps, num_train_timesteps, eta=eta, clip_denoised=clip_denoised)
    if name == "flow":
        return FlowEulerSampler(int(steps) if isinstance(steps, str) and steps.isdigit() else steps, shift=shift)
    raise ValueError(f"sampler={name!r}: expected one of {', '.join(SAMPLERS)}")
