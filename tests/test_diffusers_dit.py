"""diffusers DiT beyond the default config: other resolutions, per-block embedders, pipelines, eval mode."""

import json

import pytest
import torch

import flexikern as fk
from reference_dit import DiT, randomize_

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 11, (n,), generator=g))   # label 10: the null class


def theirs(shared: bool, seed: int = 5, **kw):
    """A tiny diffusers DiT with random weights; `shared`: every block's embedder is block 0's
    (as in a checkpoint converted from facebookresearch/DiT), else each its own (natively trained)."""
    torch.manual_seed(seed)
    model = randomize_(diffusers.DiTTransformer2DModel(**{**TINY, **kw}).eval(), seed)
    if shared:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                    p.copy_(model.get_parameter("transformer_blocks.0." + name.split(".", 2)[2]))
    return model


def run_diffusers(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def same_state(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- resolutions

@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-block"])
def test_every_resolution_matches_diffusers(shared):
    ref = theirs(shared)
    model = fk.FlexiDiT.from_diffusers(ref, patch_sizes=(2, 4), lora_rank=4)
    for size in (4, 8, 12, 16):
        x, t, y = inputs(size=size, seed=size)
        with torch.no_grad():
            assert rel_err(model(x, t, y), run_diffusers(ref, x, t, y)) <= 1e-6, size


def test_positional_tables_are_diffusers_at_every_size_and_patch():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_2d_sincos_pos_embed_from_grid
    model = fk.FlexiDiT.from_diffusers(theirs(True), patch_sizes=(2, 4), lora_rank=4)
    base, p2, p4 = 4, *model.patch_sizes
    for size in (8, 12, 16):
        g = size // 2
        exact = get_2d_sincos_pos_embed(32, g, base_size=base, interpolation_scale=1.0).float()
        assert torch.equal(model.pos_embed((size, size), p2), exact), size
        # A 4x4 patch sits at the centre of the four 2x2 patches it covers, in diffusers' coordinates.
        coords = (torch.arange(g, dtype=torch.float64) * base / g).reshape(-1, 2).mean(1)
        grid = torch.stack(torch.meshgrid(coords, coords, indexing="xy")).reshape(2, 1, g // 2, g // 2)
        centred = get_2d_sincos_pos_embed_from_grid(32, grid).float()
        assert (model.pos_embed((size, size), p4) - centred).abs().max() <= 1e-6, size


def test_dit_checkpoints_keep_dits_table_at_other_sizes():
    # facebookresearch/DiT builds its table for the grid it runs at: patch indices, not rescaled.
    small = randomize_(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                           num_classes=10), seed=3)
    model = fk.FlexiDiT.from_dit(small.state_dict(), num_heads=2)
    assert model.config["pos_base_size"] is None
    large = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    large.load_state_dict({k: v for k, v in small.state_dict().items() if k != "pos_embed"}, strict=False)
    x, t, y = inputs(size=16)
    with torch.no_grad():
        assert rel_err(model(x, t, y), large.eval()(x, t, y)) <= 1e-5


# ----------------------------------------------------------------------------- per-block embedders

@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-block"])
def test_to_diffusers_round_trips_exactly(shared):
    ref = theirs(shared)
    model = fk.FlexiDiT.from_diffusers(ref)
    assert model.config["block_embedders"] is (not shared)
    back = model.to_diffusers()
    assert same_state(back, ref)
    x, t, y = inputs(size=12)
    assert torch.equal(run_diffusers(back, x, t, y), run_diffusers(ref, x, t, y))


def test_freshly_initialised_diffusers_dit_loads_with_its_own_embedders():
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(**TINY).eval()
    model = fk.FlexiDiT.from_diffusers(ref)
    assert sorted(model.block_embedders) == ["1", "2"]
    x, t, y = inputs()
    with torch.no_grad():
        assert rel_err(model(x, t, y), run_diffusers(ref, x, t, y)) <= 1e-6


def test_shared_embedders_cost_nothing_extra():
    shared = fk.FlexiDiT.from_diffusers(theirs(True))
    own = fk.FlexiDiT.from_diffusers(theirs(False))
    plain = fk.FlexiDiT(input_size=8, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert shared.block_embedders is None and count(shared) == count(plain)
    per_block = 256 * 32 + 32 + 32 * 32 + 32 + 11 * 32   # timestep MLP + label table
    assert count(own) == count(plain) + 2 * per_block


def test_flops_count_every_blocks_embedder():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    measured = {}
    models = {s: fk.FlexiDiT.from_diffusers(theirs(s), patch_sizes=(2, 4), lora_rank=4) for s in (True, False)}
    for shared, model in models.items():
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs(n=2), patch_size=4)
        measured[shared] = counter.get_total_flops()
        assert abs(model.flops(4, batch=2) - measured[shared]) / measured[shared] <= 0.01
    assert models[False].flops(4, batch=2) - models[True].flops(4, batch=2) == measured[False] - measured[True]


@pytest.mark.parametrize("adapter", ["lora", "shared"])
def test_per_block_embedders_with_flexible_patch_sizes(adapter, tmp_path):
    model = fk.FlexiDiT.from_diffusers(theirs(False), patch_sizes=(2, 4), adapter=adapter, lora_rank=4)
    embedders = [p for n, p in model.named_parameters() if n.startswith("block_embedders.")]
    assert all(p.requires_grad == (adapter == "shared") for p in embedders)
    x, t, y = inputs()
    model.train()
    model(x, t, y, patch_size=4).square().mean().backward()
    assert all((p.grad is not None) == (adapter == "shared") for p in embedders)
    model.eval()
    with torch.no_grad():
        packed = model.forward_packed(list(x), t, y, [2, 4, 4])
        for i, p in enumerate((2, 4, 4)):
            assert rel_err(packed[i], model(x[i:i + 1], t[i:i + 1], y[i:i + 1], patch_size=p)[0]) <= 1e-5
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["block_embedders"] is True and config["pos_base_size"] == 4
    loaded = fk.FlexiDiT.from_pretrained(tmp_path)
    x, t, y = inputs(size=16)
    with torch.no_grad():
        for p in (2, 4):
            assert torch.equal(loaded(x, t, y, patch_size=p), model(x, t, y, patch_size=p))


def test_configs_without_the_new_keys_load_with_dits_numerics(tmp_path):
    model = fk.FlexiDiT.from_dit(randomize_(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                                                depth=2, num_heads=2, num_classes=10)).state_dict(), num_heads=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["pos_base_size"], config["block_embedders"]       # as written before they existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = fk.FlexiDiT.from_pretrained(tmp_path)
    assert loaded.config["pos_base_size"] is None and loaded.block_embedders is None
    x, t, y = inputs(size=16)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_to_diffusers_refuses_what_diffusers_would_compute_differently():
    model = fk.FlexiDiT.from_diffusers(theirs(True))
    model.config["pos_base_size"] = None
    with pytest.raises(ValueError, match="pos_base_size=None"):
        model.to_diffusers()
    with pytest.raises(ValueError, match="pos_base_size=0: expected a positive int"):
        fk.FlexiDiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10, pos_base_size=0)
    dit = fk.FlexiDiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10, class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="timestep_freq_shift=0.*no null class|no null class.*timestep"):
        dit.to_diffusers()


def test_unsupported_diffusers_configs_are_named():
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        fk.FlexiDiT.from_diffusers(diffusers.DiTTransformer2DModel(**{**TINY, "activation_fn": "gelu"}))
    with pytest.raises(ValueError, match="attention_bias=False"):
        fk.FlexiDiT.from_diffusers(diffusers.DiTTransformer2DModel(**{**TINY, "attention_bias": False}))
    future = diffusers.DiTTransformer2DModel(**TINY)
    future.register_to_config(qk_norm="rms_norm")     # a field a newer diffusers might add
    with pytest.raises(ValueError, match="qk_norm='rms_norm' \\(a field flexikern does not know"):
        fk.FlexiDiT.from_diffusers(future)


# ----------------------------------------------------------------------------- pipelines and eval mode

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny DiTPipeline (per-block embedders) saved to a folder: (pipeline, folder)."""
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=16)
    pipe = diffusers.DiTPipeline(transformer=theirs(False), vae=vae, scheduler=diffusers.DDIMScheduler())
    folder = tmp_path_factory.mktemp("dit-pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


def test_pipelines_folders_and_subfolders_load(pipeline):
    pipe, folder = pipeline
    x, t, y = inputs(size=12)
    expected = run_diffusers(pipe.transformer, x, t, y)
    for source, kwargs in ((folder, {}), (str(folder), {"subfolder": "transformer"}), (pipe, {}),
                           (pipe, {"subfolder": "transformer"}), (folder / "transformer", {})):
        model = fk.FlexiDiT.from_diffusers(source, **kwargs)
        assert not model.training, source
        with torch.no_grad():
            assert rel_err(model(x, t, y), expected) <= 1e-6, (source, kwargs)
    with pytest.raises(ValueError, match="subfolder='vae': this DiTPipeline's component 'vae' is a AutoencoderKL"):
        fk.FlexiDiT.from_diffusers(pipe, subfolder="vae")
    with pytest.raises(ValueError, match=r"vae.*config.json: a diffusers AutoencoderKL, not a DiTTransformer2DModel"):
        fk.FlexiDiT.from_diffusers(folder, subfolder="vae")
    with pytest.raises(FileNotFoundError, match="nothing.*config.json"):
        fk.FlexiDiT.from_diffusers(folder, subfolder="nothing")


def test_pipeline_folders_serve_the_text_models_too(tmp_path):
    # The one diffusers loader also finds a PixArt pipeline's transformer (by its class).
    from flexikern.models.convert import _diffusers_module
    torch.manual_seed(0)
    pixart = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                num_layers=1, sample_size=8, caption_channels=16,
                                                cross_attention_dim=16)
    pixart.save_pretrained(tmp_path / "denoiser")
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "denoiser": ["diffusers", "PixArtTransformer2DModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}))
    assert same_state(_diffusers_module(tmp_path, "PixArtTransformer2DModel"), pixart)


def test_every_loader_returns_eval_mode(tmp_path):
    ref = theirs(False).train()
    model = fk.FlexiDiT.from_diffusers(ref, patch_sizes=(2, 4), lora_rank=4)
    back = model.to_diffusers()
    model.save_pretrained(tmp_path / "saved")
    dit = randomize_(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                         num_classes=10))
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    loaded = [model, back, fk.FlexiDiT.from_pretrained(tmp_path / "saved"),
              fk.FlexiDiT.from_dit(tmp_path / "dit.pt", num_heads=2), fk.FlexiDiT.from_dit(dit.state_dict(), num_heads=2)]
    for m in loaded:
        assert not any(module.training for module in m.modules()), type(m).__name__
    assert ref.training   # the source model is left as it was
