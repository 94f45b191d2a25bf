"""varlen_attention: our Triton kernel (forward and backward) and every backend against the
plain-torch reference, dispatch order, and rejection of bad input.

The Triton kernel runs on CUDA or, on CPU, under TRITON_INTERPRET=1 (`bash run.sh test` sets it);
without either its tests skip with the backend's reason. Shapes are tiny: the interpreter runs
each tile as numpy arrays.
"""

from __future__ import annotations

import importlib
import itertools
import math

import pytest
import torch

import flexikern.ops as ops
from flexikern.ops._dispatch import triton_interpreting
from flexikern.ops.varlen_attention import varlen_attention_reference

CUDA = torch.cuda.is_available() and not triton_interpreting()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [8, 16, 24, 40, 64, 72, 128]  # 40 and 72 run as a main part and a tail
# Odd lengths, a length-1 and an empty sequence, and one spanning several tiles (16 under the
# interpreter; 64 on a GPU).
LENGTHS = (5, 1, 0, 17, 3) if not CUDA else (5, 1, 0, 17, 3, 150)
# Relative to the largest reference value: gradients reach ~10 while many elements are ~0.
# (The interpreter rounds fp32 -> bf16 toward zero, a full ulp, where a GPU rounds to nearest.)
RELATIVE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
BACKEND_NAMES = [b.name for b in ops.backends("varlen_attention")]
# Every test twice: in the interpreter (CI) and compiled on a GPU (`pytest -m gpu`); one skips.
pytestmark = pytest.mark.usefixtures("kernel_device")


def _cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _packed(lengths, heads, head_dim, dtype, seed=0, device=DEVICE, magnitude=1.0):
    """Random q, k, v (never zeros) for `lengths`, with cu_seqlens and max_seqlen."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (magnitude * torch.randn(total, heads, head_dim, generator=generator)
               for _ in range(3))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, _cu_seqlens(lengths, device), max(max(lengths), 1)


def _reference(q, k, v, cu_seqlens, max_seqlen, scale=None, dout=None):
    """fp32 reference output, and (dq, dk, dv) for `dout` when given, from the same inputs."""
    leaves = [t.detach().float().requires_grad_(dout is not None) for t in (q, k, v)]
    out = varlen_attention_reference(*leaves, cu_seqlens, max_seqlen, scale=scale)
    if dout is None:
        return out.detach(), None
    return out.detach(), torch.autograd.grad(out, leaves, dout.float())


def _reference_lse2(q, k, cu_seqlens, scale):
    """Base-2 logsumexp of each row's scaled scores, (heads, total), like the kernel saves."""
    lse = torch.empty(q.shape[1], q.shape[0])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks = (t[start:end].float().transpose(0, 1) for t in (q, k))
        lse[:, start:end] = torch.logsumexp(qs @ ks.transpose(1, 2) * scale, dim=-1).cpu()
    return lse / math.log(2)


def _assert_close(actual, expected, dtype, what):
    expected = expected.float().cpu()
    tolerance = RELATIVE_TOLERANCE[dtype]
    atol = tolerance * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float().cpu(), expected, atol=atol, rtol=tolerance,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def _skip_unless_triton_runs(q) -> None:
    reasons = ops.backends("varlen_attention")[BACKEND_NAMES.index("triton")] \
        .not_supported_reasons(q=q, k=q, v=q, cu_seqlens=None, max_seqlen=1, scale=None)
    if reasons:
        pytest.skip(f"triton backend: {'; '.join(reasons)}")


def _check_triton_op(q, k, v, cu_seqlens, max_seqlen, dtype, scale=None, tolerance=None):
    """The public op forced to `triton`, forward and autograd backward, against the reference
    (relative tolerances by dtype, or `tolerance` for assert_close)."""
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with ops.use_backend(varlen_attention="triton"):
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected, expected_grads = _reference(q, k, v, cu_seqlens, max_seqlen, scale=scale, dout=dout)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        if tolerance is None:
            _assert_close(got, want, dtype, name)
        else:
            torch.testing.assert_close(got.detach().cpu(), want.cpu(), **tolerance)


# --- our Triton kernel -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_triton_kernel_forward_and_backward(head_dim, dtype):
    """Host functions on NaN-filled output buffers: every element must be written, right."""
    from flexikern.kernels.varlen_attention import (varlen_attention_backward,
                                                    varlen_attention_forward)
    q, k, v, cu_seqlens, max_seqlen = _packed(LENGTHS, 2, head_dim, dtype, seed=head_dim)
    _skip_unless_triton_runs(q)
    max_seqlen += 3  # a loose bound only adds idle programs
    scale = 1.0 / math.sqrt(head_dim)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q)
    expected, expected_grads = _reference(q, k, v, cu_seqlens, max_seqlen, dout=dout)

    out, lse = varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, out=_nan_like(q),
                                        interpret=triton_interpreting())
    _assert_close(out, expected, dtype, "out")
    # The saved logsumexp is fp32 whatever the input dtype (only the inputs are rounded).
    _assert_close(lse, _reference_lse2(q, k, cu_seqlens, scale), torch.float32, "lse")

    grads = varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                      grads=tuple(_nan_like(t) for t in (q, k, v)),
                                      interpret=triton_interpreting())
    for name, grad, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        _assert_close(grad, want, dtype, name)


@pytest.mark.parametrize("head_dim, dtype", [(72, torch.bfloat16), (8, torch.float32),
                                             (128, torch.float16)], ids=str)
def test_triton_autograd_through_the_op(head_dim, dtype):
    """The public op forced to `triton`: output and autograd grads match the reference."""
    q, k, v, cu_seqlens, max_seqlen = _packed(LENGTHS, 3, head_dim, dtype, seed=7)
    _skip_unless_triton_runs(q)
    _check_triton_op(q, k, v, cu_seqlens, max_seqlen, dtype, scale=0.2)


def test_triton_many_tiles_large_scores_and_strided_inputs():
    """Several query and key tiles per sequence, scores in the hundreds (online softmax
    rescaling), q/k/v sliced from a fused qkv projection and a non-unit head_dim stride."""
    lengths, heads, head_dim = (40, 1, 33), 2, 24
    total = sum(lengths)
    generator = torch.Generator().manual_seed(3)
    qkv = (6.0 * torch.randn(total, 3, heads, head_dim, generator=generator)).to(DEVICE)
    q, k = qkv[:, 0], qkv[:, 1]  # token stride 3 * heads * head_dim
    v = torch.randn(total, head_dim, heads, generator=generator).to(DEVICE).transpose(1, 2)
    _skip_unless_triton_runs(q)
    # fp32, but scores ~100 amplify rounding
    _check_triton_op(q, k, v, _cu_seqlens(lengths), 40, torch.float32,
                     tolerance=dict(atol=2e-4, rtol=1e-4))


def test_triton_head_dim_split():
    """Head dims that one power-of-two tile would pad a lot run as a power-of-two main part plus
    a tail, two dots per product (DiT-XL/2's 72 as 64 + 16, not 128)."""
    from flexikern.kernels.varlen_attention import _split_head_dim
    splits = {head_dim: _split_head_dim(head_dim) for head_dim in (8, 16, 24, 40, 64, 72, 96, 128)}
    assert splits == {8: (16, 0), 16: (16, 0), 24: (32, 0), 40: (32, 16), 64: (64, 0),
                      72: (64, 16), 96: (64, 32), 128: (128, 0)}


def test_triton_strides_that_are_not_multiples_of_8():
    """The kernels assume token and head strides that are multiples of 8 (aligned 16-byte
    loads): the host copies inputs that have others, and refuses such output buffers."""
    from flexikern.kernels.varlen_attention import varlen_attention_forward
    lengths, heads, head_dim = (5, 17, 3), 2, 40
    generator = torch.Generator().manual_seed(4)
    wide = torch.randn(sum(lengths), heads, head_dim + 4, generator=generator).to(DEVICE)
    q = wide[..., :head_dim]  # head stride 44
    k, v = (torch.randn(q.shape, generator=generator).to(DEVICE) for _ in range(2))
    _skip_unless_triton_runs(q)
    cu_seqlens = _cu_seqlens(lengths)
    _check_triton_op(q, k, v, cu_seqlens, 17, torch.float32)
    with pytest.raises(ValueError, match="multiples of 8"):
        varlen_attention_forward(k.detach(), k.detach(), v.detach(), cu_seqlens, 17,
                                 out=_nan_like(wide)[..., :head_dim],
                                 interpret=triton_interpreting())


def test_triton_empty_batch():
    q, k, v, cu_seqlens, _ = _packed((0, 0), 2, 8, torch.float32)
    _skip_unless_triton_runs(q)
    with ops.use_backend(varlen_attention="triton"):
        out = ops.varlen_attention(q, k, v, cu_seqlens, 1)
    assert out.shape == (0, 2, 8)


def test_triton_declares_its_head_dims(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only reasons are asked; no kernel runs
    triton_backend = ops.backends("varlen_attention")[BACKEND_NAMES.index("triton")]
    for head_dim, expected in ((12, "not a multiple of 8"), (136, "head_dim 136 > 128")):
        q = torch.randn(4, 1, head_dim)
        reasons = triton_backend.not_supported_reasons(q=q, k=q, v=q, cu_seqlens=None,
                                                       max_seqlen=4, scale=None)
        assert any(expected in r for r in reasons), reasons
        # Automatic dispatch falls through to a backend that can run it.
        cu_seqlens = _cu_seqlens((4,), "cpu")
        assert ops.select("varlen_attention", q=q, k=q, v=q, cu_seqlens=cu_seqlens,
                          max_seqlen=4, scale=None).name != "triton"


# --- every backend -------------------------------------------------------------------------------


def test_backend_priority_order():
    assert BACKEND_NAMES == ["flash_attn", "torch_varlen", "xformers", "triton", "flex", "torch"]


def test_cpu_dispatch_chooses_the_reference():
    q, k, v, cu_seqlens, max_seqlen = _packed((3, 4), 2, 8, torch.float32, device="cpu")
    assert ops.select("varlen_attention", q=q, k=k, v=v, cu_seqlens=cu_seqlens,
                      max_seqlen=max_seqlen, scale=None).name == "torch"


def _backend_to_test(name: str):
    if name == "flex" and CUDA:
        # torch.compile of FlexAttention (forward and backward) takes 20-60 s, more than the GPU
        # check can spend on one backend whose kernels are torch's; the attention benchmark
        # still runs it on the GPU, last.
        pytest.skip("flex on CUDA: its torch.compile does not fit the GPU check's budget")
    return ops.backends("varlen_attention")[BACKEND_NAMES.index(name)]


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_backend_matches_reference(name):
    """Each backend that can run here, forward and (where it supports it) backward. Absent or
    unsupported ones skip with the backend's own reasons."""
    backend = _backend_to_test(name)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, cu_seqlens, max_seqlen = _packed((7, 1, 0, 20), 2, 72, dtype, seed=11)
    inputs = dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=None)
    reasons = backend.not_supported_reasons(**inputs)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    with ops.use_backend(varlen_attention=name), torch.no_grad():
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    expected, _ = _reference(q, k, v, cu_seqlens, max_seqlen)
    _assert_close(out, expected, dtype, f"{name} out")

    leaves = {key: t.clone().requires_grad_() for key, t in (("q", q), ("k", k), ("v", v))}
    if backend.not_supported_reasons(**{**inputs, **leaves}):
        return  # forward-only here (FlexAttention on CPU); its reason is tested below
    with ops.use_backend(varlen_attention=name):
        out = ops.varlen_attention(leaves["q"], leaves["k"], leaves["v"], cu_seqlens, max_seqlen)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    _, expected_grads = _reference(q, k, v, cu_seqlens, max_seqlen, dout=dout)
    for grad_name, grad, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        _assert_close(grad, want, dtype, f"{name} {grad_name}")


@pytest.mark.parametrize("name", BACKEND_NAMES)
def test_host_boundaries_give_the_same_output(name, monkeypatch):
    """`cu_seqlens_host` changes nothing but where the boundaries are read: the same output on
    every backend that runs here, and the host-side backends (with validation) then never read
    cu_seqlens back (the device sync it removes)."""
    backend = _backend_to_test(name)
    dtype = torch.bfloat16 if CUDA else torch.float32
    q, k, v, cu_seqlens, max_seqlen = _packed((7, 1, 0, 20), 2, 16, dtype, seed=5)
    host = tuple(cu_seqlens.tolist())
    reasons = backend.not_supported_reasons(q=q, k=k, v=v, cu_seqlens=cu_seqlens,
                                            max_seqlen=max_seqlen, scale=None, cu_seqlens_host=host)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    with ops.use_backend(varlen_attention=name), torch.no_grad():
        expected = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)
        if backend.reads_cu_seqlens_on_host:
            monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("read cu_seqlens back"))
        out = ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_host=host)
    assert torch.equal(out, expected)


def test_flex_refuses_backward_on_cpu():
    q, k, v, cu_seqlens, max_seqlen = _packed((3, 4), 1, 16, torch.float32, device="cpu")
    q.requires_grad_()
    with ops.use_backend(varlen_attention="flex"), pytest.raises(RuntimeError,
                                                                  match="no backward on CPU"):
        ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen)


# --- bad input -----------------------------------------------------------------------------------


def _bad_input_cases():
    q, k, v, cu_seqlens, _ = _packed((3, 5), 2, 8, torch.float32, device="cpu")
    good = dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=5)
    i32 = dict(dtype=torch.int32)
    return [
        ("cu_seqlens int64", dict(cu_seqlens=cu_seqlens.long()), TypeError, "cu_seqlens: dtype"),
        ("cu_seqlens 2-D", dict(cu_seqlens=cu_seqlens[None]), ValueError, "cu_seqlens: expected 1"),
        ("cu_seqlens too short", dict(cu_seqlens=torch.zeros(1, **i32)), ValueError, "B\\+1 >= 2"),
        ("not starting at 0", dict(cu_seqlens=torch.tensor([1, 3, 8], **i32)), ValueError,
         "must start at 0, starts at 1"),
        ("decreasing", dict(cu_seqlens=torch.tensor([0, 6, 4, 8], **i32)), ValueError,
         "non-decreasing; decreases at index 2 \\(6 -> 4\\)"),
        ("last != total", dict(cu_seqlens=torch.tensor([0, 3, 7], **i32)), ValueError,
         "last entry 7 must equal .* 8"),
        ("max_seqlen too small", dict(max_seqlen=4), ValueError,
         "max_seqlen=4 is smaller .* \\(5, sequence 1\\)"),
        ("max_seqlen zero", dict(max_seqlen=0), ValueError, "max_seqlen=0"),
        ("max_seqlen a tensor", dict(max_seqlen=torch.tensor(5)), ValueError, "max_seqlen="),
        ("heads differ", dict(k=k[:, :1]), ValueError, "k: shape \\(8, 1, 8\\) differs"),
        ("head_dim differs", dict(v=v[..., :4]), ValueError, "v: shape \\(8, 2, 4\\) differs"),
        ("dtypes differ", dict(k=k.double()), TypeError, "k: dtype torch.float64"),
        ("v dtype differs", dict(v=v.half()), TypeError, "v: dtype torch.float16 differs"),
        ("q not 3-D", dict(q=q[None]), ValueError, "q: expected 3 dimensions"),
        ("q integer", dict(q=q.int()), TypeError, "q: dtype torch.int32"),
        ("k on another device", dict(k=k.to("meta")), ValueError, "k: on meta"),
        ("cu_seqlens on another device", dict(cu_seqlens=cu_seqlens.to("meta")), ValueError,
         "cu_seqlens: on meta"),
        # The same boundaries on the host (cu_seqlens is [0, 3, 8]): validated in their place.
        ("host bounds a tensor", dict(cu_seqlens_host=cu_seqlens), TypeError,
         "cu_seqlens_host: expected a tuple of ints"),
        ("host bounds not ints", dict(cu_seqlens_host=(0, 3.0, 8)), TypeError,
         "cu_seqlens_host: expected a tuple of ints, got the entry 3.0 \\(float\\)"),
        ("host bounds too short", dict(cu_seqlens_host=(0, 8)), ValueError,
         "cu_seqlens_host: 2 entries, but cu_seqlens has 3"),
        ("host bounds not starting at 0", dict(cu_seqlens_host=(1, 3, 8)), ValueError,
         "cu_seqlens_host: must start at 0, starts at 1"),
        ("host bounds decreasing", dict(cu_seqlens_host=(0, 9, 8)), ValueError,
         "cu_seqlens_host: must be non-decreasing; decreases at index 2 \\(9 -> 8\\)"),
        ("host bounds last != total", dict(cu_seqlens_host=(0, 3, 7)), ValueError,
         "cu_seqlens_host: last entry 7 must equal .* 8"),
        ("host bounds longer than max_seqlen", dict(cu_seqlens_host=(0, 1, 8)), ValueError,
         "max_seqlen=5 is smaller .* \\(7, sequence 1\\)"),
    ], good


_CASES, _GOOD = _bad_input_cases()


@pytest.mark.parametrize("change, error, match", [c[1:] for c in _CASES],
                         ids=[c[0] for c in _CASES])
def test_bad_input_is_rejected(change, error, match, monkeypatch):
    # Rejected before dispatch: no backend is ever reached.
    # (`flexikern.ops.varlen_attention` the attribute is the function; the module is this one.)
    module = importlib.import_module("flexikern.ops.varlen_attention")
    monkeypatch.setattr(module, "dispatch", lambda *a, **kw: pytest.fail("reached dispatch"))
    with pytest.raises(error, match=match):
        ops.varlen_attention(**{**_GOOD, **change})


def test_good_input_reaches_the_reference():
    out = ops.varlen_attention(**_GOOD)
    expected, _ = _reference(**_GOOD)
    torch.testing.assert_close(out, expected)
