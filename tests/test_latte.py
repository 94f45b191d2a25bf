"""Video FlexiDiT (Latte): diffusers parity, 3-D weak sizes at init, packing, schedules, bad input."""

import pytest
import torch
import torch.nn.functional as F

import flexikern as fk
from flexikern.flexi.pos_embed import sincos_2d_scaled
from flexikern.models import TextCondition
from flexikern.models import FlexiLatte

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24, video_length=4,
            activation_fn="gelu-approximate", norm_type="ada_norm_single", norm_elementwise_affine=False,
            norm_eps=1e-6, attention_bias=True, num_embeds_ada_norm=1000)
WEAK = [(1, 2, 2), (2, 2, 2), (1, 4, 4)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(seed=0, **kw):
    model = diffusers.LatteTransformer3DModel(**{**TINY, **kw}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(n=2, frames=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, frames, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    e = torch.randn(n, 5, 24, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return x, t, TextCondition(e, mask)


def tiny_flexi(sizes=WEAK, lora_noise=0.0, **kw):
    ref = reference(**kw)
    model = FlexiLatte.from_diffusers(ref, patch_sizes=sizes, lora_rank=4).eval()
    if lora_noise:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or "size_embed" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * lora_noise)
    return model, ref


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("kw", [{}, dict(out_channels=4, sample_size=16)], ids=["tiny", "no-sigma-16"])
def test_matches_diffusers_latte(kw):
    ref = reference(**kw)
    model = FlexiLatte.from_diffusers(ref).eval()
    assert all(p.abs().min() > 0 for p in model.parameters() if p.numel() > 1)   # non-zero weights everywhere
    x, t, cond = inputs(size=ref.config.sample_size)
    with torch.no_grad():
        # diffusers' Latte does not turn a 2-D text mask into a bias for its per-frame batch: compare unmasked.
        expected = ref(x, timestep=t, encoder_hidden_states=cond.embeds).sample
        got = model(x, t, cond.embeds)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_original_size_unchanged_by_flexify_and_lora():
    model, ref = tiny_flexi(lora_noise=0.5)
    x, t, cond = inputs()
    with torch.no_grad():
        expected = ref(x, timestep=t, encoder_hidden_states=cond.embeds).sample
        assert rel_err(model(x, t, cond.embeds, patch_size=(1, 2, 2)), expected) <= 1e-5


def test_extension_and_torch_patchify_agree():
    model, _ = tiny_flexi(lora_noise=0.1)
    x, t, cond = inputs()
    with torch.no_grad(), fk.ops.use_backend(patchify="torch", unpatchify="torch"):
        expected = model(x, t, cond, patch_size=(2, 2, 2))
    if fk.ops.select("patchify", x=x, patch_size=(2, 2, 2)).name != "ext":
        pytest.skip("flexikern._C is not built")
    with torch.no_grad():
        got = model(x, t, cond, patch_size=(2, 2, 2))
    assert rel_err(got, expected) <= 1e-6


def test_temporal_weak_size_at_init_is_original_on_frame_averaged_video():
    """(2,2,2) at init = the (1,2,2) model on frame-pair means, temporal positions at pair centres, replicated."""
    model, _ = tiny_flexi()
    x, t, cond = inputs()
    with torch.no_grad():
        weak = model(x, t, cond, patch_size=(2, 2, 2))
        centres = model.temporal_pos_embed(4, (2, 2, 2))
        model.temporal_pos_embed = lambda frames, patch, device=None, dtype=None: centres
        averaged = x.reshape(2, 4, 2, 2, 8, 8).mean(3)
        expected = model(averaged, t, cond, patch_size=(1, 2, 2)).repeat_interleave(2, 2)
    assert rel_err(weak, expected) <= 1e-5


def test_spatial_weak_size_at_init_is_original_on_pooled_video():
    model, _ = tiny_flexi(sample_size=16)
    x, t, cond = inputs(size=16)
    with torch.no_grad():
        weak = model(x, t, cond, patch_size=(1, 4, 4))
        table = sincos_2d_scaled(32, (4, 4), (2.0, 2.0), model.base_size, model.config["interpolation_scale"])
        model.pos_embed = lambda size, patch, device=None, dtype=None: table.repeat(size[0] // patch[0], 1)
        pooled = F.avg_pool3d(x, (1, 2, 2))
        expected = model(pooled, t, cond).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert rel_err(weak, expected) <= 1e-5


def test_packed_matches_per_sample_forward():
    model, _ = tiny_flexi(lora_noise=0.2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 2, 8, 12, generator=g),
          torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)]
    t = torch.tensor([10, 500, 900, 3])
    e = torch.randn(4, 5, 24, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1, 2:] = False
    cond = TextCondition(e, mask)
    sizes = [(2, 2, 2), (1, 2, 2), (1, 4, 4), (2, 2, 2)]
    with torch.no_grad():
        packed = model.forward_packed(xs, t, cond, sizes)
        for i, (x, p) in enumerate(zip(xs, sizes)):
            alone = model(x[None], t[i:i + 1], cond[i], patch_size=p)[0]
            assert packed[i].shape == alone.shape
            assert rel_err(packed[i], alone) <= 1e-5


def test_flops_and_schedules():
    model, _ = tiny_flexi()
    full = model.flops((1, 2, 2), text_len=5)
    assert 0.3 < model.flops((2, 2, 2), text_len=5) / full < 0.6      # half the tokens
    assert 0.15 < model.flops((1, 4, 4), text_len=5) / full < 0.35    # a quarter
    assert model.flops((1, 2, 2), text_len=50) > full
    sched = fk.Schedule.weak_first(steps=4, weak_steps=3, weak=(1, 4, 4), powerful=(1, 2, 2))
    assert 0.3 < sched.relative_flops(model) < 0.6
    assert "1x4x4" in repr(fk.Schedule.from_list([(1, 4, 4), (2, 2, 2), (1, 2, 2)]))
    cond = inputs()[2]
    out = fk.sample(model, cond, schedule=sched, guidance=fk.Guidance(scale=2.0, mode="flexi"),
                    sampler="ddim", seed=0, progress=False)
    assert out.shape == (2, 4, 4, 8, 8) and torch.isfinite(out).all()


def test_training_gradient_reaches_lora_only():
    model, _ = tiny_flexi()
    model.train()
    x, t, cond = inputs()
    model(x, t, cond, patch_size=(2, 2, 2)).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("2x2x2" in n for n in grads)
    assert any("temporal_blocks" in n and "lora" in n for n in grads)
    assert not any("cross_attn" in n for n, p in model.named_parameters() if p.requires_grad)


def test_save_and_load_roundtrip(tmp_path):
    model, _ = tiny_flexi(lora_noise=0.1)
    model.save_pretrained(tmp_path)
    again = FlexiLatte.from_pretrained(tmp_path).eval()
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, cond, patch_size=(2, 2, 2)), again(x, t, cond, patch_size=(2, 2, 2)))


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_rejected():
    model, _ = tiny_flexi()
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="3 frames are not a multiple of the temporal patch 2"):
        model(x[:, :, :3], t, cond, patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match="caption_channels=24"):
        model(x, t, torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="mask: expected shape"):
        model(x, t, TextCondition(cond.embeds, torch.ones(2, 6)))
    with pytest.raises(ValueError, match="expected a video"):
        model(x[:, :, 0], t, cond)
    with pytest.raises(ValueError, match="not configured"):
        model(x, t, cond, patch_size=(4, 2, 2))
    with pytest.raises(ValueError, match=r"expected a video patch \(pt, ph, pw\)"):
        model(x, t, cond, patch_size=2)
    with pytest.raises(ValueError, match="'lora'"):
        FlexiLatte.from_diffusers(reference(), patch_sizes=WEAK, adapter="shared")
    with pytest.raises(ValueError, match="does not divide"):
        FlexiLatte.from_diffusers(reference(), patch_sizes=[(1, 2, 2), (3, 2, 2)])
    with pytest.raises(ValueError, match="activation_fn"):
        FlexiLatte.from_diffusers(diffusers.LatteTransformer3DModel(**{**TINY, "activation_fn": "geglu"}))
