"""Text-conditioned FlexiDiT (PixArt-alpha): diffusers parity, weak sizes, packing, guidance, bad input."""

import pytest
import torch
import torch.nn.functional as F

import flexikern as fk
from flexikern.flexi.pos_embed import sincos_2d_scaled
from flexikern.models import FlexiPixArt, TextCondition

from reference_dit import randomize_

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(**kw):
    return randomize_(diffusers.PixArtTransformer2DModel(**{**TINY, **kw}).eval(), std=0.1)


def text(n=3, length=5, channels=24, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, length, channels, generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if masked:
        mask[0, 3:] = 0
        mask[-1, 1:] = 0
    return TextCondition(e, mask)


def inputs(n=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g)


def tiny_flexi(sizes=((2, 2), (4, 4)), seed=0, adapter="lora", **kw):
    ref = reference(**kw)
    model = FlexiPixArt.from_diffusers(ref, patch_sizes=sizes, adapter=adapter, lora_rank=4,
                                       null_caption=torch.randn(5, 24, generator=torch.Generator().manual_seed(9)))
    return model.eval(), ref


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("kw,size", [({}, 8), (dict(interpolation_scale=2, sample_size=16), 16),
                                     (dict(interpolation_scale=2, sample_size=16), 12),
                                     (dict(out_channels=4), 8)],
                         ids=["tiny", "interp2", "other-resolution", "no-sigma"])
def test_matches_diffusers_pixart(kw, size):
    ref = reference(**kw)
    model = FlexiPixArt.from_diffusers(ref).eval()
    assert all(p.abs().min() > 0 for p in model.parameters() if p.numel() > 1)   # non-zero weights everywhere
    x, t = inputs(size=size)
    cond = text()
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond.embeds, timestep=t,
                       encoder_attention_mask=cond.mask.long()).sample
        got = model(x, t, cond)
        expected_nomask = ref(x, encoder_hidden_states=cond.embeds, timestep=t).sample
        got_nomask = model(x, t, cond.embeds)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got_nomask, expected_nomask) <= 1e-5
    assert rel_err(got, got_nomask) > 1e-3      # the mask matters


def test_original_size_unchanged_by_flexify_and_lora():
    model, ref = tiny_flexi()
    for m in model.modules():   # make every LoRA non-zero: the original size must not see it
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                torch.nn.init.normal_(b)
    x, t = inputs()
    cond = text()
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond.embeds, timestep=t, encoder_attention_mask=cond.mask).sample
        assert rel_err(model(x, t, cond, patch_size=2), expected) <= 1e-5


def test_lora_recipe_trainable_parts():
    model, _ = tiny_flexi()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("4x4" in n for n in trainable)
    assert any("attn.qkv.lora_A" in n for n in trainable) and any("mlp.fc2.lora_B" in n for n in trainable)
    assert not any("cross_attn" in n for n in trainable)        # cross-attention: frozen, no LoRA
    assert not any("cross_attn" in n and "lora" in n for n, _ in model.named_parameters())


def test_weak_size_at_init_is_original_on_pooled_input():
    """p=4 at init = the p=2 model on the 2x2-pooled latent (positions at p=4 centres), replicated."""
    model, _ = tiny_flexi(sample_size=16)
    x, t = inputs(size=16)
    cond = text()
    with torch.no_grad():
        weak = model(x, t, cond, patch_size=4)
        table = sincos_2d_scaled(32, (4, 4), (2.0, 2.0), model.base_size, model.config["interpolation_scale"])
        model.pos_embed = lambda size, patch, device=None, dtype=None: table
        pooled = model(F.avg_pool2d(x, 2), t, cond, patch_size=2)
    expected = pooled.repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert rel_err(weak, expected) <= 1e-5


def test_packed_matches_per_sample_forward():
    model, _ = tiny_flexi(sizes=((2, 2), (4, 4)))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            for b in m.lora_B.values():
                torch.nn.init.normal_(b, std=0.1)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 12, generator=g), torch.randn(4, 8, 8, generator=g)]
    t = torch.tensor([10, 500, 900])
    cond = text(3)
    sizes = [4, 2, 2]
    with torch.no_grad():
        packed = model.forward_packed(xs, t, cond, sizes)
        for i, (x, p) in enumerate(zip(xs, sizes)):
            alone = model(x[None], t[i:i + 1], cond[i], patch_size=p)[0]
            assert packed[i].shape == alone.shape
            assert rel_err(packed[i], alone) <= 1e-5


def test_flops_include_cross_attention():
    model, _ = tiny_flexi()
    f2, f4 = model.flops(2), model.flops(4)
    assert 0.15 < f4 / f2 < 0.5
    assert model.flops(2, text_len=50) > model.flops(2, text_len=5)
    assert model.flops(2, batch=3) == 3 * f2


# ----------------------------------------------------------------------------- sampling and guidance

def test_null_condition_and_guided_sampling_schedule():
    model, _ = tiny_flexi()
    cond = text(2)
    null = model.null_condition(cond)
    assert len(null) == 2 and torch.equal(null.embeds[0], model.y_embedder.y_embedding)
    sched = fk.Schedule.weak_first(steps=4, weak_steps=2, weak=4, powerful=2)
    assert 0.3 < sched.relative_flops(model) < 1.0
    out = fk.sample(model, cond, schedule=sched, guidance=fk.Guidance(scale=2.0, mode="flexi"),
                    sampler="ddim", seed=0, progress=False)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    again = fk.sample(model, cond, schedule=sched, guidance=fk.Guidance(scale=2.0, mode="flexi"),
                      sampler="ddim", seed=0, progress=False)
    assert torch.equal(out, again)


def test_cfg_uses_the_null_caption():
    from flexikern.diffusion.guidance import Guidance, GuidedDenoiser
    model, _ = tiny_flexi()
    cond = text(2)
    x, t = inputs(2)
    with torch.no_grad():
        den = GuidedDenoiser(model, cond, Guidance(3.0, "cfg"))
        got = den(x, t, (2, 2), (2, 2))
        c, u = model(x, t, cond), model(x, t, model.null_condition(cond))
    expected = c.clone()
    expected[:, :4] = u[:, :4] + 3.0 * (c[:, :4] - u[:, :4])
    assert rel_err(got, expected) <= 1e-5


def test_save_and_load_roundtrip(tmp_path):
    model, _ = tiny_flexi()
    model.save_pretrained(tmp_path)
    again = FlexiPixArt.from_pretrained(tmp_path).eval()
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, text(), patch_size=4), again(x, t, text(), patch_size=4))


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_rejected():
    model, _ = tiny_flexi()
    x, t = inputs()
    with pytest.raises(ValueError, match="caption_channels=24"):
        model(x, t, torch.randn(3, 5, 23))
    with pytest.raises(ValueError, match="mask: expected shape"):
        model(x, t, TextCondition(torch.randn(3, 5, 24), torch.ones(3, 4)))
    with pytest.raises(ValueError, match="mask: expected 0/1"):
        TextCondition(torch.randn(3, 5, 24), torch.full((3, 5), 2))
    with pytest.raises(ValueError, match="3 text embeddings for a batch of 2"):
        model(x[:2], t[:2], text(3))
    with pytest.raises(ValueError, match="not configured"):
        model(x, t, text(), patch_size=8)
    with pytest.raises(ValueError, match="multiples of patch_size"):
        model(torch.randn(1, 4, 6, 6), t[:1], text(1), patch_size=4)
    with pytest.raises(ValueError, match="use_additional_conditions"):
        FlexiPixArt.from_diffusers(diffusers.PixArtTransformer2DModel(**{**TINY, "sample_size": 128}))
    with pytest.raises(ValueError, match="null_caption"):
        FlexiPixArt.from_diffusers(reference(), null_caption=torch.randn(5, 23))
