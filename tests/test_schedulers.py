"""fk.sample driven by diffusers schedulers (flexikern.diffusion.schedulers), a caller's null
condition (`y_null`) and latents of another resolution; each against a loop written here on the
diffusers transformer."""

import pytest
import torch

import flexikern as fk
from flexikern.diffusion.schedulers import SchedulerSampler, check_scheduler, make_scheduler
from reference_dit import randomize_

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)
LABELS = torch.tensor([1, 3, 7])


@pytest.fixture(scope="module")
def pair():
    """(diffusers DiTTransformer2DModel, the FlexiDiT converted from it), random non-zero weights."""
    theirs = randomize_(diffusers.DiTTransformer2DModel(**TINY).eval(), seed=1)
    return theirs, fk.FlexiDiT.from_diffusers(theirs, patch_sizes=(2, 4), lora_rank=4)


def reference_loop(model, scheduler, noise, labels, null, scale, steps):
    """diffusers' pipeline loop, written out: CFG on the epsilon channels, learned sigma dropped."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    n = len(labels)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            out = model(torch.cat([x_in, x_in]), timestep=t.expand(2 * n), class_labels=torch.cat([labels, null])
                        ).sample[:, :4]
            cond, uncond = out.chunk(2)
            x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_fk_sample_with_a_scheduler_is_the_pipeline_loop(pair, name):
    theirs, ours = pair
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_loop(theirs, make_scheduler(name), noise, LABELS, torch.full((3,), 10), 3.0, 7)
    got = fk.sample(ours, LABELS, fk.Schedule.static(7, 2), fk.Guidance(3.0, "cfg"), sampler=make_scheduler(name),
                    noise=noise, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    if name == "EulerDiscreteScheduler":   # its initial noise is scaled by sigma_max
        assert make_scheduler(name).init_noise_sigma > 10


def test_a_negative_condition_replaces_the_null_class(pair):
    theirs, ours = pair
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    negative = torch.tensor([2, 2, 5])
    expected = reference_loop(theirs, make_scheduler("DDIMScheduler"), noise, LABELS, negative, 2.0, 5)
    got = fk.sample(ours, LABELS, fk.Schedule.static(5, 2), fk.Guidance(2.0, "cfg"), noise=noise, progress=False,
                    sampler=make_scheduler("DDIMScheduler"), y_null=negative)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="y: 2 .*batch of 3|expected"):
        fk.sample(ours, LABELS, fk.Schedule.static(5, 2), 2.0, y_null=torch.tensor([1, 2]), progress=False)


def test_a_scheduler_is_reset_for_every_run_and_weak_steps_run_first(pair):
    _, ours = pair
    scheduler = make_scheduler("DPMSolverMultistepScheduler")
    schedule = fk.Schedule.weak_first(8, 3, 4, 2)
    first = fk.sample(ours, LABELS, schedule, 2.0, sampler=scheduler, seed=3, progress=False)
    assert torch.equal(first, fk.sample(ours, LABELS, schedule, 2.0, sampler=scheduler, seed=3, progress=False))
    static = fk.sample(ours, LABELS, fk.Schedule.static(8, 2), 2.0, sampler=scheduler, seed=3, progress=False)
    assert (first - static).abs().max() > 1e-3


def test_latents_of_another_resolution(pair):
    theirs, ours = pair
    noise = torch.randn(3, 4, 12, 12, generator=torch.Generator().manual_seed(2))   # diffusers' DiT: square
    expected = reference_loop(theirs, make_scheduler("DDIMScheduler"), noise, LABELS, torch.full((3,), 10), 2.0, 4)
    got = fk.sample(ours, LABELS, fk.Schedule.static(4, 2), fk.Guidance(2.0, "cfg"), noise=noise, progress=False,
                    sampler=make_scheduler("DDIMScheduler"))
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"noise: spatial size \(10, 12\) is not a multiple of the schedule's "
                                         r"patch size 4x4"):
        fk.sample(ours, LABELS, fk.Schedule.weak_first(4, 2, 4, 2), 2.0, noise=torch.randn(3, 4, 10, 12))


def test_what_a_scheduler_run_refuses(pair):
    _, ours = pair
    static = fk.Schedule.static(4, 2)
    with pytest.raises(ValueError, match="cuda_graphs=True with a diffusers DDIMScheduler"):
        fk.sample(ours, LABELS, static, sampler=make_scheduler("DDIMScheduler"), cuda_graphs=True)
    with pytest.raises(ValueError, match="eta=0.5: EulerDiscreteScheduler.step takes no eta"):
        fk.sample(ours, LABELS, static, sampler=make_scheduler("EulerDiscreteScheduler"), eta=0.5)
    with pytest.raises(ValueError, match="shift=3: a diffusers scheduler takes its shift from its own config"):
        fk.sample(ours, LABELS, static, sampler=make_scheduler("EulerDiscreteScheduler"), shift=3)
    with pytest.raises(ValueError, match=r"schedule has 4 steps but the HeunDiscreteScheduler sampler has 7 "
                                         r"\(7 model evaluations for num_inference_steps=4"):
        fk.sample(ours, LABELS, static, sampler=SchedulerSampler(make_scheduler("HeunDiscreteScheduler"), 4))
    with pytest.raises(TypeError, match="a str cannot drive the denoising steps"):
        check_scheduler("ddim")
    with pytest.raises(TypeError, match=r"sampler=DDIMScheduler: a class, not a scheduler; pass an instance"):
        fk.sample(ours, LABELS, static, sampler=diffusers.DDIMScheduler)
    with pytest.raises(ValueError, match="no num_inference_steps makes HeunDiscreteScheduler evaluate the model 8 "
                                         "times .* build a schedule of 7 or 9 steps"):
        fk.sample(ours, LABELS, fk.Schedule.static(8, 2), sampler=make_scheduler("HeunDiscreteScheduler"))
    with pytest.raises(ValueError, match="'Nope': not a diffusers scheduler class; expected one of .*DDIMScheduler"):
        make_scheduler("Nope")


def test_a_learned_variance_goes_to_a_scheduler_that_uses_it(pair):
    """DDPMScheduler(variance_type="learned_range") takes all 8 channels (LattePipeline's rule)."""
    theirs, ours = pair
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    scheduler = make_scheduler("DDPMScheduler", variance_type="learned_range")
    scheduler.set_timesteps(4)
    x, g = noise.clone(), torch.Generator().manual_seed(9)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = theirs(x, timestep=t.expand(3), class_labels=LABELS).sample   # eps and variance
            x = scheduler.step(out, t, x, generator=g).prev_sample
    sampler = SchedulerSampler(make_scheduler("DDPMScheduler", variance_type="learned_range"), 4,
                               generator=torch.Generator().manual_seed(9))
    assert sampler.learned_variance and not SchedulerSampler(make_scheduler("DDPMScheduler"), 4).learned_variance
    got = fk.sample(ours, LABELS, fk.Schedule.static(4, 2), None, sampler=sampler, noise=noise, progress=False)
    torch.testing.assert_close(got, x, rtol=0, atol=2e-5)


def test_a_second_order_scheduler_runs_one_schedule_step_per_evaluation(pair):
    """Heun evaluates the model 2N - 1 times for N steps: a 9-step schedule runs 5 inference steps."""
    _, ours = pair
    sizes = []
    forward = ours.forward
    ours.forward = lambda x, t, y, patch_size=None: sizes.append(tuple(ours._patch(patch_size))) or \
        forward(x, t, y, patch_size=patch_size)
    try:
        out = fk.sample(ours, LABELS, fk.Schedule.weak_first(9, 4, 4, 2), 2.0,
                        sampler=make_scheduler("HeunDiscreteScheduler"), progress=False)
    finally:
        del ours.forward
    assert sizes == [(4, 4)] * 4 + [(2, 2)] * 5 and torch.isfinite(out).all()
