"""FlexiDiT: exactness against DiT and diffusers, weak sizes, adapters, loading, FLOPs, bad input."""

import argparse
import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import flexikern as fk
from flexikern.ops.patch_size import PatchSize
from flexikern.flexi import lift_deembed, lift_embed, pi_resize, resize_deembed, resize_matrix, sincos_2d
from reference_dit import DiT, get_2d_sincos_pos_embed, randomize_

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inputs(n=3, c=4, size=8, num_classes=10, seed=0, null=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    if null:
        y[-1] = num_classes  # the null class
    return x, t, y


def tiny_flexi(adapter="lora", sizes=(2, 4), seed=0, **kw):
    ref = randomize_(DiT(**{**TINY, **kw}), seed)
    return fk.FlexiDiT.from_dit(ref.state_dict(), patch_sizes=sizes, adapter=adapter, lora_rank=4,
                                num_heads=ref.blocks[0].attn.num_heads)


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("config", [
    dict(TINY),
    dict(TINY, learn_sigma=False),
    dict(TINY, class_dropout_prob=0.0),
    dict(TINY, in_channels=3, patch_size=4, input_size=16, num_heads=4),
    dict(input_size=8, patch_size=2, in_channels=4, hidden_size=1152, depth=1, num_heads=16, num_classes=1000),
], ids=["tiny", "no-sigma", "no-null", "p4", "xl-width"])
def test_matches_reference_dit(config):
    ref = randomize_(DiT(**config).eval(), seed=1)
    model = fk.FlexiDiT.from_dit(ref.state_dict(), num_heads=config["num_heads"]).eval()
    null = config.get("class_dropout_prob", 0.1) > 0
    x, t, y = inputs(c=config["in_channels"], size=config["input_size"], num_classes=config["num_classes"], null=null)
    with torch.no_grad():
        expected, got = ref(x, t, y), model(x, t, y)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= 1e-5


def test_lora_original_size_is_bit_identical_to_unconverted():
    ref = randomize_(DiT(**TINY), seed=2)
    plain = fk.FlexiDiT.from_dit(ref.state_dict(), num_heads=2)
    flexi = fk.FlexiDiT.from_dit(ref.state_dict(), patch_sizes=(2, 4), adapter="lora", lora_rank=4, num_heads=2)
    with torch.no_grad():  # make the adapters non-trivial: they must still be ignored at p=2
        for p in flexi.trainable_parameters():
            p.normal_()
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(flexi(x, t, y), plain(x, t, y))
        assert torch.equal(flexi(x, t, y, patch_size=2), plain(x, t, y))


def test_shared_original_size_matches():
    ref = randomize_(DiT(**TINY), seed=3)
    model = fk.FlexiDiT.from_dit(ref.state_dict(), patch_sizes=(2, 4), adapter="shared", num_heads=2)
    x, t, y = inputs()
    with torch.no_grad():
        assert rel_err(model(x, t, y, patch_size=2), ref(x, t, y)) <= 1e-5


def test_loads_release_training_and_safetensors_files(tmp_path):
    ref = randomize_(DiT(**TINY), seed=4)
    x, t, y = inputs()
    with torch.no_grad():
        expected = ref(x, t, y)
    release = tmp_path / "release.pt"
    torch.save(ref.state_dict(), release)
    training = tmp_path / "0001000.pt"
    junk = {k: torch.zeros_like(v) for k, v in ref.state_dict().items()}
    torch.save({"model": junk, "ema": ref.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(num_classes=10, image_size=64, model="DiT-S/2")}, training)
    from safetensors.torch import save_file
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "pos_embed"}, str(st))
    for path in (release, training, st):
        model = fk.FlexiDiT.from_dit(path, num_heads=2)
        with torch.no_grad():
            assert rel_err(model(x, t, y), expected) <= 1e-5, path


def test_diffusers_parity_and_round_trip():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    theirs = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                             out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                             num_embeds_ada_norm=10).eval()
    randomize_(theirs, seed=5)
    with torch.no_grad():  # a real (converted) checkpoint holds one embedder copied into every block
        for name, p in theirs.named_parameters():
            if ".norm1.emb." in name and not name.startswith("transformer_blocks.0."):
                p.copy_(theirs.get_parameter("transformer_blocks.0." + name.split(".", 2)[2]))
    model = fk.FlexiDiT.from_diffusers(theirs, patch_sizes=(2, 4), adapter="lora", lora_rank=4).eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        assert rel_err(model(x, t, y), expected) <= 1e-5
        back = model.to_diffusers().eval()
        assert torch.equal(back(x, timestep=t, class_labels=y).sample, expected)
    a, b = theirs.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_and_load_pretrained(tmp_path):
    for adapter in ("lora", "shared"):
        model = tiny_flexi(adapter)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(tmp_path / adapter)
        loaded = fk.FlexiDiT.from_pretrained(tmp_path / adapter)
        x, t, y = inputs()
        with torch.no_grad():
            for p in (2, 4):
                assert torch.equal(model(x, t, y, patch_size=p), loaded(x, t, y, patch_size=p))
        assert [n for n, p in model.named_parameters() if p.requires_grad] == \
               [n for n, p in loaded.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- weak sizes

@pytest.mark.parametrize("adapter", ["lora", "shared"])
def test_weak_sizes_shapes_and_non_square(adapter):
    model = tiny_flexi(adapter, sizes=(2, 4, (2, 4), (4, 2), 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 16, generator=g)
    t, y = torch.tensor([10, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        for p in model.patch_sizes:
            out = model(x, t, y, patch_size=p)
            assert out.shape == (2, 8, 8, 16) and torch.isfinite(out).all()


def test_weak_embedding_at_init_equals_pooled_original():
    model = tiny_flexi("lora")
    x, _, _ = inputs()
    emb = model.x_embedder
    with torch.no_grad():
        weak = emb(x, PatchSize.parse(4), None)
        pooled = emb(F.avg_pool2d(x, 2), PatchSize.parse(2), None)
    assert rel_err(weak, pooled) <= 1e-6


def test_weak_deembedding_at_init_replicates_original():
    model = tiny_flexi("shared")
    tokens = torch.randn(2, 4, 32)
    with torch.no_grad():
        weak = model.final_layer.linear(tokens, PatchSize.parse(4), (8, 8))          # 2x2 tokens of 4x4 patches
        strong = model.final_layer.linear(tokens, PatchSize.parse(2), (4, 4))        # the same tokens at p=2
    assert rel_err(weak, strong.repeat_interleave(2, 2).repeat_interleave(2, 3)) <= 1e-6


def test_positional_tables():
    dit = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float()
    assert torch.equal(sincos_2d(32, (4, 4)), dit)
    # a p=4 token of a p=2 model sits at the centre of its 2x2 original tokens
    centre = sincos_2d(32, (2, 2), (2.0, 2.0))
    from flexikern.flexi import sincos_1d
    expected_x = sincos_1d(16, torch.tensor([0.5, 2.5, 0.5, 2.5])).float()
    expected_y = sincos_1d(16, torch.tensor([0.5, 0.5, 2.5, 2.5])).float()
    assert torch.allclose(centre, torch.cat([expected_x, expected_y], 1), atol=1e-6)
    assert sincos_2d(32, (4, 4)) is sincos_2d(32, (4, 4))  # cached per grid


def test_pi_resize_properties():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, 2, 3, generator=g, dtype=torch.float64)
    # definition: w @ pinv(R), R = bilinear resize of the identity
    R = resize_matrix((2, 3), (4, 5), dtype=torch.float64)
    expected = (w.reshape(5, 3, 6) @ torch.linalg.pinv(R)).reshape(5, 3, 4, 5)
    assert torch.allclose(pi_resize(w, (4, 5)), expected)
    # upsampling keeps <resize(x), w_new> = <x, w>
    x = torch.randn(7, 3, 2, 3, generator=g, dtype=torch.float64)
    up = F.interpolate(x, size=(4, 5), mode="bilinear", align_corners=False)
    assert torch.allclose(torch.einsum("nchw,dchw->nd", up, pi_resize(w, (4, 5))),
                          torch.einsum("nchw,dchw->nd", x, w))
    # lifting then resizing back is exact (embed: spread / 4; de-embed: replicate)
    assert torch.allclose(pi_resize(lift_embed(w, (4, 6)), (2, 3)), w)
    assert torch.allclose(resize_deembed(lift_deembed(w, (4, 6)), (2, 3)), w)
    assert torch.allclose(lift_embed(w, (4, 6))[..., ::2, ::2], w / 4)
    assert torch.allclose(lift_deembed(w, (4, 6))[..., 1::2, 1::2], w)
    assert pi_resize(w.float(), 4).dtype == torch.float32


# ----------------------------------------------------------------------------- adapters and gradients

def _grads(model, patch_size):
    model.zero_grad(set_to_none=True)
    x, t, y = inputs()
    out = model(x, t, y, patch_size=patch_size)
    if out.requires_grad:
        out.square().mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_lora_gradients_reach_exactly_the_weak_adapter():
    model = tiny_flexi("lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or n.endswith(".4x4")) for n in trainable)
    assert _grads(model, 4) == trainable
    assert _grads(model, 2) == set()  # the original size uses no trainable tensor


def test_shared_gradients_reach_everything_of_the_size():
    model = tiny_flexi("shared")
    names = {n for n, _ in model.named_parameters()}
    assert all(p.requires_grad for p in model.parameters())
    for size, other in ((4, "2x2"), (2, "4x4")):
        got = _grads(model, size)
        expected = {n for n in names if not n.endswith("." + other)}
        if size == 2:
            expected -= {n for n in names if n.startswith("x_embedder.size_embed")}
        assert got == expected


def test_forward_runs_the_stored_kernels_in_inference():
    """No resized copy of a kernel is kept: every size runs the stored parameters, resized by the
    op (tests/test_stale_state.py checks forwards after weight changes)."""
    model = tiny_flexi("shared").eval()
    with torch.no_grad():
        model(*inputs(), patch_size=2)                    # 2x2 is resized from the 4x4 kernel
    for layer in (model.x_embedder, model.final_layer.linear):
        weight, bias, kernel = layer.weights((2, 2))
        assert weight is layer.weight["shared"] and bias is layer.bias["shared"] and kernel == (4, 4)


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("adapter,size", [("lora", 2), ("lora", 4), ("shared", 4)])
def test_flops_match_flop_counter(adapter, size):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = fk.FlexiDiT(input_size=16, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                        patch_sizes=(2, 4), adapter=adapter, lora_rank=8).eval()
    x, t, y = inputs(n=2, size=16)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(x, t, y, patch_size=size)
    measured = counter.get_total_flops()
    assert abs(model.flops(size, batch=2) - measured) / measured <= 0.01


def test_dit_xl2_flops():
    with torch.device("meta"):  # FLOPs are analytic: no need to allocate 675M parameters
        model = fk.FlexiDiT.from_config("DiT-XL/2", patch_sizes=(2, 4), adapter="shared")
    gflops = model.flops(2) / 1e9
    assert 236 < gflops < 240  # DiT paper: 118.6 GMACs
    assert 0.24 < model.flops(4) / model.flops(2) < 0.25   # paper: F(4)/F(2) ~ 0.245


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument():
    model = tiny_flexi("lora")
    x, t, y = inputs()
    cases = [
        ((x[0], t, y), {}, "x: expected"),
        ((x[:, :3], t, y), {}, "channels"),
        ((x[..., :6], t, y), {"patch_size": 4}, "multiples of patch_size"),
        ((x, t, y), {"patch_size": 8}, "not configured"),
        ((x, t[:2], y), {}, "t: expected shape"),
        ((x, t, y[:2]), {}, "y: 2 labels for a batch of 3"),
        ((x, t, y.float()), {}, "y: class labels must be integers"),
        ((x, t, torch.tensor([0, 1, 11])), {}, r"y: labels \[11\] out of range; expected 0..9 \(or 10"),
        ((x, t, torch.tensor([0, -1, 1])), {}, r"y: labels \[-1\] out of range"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            model(*args, **kwargs)
    y = torch.tensor([0, 1, 2])
    model(x, t, y)                   # validated once, then trusted while unmodified (no device sync)
    assert model._labels_checked(y)
    y[1] = 11
    with pytest.raises(ValueError, match=r"labels \[11\] out of range"):
        model(x, t, y)
    with pytest.raises(ValueError, match="include the original"):
        fk.FlexiDiT(**TINY).flexify((4,))
    with pytest.raises(ValueError, match="adapter"):
        fk.FlexiDiT(**TINY).flexify((2, 4), adapter="full")


def test_bad_checkpoints_list_their_keys(tmp_path):
    state = randomize_(DiT(**TINY)).state_dict()
    broken = dict(state)
    broken.pop("blocks.0.attn.proj.bias")
    broken["blocks.0.extra"] = torch.zeros(1)
    broken["blocks.1.mlp.fc2.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as info:
        fk.FlexiDiT.from_dit(broken, num_heads=2)
    message = str(info.value)
    for expected in ("missing keys", "blocks.0.attn.proj.bias", "unexpected keys", "blocks.0.extra",
                     "misshaped keys", "blocks.1.mlp.fc2.bias"):
        assert expected in message
    with pytest.raises(ValueError, match="x_embedder.proj.weight"):
        fk.FlexiDiT.from_dit({"foo": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_heads"):
        fk.FlexiDiT.from_dit({**state, "x_embedder.proj.weight": torch.zeros(33, 4, 2, 2)})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        fk.FlexiDiT.from_dit(corrupt, num_heads=2)
    with pytest.raises(FileNotFoundError):
        fk.FlexiDiT.from_dit(tmp_path / "absent.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['FLEXIKERN_PWNED']}",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FLEXIKERN_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    state = randomize_(DiT(**TINY)).state_dict()
    torch.save({"ema": state, "args": _Evil()}, path)
    with pytest.raises(ValueError, match="refused to load"):
        fk.FlexiDiT.from_dit(path, num_heads=2)
    assert not marker.exists()


def test_import_is_light():
    code = ("import sys, flexikern, flexikern.ops, flexikern.models;"
            "bad = [m for m in ('triton', 'diffusers', 'flexikern._C') if m in sys.modules];"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- packed forward

@pytest.mark.parametrize("adapter", ["lora", "shared"])
def test_forward_packed_equals_per_sample(adapter):
    model = tiny_flexi(adapter, sizes=(2, 4, (2, 4)))
    with torch.no_grad():  # non-trivial adapters, so a mix-up of sizes would show
        for name, p in model.named_parameters():
            if "lora_B" in name or "size_embed" in name:
                p.normal_(std=0.05)
    g = torch.Generator().manual_seed(1)
    shapes = [(8, 8), (8, 8), (8, 16), (4, 8), (8, 8)]
    sizes = [4, 2, (2, 4), 4, None]
    xs = [torch.randn(4, h, w, generator=g) for h, w in shapes]
    t, y = torch.tensor([3, 999, 500, 10, 250]), torch.tensor([1, 10, 2, 3, 4])
    with torch.no_grad():
        packed = model.forward_packed(xs, t, y, sizes)
        for i, (x, p) in enumerate(zip(xs, sizes)):
            alone = model(x[None], t[i:i + 1], y[i:i + 1], patch_size=p)[0]
            assert packed[i].shape == alone.shape
            assert rel_err(packed[i], alone) <= 1e-5, i
        again = model.forward_packed(xs, t, y, sizes)      # the packing is cached per signature
    assert len(model._packings) == 1 and all(torch.equal(a, b) for a, b in zip(again, packed))


def test_forward_packed_gradients_match():
    model = tiny_flexi("shared")
    xs = [torch.randn(4, 8, 8), torch.randn(4, 8, 8)]
    t, y = torch.tensor([3, 700]), torch.tensor([1, 2])
    sum(o.square().sum() for o in model.forward_packed(xs, t, y, [2, 4])).backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (model(xs[0][None], t[:1], y[:1], 2).square().sum() + model(xs[1][None], t[1:], y[1:], 4).square().sum()).backward()
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert packed.keys() == alone.keys()
    assert all(rel_err(packed[n], alone[n]) <= 1e-4 for n in alone if alone[n].norm() > 0)


def test_forward_packed_bad_input():
    model = tiny_flexi("lora")
    x = torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match="patch_sizes: 1 entries for 2"):
        model.forward_packed([x, x], torch.tensor([1, 2]), torch.tensor([1, 2]), [2])
    with pytest.raises(ValueError, match=r"xs\[0\]"):
        model.forward_packed([x[None]], torch.tensor([1]), torch.tensor([1]), [2])
    with pytest.raises(ValueError, match="not configured"):
        model.forward_packed([x], torch.tensor([1]), torch.tensor([1]), [8])
