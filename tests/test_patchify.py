"""patchify / unpatchify: the extension (flexikern._C) against the torch reference, bit for bit, every patch size 1..8, non-square and video patches, every dtype;
outputs poisoned with NaN through the extension's out= entry points; gradients (gradcheck in
float64); torch.library registration (opcheck); bad input.

Extension tests skip with the reason when flexikern._C is not built; CUDA cases run when a GPU is
present and the extension has its CUDA kernels.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexikern as fk
from flexikern import _ext
from flexikern.ops.patchify import patchify_reference, unpatchify_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
EXT_REASON = _ext.unavailable_reason()
needs_ext = pytest.mark.skipif(EXT_REASON is not None, reason=f"extension not built: {EXT_REASON}")


# The CUDA cases are GPU tests (`-m gpu`); on a GPU they fail, not skip, when the extension was
# built without its CUDA kernels: gpu_check.sh builds them, and silently testing nothing is worse.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _random(shape, dtype, device, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


def _image_shape(patch, rng: random.Random, channels=None) -> tuple[int, ...]:
    """A random small (N, C, *grid * patch) with odd grids and channel counts."""
    n = rng.randint(1, 2)
    c = channels or rng.choice([1, 3, 4, 5])
    return (n, c, *(p * rng.randint(1, 3) for p in patch))


def _assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if not torch.equal(actual, expected):  # NaN anywhere (an unwritten element) also fails here
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{len((actual != expected).nonzero())} elements differ, first at {bad}")


def _check_ext(x: torch.Tensor, patch: tuple[int, ...]) -> None:
    """Extension == reference bit for bit, forwards and back, and the round trip is exact."""
    with fk.ops.use_backend(patchify="ext", unpatchify="ext"):
        tokens = fk.ops.patchify(x, patch)
        _assert_same(tokens, patchify_reference(x, patch))
        back = fk.ops.unpatchify(tokens, patch, tuple(x.shape[2:]))
    _assert_same(back, unpatchify_reference(tokens, patch, tuple(x.shape[2:])))
    _assert_same(back, x)


# ---- the reference is DiT's layout (videos: frames outermost) -------------------------------


def test_reference_is_dits_layout():
    # DiT's unpatchify: x.reshape(N, h, w, p, p, c), einsum("nhwpqc->nchpwq"), reshape.
    n, c, p, h, w = 2, 3, 2, 3, 4
    tokens = _random((n, h * w, p * p * c), torch.float32, "cpu")
    dit = torch.einsum("nhwpqc->nchpwq", tokens.reshape(n, h, w, p, p, c)).reshape(n, c, h * p,
                                                                                    w * p)
    _assert_same(unpatchify_reference(tokens, (p, p), (h * p, w * p)), dit)
    _assert_same(patchify_reference(dit, (p, p)), tokens)


def test_reference_video_layout_by_hand():
    x = _random((1, 2, 4, 2, 6), torch.float32, "cpu")
    pt, ph, pw = 2, 1, 3
    tokens = patchify_reference(x, (pt, ph, pw))
    grid = (2, 2, 2)
    for fg in range(grid[0]):
        for hg in range(grid[1]):
            for wg in range(grid[2]):
                t = (fg * grid[1] + hg) * grid[2] + wg
                for i in range(pt):
                    for j in range(ph):
                        for k in range(pw):
                            for c in range(2):
                                d = ((i * ph + j) * pw + k) * 2 + c
                                assert tokens[0, t, d] == x[0, c, fg * pt + i, hg * ph + j,
                                                            wg * pw + k]


# ---- the extension against the reference -----------------------------------------------------


@needs_ext
def test_extension_is_chosen_first():
    x = torch.randn(1, 4, 4, 4)
    assert fk.ops.select("patchify", x=x, patch_size=(2, 2)).name == "ext"
    # Above the extension's 8 per axis, dispatch falls back to torch.
    assert fk.ops.select("patchify", x=torch.randn(1, 1, 16, 16), patch_size=(16, 16)).name == "torch"


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", range(1, 9))
def test_every_square_patch_size(p, dtype, device):
    rng = random.Random(p)
    _check_ext(_random(_image_shape((p, p), rng), dtype, device, seed=p), (p, p))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patch", [(1, 3), (5, 2), (8, 1), (3, 7), (2, 8), (6, 4)], ids=str)
def test_non_square_patches(patch, dtype, device):
    rng = random.Random(sum(patch))
    _check_ext(_random(_image_shape(patch, rng), dtype, device), patch)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2), (1, 4, 4), (3, 1, 2), (2, 5, 3),
                                   (8, 8, 8)], ids=str)
def test_video_patches(patch, dtype, device):
    rng = random.Random(math.prod(patch))
    shape = (1, 3, *patch) if patch == (8, 8, 8) else _image_shape(patch, rng)
    _check_ext(_random(shape, dtype, device), patch)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,patch", [
    ((64, 4, 32, 32), (2, 2)),        # DiT-XL/2's latent
    ((3, 4, 32, 32), (4, 4)),         # its weak mode
    ((1, 33, 8, 8), (8, 8)),          # a token of 2112 features
    ((1, 16, 8, 8, 8), (8, 8, 8)),    # 8192 features: wider than a CUDA tile (element-wise path)
    ((2, 3, 6, 10), (2, 5)),          # rows not a multiple of 16 bytes (no vector loads)
], ids=str)
def test_larger_shapes_and_kernel_paths(shape, patch, device):
    for dtype in (torch.float32, torch.float16, torch.float64):
        _check_ext(_random(shape, dtype, device), patch)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x = _random((2, 6, 8, 12), torch.float32, device)
    for view in (x.transpose(2, 3), x.to(memory_format=torch.channels_last), x[:, ::2], x[..., 1:9]):
        assert not view.is_contiguous()
        _check_ext(view, (2, 4))
    tokens = _random((2, 4, 40), torch.float32, device)[:, :, 8:32]  # strided rows
    with fk.ops.use_backend(unpatchify="ext"):
        out = fk.ops.unpatchify(tokens, (2, 3), (4, 6))
    _assert_same(out, unpatchify_reference(tokens, (2, 3), (4, 6)))
    transposed = _random((2, 24, 4), torch.float32, device).transpose(1, 2)  # last dim strided
    with fk.ops.use_backend(unpatchify="ext"):
        out = fk.ops.unpatchify(transposed, (2, 3), (4, 6))
    _assert_same(out, unpatchify_reference(transposed, (2, 3), (4, 6)))


# ---- poisoned outputs: every element written, nothing else touched ---------------------------


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("patch", [(1, 1), (2, 2), (3, 5), (8, 8), (2, 2, 2), (1, 4, 3)], ids=str)
def test_poisoned_outputs(patch, dtype, device):
    x = _random(_image_shape(patch, random.Random(7), channels=3), dtype, device)
    expected = patchify_reference(x, patch)
    out = torch.full(expected.shape, float("nan"), dtype=dtype, device=device)
    torch.ops.flexikern.patchify_out(x, list(patch), out)
    _assert_same(out, expected)

    # Into a slice of wider token rows: the extra columns stay NaN.
    n, t, d = expected.shape
    wide = torch.full((n, t, d + 5), float("nan"), dtype=dtype, device=device)
    torch.ops.flexikern.patchify_out(x, list(patch), wide[:, :, 2:2 + d])
    _assert_same(wide[:, :, 2:2 + d], expected)
    assert wide[:, :, :2].isnan().all() and wide[:, :, 2 + d:].isnan().all()

    image = torch.full_like(x, float("nan"))
    torch.ops.flexikern.unpatchify_out(expected, list(patch), image)
    _assert_same(image, x)


# ---- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("patch,shape", [((2, 3), (2, 2, 4, 6)), ((1, 2, 2), (1, 2, 2, 4, 2))],
                         ids=["image", "video"])
def test_gradcheck(backend, patch, shape):
    if backend == "ext" and EXT_REASON:
        pytest.skip(f"extension not built: {EXT_REASON}")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    tokens = patchify_reference(x.detach(), patch).requires_grad_()
    with fk.ops.use_backend(patchify=backend, unpatchify=backend):
        assert torch.autograd.gradcheck(lambda a: fk.ops.patchify(a, patch), (x,))
        assert torch.autograd.gradcheck(lambda t: fk.ops.unpatchify(t, patch, shape[2:]), (tokens,))
        assert torch.autograd.gradgradcheck(lambda a: fk.ops.patchify(a, patch), (x,))


# ---- torch.library registration -------------------------------------------------------------


@needs_ext
def test_opcheck():
    ops = torch.ops.flexikern
    x = torch.randn(2, 3, 4, 6)
    cases = [
        (ops.patchify.default, (x, [2, 3])),
        (ops.patchify.default, (torch.randn(1, 2, 2, 4, 6), [1, 2, 3])),
        (ops.unpatchify.default, (torch.randn(2, 4, 18), [2, 3], [4, 6])),
        (ops.patchify_out.default, (x, [2, 3], torch.empty(2, 4, 18))),
        (ops.unpatchify_out.default, (torch.randn(2, 4, 18), [2, 3], torch.empty(2, 3, 4, 6))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_ext
def test_compiles_with_fullgraph():
    # aot_eager traces through dispatch, the fake implementations and autograd without inductor's
    # compile time. The extension is loaded eagerly first (a library import cannot be traced).
    x = torch.randn(2, 4, 8, 8)
    fk.ops.patchify(x, 2)

    def image(a):
        return fk.ops.unpatchify(fk.ops.patchify(a, 2) * 2, 2, (8, 8))

    with fk.ops.use_backend(patchify="ext", unpatchify="ext"):
        _assert_same(torch.compile(image, fullgraph=True, backend="aot_eager")(x), x * 2)


# ---- properties over shapes -----------------------------------------------------------------


@needs_ext
@settings(max_examples=25, deadline=None)
@given(video=st.booleans(), data=st.data())
def test_property_round_trip(video, data):
    k = 3 if video else 2
    patch = tuple(data.draw(st.integers(1, 8 if not video else 4)) for _ in range(k))
    grid = tuple(data.draw(st.integers(1, 3)) for _ in range(k))
    n, c = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 6))
    dtype = data.draw(st.sampled_from(DTYPES))
    x = _random((n, c, *(g * p for g, p in zip(grid, patch))), dtype, "cpu", seed=sum(patch))
    _check_ext(x, patch)


# ---- bad input ------------------------------------------------------------------------------


def test_rejects_bad_input():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"x: spatial size \(8, 8\) is not divisible by patch"):
        fk.ops.patchify(x, 3)
    with pytest.raises(ValueError, match="x: expected 4 or 5 dimensions"):
        fk.ops.patchify(torch.randn(3, 8, 8), 2)
    with pytest.raises(ValueError, match=r"patch_size=0: expected an int or \(ph, pw\)"):
        fk.ops.patchify(x, 0)
    with pytest.raises(ValueError, match=r"patch_size=\(0, 0\): expected an int or \(ph, pw\)"):
        fk.ops.patchify(x, (0, 0))
    with pytest.raises(ValueError, match=r"patch_size=\(2, 2\): expected \(pt, ph, pw\)"):
        fk.ops.patchify(torch.randn(1, 3, 2, 8, 8), (2, 2))
    with pytest.raises(TypeError, match="x: dtype torch.int64"):
        fk.ops.patchify(torch.ones(1, 3, 8, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match=r"tokens: shape \(1, 16, 11\) does not fit"):
        fk.ops.unpatchify(torch.randn(1, 16, 11), 2, (8, 8))
    with pytest.raises(ValueError, match="size=8"):
        fk.ops.unpatchify(torch.randn(1, 16, 12), 2, 8)


@needs_ext
def test_extension_limits_are_reasons():
    x = torch.randn(1, 1, 9, 9)
    with fk.ops.use_backend(patchify="ext"):
        with pytest.raises(RuntimeError, match=r"forced backend 'ext'.*exceed the extension's maximum 8"):
            fk.ops.patchify(x, 9)
    _assert_same(fk.ops.patchify(x, 9), patchify_reference(x, (9, 9)))  # torch takes it
    # The C++ checks stand behind the Python ones.
    with pytest.raises(RuntimeError, match="not divisible"):
        torch.ops.flexikern.patchify(torch.randn(1, 1, 6, 6), [4, 4])
    with pytest.raises(RuntimeError, match="out has shape"):
        torch.ops.flexikern.patchify_out(torch.randn(1, 1, 4, 4), [2, 2], torch.empty(1, 4, 3))
