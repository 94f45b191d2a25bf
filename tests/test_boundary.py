"""Bad input caught at the public boundary (issue 14, section 3), before any compute.

Every case is either the right value or an error naming the argument, its value, what was
expected and the fix. The rules:

* dtype: a model casts a float latent of any dtype to its own dtype (its weights') and returns
  its dtype; the ops refuse a weight/bias whose dtype differs from x (outside autocast).
* class labels: ONE validation (`base.check_labels`) for `check_condition` (`fk.sample`) and the
  forwards: ints, integer tensors of any int dtype, numpy ints; no bools, no floats, no strings.
* empty batches and empty axes, meta-device models, bad timesteps, bool/float patch sizes are
  refused; numpy ints are ints.
"""

import copy
import re

import numpy as np
import pytest
import torch

import flexikern as fk
from flexikern.models.base import check_labels
from flexikern.models.dit import FlexiDiT
from flexikern.models.latte import FlexiLatte
from flexikern.models.pixart import FlexiPixArt
from flexikern.models.text import TextCondition, as_text_condition
from flexikern.ops.patch_size import PatchSize

from reference_dit import randomize_


def dit(**kw):
    return randomize_(FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                               num_heads=2, num_classes=10, **kw), std=0.1).eval()


def pixart():
    return randomize_(FlexiPixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1,
                                  num_heads=2, caption_channels=16, text_len=5), std=0.1).eval()


def latte():
    return randomize_(FlexiLatte(input_size=8, num_frames=2, patch_size=(1, 2, 2), in_channels=4,
                                 hidden_size=32, depth=1, num_heads=2, caption_channels=16, text_len=5), std=0.1).eval()


def family(name):
    """(model, x, t, y) with random inputs for a batch of 2."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([3, 700])
    if name == "dit":
        return dit(), torch.randn(2, 4, 8, 8, generator=g), t, torch.tensor([1, 7])
    text = TextCondition(torch.randn(2, 5, 16, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))
    if name == "pixart":
        return pixart(), torch.randn(2, 4, 8, 8, generator=g), t, text
    return latte(), torch.randn(2, 4, 2, 8, 8, generator=g), t, text


FAMILIES = ["dit", "pixart", "latte"]


# ----------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("name", FAMILIES)
def test_models_cast_the_latent_to_their_dtype(name):
    """A bf16 model takes fp32 latents (cast at the boundary, as diffusers' pipelines prepare
    latents in the transformer's dtype) and returns bf16; an fp32 model takes bf16 latents."""
    model, x, t, y = family(name)
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = half(x, t, y)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, half(x.bfloat16(), t, y), rtol=0, atol=0)
    packed = torch.stack(half.forward_packed(list(x), t, y, [None, None]))
    assert packed.dtype == torch.bfloat16
    torch.testing.assert_close(packed, torch.stack(half.forward_packed(list(x.bfloat16()), t, y, [None, None])),
                               rtol=0, atol=0)
    out = model(x.bfloat16(), t, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x.bfloat16().float(), t, y), rtol=0, atol=0)


def test_ops_refuse_a_weight_of_another_dtype():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    w = torch.randn(16, 4, 2, 2, generator=g)
    with pytest.raises(TypeError, match=r"weight: dtype torch.bfloat16 differs from x's torch.float32; .*"
                                        r"x.to\(weight.dtype\)\) or run under torch.autocast"):
        fk.ops.patch_embed(x, w.bfloat16(), None, 2)
    with pytest.raises(TypeError, match=r"bias: dtype torch.float16 differs from x's torch.float32"):
        fk.ops.patch_embed(x, w, torch.randn(16, generator=g).half(), 2)
    tokens = torch.randn(2, 16, 8, generator=g)
    wd = torch.randn(16, 8, generator=g)
    with pytest.raises(TypeError, match=r"weight: dtype torch.bfloat16 differs from x's torch.float32"):
        fk.ops.de_embed(tokens, wd.bfloat16(), None, 2, 2, (8, 8))
    with pytest.raises(TypeError, match=r"bias: dtype torch.bfloat16 differs from x's torch.float32"):
        fk.ops.de_embed(tokens, wd, torch.randn(16, generator=g).bfloat16(), 2, 2, (8, 8))
    # Under autocast F.conv2d / F.linear cast both: allowed, and equal to casting by hand.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fk.ops.patch_embed(x, w.bfloat16(), None, 2)
    torch.testing.assert_close(out, fk.ops.patch_embed(x.bfloat16(), w.bfloat16(), None, 2))


# ----------------------------------------------------------------------------- empty and meta

@pytest.mark.parametrize("name", FAMILIES)
def test_models_refuse_empty_batches_and_axes(name):
    model, x, t, y = family(name)
    with pytest.raises(ValueError, match=r"x: an empty batch, shape \(0, 4, .*\); pass at least one sample"):
        model(x[:0], t[:0], y[:0] if name == "dit" else y)
    for axis in range(2, x.dim()):
        empty = x.narrow(axis, 0, 0)
        with pytest.raises(ValueError, match=r"x: .* has an empty axis; expected positive multiples of the patch"):
            model(empty, t, y)
    with pytest.raises(ValueError, match=r"xs\[1\]: .* has an empty axis"):
        model.forward_packed([x[0], x[1].narrow(-1, 0, 0)], t, y, [None, None])
    with pytest.raises(ValueError, match=r"patch_sizes: expected a list of one patch size per sample, got int"):
        model.forward_packed(list(x), t, y, 2)


def test_ops_empty_axes_and_sizes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 4, 2, 2, generator=g)
    # An empty batch is a right value for an op: (0, T, D).
    assert fk.ops.patch_embed(torch.randn(0, 4, 8, 8), w, None, 2).shape == (0, 16, 16)
    for op in (lambda x: fk.ops.patch_embed(x, w, None, 2), lambda x: fk.ops.patchify(x, 2)):
        with pytest.raises(ValueError, match=r"x: spatial size \(0, 8\) has an empty axis"):
            op(torch.randn(1, 4, 0, 8))
    tokens = torch.randn(1, 16, 16, generator=g)
    for size in [(8.5, 8), (0, 8), (-8, -8), (True, 8)]:   # truncated or raw errors before
        with pytest.raises(ValueError, match=r"size=.*: expected \(H, W\) or \(F, H, W\) of positive ints"):
            fk.ops.unpatchify(tokens, 2, size)
        with pytest.raises(ValueError, match=r"size=.*: expected \(H, W\) or \(F, H, W\) of positive ints"):
            fk.ops.de_embed(tokens, torch.randn(16, 16), None, 2, 2, size)
    assert torch.equal(fk.ops.unpatchify(tokens, 2, (np.int64(8), 8)), fk.ops.unpatchify(tokens, 2, (8, 8)))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_model_on_the_meta_device_says_to_load_weights(name):
    model, x, t, y = family(name)
    with torch.device("meta"):
        empty = type(model)(**model.config)
    with pytest.raises(RuntimeError, match=r"on the meta device: its weights hold no data. Load weights first, "
                                           r"e.g. model.to_empty\(device='cpu'\) then model.load_state_dict"):
        empty(x, t, y)
    empty.to_empty(device="cpu").load_state_dict(model.state_dict())
    torch.testing.assert_close(empty.eval()(x, t, y), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x: on meta, but the model is on cpu; move it to the model's device"):
        model(x.to("meta"), t, y)


# ----------------------------------------------------------------------------- timesteps

@pytest.mark.parametrize("name", FAMILIES)
def test_bad_timesteps_are_named(name):
    model, x, t, y = family(name)
    cases = [(torch.tensor([True, False]), r"t: expected int or float timesteps, got a torch.bool tensor"),
             (torch.tensor([1j, 2j]), r"t: expected int or float timesteps, got a torch.complex64 tensor"),
             ("late", r"t: expected timesteps \(a number, a list of numbers or a tensor\), got str 'late'"),
             (torch.tensor([[3], [4]]), r"t: expected shape \(2,\) to match x's batch \(or a scalar\), got \(2, 1\)"),
             ([3, 4, 5], r"t: expected shape \(2,\)")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            model(x, bad, y)
    # A scalar, a list and an int tensor are the same timesteps.
    torch.testing.assert_close(model(x, 500, y), model(x, torch.tensor([500.0, 500.0]), y), rtol=0, atol=0)
    torch.testing.assert_close(model(x, [3, 700], y), model(x, t, y), rtol=0, atol=0)


# ----------------------------------------------------------------------------- class labels

BAD_LABELS = [
    ([1.7, 3.2], r"y: class labels must be ints .*got 1.7 \(float\), 3.2 \(float\); pass ints"),
    ([1, True], r"y: class labels must be ints .*got True \(bool\)"),
    ("ab", r"y: class labels must be ints .*got 'ab' \(str\)"),
    (torch.tensor([1.7, 3.2]), r"y: class labels must be integers, got a torch.float32 tensor \[1.7"),
    (torch.tensor([1.0, 3.0]), r"y: class labels must be integers, got a torch.float32 tensor \[1.0, 3.0\]; "
                               r"pass ints .*y.long\(\)"),
    (torch.tensor([True, False]), r"y: class labels must be integers, got a torch.bool tensor \[True, False\]"),
    (np.array([1.5, 2.0]), r"y: class labels must be integers, got a numpy float64 array \[1.5, 2.0\]"),
    (np.array([True, False]), r"y: class labels must be integers, got a numpy bool array"),
    (torch.tensor([[1], [3]]), r"y: expected \(N,\) class labels, got shape \(2, 1\)"),
    ([1, 12], r"y: labels \[12\] out of range; expected 0..9 \(or 10 = the null class"),
]


@pytest.mark.parametrize("bad, match", BAD_LABELS)
def test_one_label_validation_for_check_condition_forward_and_sample(bad, match):
    """`check_condition` (hence `fk.sample`) and the forwards refuse the same labels with the same
    message; before, floats were truncated by check_condition (1.7 -> class 1) and bools accepted."""
    model, x, t, _ = family("dit")
    with pytest.raises(ValueError, match=match):
        model.check_condition(bad)
    with pytest.raises(ValueError, match=match):
        model(x, t, bad)
    with pytest.raises(ValueError, match=match):
        model.forward_packed(list(x), t, bad, [2, 2])
    with pytest.raises(ValueError, match=match):
        fk.sample(model, bad, fk.Schedule.static(2, 2), progress=False)


@pytest.mark.parametrize("labels", [torch.tensor([1, 7], dtype=torch.uint8), torch.tensor([1, 7], dtype=torch.int32),
                                    np.array([1, 7]), np.array([1, 7], dtype=np.uint8), [np.int64(1), np.int32(7)],
                                    (1, 7), [torch.tensor(1), torch.tensor(7)]])
def test_integer_labels_of_any_int_type_are_labels(labels):
    model, x, t, y = family("dit")
    checked = model.check_condition(labels)
    assert checked.dtype == torch.long and checked.tolist() == [1, 7]
    torch.testing.assert_close(model(x, t, labels), model(x, t, y), rtol=0, atol=0)


def test_scalar_labels_broadcast_and_numpy_scalars():
    model, x, t, _ = family("dit")
    assert model.check_condition(np.int64(3)).tolist() == [3]
    assert model.check_condition(3, n=2).tolist() == [3, 3]
    torch.testing.assert_close(model(x, t, np.int64(3)), model(x, t, torch.tensor([3, 3])), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"y: 3 labels for a batch of 2"):
        model(x, t, [1, 2, 3])
    with pytest.raises(ValueError, match="y: expected at least one class label, got none"):
        model.check_condition([])
    with pytest.raises(ValueError, match=r"y: class labels must be ints .*got None \(NoneType\)"):
        check_labels(None, 10, True)


def test_cfg_batch_on_a_model_without_null_class_names_the_null_class():
    """DiT's own CFG batch (labels, then `num_classes` for the null branch) on a model trained
    without class dropout: the message says label 10 is the null class this model lacks, not
    "labels must be in [0, 9]; got values in [1, 10]" as if the user had mislabelled."""
    model = dit(class_dropout_prob=0.0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    match = (r"y: labels \[10\] out of range; expected 0..9\. Label 10 \(= num_classes\) is the null class of "
             r"classifier-free guidance, and this model has no null class: it was trained without class "
             r"dropout \(class_dropout_prob=0\)\. Classifier-free guidance needs a model trained with class dropout")
    with pytest.raises(ValueError, match=match):
        model(x, torch.tensor([5, 5]), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"labels \[11\] out of range; expected 0..9 \(this model has no null class\)"):
        model.check_condition([1, 11])
    with pytest.raises(ValueError, match=r"classifier-free guidance needs the null class \(label 10\), which this "
                                         r"model does not have: it was trained without class dropout"):
        model.null_condition(torch.tensor([1]))


# ----------------------------------------------------------------------------- text conditions

def test_text_conditions_name_what_is_wrong():
    g = torch.Generator().manual_seed(5)
    e = torch.randn(2, 5, 16, generator=g)
    cases = [
        (lambda: TextCondition(e.long()), r"embeds: expected float text embeddings, got torch.int64"),
        (lambda: TextCondition(e[0]), r"embeds: expected text embeddings \(N, L, C_text\), got shape \(5, 16\)"),
        (lambda: TextCondition(e, torch.tensor([[0, 1, 2, 1, 5]] * 2)),
         r"mask: expected 0/1 \(or bool\) values, True/1 = a real token; got values \[2, 5\]"),
        (lambda: TextCondition(e, torch.ones(2, 4)), r"mask: expected shape \(2, 5\) \(N, L\) matching embeds, got shape \(2, 4\)"),
        (lambda: TextCondition(e, torch.ones(3, 5)), r"mask: expected shape \(2, 5\)"),
        (lambda: TextCondition(e, torch.ones(2, 5, device="meta")), r"mask: on meta, but embeds are on cpu"),
        (lambda: as_text_condition(e[:0]), r"y: no text conditions \(N=0\); pass at least one"),
        (lambda: as_text_condition([e, e, e]), r"y: expected a TextCondition, .* got a list of length 3"),
        (lambda: pixart().check_condition(e, n=3), r"y: 2 text embeddings for a batch of 3"),
    ]
    for build, match in cases:
        with pytest.raises(ValueError, match=match):
            build()
    # 0/1 masks of any dtype are the bool mask; a row is indexed keeping its batch axis.
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    for m in (mask, mask.float(), mask.bool()):
        assert torch.equal(TextCondition(e, m).mask, mask.bool())
    cond = TextCondition(e, mask)
    assert torch.equal(cond[-1].embeds, e[1:]) and torch.equal(cond[-1].mask, mask[1:].bool())   # was empty
    assert torch.equal(cond.repeat(2).embeds, torch.cat([e, e]))
    for n in (0, 2.0, True):   # 0 returned the condition unrepeated
        with pytest.raises(ValueError, match=rf"n={n!r}: expected a positive int"):
            cond.repeat(n)


@pytest.mark.parametrize("name", ["pixart", "latte"])
def test_text_models_take_embeddings_of_any_float_dtype(name):
    model, x, t, y = family(name)
    half = TextCondition(y.embeds.double(), y.mask)
    torch.testing.assert_close(model(x, t, half), model(x, t, y), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x: an empty batch"):
        model(x[:0], t, y[:0] if len(y[:0]) else y)


# ----------------------------------------------------------------------------- patch sizes

def test_patch_sizes_take_numpy_ints_and_refuse_bools_and_floats():
    assert PatchSize.parse(np.int64(2)) == (2, 2) and type(PatchSize.parse(np.int64(2))[0]) is int
    assert PatchSize.parse((np.int32(1), 2, np.uint8(2)), ndim=3) == (1, 2, 2)
    for bad in (True, 2.0, (2.0, 2), (True, 2), np.bool_(True), np.float64(2), "2.0"):
        with pytest.raises(ValueError, match=r"patch_size=.*: expected an int"):
            PatchSize.parse(bad)
    model, x, t, y = family("dit")
    model.flexify((2, 4), lora_rank=4)
    torch.testing.assert_close(model(x, t, y, patch_size=np.int64(4)), model(x, t, y, patch_size=4), rtol=0, atol=0)
    for bad in (4.0, True):
        with pytest.raises(ValueError, match=rf"patch_size={bad!r}: expected an int or \(ph, pw\) of positive ints"):
            model(x, t, y, patch_size=bad)
    assert torch.equal(fk.ops.patchify(x, np.int64(2)), fk.ops.patchify(x, 2))


@pytest.mark.parametrize("field, value", [("depth", -1), ("hidden_size", 0), ("num_heads", True),
                                          ("input_size", 8.0), ("num_classes", -2), ("mlp_ratio", float("nan"))])
def test_constructors_refuse_bad_sizes_by_name(field, value):
    kw = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    expected = "an int >= 0" if field == "num_classes" else "a positive"
    with pytest.raises(ValueError, match=f"{field}={value!r}: expected {expected}"):
        FlexiDiT(**{**kw, field: value})


def test_flexify_refuses_a_single_size_and_takes_numpy_ranks():
    with pytest.raises(TypeError, match=r"patch_sizes=4: expected a sequence .* \(2, 2\), e.g. \[2, 4\]"):
        dit().flexify(4)
    model = dit().flexify([2, 4], lora_rank=np.int64(3))
    assert model.lora_rank == 3 and type(model.lora_rank) is int
    assert model.blocks[0].attn.qkv.lora_A["4x4"].shape[0] == 3


def test_guided_denoiser_cfg_without_null_class_names_the_null_class():
    from flexikern.diffusion.guidance import Guidance, GuidedDenoiser
    model = dit(class_dropout_prob=0.0)
    denoiser = GuidedDenoiser(model, torch.tensor([1, 2]), Guidance(4.0, "cfg"))
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="null class"):
        denoiser(x, torch.tensor([10, 10]), PatchSize.parse(2), PatchSize.parse(2))


# ----------------------------------------------------------------------------- model library (review)

@pytest.mark.parametrize("name", FAMILIES)
def test_timesteps_must_be_finite_and_nonnegative(name):
    """NaN, inf and negative timesteps were run (a NaN t gave an all-NaN output); `fk.sample`'s
    own steps are trusted (no device read per step)."""
    from flexikern.models.base import conditions_checked
    model, x, t, y = family(name)
    for bad, shown in [(torch.tensor([float("nan"), 3.0]), r"\[nan\]"), (float("inf"), r"\[inf, inf\]"),
                       (-5, r"\[-5, -5\]"), (np.array([3.0, -0.5]), r"\[-0.5\]")]:
        with pytest.raises(ValueError, match=rf"t: timesteps must be finite and >= 0, got {shown}; diffusion"):
            model(x, bad, y)
        with pytest.raises(ValueError, match=r"t: timesteps must be finite and >= 0"):
            model.forward_packed(list(x), bad, y, [None, None])
    with pytest.raises(ValueError, match=r"t: on the meta device, it holds no values"):
        model(x, t.to("meta"), y)
    torch.testing.assert_close(model(x, np.array([3, 700]), y), model(x, t, y), rtol=0, atol=0)
    torch.testing.assert_close(model(x, 0, y), model(x, torch.zeros(2), y), rtol=0, atol=0)
    with conditions_checked():   # trusted: not read
        assert model(x, float("nan"), y).isnan().all()


@pytest.mark.parametrize("name", FAMILIES)
def test_flops_arguments_are_checked(name):
    """`flops` silently took batch 0/-1/True/2.5 (0, negative or scaled counts), input_size 0 or
    None-like (the default), sizes the patch does not divide (floored), and text_len 0."""
    model, *_ = family(name)
    for batch in (0, -1, True, 2.5, "2"):
        with pytest.raises(ValueError, match=rf"batch={batch!r}: expected a positive int"):
            model.flops(batch=batch)
    for size in (0, -8, True, 8.0):
        with pytest.raises(ValueError, match=rf"input_size={size!r}: expected an int or \(ph, pw\) of positive ints"):
            model.flops(input_size=size)
    with pytest.raises(ValueError, match=r"input_size\)?=\(.*7, 7\): not a multiple of patch_size"):
        model.flops(input_size=7)
    assert model.flops(batch=np.int64(3)) == 3 * model.flops()
    assert model.flops(input_size=(8, 8)) == model.flops()
    if name != "dit":
        for text_len in (0, -1, 2.0):
            with pytest.raises(ValueError, match=rf"text_len={text_len!r}: expected a positive int"):
                model.flops(text_len=text_len)
        assert model.flops(text_len=5) == model.flops()   # the model's text_len
    if name == "latte":
        with pytest.raises(ValueError, match=r"num_frames=0: expected a positive int"):
            model.flops(num_frames=0)
        assert model.flops(num_frames=4) > model.flops()


@pytest.mark.parametrize("name", FAMILIES)
def test_prepare_and_pos_embed_check_sizes(name):
    """`prepare` built tables for sizes the patch does not divide or with an empty axis, and
    raised raw TypeErrors for an int size or patch_sizes; `pos_embed` floored the grid."""
    model, x, t, y = family(name)
    size, patch = tuple(x.shape[2:]), model.original_patch_size
    axes = r"\(H, W\)" if patch.ndim == 2 else r"\(F, H, W\)"
    bad_divide = size[:-1] + (size[-1] - 1,)
    with pytest.raises(ValueError, match=re.escape(f"size={bad_divide}: not a multiple of patch_size {tuple(patch)}")):
        model.prepare([None], bad_divide, "cpu")
    with pytest.raises(ValueError, match=r"not a multiple of patch_size"):
        model.pos_embed(bad_divide, patch)
    for bad in (8, size[:-1] + (0,), size[1:] if patch.ndim == 3 else size + (8,)):
        with pytest.raises(ValueError, match=rf"size=.*: expected the latent's spatial size {axes}, positive ints"):
            model.prepare([None], bad, "cpu")
    for bad in (2, [], PatchSize.parse(patch)):
        with pytest.raises(ValueError, match=r"patch_sizes=.*: expected a non-empty list of patch sizes"):
            model.prepare(bad, size, "cpu")
    built = model.prepare([None], torch.Size(size), "cpu", packed=True)
    assert any(torch.equal(b, model.pos_embed(size, patch)) for b in built)
    if name == "dit":
        assert torch.equal(model.pos_embed(size, 2), model.pos_embed(size, patch))   # an int patch too


def test_constructors_refuse_a_latent_the_patch_does_not_divide():
    with pytest.raises(ValueError, match=r"input_size=7: not a multiple of patch_size \(2, 2\)"):
        FlexiDiT(input_size=7, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"num_frames, input_size=\(2, 6, 6\): not a multiple of patch_size \(1, 4, 4\)"):
        FlexiLatte(input_size=6, num_frames=2, patch_size=(1, 4, 4), in_channels=4, hidden_size=32, depth=1,
                   num_heads=2, caption_channels=16, text_len=5)


def test_check_condition_batch_size_is_a_positive_int():
    model, *_ = family("dit")
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=rf"n={n!r}: expected a positive int"):
            model.check_condition(1, n=n)
    with pytest.raises(ValueError, match=r"y: class labels on the meta device hold no values"):
        model.check_condition(torch.tensor([1, 2], device="meta"))
    assert model.check_condition(3, n=np.int64(2)).tolist() == [3, 3]


def test_resizes_refuse_integer_kernels_and_bad_shapes():
    """pi_resize / lift_* of an integer kernel truncated the fractional weights back to ints, a
    resize matrix of an int dtype was all zeros and ones; deembed_weight's shape errors were raw."""
    from flexikern.ops import resize
    g = torch.Generator().manual_seed(6)
    w = torch.randn(6, 4, 4, generator=g)
    for fn in (lambda k: resize.pi_resize(k, 2), lambda k: resize.resize_deembed(k, 2),
               lambda k: resize.lift_embed(k, 8), lambda k: resize.lift_deembed(k, 8)):
        with pytest.raises(TypeError, match=r"weight: dtype torch.int64 is not supported; expected one of"):
            fn(w.long())
        with pytest.raises(TypeError, match=r"weight: expected a torch.Tensor, got ndarray"):
            fn(w.numpy())
        assert fn(w.double()).dtype == torch.float64
    for matrix in (resize.resize_matrix, resize.pi_resize_matrix):
        with pytest.raises(TypeError, match=r"dtype=torch.int64: expected a floating torch.dtype"):
            matrix(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"weight: shape \(17, 8\) is not \(kh\*kw\*C_out, D\) for kernel_size \(4, 4\)"):
        resize.deembed_weight(torch.randn(17, 8), None, 4, 2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\) to match weight, got \(5,\)"):
        resize.deembed_weight(torch.randn(16, 8), torch.randn(5), 4, 2)


def test_varlen_attention_scale_and_numpy_lengths():
    """A NaN, zero, negative or bool `scale` ran (NaN silently became the default scale); numpy
    ints, which every other op takes, were refused as max_seqlen and host boundaries."""
    from flexikern.ops.varlen_attention import varlen_attention_reference
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(10, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for scale in (float("nan"), float("inf"), 0, -1.0, True, "a", torch.tensor(0.5)):
        with pytest.raises(ValueError, match=r"scale=.*: expected a positive finite float \(the softmax scale\), or None"):
            fk.ops.varlen_attention(q, k, v, cu, 6, scale=scale)
    expected = varlen_attention_reference(q, k, v, cu, 6, scale=0.3)
    torch.testing.assert_close(fk.ops.varlen_attention(q, k, v, cu, np.int64(6), scale=np.float32(0.3),
                                                       cu_seqlens_host=(0, np.int64(4), 10)), expected)


def test_hidden_size_must_split_into_the_sincos_table():
    with pytest.raises(ValueError, match="hidden_size=6: expected a multiple of 4"):
        FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=6, depth=1, num_heads=2, num_classes=10)


@pytest.mark.parametrize("value", [2.0, -0.1, 1.0, True])
def test_class_dropout_is_a_probability(value):
    with pytest.raises(ValueError, match=rf"class_dropout_prob={value!r}: expected a probability in \[0, 1\)"):
        dit(class_dropout_prob=value)
