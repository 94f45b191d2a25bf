"""diffusers PixArt and Latte configs beyond the defaults: each field reproduced exactly or refused by name.

The two base configs are diffusers' own test configs (tests/models/transformers/
test_models_pixart_transformer2d.py and test_models_transformer_latte.py), loaded as they are.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flexikern as fk
from flexikern.models import FlexiLatte, FlexiPixArt, TextCondition

from reference_dit import randomize_

diffusers = pytest.importorskip("diffusers")

# diffusers' PixArt test config: no caption projection, cross_attention_dim 8 != inner dim 2 * 2.
PIXART_TEST_CONFIG = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2,
                          in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                          activation_fn="gelu-approximate", num_embeds_ada_norm=8, norm_type="ada_norm_single",
                          norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
                          caption_channels=None)
# diffusers' Latte test config (its test input has 1 frame; video_length is the default 16).
LATTE_TEST_CONFIG = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                         caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8,
                         attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
PIXART_VARIANTS = {
    "diffusers-test-config": {},
    "no-projection-wide": dict(attention_head_dim=8, cross_attention_dim=24, num_layers=2),
    "projection-no-attention-bias": dict(caption_channels=12, cross_attention_dim=4, attention_bias=False),
    "no-projection-no-attention-bias": dict(attention_bias=False),
    "no-effect-fields": dict(upcast_attention=True, norm_num_groups=7, num_embeds_ada_norm=3),
}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pixart_reference(**kw):
    return randomize_(diffusers.PixArtTransformer2DModel(**{**PIXART_TEST_CONFIG, **kw}).eval(), std=0.3)


def latte_reference(**kw):
    return randomize_(diffusers.LatteTransformer3DModel(**{**LATTE_TEST_CONFIG, **kw}).eval(), std=0.3)


def text_of(model, n, length=8, seed=2):
    """A random text condition for `model` (its text channels), the first row partly masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, length // 2:] = False
    return TextCondition(torch.randn(n, length, model.text_channels, generator=g), mask)


def noisy_adapters_(model, std=0.3):
    """Non-zero LoRA and patch-size embeddings: the original size must not see them."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "size_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def counted_flops(fn):
    """FLOPs torch counts for `fn()`, attention through SDPA's math path (so its matmuls count)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        fn()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- PixArt

@pytest.mark.parametrize("variant,size", [(v, 8) for v in PIXART_VARIANTS] + [("diffusers-test-config", 12)])
def test_pixart_config_matches_diffusers(variant, size):
    ref = pixart_reference(**PIXART_VARIANTS[variant])
    model = FlexiPixArt.from_diffusers(ref, patch_sizes=[2, 4], lora_rank=2)
    noisy_adapters_(model)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, size, size, generator=g), torch.randint(0, 1000, (4,), generator=g)
    cond = text_of(model, 4)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond.embeds, timestep=t, encoder_attention_mask=cond.mask,
                       added_cond_kwargs={"aspect_ratio": None, "resolution": None}).sample
        got = model(x, t, cond)
        expected_unmasked = ref(x, encoder_hidden_states=cond.embeds, timestep=t).sample
        got_unmasked = model(x, t, cond.embeds)
        weak = model(x, t, cond, patch_size=4)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got_unmasked, expected_unmasked) <= 1e-5
    assert rel_err(got, got_unmasked) > 1e-3            # the mask reaches the cross-attention
    assert weak.shape == got.shape and torch.isfinite(weak).all() and rel_err(weak, got) > 1e-3


def test_pixart_without_projection_has_none_and_says_so():
    model = FlexiPixArt.from_diffusers(pixart_reference())
    assert model.y_embedder.y_proj is None and model.text_channels == 8
    assert model.blocks[0].cross_attn.kv_linear.in_features == 8 and model.blocks[0].attn.qkv.out_features == 12
    assert not any(name.startswith("y_embedder.y_proj") for name in model.state_dict())
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"cross_attention_dim \(no caption projection\)=8"):
        model(x, torch.tensor([1]), torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match="cross_attention_dim=8: the caption projection"):
        FlexiPixArt(input_size=8, hidden_size=4, num_heads=2, depth=1, caption_channels=6, cross_attention_dim=8)


def test_pixart_without_projection_samples_with_guidance():
    model = FlexiPixArt.from_diffusers(pixart_reference(), patch_sizes=[2, 4], lora_rank=2,
                                       null_caption=torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    sched = fk.Schedule.weak_first(steps=2, weak_steps=1, weak=4, powerful=2)
    out = fk.sample(model, text_of(model, 2), schedule=sched, guidance=fk.Guidance(scale=2.0, mode="cfg"),
                    sampler="ddim", seed=0, progress=False)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- Latte

@pytest.mark.parametrize("frames,size,kw", [(1, 8, {}), (16, 8, {}), (4, 8, dict(video_length=4, attention_bias=False)),
                                            (1, 12, {})],
                         ids=["diffusers-test-input", "video_length-frames", "no-attention-bias", "other-resolution"])
@pytest.mark.parametrize("temporal", [True, False])
def test_latte_config_matches_diffusers(frames, size, kw, temporal):
    ref = latte_reference(**kw)
    model = FlexiLatte.from_diffusers(ref)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, frames, size, size, generator=g), torch.randint(0, 1000, (2,), generator=g)
    embeds = text_of(model, 2).embeds   # diffusers' Latte ignores a 2-D mask per frame: compare unmasked
    with torch.no_grad():
        expected = ref(x, timestep=t, encoder_hidden_states=embeds, enable_temporal_attentions=temporal).sample
        got = model(x, t, embeds, enable_temporal_attentions=temporal)
        other = model(x, t, embeds, enable_temporal_attentions=not temporal)
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(got, other) > 1e-3                  # the temporal blocks matter


def test_latte_temporal_setting_of_the_model():
    ref = latte_reference(video_length=4)
    model = FlexiLatte.from_diffusers(ref, patch_sizes=[(1, 2, 2), (2, 2, 2), (1, 4, 4)], lora_rank=2,
                                      enable_temporal_attentions=False)
    noisy_adapters_(model)
    assert model.config["enable_temporal_attentions"] is False
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 4, 8, 8, generator=g), torch.tensor([10, 500, 900])
    cond = text_of(model, 3)
    with torch.no_grad():
        expected = ref(x, timestep=t, encoder_hidden_states=cond.embeds, enable_temporal_attentions=False).sample
        assert rel_err(model(x, t, cond.embeds), expected) <= 1e-5
        expected_on = ref(x, timestep=t, encoder_hidden_states=cond.embeds).sample
        assert rel_err(model(x, t, cond.embeds, enable_temporal_attentions=True), expected_on) <= 1e-5
        sizes = [(2, 2, 2), (1, 2, 2), (1, 4, 4)]
        for flag in (None, True):
            packed = model.forward_packed(list(x), t, cond, sizes, enable_temporal_attentions=flag)
            for i, p in enumerate(sizes):
                alone = model(x[i:i + 1], t[i:i + 1], cond[i], patch_size=p, enable_temporal_attentions=flag)[0]
                assert rel_err(packed[i], alone) <= 1e-5
    for bad in ("no", 1):
        with pytest.raises(ValueError, match=f"enable_temporal_attentions={bad!r}: expected True, False or None"):
            model(x, t, cond, enable_temporal_attentions=bad)
    with pytest.raises(ValueError, match="enable_temporal_attentions=None: expected True or False"):
        FlexiLatte(input_size=8, hidden_size=8, num_heads=2, depth=1, enable_temporal_attentions=None)


# ----------------------------------------------------------------------------- FLOPs, saving, eval mode

def test_flops_count_what_runs():
    """`flops()` equals what torch counts running the forward: no caption projection, keys and
    values from cross_attention_dim, with and without temporal blocks, at every patch size."""
    for kw in ({}, dict(attention_head_dim=8, cross_attention_dim=24, num_layers=2),
               dict(caption_channels=12, cross_attention_dim=4)):
        model = FlexiPixArt.from_diffusers(pixart_reference(**kw), patch_sizes=[2, 4], lora_rank=2)
        x, cond = torch.randn(1, 4, 8, 8), text_of(model, 1, length=5)
        for p in (2, 4):
            assert model.flops(p, text_len=5) == counted_flops(lambda: model(x, torch.tensor([3]), cond, p)), (kw, p)
    model = FlexiLatte.from_diffusers(latte_reference(video_length=4), patch_sizes=[(1, 2, 2), (2, 2, 2)],
                                      lora_rank=2)
    x, cond = torch.randn(1, 4, 4, 8, 8), text_of(model, 1, length=5)
    for p in ((1, 2, 2), (2, 2, 2)):
        for on in (True, False):
            counted = counted_flops(lambda: model(x, torch.tensor([3]), cond, p, enable_temporal_attentions=on))
            assert model.flops(p, text_len=5, enable_temporal_attentions=on) == counted, (p, on)
    model.config["enable_temporal_attentions"] = False
    assert model.flops((2, 2, 2), text_len=5) == model.flops((2, 2, 2), text_len=5, enable_temporal_attentions=False)


def test_save_and_load_the_new_configs(tmp_path):
    pixart = FlexiPixArt.from_diffusers(pixart_reference(attention_bias=False), patch_sizes=[2, 4], lora_rank=2)
    latte = FlexiLatte.from_diffusers(latte_reference(video_length=4, attention_bias=False), lora_rank=2,
                                      patch_sizes=[(1, 2, 2), (2, 2, 2)], enable_temporal_attentions=False)
    for model, x, p in ((pixart, torch.randn(2, 4, 8, 8), 4), (latte, torch.randn(2, 4, 4, 8, 8), (2, 2, 2))):
        noisy_adapters_(model)
        model.save_pretrained(tmp_path / type(model).__name__)
        again = type(model).from_pretrained(tmp_path / type(model).__name__).eval()
        assert again.config == model.config
        assert again.y_embedder.y_proj is None if model is pixart else again.y_embedder.y_proj is not None
        cond, t = text_of(model, 2), torch.tensor([5, 700])
        with torch.no_grad():
            assert torch.equal(again(x, t, cond, patch_size=p), model(x, t, cond, patch_size=p))
            assert torch.equal(again(x, t, cond), model(x, t, cond))


def test_loaders_return_eval_mode_from_models_and_pipeline_folders(tmp_path):
    ref = pixart_reference()
    assert not FlexiPixArt.from_diffusers(ref).training
    assert not FlexiPixArt.from_diffusers(ref, patch_sizes=[2, 4]).training
    assert not FlexiLatte.from_diffusers(latte_reference()).training
    # A saved pipeline's folder (its text encoder, VAE and scheduler left out: only the index matters).
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(
        '{"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}')
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([7]), torch.randn(1, 8, 8)
    with torch.no_grad():
        expected = ref(x, encoder_hidden_states=cond, timestep=t).sample
        for source, kw in ((tmp_path / "pipe", {}), (tmp_path / "pipe", dict(subfolder="transformer")),
                           (tmp_path / "pipe" / "transformer", {})):
            model = FlexiPixArt.from_diffusers(source, **kw)
            assert not model.training and rel_err(model(x, t, cond), expected) <= 1e-5


# ----------------------------------------------------------------------------- refused, by name

@pytest.mark.parametrize("family,kw,message", [
    ("pixart", dict(norm_elementwise_affine=True), "norm_elementwise_affine=True (supported: False"),
    ("pixart", dict(activation_fn="gelu"), "activation_fn='gelu' (supported: 'gelu-approximate')"),
    ("pixart", dict(dropout=0.1), "dropout=0.1 (supported: 0"),
    ("pixart", dict(attention_type="gated"), "attention_type='gated' (supported: 'default')"),
    ("pixart", dict(cross_attention_dim=None), "cross_attention_dim=None (supported: an int"),
    ("pixart", dict(caption_channels=6), "cross_attention_dim=8 (supported: an int: the text channels without"),
    ("pixart", dict(sample_size=128, use_additional_conditions=None), "use_additional_conditions=True"),
    ("latte", dict(norm_type="layer_norm"), "norm_type='layer_norm' (supported: 'ada_norm_single')"),
    ("latte", dict(activation_fn="geglu"), "activation_fn='geglu'"),
    ("latte", dict(dropout=0.2), "dropout=0.2"),
    ("latte", dict(cross_attention_dim=None), "cross_attention_dim=None"),
])
def test_unsupported_fields_are_refused_by_name(family, kw, message):
    make = pixart_reference if family == "pixart" else latte_reference
    cls = FlexiPixArt if family == "pixart" else FlexiLatte
    with pytest.raises(ValueError) as info:
        cls.from_diffusers(make(**kw))
    assert message in str(info.value)


def test_unknown_field_is_refused():
    ref = pixart_reference()
    ref.register_to_config(rope_theta=10000)      # a field a newer diffusers might add
    with pytest.raises(ValueError, match=r"rope_theta=10000 \(a field flexikern does not know"):
        FlexiPixArt.from_diffusers(ref)
