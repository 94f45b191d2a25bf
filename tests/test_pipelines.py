"""flexikern.pipelines: FlexiDiT inside diffusers pipelines, against diffusers' own pipelines.

Tiny random pipelines are built and saved here (non-zero random weights everywhere, a tiny
AutoencoderKL, for PixArt a tiny T5 encoder from a config and a tokenizer over letters); nothing
is downloaded. With the static schedule and plain CFG the flexible pipelines must give diffusers'
images from the same folder and generator.
"""

import json

import pytest
import torch

import flexikern as fk
from reference_dit import randomize_

diffusers = pytest.importorskip("diffusers")
pipelines = pytest.importorskip("flexikern.pipelines")
FlexiDiTPipeline = pipelines.FlexiDiTPipeline

ID2LABEL = {"0": "tench, Tinca tinca", "1": "goldfish", "7": "cock", "207": "golden retriever"}
LABELS = [1, 7, 207]
# DiTPipeline's null class is label 1000: its transformer needs 1000 classes.
DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
           sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
PIXART = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
              out_channels=8, cross_attention_dim=16, caption_channels=16, use_additional_conditions=False)
LATTE = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
             out_channels=8, cross_attention_dim=16, caption_channels=16, activation_fn="gelu-approximate",
             num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             attention_bias=True, video_length=2)
DIT_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
DETERMINISTIC = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]


def tiny_vae():
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=16)
    return randomize_(vae, seed=2, std=0.3).eval()


def scheduler(name, config=None):
    cls = getattr(diffusers, name)
    return cls.from_config(config) if config is not None else cls(**DIT_CONFIG)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny DiTPipeline saved as the Hub's facebook/DiT folders are (id2label in model_index.json)."""
    folder = tmp_path_factory.mktemp("dit")
    transformer = randomize_(diffusers.DiTTransformer2DModel(**DIT).eval(), seed=1)
    diffusers.DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler("DDIMScheduler")
                          ).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": ID2LABEL}))
    return folder


def tiny_text_parts():
    """A tiny T5 encoder (from a config) and a fast T5 tokenizer over letters."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(chr(c), -1.0) for c in range(97, 123)] + [("▁", -1.0)]
    tok = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    return transformers.T5TokenizerFast(tokenizer_object=tok, extra_ids=0), randomize_(encoder.eval(), seed=3, std=0.3)


def text_pipeline_folder(folder, pipeline, transformer, scheduler_name):
    """A tiny text pipeline (T5 parts from `tiny_text_parts`, a tiny VAE) saved to `folder`."""
    tokenizer, encoder = tiny_text_parts()
    pipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(), transformer=transformer.eval(),
             scheduler=scheduler(scheduler_name)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    transformer = randomize_(diffusers.PixArtTransformer2DModel(**PIXART), seed=4, std=0.3)
    return text_pipeline_folder(tmp_path_factory.mktemp("pixart"), diffusers.PixArtAlphaPipeline, transformer,
                                "DPMSolverMultistepScheduler")


@pytest.fixture(scope="module")
def latte_folder(tmp_path_factory):
    transformer = randomize_(diffusers.LatteTransformer3DModel(**LATTE), seed=5, std=0.3)
    return text_pipeline_folder(tmp_path_factory.mktemp("latte"), diffusers.LattePipeline, transformer, "DDIMScheduler")


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pair(folder, name="DDIMScheduler"):
    """(diffusers' DiTPipeline, FlexiDiTPipeline) from one folder, both with the scheduler `name`."""
    theirs, ours = quiet(diffusers.DiTPipeline.from_pretrained(folder)), quiet(FlexiDiTPipeline.from_pretrained(folder))
    for pipe in (theirs, ours):
        pipe.scheduler = scheduler(name, pipe.scheduler.config)
    return theirs, ours


def run(pipe, seed=0, **kw):
    kw = {"class_labels": LABELS, "num_inference_steps": 6, "output_type": "pt", **kw}
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", DETERMINISTIC[:2])
def test_dit_static_is_diffusers_dit_pipeline(dit_folder, name):
    theirs, ours = dit_pair(dit_folder, name)
    reference = run(theirs)
    assert reference.std() > 0.05   # images that differ where a bug would show
    torch.testing.assert_close(run(ours), reference, rtol=0, atol=1e-5)
    assert (run(ours, seed=1) - reference).abs().max() > 1e-2   # the comparison can fail
    assert isinstance(ours, diffusers.DiTPipeline) and isinstance(ours.transformer, fk.FlexiDiT)


def test_dit_output_types_and_return_dict(dit_folder):
    _, ours = dit_pair(dit_folder)
    images = run(ours, output_type="pt")
    np_images = run(ours, output_type="np")
    assert np_images.shape == (3, 8, 8, 3) and abs(np_images - images.permute(0, 2, 3, 1).numpy()).max() == 0
    pil = run(ours, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (8, 8)
    latents = run(ours, output_type="latent")
    assert latents.shape == (3, 4, 8, 8)
    (tupled,) = ours(LABELS, num_inference_steps=6, output_type="pt", return_dict=False,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(tupled, images)


def test_dit_sample_py_guidance_is_reachable(dit_folder):
    """guidance_channels=3: facebookresearch/DiT's sample.py, which guides 3 of the 4 latent
    channels; checked against a loop written here on diffusers' transformer."""
    theirs, ours = dit_pair(dit_folder)
    model, sched, scale = theirs.transformer, theirs.scheduler, 4.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    y = torch.tensor(LABELS + [1000] * 3)
    sched.set_timesteps(6)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([x, x]), timestep=t.expand(6), class_labels=y).sample[:, :4]
            cond, uncond = out.chunk(2)
            eps = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
            x = sched.step(eps, t, x).prev_sample
    got = run(ours, output_type="latent", guidance_scale=scale, guidance_channels=3)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)
    assert (run(ours, output_type="latent", guidance_scale=scale) - x).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "DDIMScheduler"])
def test_pixart_static_is_diffusers_pixart_pipeline(pixart_folder, name):
    Flexi = pipelines.FlexiPixArtPipeline
    theirs, ours = quiet(diffusers.PixArtAlphaPipeline.from_pretrained(pixart_folder)), \
        quiet(Flexi.from_pretrained(pixart_folder))
    for pipe in (theirs, ours):
        pipe.scheduler = scheduler(name, pipe.scheduler.config)
    kw = dict(prompt=["a cat", "two dogs on a mat"], num_inference_steps=5, output_type="pt",
              use_resolution_binning=False, max_sequence_length=12, clean_caption=False)
    reference = theirs(**kw, generator=torch.Generator().manual_seed(0)).images
    assert reference.std() > 0.05
    got = ours(**kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    other = ours(**{**kw, "prompt": ["a dog", "two cats on a mat"]}, generator=torch.Generator().manual_seed(0)).images
    assert (other - reference).abs().max() > 1e-2   # the prompt matters, so the comparison can fail
    assert isinstance(ours, diffusers.PixArtAlphaPipeline) and isinstance(ours.transformer, fk.FlexiPixArt)
    # FlexiDiT's budget: a cheaper schedule runs (the tiny model's text work makes p=4 cost 0.72).
    cheap = ours(**kw, generator=torch.Generator().manual_seed(0), budget=0.85).images
    assert cheap.shape == reference.shape and torch.isfinite(cheap).all()
    assert (cheap - reference).abs().max() > 1e-3
    _never_forward(ours.text_encoder)   # FlexiDiT's arguments are checked before the prompts are encoded
    _never_forward(ours.transformer)
    with pytest.raises(ValueError, match="looks like a percentage"):
        ours(**kw, budget=60)
    with pytest.raises(ValueError, match="schedule: 4 steps, but num_inference_steps=5 runs 5"):
        ours(**kw, schedule=fk.Schedule.static(4, 2))


def test_pixart_save_pretrained_is_read_by_both_libraries(pixart_folder, tmp_path):
    Flexi = pipelines.FlexiPixArtPipeline
    ours = quiet(Flexi.from_pretrained(pixart_folder))
    kw = dict(prompt="a red cat", num_inference_steps=4, output_type="pt", use_resolution_binning=False,
              max_sequence_length=12, clean_caption=False)
    ours.save_pretrained(tmp_path / "saved")
    theirs = quiet(diffusers.PixArtAlphaPipeline.from_pretrained(tmp_path / "saved"))
    torch.testing.assert_close(theirs(**kw, generator=torch.Generator().manual_seed(0)).images,
                               ours(**kw, generator=torch.Generator().manual_seed(0)).images, rtol=0, atol=1e-5)
    again = quiet(Flexi.from_pretrained(tmp_path / "saved"))
    assert torch.equal(again(**kw, generator=torch.Generator().manual_seed(0), budget=0.85).images,
                       ours(**kw, generator=torch.Generator().manual_seed(0), budget=0.85).images)


def test_latte_static_is_diffusers_latte_pipeline_and_saves_for_both(latte_folder, tmp_path):
    Flexi = pipelines.FlexiLattePipeline
    theirs = quiet(diffusers.LattePipeline.from_pretrained(latte_folder))
    ours = quiet(Flexi.from_pretrained(latte_folder))
    kw = dict(prompt=["a cat", "two dogs"], num_inference_steps=4, video_length=2, height=8, width=8,
              output_type="pt", clean_caption=False)
    reference = theirs(**kw, generator=torch.Generator().manual_seed(0)).frames
    assert reference.shape == (2, 2, 3, 8, 8) and reference.std() > 0.05
    got = ours(**kw, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)
    assert isinstance(ours, diffusers.LattePipeline) and isinstance(ours.transformer, fk.FlexiLatte)
    cheap = ours(**kw, generator=torch.Generator().manual_seed(0), budget=0.9).frames
    assert (cheap - reference).abs().max() > 1e-3
    no_temporal = ours(**kw, generator=torch.Generator().manual_seed(0), enable_temporal_attentions=False).frames
    assert (no_temporal - reference).abs().max() > 1e-3 and ours.transformer.config["enable_temporal_attentions"]
    ours.save_pretrained(tmp_path / "saved")
    back = quiet(diffusers.LattePipeline.from_pretrained(tmp_path / "saved"))
    torch.testing.assert_close(back(**kw, generator=torch.Generator().manual_seed(0)).frames, reference,
                               rtol=0, atol=1e-4)
    again = quiet(Flexi.from_pretrained(tmp_path / "saved"))
    assert torch.equal(again(**kw, generator=torch.Generator().manual_seed(0), budget=0.9).frames, cheap)


# ----------------------------------------------------------------------------- FlexiDiT's steps under any scheduler

def recorded_sizes(model):
    """Patch sizes of each forward, in order (the pipeline runs both CFG branches as one batch)."""
    sizes = []
    forward = model.forward

    def recording(x, t, y, patch_size=None):
        sizes.append(tuple(model._patch(patch_size)))
        return forward(x, t, y, patch_size=patch_size)
    model.forward = recording
    return sizes


@pytest.mark.parametrize("name", [*DETERMINISTIC, "DDPMScheduler"])
def test_budget_runs_weak_steps_first_with_any_scheduler(dit_folder, name):
    _, ours = dit_pair(dit_folder, name)
    sizes = recorded_sizes(ours.transformer)
    # (The tiny model's p=4 costs 0.6 of p=2: at budget 0.8 some steps are weak, some powerful.)
    images = run(ours, num_inference_steps=10, budget=0.8)
    expected = fk.Schedule.for_budget(ours.transformer, 10, 0.8)
    assert expected.relative_flops(ours.transformer) <= 0.8 and expected.sizes == {(2, 2), (4, 4)}
    assert sizes == [tuple(s) for s in expected.cond]   # one batched CFG forward per step, weak first
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, run(ours, num_inference_steps=10, budget=0.8))   # reproducible (DDPM: generator)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_budget_0_6_on_the_shipped_model_with_ddim_dpm_solver_and_euler(name):
    """The issue's call: budget=0.6 with DDIM, DPM-Solver++ and Euler, on the shipped (pixel-space) model."""
    from flexikern.arguments import shipped_models
    model = fk.FlexiDiT.from_pretrained(shipped_models()["shapes16"])
    pipe = quiet(FlexiDiTPipeline(transformer=model, vae=None, scheduler=scheduler(name)))
    sizes = recorded_sizes(model)
    images = pipe([0, 3], guidance_scale=1.625, num_inference_steps=20, output_type="np", budget=0.6,
                  generator=torch.Generator().manual_seed(0)).images
    schedule = fk.Schedule.for_budget(model, 20, 0.6)
    assert schedule.notation == "9/9" and schedule.relative_flops(model) <= 0.6
    assert sizes == [tuple(s) for s in schedule.cond]
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.1


def test_schedule_sized_to_model_evaluations(dit_folder):
    """A second-order scheduler evaluates the model 2N-1 times: the schedule has one entry per evaluation."""
    _, ours = dit_pair(dit_folder, "HeunDiscreteScheduler")
    with pytest.raises(ValueError, match=r"schedule: 5 steps, but num_inference_steps=5 runs 9 .*"
                                         r"HeunDiscreteScheduler evaluates the model 9 times"):
        run(ours, num_inference_steps=5, schedule=fk.Schedule.weak_first(5, 2, 4, 2))
    sizes = recorded_sizes(ours.transformer)
    run(ours, num_inference_steps=5, schedule=fk.Schedule.weak_first(9, 4, 4, 2))
    assert sizes == [(4, 4)] * 4 + [(2, 2)] * 5


def test_flexi_guidance_mode_runs_the_weak_model_as_guidance(dit_folder):
    _, ours = dit_pair(dit_folder)
    schedule = fk.Schedule.weak_first(6, 2, 4, 2, guidance_weak_steps=6)   # "4/0": guidance always weak
    flexi = run(ours, schedule=schedule, guidance_mode="flexi", output_type="latent")
    cfg = run(ours, schedule=schedule, guidance_mode="cfg", output_type="latent")
    assert (flexi - cfg).abs().max() > 1e-3


# ----------------------------------------------------------------------------- saving and loading

def test_save_pretrained_is_read_by_both_libraries(dit_folder, tmp_path):
    _, ours = dit_pair(dit_folder)
    with torch.no_grad():   # a "fine-tuned" weak mode: non-zero LoRA, so the flexible weights matter
        for name, p in ours.transformer.named_parameters():
            if "lora_B" in name or "size_embed" in name:
                p.normal_(0, 0.2)
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"] == ID2LABEL
    theirs = quiet(diffusers.DiTPipeline.from_pretrained(tmp_path / "saved"))
    assert theirs.labels == ours.labels and theirs.scheduler.__class__ is ours.scheduler.__class__
    torch.testing.assert_close(run(theirs), run(ours), rtol=0, atol=1e-5)
    again = quiet(FlexiDiTPipeline.from_pretrained(tmp_path / "saved"))   # flexible/ by default
    assert torch.equal(run(again, budget=0.6), run(ours, budget=0.6))
    into = quiet(FlexiDiTPipeline.from_pretrained(dit_folder, flexible=tmp_path / "saved"))   # its flexible/
    assert torch.equal(run(into, budget=0.6), run(ours, budget=0.6))
    fresh = quiet(FlexiDiTPipeline.from_pretrained(tmp_path / "saved", flexible=False))
    assert not torch.equal(run(fresh, budget=0.6), run(ours, budget=0.6))


def test_flexible_weights_from_a_flexikern_folder(dit_folder, tmp_path):
    model = fk.FlexiDiT.from_diffusers(dit_folder, patch_sizes=(2, 4), adapter="lora", lora_rank=4)
    model.save_pretrained(tmp_path / "ft")
    pipe = FlexiDiTPipeline.from_pretrained(dit_folder, flexible=tmp_path / "ft")
    assert pipe.transformer.lora_rank == 4
    with pytest.raises(ValueError, match=r"patch_sizes=\(2, 8\).*has its own"):
        FlexiDiTPipeline.from_pretrained(dit_folder, flexible=tmp_path / "ft", patch_sizes=(2, 8))
    with pytest.raises(FileNotFoundError, match="flexible='nope': no such folder"):
        FlexiDiTPipeline.from_pretrained(dit_folder, flexible="nope")
    with pytest.raises(TypeError, match="torch_dtype='float16': expected a torch.dtype"):
        FlexiDiTPipeline.from_pretrained(dit_folder, torch_dtype="float16")
    with pytest.raises(ValueError, match="lora_rank=8 with adapter='shared'"):
        FlexiDiTPipeline.from_pretrained(dit_folder, adapter="shared", lora_rank=8)
    with pytest.raises(ValueError, match="transformer=... and flexible="):
        FlexiDiTPipeline.from_pretrained(dit_folder, transformer=model, flexible=tmp_path / "ft")
    assert FlexiDiTPipeline.from_pretrained(dit_folder, transformer=model).transformer is model
    custom = FlexiDiTPipeline.from_pretrained(dit_folder, patch_sizes=(2, 8), adapter="lora", lora_rank=2)
    assert [tuple(p) for p in custom.transformer.patch_sizes] == [(2, 2), (8, 8)]


def test_save_refuses_what_diffusers_cannot_hold_before_writing(dit_folder, tmp_path):
    _, ours = dit_pair(dit_folder)
    ours.transformer = fk.FlexiDiT.from_diffusers(dit_folder, patch_sizes=(2, 4), adapter="shared")
    with pytest.raises(ValueError, match=r"adapter='shared'.*pipe.transformer.save_pretrained\(folder\)"):
        ours.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_get_label_ids_as_dit_pipeline(dit_folder):
    theirs, ours = dit_pair(dit_folder)
    names = ["goldfish", "Tinca tinca"]
    assert ours.get_label_ids(names) == theirs.get_label_ids(names) == [1, 0]
    assert ours.get_label_ids("golden retriever") == [207]
    with pytest.raises(ValueError, match="zebra does not exist"):
        ours.get_label_ids(["zebra"])


def test_a_diffusers_transformer_is_made_flexible(dit_folder):
    theirs, _ = dit_pair(dit_folder)
    pipe = quiet(FlexiDiTPipeline(transformer=theirs.transformer, vae=theirs.vae, scheduler=theirs.scheduler))
    assert [tuple(p) for p in pipe.transformer.patch_sizes] == [(2, 2), (4, 4)]
    assert pipe.to("cpu", torch.float32) is pipe and (pipe.device.type, pipe.dtype) == ("cpu", torch.float32)
    torch.testing.assert_close(run(pipe), run(theirs), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input

def _never_forward(model):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")
    model.forward = forbidden


@pytest.mark.parametrize("kw,error,message", [
    (dict(class_labels=[1.5, 2]), ValueError, "class labels must be ints"),
    (dict(class_labels=[1001]), ValueError, "out of range"),
    (dict(budget=60), ValueError, "looks like a percentage: pass 0.6"),
    (dict(budget=0.6, schedule=fk.Schedule.static(6, 2)), ValueError, "pass one of them"),
    (dict(schedule=fk.Schedule.static(5, 2)), ValueError, "schedule: 5 steps, but num_inference_steps=6 runs 6"),
    (dict(schedule=fk.Schedule.static(6, 8)), ValueError, r"patch sizes \[\(8, 8\)\] but the model supports only"),
    (dict(schedule="9/9"), TypeError, "expected a flexikern Schedule"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale=nan"),
    (dict(guidance_mode="weak"), ValueError, "guidance_mode='weak': expected 'flexi'"),
    (dict(output_type="jpg"), ValueError, "output_type='jpg': expected one of pil, np, pt, latent"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps=0"),
    (dict(generator=[torch.Generator()] * 2), ValueError, "2 generators for 3 images"),
    (dict(generator=0), TypeError, "generator=0: expected a torch.Generator"),
    (dict(guidance_channels=0), ValueError, r"guidance_channels=0: expected an int in \[1, 4\]"),
    (dict(guidance_channels=5, guidance_scale=1.0), ValueError, "guidance_channels=5: the latents have 4 channels"),
])
def test_bad_call_arguments_are_named_before_any_compute(dit_folder, kw, error, message):
    _, ours = dit_pair(dit_folder)
    _never_forward(ours.transformer)
    with pytest.raises(error, match=message):
        ours(**{"class_labels": LABELS, "num_inference_steps": 6, **kw})


@pytest.mark.parametrize("family", ["pixart", "latte"])
def test_bad_text_pipeline_arguments_are_named_before_the_prompts_are_encoded(family, pixart_folder, latte_folder):
    folder, Flexi = ((pixart_folder, pipelines.FlexiPixArtPipeline) if family == "pixart"
                     else (latte_folder, pipelines.FlexiLattePipeline))
    pipe = quiet(Flexi.from_pretrained(folder))
    _never_forward(pipe.text_encoder)
    _never_forward(pipe.transformer)
    kw = dict(prompt="a cat", num_inference_steps=3, height=8, width=8, clean_caption=False,
              **({"use_resolution_binning": False} if family == "pixart" else {"video_length": 2}))
    frames = (2,) if family == "latte" else ()
    # diffusers needs PixArt's mask with given embeddings, and fails in Latte's masking without one.
    given = dict(prompt_attention_mask=torch.ones(1, 5)) if family == "pixart" else dict(mask_feature=False)
    cases = [
        (dict(latents=torch.randn(1, 4, *frames, 8, 16)), ValueError, r"latents: expected shape \(1, 4, "),
        (dict(latents=[0]), TypeError, "latents: expected a float tensor"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0: expected a positive int"),
        (dict(prompt=[]), ValueError, "prompt=\\[\\]: no prompts"),
        (dict(prompt=None, prompt_embeds=torch.randn(1, 5, 7), **given), ValueError,
         r"prompt_embeds: expected text-encoder embeddings \(N, L, 16\)"),
        (dict(prompt=None, prompt_embeds=torch.full((1, 5, 16), float("nan")), guidance_scale=1.0, **given),
         ValueError, "y: text embeddings contain NaN"),
    ]
    if family == "latte":
        cases += [(dict(video_length=0), ValueError, "video_length=0: expected a positive int"),
                  (dict(decode_chunk_size=-1), ValueError, "decode_chunk_size=-1: expected a positive int")]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            pipe(**{**kw, **extra})


def test_a_latent_model_without_a_vae_gives_latents_only(dit_folder):
    pipe = quiet(FlexiDiTPipeline.from_pretrained(dit_folder, vae=None))
    _never_forward(pipe.transformer)
    with pytest.raises(ValueError, match="no vae to decode its 4-channel latents with; load one, or pass "
                                         "output_type='latent'"):
        pipe(LABELS, num_inference_steps=2)


def test_an_undrivable_scheduler_is_named(dit_folder):
    class OwnScheduler:
        def set_timesteps(self, n):
            self.timesteps = torch.arange(n)

        def step(self, output, t):
            return output
    _, ours = dit_pair(dit_folder)
    ours.scheduler = OwnScheduler()
    _never_forward(ours.transformer)
    with pytest.raises(TypeError, match=r"a OwnScheduler cannot drive the denoising steps: it lacks step\(\) "
                                        r"parameters model_output, timestep, sample, return_dict"):
        ours(LABELS, num_inference_steps=4)


def test_a_folder_of_another_family_names_both(dit_folder, pixart_folder, tmp_path):
    with pytest.raises(ValueError, match=r"a PixArtAlphaPipeline folder with transformer PixArtTransformer2DModel, "
                                         r"not a DiTPipeline .* load it with flexikern.pipelines.FlexiPixArtPipeline"):
        FlexiDiTPipeline.from_pretrained(pixart_folder)
    with pytest.raises(ValueError, match=r"a DiTPipeline folder .*not a PixArtAlphaPipeline.*FlexiDiTPipeline"):
        pipelines.FlexiPixArtPipeline.from_pretrained(dit_folder)
    with pytest.raises(FileNotFoundError, match="a folder without model_index.json"):
        FlexiDiTPipeline.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- the shipped example

def test_the_shipped_example_runs(tmp_path):
    from flexikern.pipelines import example
    path = example.main(["--out", str(tmp_path / "grid.png"), "--num-images", "4", "--threads", "1"])
    assert path.is_file() and path.stat().st_size > 0
