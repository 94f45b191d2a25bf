"""The fused Triton patch_embed / de_embed kernels against the plain-torch references.

Runs under the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`, set here when absent and
no GPU is present), or compiled on CUDA. Every output buffer the kernels allocate is NaN-poisoned
first, so an element a kernel fails to write fails the comparison.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # Triton reads this when `@triton.jit` decorates, so before flexikern.kernels is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import flexikern.ops as ops  # noqa: E402
from flexikern.ops._dispatch import triton_interpreting  # noqa: E402
from flexikern.ops.de_embed import de_embed_reference  # noqa: E402
from flexikern.ops.patch_embed import patch_embed_reference  # noqa: E402

if triton_interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from flexikern.kernels import _common  # noqa: E402
# Every test twice: in the interpreter (CI) and compiled on a GPU (`pytest -m gpu`); one skips.
pytestmark = pytest.mark.usefixtures("kernel_device")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# (stored kernel size, patch size run): every patch size 1..8, down- and up-sizing, no resize,
# and rectangular patches.
RESIZE_CASES = [
    ((4, 4), (1, 1)), ((4, 4), (2, 2)), ((2, 2), (3, 3)), ((4, 4), (4, 4)), ((8, 8), (5, 5)),
    ((4, 4), (6, 6)), ((8, 8), (7, 7)), ((4, 4), (8, 8)), ((8, 8), (3, 5)), ((3, 3), (2, 4)),
    ((2, 2), (2, 2)), ((1, 1), (1, 1)), ((2, 2), (8, 1)),
]
FEW_CASES = [((4, 4), (2, 2)), ((2, 2), (2, 2)), ((8, 8), (3, 5))]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = ""):
    """Relative to the largest reference value; NaN (an unwritten element) always fails."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} vs {expected.shape}"
    tol = TOLERANCE[dtype]
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def randn(*shape, dtype=torch.float32, requires_grad=False):
    t = torch.randn(*shape, device=DEVICE).to(dtype)
    return t.requires_grad_(requires_grad)


def embed_inputs(kernel, patch, dtype=torch.float32, n=2, c=3, d=7, grid=(2, 3), extras=True,
                 channels_last=False, requires_grad=False):
    h, w = grid[0] * patch[0], grid[1] * patch[1]
    x = randn(n, c, h, w, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(requires_grad)
    tokens = grid[0] * grid[1]
    inputs = dict(x=x, weight=randn(d, c, *kernel, dtype=dtype, requires_grad=requires_grad),
                  bias=randn(d, dtype=dtype, requires_grad=requires_grad), patch_size=patch)
    if extras:
        inputs.update(pos_embed=randn(tokens, d, dtype=dtype, requires_grad=requires_grad),
                      size_embed=randn(d, dtype=dtype, requires_grad=requires_grad))
    return inputs


def deembed_inputs(kernel, patch, dtype=torch.float32, n=2, c=3, d=7, grid=(2, 3),
                   requires_grad=False):
    size = (grid[0] * patch[0], grid[1] * patch[1])
    k = kernel[0] * kernel[1] * c
    return dict(x=randn(n, grid[0] * grid[1], d, dtype=dtype, requires_grad=requires_grad),
                weight=randn(k, d, dtype=dtype, requires_grad=requires_grad),
                bias=randn(k, dtype=dtype, requires_grad=requires_grad),
                kernel_size=kernel, patch_size=patch, size=size)


def as_reference_leaves(inputs):
    """The same values in float64, detached: the reference's ground truth. (float64 also keeps
    cuDNN/cuBLAS TF32 out of the reference on GPU.)"""
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
            for k, v in inputs.items()}


def run_triton(op, inputs):
    with ops.use_backend(**{op: "triton"}):
        assert ops.select(op, **inputs).name == "triton"
        return getattr(ops, op)(**inputs)


REFERENCES = {"patch_embed": patch_embed_reference, "de_embed": de_embed_reference}


def check_forward(op, inputs, dtype=torch.float32):
    """The Triton op's output vs the float64 reference; returns the output."""
    out = run_triton(op, inputs)
    assert_close(out, REFERENCES[op](**as_reference_leaves(inputs)), dtype)
    return out


# ---------------------------------------------------------------------------------- patch_embed


@pytest.mark.parametrize("kernel,patch", RESIZE_CASES, ids=str)
def test_patch_embed_every_patch_size(kernel, patch):
    inputs = embed_inputs(kernel, patch)
    check_forward("patch_embed", inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel,patch", FEW_CASES, ids=str)
def test_patch_embed_half_precision(kernel, patch, dtype):
    inputs = embed_inputs(kernel, patch, dtype=dtype)
    assert check_forward("patch_embed", inputs, dtype).dtype == dtype


@pytest.mark.parametrize("kernel,patch", FEW_CASES, ids=str)
def test_patch_embed_channels_last_and_no_extras(kernel, patch):
    inputs = embed_inputs(kernel, patch, channels_last=True)
    check_forward("patch_embed", inputs)
    bare = embed_inputs(kernel, patch, extras=False)
    bare["bias"] = None
    check_forward("patch_embed", bare)


def test_patch_embed_several_tiles_and_promoted_output():
    # More tokens than BLOCK_M, more features than BLOCK_D, more channels than one K-tile.
    inputs = embed_inputs((2, 2), (4, 4), n=3, c=5, d=150, grid=(5, 5))
    check_forward("patch_embed", inputs)
    # bf16 latent with an fp32 positional table: the output is fp32, as in the reference.
    half = embed_inputs((4, 4), (2, 2), dtype=torch.bfloat16)
    half["pos_embed"] = half["pos_embed"].float()
    assert check_forward("patch_embed", half, torch.bfloat16).dtype == torch.float32


GRAD_CASES = [((4, 4), (2, 2)), ((2, 2), (2, 2)), ((8, 8), (3, 5)), ((4, 4), (1, 1)),
              ((4, 4), (8, 8))]


def check_grads(op, inputs, dtype, channels_last=False):
    """Outputs and every input gradient of the Triton op vs the float64 reference's autograd."""
    ref_inputs = as_reference_leaves(inputs)
    out = run_triton(op, inputs)
    expected = REFERENCES[op](**ref_inputs)
    assert_close(out, expected, dtype, "output")
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.requires_grad:
            assert value.grad is not None, f"no gradient for {name}"
            assert value.grad.dtype == value.dtype, name
            if channels_last and name == "x":
                assert value.grad.is_contiguous(memory_format=torch.channels_last)
            assert_close(value.grad, ref_inputs[name].grad, dtype, f"grad {name}")


@pytest.mark.parametrize("kernel,patch", GRAD_CASES, ids=str)
def test_patch_embed_gradients(kernel, patch):
    check_grads("patch_embed", embed_inputs(kernel, patch, requires_grad=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_patch_embed_gradients_half_precision_channels_last(dtype):
    inputs = embed_inputs((4, 4), (2, 2), dtype=dtype, channels_last=True, requires_grad=True)
    check_grads("patch_embed", inputs, dtype, channels_last=True)


def test_patch_embed_gradients_only_some_inputs():
    # A frozen embedding: only x and the size embedding need gradients.
    inputs = embed_inputs((4, 4), (2, 2))
    inputs["x"].requires_grad_(True)
    inputs["size_embed"].requires_grad_(True)
    check_grads("patch_embed", inputs, torch.float32)


# ------------------------------------------------------------------------------------- de_embed


@pytest.mark.parametrize("kernel,patch", RESIZE_CASES, ids=str)
def test_de_embed_every_patch_size(kernel, patch):
    inputs = deembed_inputs(kernel, patch)
    check_forward("de_embed", inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel,patch", FEW_CASES, ids=str)
def test_de_embed_half_precision(kernel, patch, dtype):
    inputs = deembed_inputs(kernel, patch, dtype=dtype)
    assert check_forward("de_embed", inputs, dtype).dtype == dtype


def test_de_embed_strided_tokens_no_bias_several_tiles():
    inputs = deembed_inputs((2, 2), (4, 4), n=3, c=5, d=150, grid=(5, 5))
    # Tokens as a strided view (every other feature of a wider tensor), and no bias.
    inputs["x"] = randn(3, 25, 300)[:, :, ::2]
    inputs["bias"] = None
    check_forward("de_embed", inputs)


@pytest.mark.parametrize("kernel,patch", GRAD_CASES, ids=str)
def test_de_embed_gradients(kernel, patch):
    check_grads("de_embed", deembed_inputs(kernel, patch, requires_grad=True), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_de_embed_gradients_half_precision(dtype):
    inputs = deembed_inputs((4, 4), (2, 2), dtype=dtype, requires_grad=True)
    check_grads("de_embed", inputs, dtype)


def test_64_token_tiles(monkeypatch):
    # Tiny test shapes get 16-token tiles; force the 64-token tiles that large batches use.
    monkeypatch.setattr(_common, "_block_m", lambda m, other_blocks, largest=64: 64)
    check_grads("patch_embed", embed_inputs((4, 4), (2, 2), n=3, grid=(5, 5), requires_grad=True),
                torch.float32)
    check_grads("de_embed", deembed_inputs((4, 4), (2, 2), n=3, grid=(5, 5), requires_grad=True),
                torch.float32)


# ------------------------------------------------------------------------------ videos (3-D)
# The fused kernels take images; video latents (N, C, F, H, W) run on the torch backend, as the
# video model computed them: patchify + linear, and linear + unpatchify.

VIDEO_CASES = [  # (latent (N, C, F, H, W), patch (pt, ph, pw), D)
    ((2, 3, 4, 6, 10), (2, 2, 2), 7), ((1, 5, 3, 3, 5), (1, 3, 5), 9),
    ((3, 4, 2, 4, 6), (1, 2, 2), 16), ((1, 1, 6, 2, 3), (3, 1, 1), 5),
]


def video_embed_inputs(shape, patch, d, dtype, requires_grad=False):
    n, c, *size = shape
    tokens = math.prod(s // p for s, p in zip(size, patch))
    return dict(x=randn(*shape, dtype=dtype, requires_grad=requires_grad),
                weight=randn(d, c, *patch, dtype=dtype, requires_grad=requires_grad),
                bias=randn(d, dtype=dtype, requires_grad=requires_grad), patch_size=patch,
                pos_embed=randn(tokens, d, dtype=dtype, requires_grad=requires_grad),
                size_embed=randn(d, dtype=dtype, requires_grad=requires_grad))


def video_deembed_inputs(shape, patch, d, dtype, requires_grad=False):
    n, c, *size = shape
    tokens = math.prod(s // p for s, p in zip(size, patch))
    rows = math.prod(patch) * c
    return dict(x=randn(n, tokens, d, dtype=dtype, requires_grad=requires_grad),
                weight=randn(rows, d, dtype=dtype, requires_grad=requires_grad),
                bias=randn(rows, dtype=dtype, requires_grad=requires_grad), kernel_size=patch,
                patch_size=patch, size=tuple(size))


def conv3d_embed(x, weight, bias, patch_size, pos_embed, size_embed):
    """A video patch embedding as a strided conv3d: the ground truth the op is checked against."""
    tokens = F.conv3d(x, weight, bias, stride=patch_size).flatten(2).transpose(1, 2)
    return tokens + pos_embed + size_embed


def conv_transpose3d_deembed(x, weight, bias, kernel_size, patch_size, size):
    """A video de-embedding as a strided conv_transpose3d plus the per-pixel bias tiled."""
    pt, ph, pw = patch_size
    grid = [s // p for s, p in zip(size, patch_size)]
    n, _, d = x.shape
    c = weight.shape[0] // (pt * ph * pw)
    kernel = weight.reshape(pt, ph, pw, c, d).permute(4, 3, 0, 1, 2)        # (D, C, pt, ph, pw)
    image = F.conv_transpose3d(x.transpose(1, 2).reshape(n, d, *grid), kernel, stride=patch_size)
    return image + bias.reshape(pt, ph, pw, c).permute(3, 0, 1, 2).repeat(1, *grid)


VIDEO_REFERENCES = {"patch_embed": conv3d_embed, "de_embed": conv_transpose3d_deembed}


def check_video(op, inputs, dtype):
    """The op (automatic dispatch: torch) vs the conv reference in float64, output and grads."""
    assert ops.select(op, **inputs).name == "torch"
    ref_inputs = as_reference_leaves(inputs)
    out = getattr(ops, op)(**inputs)
    expected = VIDEO_REFERENCES[op](**ref_inputs)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "output")
    grad = torch.randn_like(expected)
    out.backward(grad.to(out.dtype))
    expected.backward(grad)
    for name, value in inputs.items():
        if torch.is_tensor(value):
            assert value.grad is not None and value.grad.dtype == value.dtype, name
            assert_close(value.grad, ref_inputs[name].grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,patch,d", VIDEO_CASES, ids=str)
def test_patch_embed_video(shape, patch, d, dtype):
    check_video("patch_embed", video_embed_inputs(shape, patch, d, dtype, requires_grad=True),
                dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,patch,d", VIDEO_CASES, ids=str)
def test_de_embed_video(shape, patch, d, dtype):
    check_video("de_embed", video_deembed_inputs(shape, patch, d, dtype, requires_grad=True),
                dtype)


@pytest.mark.parametrize("shape,patch,d", VIDEO_CASES[:2], ids=str)
def test_video_numerics_are_the_video_models(shape, patch, d):
    # Bit for bit what the video model computed before it called these ops.
    embed = video_embed_inputs(shape, patch, d, torch.float32)
    x, weight, bias = embed["x"], embed["weight"], embed["bias"]
    before = F.linear(ops.patchify(x, patch), weight.permute(0, 2, 3, 4, 1).reshape(d, -1), bias)
    assert torch.equal(ops.patch_embed(x, weight, bias, patch), before)
    deembed = video_deembed_inputs(shape, patch, d, torch.float32)
    x, weight, bias, size = deembed["x"], deembed["weight"], deembed["bias"], deembed["size"]
    before = ops.unpatchify(F.linear(x, weight, bias), patch, size)
    assert torch.equal(ops.de_embed(x, weight, bias, patch, patch, size), before)


def test_video_kernels_are_not_resized():
    embed = video_embed_inputs((1, 3, 4, 4, 4), (2, 2, 2), 5, torch.float32)
    with pytest.raises(ValueError, match=r"video kernel \(2, 2, 2\) must equal patch_size "
                                         r"\(1, 2, 2\); 3-D kernels are not resized"):
        ops.patch_embed(embed["x"], embed["weight"], None, (1, 2, 2))
    deembed = video_deembed_inputs((1, 3, 4, 4, 4), (2, 2, 2), 5, torch.float32)
    with pytest.raises(ValueError, match=r"kernel_size=\(1, 2, 2\): a video de-embedding must be "
                                         r"stored at patch_size \(2, 2, 2\)"):
        ops.de_embed(deembed["x"], deembed["weight"], None, (1, 2, 2), (2, 2, 2), (4, 4, 4))
    with pytest.raises(ValueError, match=r"patch_size=\(2, 2\): expected \(pt, ph, pw\)"):
        ops.patch_embed(embed["x"], embed["weight"], None, (2, 2))


@pytest.mark.parametrize("op", ["patch_embed", "de_embed"])
def test_triton_declines_videos(op):
    make = video_embed_inputs if op == "patch_embed" else video_deembed_inputs
    inputs = make((1, 3, 2, 4, 4), (1, 2, 2), 5, torch.float32)
    triton_backend = next(b for b in ops.backends(op) if b.name == "triton")
    assert triton_backend.not_supported_reasons(**inputs) == [
        "3-D (video) patches: the fused kernels take 2-D images; torch runs videos"]
    with ops.use_backend(**{op: "triton"}):
        with pytest.raises(RuntimeError, match="forced backend 'triton' cannot run.*3-D"):
            getattr(ops, op)(**inputs)


# ------------------------------------------------------------------------------------- dispatch


def test_autocast_casts_like_conv_and_linear():
    device_type = torch.device(DEVICE).type
    embed = embed_inputs((4, 4), (2, 2), extras=False)
    deembed = deembed_inputs((4, 4), (2, 2))
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = run_triton("patch_embed", embed)
        expected = patch_embed_reference(**embed)
        image = run_triton("de_embed", deembed)
        expected_image = de_embed_reference(**deembed)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert image.dtype == expected_image.dtype == torch.bfloat16
    assert_close(out, expected, torch.bfloat16)
    assert_close(image, expected_image, torch.bfloat16)


def test_backend_reasons():
    inputs = embed_inputs((4, 4), (2, 2))
    backend = next(b for b in ops.backends("patch_embed") if b.name == "triton")
    assert ops.backends("patch_embed")[0].name == "triton"  # tried before torch
    assert backend.not_supported_reasons(**inputs) == []
    mixed = dict(inputs, weight=inputs["weight"].double())
    assert any("weight dtype torch.float64" in r for r in backend.not_supported_reasons(**mixed))
    big = embed_inputs((16, 16), (2, 2), extras=False)
    assert any("kernel (16, 16)" in r for r in backend.not_supported_reasons(**big))
    if DEVICE == "cpu":
        # Emulated: never chosen automatically on CPU, only when forced.
        assert ops.select("patch_embed", **inputs).name == "torch"
        assert ops.select("de_embed", **deembed_inputs((4, 4), (2, 2))).name == "torch"


def test_importing_flexikern_does_not_import_triton():
    code = ("import sys, torch, flexikern, flexikern.ops as ops\n"
            "x = torch.randn(1, 3, 4, 4); w = torch.randn(5, 3, 2, 2)\n"
            "ops.patch_embed(x, w, None, 2)\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(DEVICE != "cuda", reason="DiT-XL/2 sizes need a GPU")
@pytest.mark.parametrize("patch", [(2, 2), (4, 4)], ids=str)
def test_dit_xl_shapes_on_gpu(patch):
    # Batch 64, 4x32x32 latent, D=1152, stored 4x4 kernel; int64 offsets are exercised at N=64.
    embed = embed_inputs((4, 4), patch, dtype=torch.bfloat16, n=64, c=4, d=1152,
                         grid=(32 // patch[0], 32 // patch[1]), requires_grad=True)
    check_grads("patch_embed", embed, torch.bfloat16)
    deembed = deembed_inputs((4, 4), patch, dtype=torch.bfloat16, n=64, c=8, d=1152,
                             grid=(32 // patch[0], 32 // patch[1]), requires_grad=True)
    check_grads("de_embed", deembed, torch.bfloat16)
