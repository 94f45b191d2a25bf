"""The sampler loop on a tiny FlexiDiT: determinism, exactness, guidance modes, intervals, samplers."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import flexikern as fk
from flexikern.diffusion import (DenoisingLoop, FlexibleDenoiser, Guidance, GuidedDenoiser, Schedule, make_sampler,
                                 sample)
from flexikern.models import FlexiDiT
from flexikern.ops.patch_size import PatchSize


def tiny(patch_sizes=(2, 4), learn_sigma=True, seed=0):
    """A 2-block DiT with random (non-zero-initialised) weights, flexified after randomising."""
    torch.manual_seed(seed)
    m = FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    if patch_sizes is not None:
        m.flexify(patch_sizes, adapter="lora")
    return m.eval()


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def model():
    return tiny()


def spy(model):
    """Record (batch, patch size, labels) of every forward."""
    calls = []
    forward = model.forward

    def recording(x, t, y, patch_size=None):
        calls.append((x.shape[0], PatchSize.parse(patch_size), y.tolist()))
        return forward(x, t, y, patch_size=patch_size)

    model.forward = recording
    return calls


class Without:
    """`model` without some members: a model that implements only part of the protocol."""

    def __init__(self, model, *missing):
        self._model, self._missing = model, missing

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._model, name)


def test_public_names():
    assert fk.Schedule is Schedule and fk.Guidance is Guidance and fk.sample is sample


def test_same_seed_same_samples_and_per_sample_seeds(model):
    sched = Schedule.weak_first(6, 3, weak=4, powerful=2)
    g = Guidance(1.5, "flexi")
    a = sample(model, [1, 2, 3], sched, g, seed=5, progress=False)
    b = sample(model, [1, 2, 3], sched, g, seed=5, progress=False)
    assert a.shape == (3, 4, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, sample(model, [1, 2, 3], sched, g, seed=6, progress=False))
    # Sample i uses seed + i, whatever batch it is in.
    part = sample(model, [2, 3], sched, g, seed=6, progress=False)
    torch.testing.assert_close(part, a[1:], rtol=1e-3, atol=1e-3)   # batch-size-dependent rounding only
    torch.testing.assert_close(sample(model, [3], sched, g, seed=[7], progress=False), a[2:], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode, sampler", [("cfg", "ddpm"), ("flexi", "ddim")])
def test_static_schedule_on_a_lora_model_is_the_original_model(mode, sampler):
    original = tiny(patch_sizes=None, seed=1)
    flexible = copy.deepcopy(original).flexify((2, 4), adapter="lora")
    with torch.no_grad():   # trained-looking adapters: they must not touch the original size
        for name, p in flexible.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    sched = Schedule.static(5, 2)
    kwargs = dict(guidance=Guidance(2.0, mode), sampler=sampler, seed=3, progress=False,
                  eta=0.5 if sampler == "ddim" else 0.0)
    a = sample(original, [0, 9], sched, **kwargs)
    b = sample(flexible, [0, 9], sched, **kwargs)
    assert torch.equal(a, b)
    # ... while the weak size does change the samples.
    c = sample(flexible, [0, 9], Schedule.weak_first(5, 2, 4, 2), **kwargs)
    assert not torch.allclose(a, c)


N = 2
Y = [3, 7]
NULL = [10, 10]


@pytest.mark.parametrize("guidance, schedule, per_step", [
    (None, Schedule.weak_first(2, 1, 4, 2), [[(N, (4, 4), Y)], [(N, (2, 2), Y)]]),
    (Guidance(1.5, "none"), Schedule.static(1, 4), [[(N, (4, 4), Y)]]),
    # Same size: ONE batched forward, conditional + null class.
    (Guidance(1.5, "cfg"), Schedule.static(1, 2), [[(2 * N, (2, 2), Y + NULL)]]),
    (Guidance(1.5, "flexi"), Schedule.static(1, 4), [[(2 * N, (4, 4), Y + NULL)]]),
    # Weak guidance branch: flexi uses the weak model's CONDITIONAL prediction, cfg the null class.
    (Guidance(1.5, "flexi"), Schedule.weak_first(1, 0, 4, 2, guidance_weak_steps=1),
     [[(N, (2, 2), Y), (N, (4, 4), Y)]]),
    (Guidance(1.5, "cfg"), Schedule.weak_first(1, 0, 4, 2, guidance_weak_steps=1),
     [[(N, (2, 2), Y), (N, (4, 4), NULL)]]),
    # A guidance branch more powerful than the conditional one is CFG across sizes, also in flexi mode.
    (Guidance(1.5, "flexi"), Schedule.from_list([4], guidance=[2]), [[(N, (4, 4), Y), (N, (2, 2), NULL)]]),
])
def test_branches_per_mode(guidance, schedule, per_step):
    m = tiny()
    calls = spy(m)
    sample(m, Y, schedule, guidance, progress=False)
    assert calls == [c for step in per_step for c in step]


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_guided_prediction_formulas(model, learn_sigma):
    m = model if learn_sigma else tiny(learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 900.0]), torch.tensor([1, 4])
    null = torch.full_like(y, 10)
    with torch.no_grad():
        powerful, weak, uncond = m(x, t, y, 2), m(x, t, y, 4), m(x, t, null, 2)
    s = 3.0
    s2 = 1 - (1 - s) / 2.5
    p2, p4 = PatchSize.parse(2), PatchSize.parse(4)
    flexi = GuidedDenoiser(m, y, Guidance(s, "flexi"))(x, t, p2, p4)
    torch.testing.assert_close(flexi[:, :4], weak[:, :4] + s2 * (powerful[:, :4] - weak[:, :4]))
    torch.testing.assert_close(flexi[:, 4:], powerful[:, 4:])   # variance: the conditional branch
    cfg = GuidedDenoiser(m, y, Guidance(s, "cfg"))(x, t, p2, p2)
    torch.testing.assert_close(cfg[:, :4], uncond[:, :4] + s * (powerful[:, :4] - uncond[:, :4]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cfg[:, 4:], powerful[:, 4:], rtol=1e-4, atol=1e-4)
    # DiT's forward_with_cfg guides the first 3 channels only.
    dit = GuidedDenoiser(m, y, Guidance(s, "cfg", first_channels=3))(x, t, p2, p2)
    torch.testing.assert_close(dit[:, :3], cfg[:, :3])
    torch.testing.assert_close(dit[:, 3:], powerful[:, 3:], rtol=1e-4, atol=1e-4)
    assert Guidance(1.5).weak_scale == pytest.approx(1.2) and (1 - 4.0) / (1 - Guidance(4.0).weak_scale) == pytest.approx(2.5)


def test_guidance_interval(model):
    sched = Schedule.weak_first(6, 2, 4, 2)
    g = Guidance(1.5, "flexi", interval=(0, 500))
    loop = DenoisingLoop(model, torch.tensor(Y), sched, g, make_sampler("ddpm", 6))
    assert loop.sampler.model_timesteps.tolist() == [999, 799, 599, 400, 200, 0]
    assert loop.guided == [False, False, False, True, True, True]
    assert loop.phases == [(0, 2, (4, 4), None), (2, 3, (2, 2), None), (3, 6, (2, 2), (2, 2))]
    assert loop.flops(2) == sched.flops(model, 2, guidance=loop.guided) < sched.flops(model, 2)
    m = tiny()
    calls = spy(m)
    sample(m, Y, sched, g, progress=False)
    assert [c[0] for c in calls] == [N, N, N, 2 * N, 2 * N, 2 * N]
    with pytest.raises(ValueError, match="interval"):
        Guidance(1.5, interval=(600, 500))


def test_samplers(model):
    sched = Schedule.weak_first(4, 2, 4, 2)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    run = lambda **kw: sample(model, Y, sched, Guidance(1.5, "cfg"), progress=False, **kw)
    # Deterministic samplers depend only on the initial noise.
    for name in ["ddim", "flow"]:
        assert torch.equal(run(sampler=name, noise=noise, seed=0), run(sampler=name, noise=noise, seed=1))
    assert not torch.allclose(run(sampler="ddim", eta=1.0, noise=noise, seed=0),
                              run(sampler="ddim", eta=1.0, noise=noise, seed=1))
    assert not torch.allclose(run(sampler="ddpm", noise=noise, seed=0), run(sampler="ddpm", noise=noise, seed=1))
    assert not torch.allclose(run(sampler="flow", noise=noise), run(sampler="ddim", noise=noise))
    # The noise argument is the initial noise: x_T for the flow sampler's first (t = 1) step.
    calls = []
    forward = model.forward
    model.forward = lambda x, t, y, patch_size=None: (calls.append((x.clone(), t.clone())), forward(x, t, y, patch_size))[1]
    try:
        run(sampler="flow", noise=noise)
    finally:
        del model.forward
    assert torch.equal(calls[0][0][:2], noise) and calls[0][1].tolist() == [1000.0] * 4


def test_vae_and_mode_restored(model):
    vae = SimpleNamespace(decode=lambda z: SimpleNamespace(sample=z * 2))
    sched = Schedule.static(2, 2)
    latents = sample(model, Y, sched, progress=False)
    images = sample(model, Y, sched, progress=False, vae=vae)
    torch.testing.assert_close(images, latents / 0.18215 * 2)
    plain = SimpleNamespace(decode=lambda z: z + 1)
    torch.testing.assert_close(sample(model, Y, sched, progress=False, vae=plain), latents / 0.18215 + 1)
    model.train()
    sample(model, Y, sched, progress=False)
    assert model.training
    model.eval()


def test_errors(model):
    s = Schedule.static(3, 2)
    with pytest.raises(ValueError, match=r"y: labels \[11\] out of range"):
        sample(model, [1, 11], s, progress=False)
    with pytest.raises(ValueError, match=r"\[\(8, 8\)\] but the model supports only \[\(2, 2\), \(4, 4\)\]"):
        sample(model, [1], Schedule.static(3, 8), progress=False)
    with pytest.raises(ValueError, match="schedule has 3 steps but the ddpm sampler has 5"):
        sample(model, [1], s, sampler=make_sampler("ddpm", 5), progress=False)
    with pytest.raises(ValueError, match=r"noise: expected shape \(1, 4, 8, 8\)"):
        sample(model, [1], s, noise=torch.randn(1, 3, 8, 8), progress=False)   # channels (another size is fine)
    with pytest.raises(TypeError, match="schedule: expected a flexikern.Schedule"):
        sample(model, [1], 250, progress=False)
    with pytest.raises(ValueError, match="2 seeds for 1 samples"):
        sample(model, [1], s, seed=[1, 2], progress=False)
    with pytest.raises(ValueError, match="mode='auto'"):
        Guidance(1.5, "auto")


def test_whole_ddpm_loop_matches_a_diffusers_loop(model):
    """End to end: DiT's spacing, the original timestep handed to the model, CFG, learned sigma, noise order."""
    DDPMScheduler = pytest.importorskip("diffusers", reason="the reference loop is diffusers'").DDPMScheduler

    from flexikern.diffusion import space_timesteps
    steps, seed, scale, label = 8, 11, 2.5, 6
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                        clip_sample=False)
    ref.set_timesteps(timesteps=sorted(space_timesteps(1000, str(steps)), reverse=True))
    g = torch.Generator().manual_seed(seed)   # sample 0 of seed `seed`: initial noise, then one draw per step
    x = torch.randn(1, 4, 8, 8, generator=g)
    y, null = torch.tensor([label]), torch.tensor([10])
    with torch.no_grad():
        for t in ref.timesteps:
            tt = t.float().expand(1)
            cond, uncond = model(x, tt, y), model(x, tt, null)
            out = torch.cat([uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]), cond[:, 4:]], 1)
            x = ref.step(out, t, x, generator=g).prev_sample
    ours = sample(model, [label], Schedule.static(steps, 2), Guidance(scale, "cfg"), seed=seed, progress=False)
    torch.testing.assert_close(ours, x, rtol=1e-3, atol=1e-3)   # diffusers' float32 tables near t = 0


@pytest.mark.parametrize("mode", ["cfg", "flexi"])
def test_packed_branches_equal_two_passes(mode):
    """Mixed steps run as one packed forward when asked (auto on CUDA); same samples as two passes."""
    model = tiny()
    with torch.no_grad():  # non-trivial adapters, so a size mix-up inside the pack would show
        for name, p in model.named_parameters():
            if "lora_B" in name or "size_embed" in name:
                p.normal_(std=0.05)
    schedule = Schedule.weak_first(6, weak_steps=2, weak=4, powerful=2, guidance_weak_steps=4)
    calls = []
    packed_forward = model.forward_packed
    model.forward_packed = lambda *a: calls.append(a[3]) or packed_forward(*a)
    try:
        kwargs = dict(schedule=schedule, guidance=Guidance(2.0, mode), seed=3, progress=False)
        packed = sample(model, [1, 5, 10], packed=True, **kwargs)
        assert len(calls) == 2 and calls[0] == [(2, 2)] * 3 + [(4, 4)] * 3   # steps 2 and 3 are mixed
        two = sample(model, [1, 5, 10], packed=False, **kwargs)
        assert len(calls) == 2
        assert sample(model, [1, 5, 10], **kwargs).equal(two)   # auto: two passes on CPU
    finally:
        del model.forward_packed
    assert torch.allclose(packed, two, rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="forward_packed"):   # the protocol, checked by `sample`
        sample(Without(model, "forward_packed"), [1], packed=True, **kwargs)


def test_a_model_without_null_class_fails_before_sampling():
    """Without class dropout DiT has no null-class row: label `num_classes` and CFG are refused
    with a message, before any step (inside `sample` the forwards trust the labels)."""
    torch.manual_seed(0)
    bare = FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=10, class_dropout_prob=0.0).eval()
    assert not bare.has_null_class and tiny().has_null_class
    s = Schedule.static(2, 2)
    with pytest.raises(ValueError, match=r"labels \[10\] out of range; expected 0..9\. Label 10 \(= num_classes\) "
                                         r"is the null class .* this model has no null class"):
        sample(bare, [1, 10], s, progress=False)
    with pytest.raises(ValueError, match="classifier-free guidance needs the null class"):
        sample(bare, [1], s, Guidance(1.5, "cfg"), progress=False)
    assert sample(bare, [1, 9], s, progress=False).shape == (2, 4, 8, 8)


def test_a_model_missing_part_of_the_protocol_fails_before_any_compute():
    """`sample` checks the `FlexibleDenoiser` protocol at its boundary: a model that lacks a member
    (e.g. a diffusers transformer not converted) fails there, naming what is missing, with no forward run."""
    m = tiny()
    assert isinstance(m, FlexibleDenoiser)
    calls = spy(m)
    partial = Without(m, "null_condition", "prepare")
    assert not isinstance(partial, FlexibleDenoiser)
    with pytest.raises(TypeError, match=r"Without is not a flexible denoiser: it lacks null_condition, prepare "
                                        r"\(flexikern.diffusion.FlexibleDenoiser\).*FlexiDiT.from_diffusers"):
        sample(partial, Y, Schedule.static(2, 2), Guidance(1.5, "cfg"), progress=False)
    assert calls == []
    with pytest.raises(TypeError, match="it lacks .*latent_shape"):
        sample(SimpleNamespace(forward=m.forward), Y, Schedule.static(2, 2), progress=False)
    assert calls == []
