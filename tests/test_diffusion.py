"""The diffusion math (DiT/ADM Gaussian diffusion, DDIM, rectified flow) against diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch
from flexikern.diffusion import (DDIMSampler, DDPMSampler, FlowEulerSampler, GaussianDiffusion, linear_betas,
                                 make_sampler, space_timesteps)

C, H = 4, 5   # odd spatial size on purpose


def _diffusers():
    """diffusers, whose schedulers are the reference; a test that needs it skips without it."""
    return pytest.importorskip("diffusers", reason="the reference schedulers come from diffusers")


def _close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _inputs(seed, out_channels=C):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, H, H, generator=g)
    out = torch.randn(3, out_channels, H, H, generator=g)
    if out_channels == 2 * C:
        out[:, C:] = torch.rand(3, C, H, H, generator=g) * 2 - 1   # variance interpolation in [-1, 1]
    return x, out


def test_linear_betas_match_diffusers():
    ours = linear_betas(1000)
    ref = _diffusers().DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").betas
    _close(ours.float(), ref, rtol=1e-6, atol=1e-9)
    assert ours[0].item() == pytest.approx(1e-4) and ours[-1].item() == pytest.approx(0.02)
    # ADM scales both ends by 1000 / T for other lengths.
    assert linear_betas(500)[-1].item() == pytest.approx(0.04)


@pytest.mark.parametrize("steps", [250, 100, 50, 27, 10, 2])
def test_dit_spacing_is_diffusers_linspace(steps):
    kept = space_timesteps(1000, str(steps))
    assert len(kept) == steps and kept[0] == 0 and kept[-1] == 999
    sched = _diffusers().DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    sched.set_timesteps(steps)
    assert sorted(sched.timesteps.tolist()) == kept


def test_spacing_forms():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    ref = _diffusers().DDIMScheduler(num_train_timesteps=1000)
    ref.set_timesteps(50)
    assert sorted(ref.timesteps.tolist()) == space_timesteps(1000, "ddim50")
    # ADM's sections: "10,15" = 10 steps over the first half, 15 over the second.
    kept = space_timesteps(100, "10,15")
    assert len(kept) == 25 and max(k for k in kept if k < 50) == 49 and min(k for k in kept if k >= 50) == 50
    assert space_timesteps(1000, 1000) == list(range(1000))
    for bad in ["abc", "ddim600", "2000"]:
        with pytest.raises(ValueError, match="section_counts"):
            space_timesteps(1000, bad)


def test_respacing_keeps_alphas_cumprod():
    base = GaussianDiffusion(linear_betas(1000))
    spaced = GaussianDiffusion.dit(25)
    kept = space_timesteps(1000, "25")
    assert spaced.timestep_map.tolist() == kept
    torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert spaced.alphas_cumprod_prev[0] == 1.0 and spaced.posterior_variance[0] == 0.0
    # The clipped log-variance repeats the second entry at t = 0 (finite).
    assert spaced.posterior_log_variance_clipped[0] == spaced.posterior_log_variance_clipped[1]


def _diffusers_ddpm(kept, variance_type):
    sched = _diffusers().DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type=variance_type, clip_sample=False)
    sched.set_timesteps(timesteps=sorted(kept, reverse=True))
    return sched


@pytest.mark.parametrize("steps", [1000, 12])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_ddpm_step_matches_diffusers(steps, learn_sigma):
    sampler = DDPMSampler(steps)
    kept = space_timesteps(1000, str(steps))
    ref = _diffusers_ddpm(kept, "learned_range" if learn_sigma else "fixed_small")
    assert sampler.model_timesteps.long().tolist() == ref.timesteps.tolist()
    check = range(steps) if steps < 50 else [0, 1, 500, 998, 999]
    for k in check:
        x, out = _inputs(k, 2 * C if learn_sigma else C)
        t = int(ref.timesteps[k])
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        got = sampler.step(out, x, torch.tensor(k), noise)
        # diffusers computes 1 - alphas_cumprod in float32: ~3e-4 relative error near t = 0, where it is ~1e-4.
        tol = 2e-5 if t >= 10 else 5e-4
        _close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(eta):
    sampler = DDIMSampler("ddim20", eta=eta)
    ref = _diffusers().DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(20)
    assert sampler.model_timesteps.long().tolist() == ref.timesteps.tolist()
    for k in range(20):
        x, out = _inputs(100 + k)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
        expected = ref.step(out, int(ref.timesteps[k]), x, eta=eta,
                            variance_noise=noise if eta > 0 else None).prev_sample
        got = sampler.step(out, x, torch.tensor(k), noise if eta > 0 else None)
        _close(got, expected, rtol=2e-5, atol=2e-5)
    assert not DDIMSampler(10).stochastic and DDIMSampler(10, eta=1.0).stochastic


def test_ddim_eta1_noise_is_the_ddpm_fixed_small_noise():
    """DDIM with eta = 1 has DDPM's posterior standard deviation (Song et al. 2021)."""
    d = GaussianDiffusion.dit(10)
    ddim, ddpm = DDIMSampler(diffusion=d, eta=1.0), DDPMSampler(diffusion=d)
    x, out = _inputs(7)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for k in range(9):   # the last step adds no noise in either
        kk = torch.tensor(k)
        a = ddim.step(out, x, kk, noise) - ddim.step(out, x, kk, torch.zeros_like(noise))
        b = ddpm.step(out, x, kk, noise) - ddpm.step(out, x, kk, torch.zeros_like(noise))
        _close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_oracle_denoiser_recovers_the_data_point(name):
    """With all data at one point x0, the exact eps makes every step's x0-prediction x0; the chain ends at x0."""
    sampler = make_sampler(name, 10)
    d = sampler.diffusion
    x0 = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, C, H, H, generator=torch.Generator().manual_seed(4))
    acp = {int(t): a.item() for t, a in zip(d.timestep_map, d.alphas_cumprod)}
    for k in range(sampler.num_steps):
        a = acp[int(sampler.model_timesteps[k])]
        eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5
        x = sampler.step(eps, x, torch.tensor(k), torch.randn(x.shape))
    _close(x, x0, rtol=1e-4, atol=1e-4)


def test_flow_euler_conventions_and_oracle():
    s = FlowEulerSampler(8)
    assert s.model_timesteps[0].item() == 1000 and s.model_timesteps[-1].item() == pytest.approx(125)
    assert s.table.sum().item() == pytest.approx(-1.0)
    # x_t = (1 - t) x0 + t noise and v = noise - x0: Euler is exact on straight paths.
    x0 = torch.randn(2, C, H, H)
    noise = torch.randn(2, C, H, H)
    x = noise.clone()
    for k in range(8):
        t = s.model_timesteps[k].item() / 1000
        _close(x, (1 - t) * x0 + t * noise)
        v = (x - x0) / t                       # the exact velocity of a point mass at x0
        x = s.step(torch.cat([v, torch.zeros_like(v)], 1), x, torch.tensor(k), None)   # sigma channels ignored
    _close(x, x0)
    shifted = FlowEulerSampler(8, shift=3.0)
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    _close(shifted.times, 3 * t / (1 + 2 * t), rtol=1e-12, atol=1e-12)


def test_sampler_errors():
    with pytest.raises(ValueError, match="sampler='euler'"):
        make_sampler("euler", 10)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(10, eta=-1)
    with pytest.raises(ValueError, match="model_output"):
        DDPMSampler(10).step(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor(0), torch.randn(1, 4, 2, 2))
