"""The Triton backends as torch.library custom ops: `flexikern::patch_embed_triton`,
`flexikern::de_embed_triton`, `flexikern::varlen_attention_triton` and their backward launches.

* `torch.library.opcheck` on every op, forward and backward: schema, fake kernel (shapes, dtypes,
  strides; dynamic shapes), autograd registration, AOT dispatch.
* Each Triton entry point against its plain-torch reference, outputs and gradients, on random
  inputs with every buffer the kernels allocate NaN-poisoned first.
* torch.compile(fullgraph=True): the entry points and the public ops forced to `triton` trace with
  no graph break, the kernels stay opaque calls in the forward and the backward graph, and the
  results equal eager.

Runs under the Triton interpreter on CPU tensors (`TRITON_INTERPRET=1`, set here when absent and
no GPU is present), or compiled on CUDA. fp32 only: the interpreter's bf16 dots are wrong, and
the dtypes are covered by test_kernels_embed.py and test_varlen_attention.py. Tiny shapes.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    # Triton reads this when `@triton.jit` decorates, so before flexikern.kernels is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import itertools  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

import flexikern.ops as ops  # noqa: E402
from flexikern.ops._dispatch import triton_interpreting  # noqa: E402
from flexikern.ops.de_embed import _deembed_resize, de_embed_reference, de_embed_triton  # noqa: E402
from flexikern.ops.patch_embed import (_embed_resize, patch_embed_reference,  # noqa: E402
                                       patch_embed_triton)
from flexikern.ops.varlen_attention import varlen_attention_reference  # noqa: E402

if triton_interpreting():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from flexikern.kernels import _common  # noqa: E402

# Every test twice: in the interpreter (CI) and compiled on a GPU (`pytest -m gpu`); one skips.
pytestmark = pytest.mark.usefixtures("kernel_device")

FLEX = torch.ops.flexikern
TRITON_VARLEN = next(b for b in ops.backends("varlen_attention") if b.name == "triton")
N, C, D, HEADS, HEAD_DIM = 2, 3, 16, 2, 16
LENGTHS = (5, 3, 7)   # odd lengths, one spanning two of the interpreter's 16-row tiles with 17
# (stored kernel, patch): resized inside the launch, and run at its stored size.
EMBED_CASES = [((4, 4), (2, 2)), ((4, 4), (4, 4))]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).requires_grad_(requires_grad)


def embed_inputs(kernel, patch, grid=(2, 3), requires_grad=True):
    h, w = grid[0] * patch[0], grid[1] * patch[1]
    return dict(x=randn(N, C, h, w, requires_grad=requires_grad),
                weight=randn(D, C, *kernel, requires_grad=requires_grad),
                bias=randn(D, requires_grad=requires_grad), patch_size=patch,
                pos_embed=randn(grid[0] * grid[1], D, requires_grad=requires_grad),
                size_embed=randn(D, requires_grad=requires_grad))


def deembed_inputs(kernel, patch, grid=(2, 3), requires_grad=True):
    size = (grid[0] * patch[0], grid[1] * patch[1])
    k = kernel[0] * kernel[1] * C
    return dict(x=randn(N, grid[0] * grid[1], D, requires_grad=requires_grad),
                weight=randn(k, D, requires_grad=requires_grad),
                bias=randn(k, requires_grad=requires_grad),
                kernel_size=kernel, patch_size=patch, size=size)


def varlen_inputs(lengths=LENGTHS, fused_qkv=False, requires_grad=True):
    """q, k, v (views of one fused qkv projection when `fused_qkv`, as in the model), cu_seqlens,
    max_seqlen."""
    total = sum(lengths)
    if fused_qkv:
        q, k, v = randn(total, 3, HEADS, HEAD_DIM).unbind(1)
    else:
        q, k, v = (randn(total, HEADS, HEAD_DIM) for _ in range(3))
    q, k, v = (t.requires_grad_(requires_grad) for t in (q, k, v))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32,
                              device=DEVICE)
    return q, k, v, cu_seqlens, max(lengths)


def assert_same(actual, expected, name):
    """fp32 kernels against an fp32/fp64 reference; NaN (an unwritten element) always fails."""
    expected = expected.detach().double()
    tolerance = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.detach().double(), expected, rtol=1e-5, atol=tolerance,
                               msg=lambda m: f"{name}: {m}")


def check_grads(actual_out, expected_out, actual_leaves, expected_leaves, names):
    """Outputs, then the gradients of both for one random grad_output."""
    assert_same(actual_out, expected_out, "out")
    grad = torch.randn_like(actual_out)
    actual = torch.autograd.grad(actual_out, actual_leaves, grad)
    expected = torch.autograd.grad(expected_out, expected_leaves, grad.to(expected_out.dtype))
    for name, a, e in zip(names, actual, expected):
        assert_same(a, e, f"grad {name}")


def leaves(inputs):
    return [v for v in inputs.values() if torch.is_tensor(v) and v.requires_grad]


def as_reference(inputs):
    """The same values in float64, detached leaves: the reference's ground truth."""
    return {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v)
            for k, v in inputs.items()}


# ---- opcheck: schema, fake kernel (static and dynamic shapes), autograd, AOT dispatch --------


@pytest.mark.parametrize("kernel,patch", EMBED_CASES, ids=str)
def test_opcheck_patch_embed(kernel, patch):
    i = embed_inputs(kernel, patch)
    resize = _embed_resize(kernel, patch, i["x"].device)
    torch.library.opcheck(FLEX.patch_embed_triton.default,
                          (i["x"], i["weight"], resize, i["bias"], list(patch), i["pos_embed"],
                           i["size_embed"]))
    # No optional inputs, and a channels_last x (its gradient is channels_last too).
    x = i["x"].detach().to(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(FLEX.patch_embed_triton.default,
                          (x, i["weight"], resize, None, list(patch), None, None))
    grad_out = randn(N, 6, D)
    for x in (i["x"].detach(), x.detach()):
        torch.library.opcheck(FLEX.patch_embed_triton_grad_x.default,
                              (grad_out, x, i["weight"].detach(), resize, list(patch)))


@pytest.mark.parametrize("kernel,patch", EMBED_CASES, ids=str)
def test_opcheck_de_embed(kernel, patch):
    i = deembed_inputs(kernel, patch)
    resize_t = _deembed_resize(kernel, patch, i["x"].device)
    args = (i["x"], i["weight"], resize_t, i["bias"], list(kernel), list(patch), list(i["size"]))
    torch.library.opcheck(FLEX.de_embed_triton.default, args)
    torch.library.opcheck(FLEX.de_embed_triton.default, (*args[:3], None, *args[4:]))
    grad_out = randn(N, C, *i["size"])
    torch.library.opcheck(FLEX.de_embed_triton_grad_x.default,
                          (grad_out, i["x"].detach(), i["weight"].detach(), resize_t,
                           list(kernel), list(patch)))


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["contiguous", "fused_qkv"])
def test_opcheck_varlen_attention(fused_qkv):
    q, k, v, cu_seqlens, max_seqlen = varlen_inputs(fused_qkv=fused_qkv)
    torch.library.opcheck(FLEX.varlen_attention_triton.default,
                          (q, k, v, cu_seqlens, max_seqlen, None))
    out, lse = FLEX.varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, 0.3)
    torch.library.opcheck(FLEX.varlen_attention_triton_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                           out.detach(), lse, cu_seqlens, max_seqlen, 0.3))


# ---- the entry points against the references ------------------------------------------------


@pytest.mark.parametrize("kernel,patch", EMBED_CASES, ids=str)
def test_patch_embed_triton_matches_reference(kernel, patch):
    i = embed_inputs(kernel, patch)
    r = as_reference(i)
    check_grads(patch_embed_triton(**i), patch_embed_reference(**r), leaves(i), leaves(r),
                ["x", "weight", "bias", "pos_embed", "size_embed"])


@pytest.mark.parametrize("kernel,patch", EMBED_CASES, ids=str)
def test_de_embed_triton_matches_reference(kernel, patch):
    i = deembed_inputs(kernel, patch)
    r = as_reference(i)
    check_grads(de_embed_triton(**i), de_embed_reference(**r), leaves(i), leaves(r),
                ["x", "weight", "bias"])


def test_triton_varlen_backend_matches_reference():
    q, k, v, cu_seqlens, max_seqlen = varlen_inputs(fused_qkv=True)
    out = TRITON_VARLEN(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=0.3)
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = varlen_attention_reference(*reference, cu_seqlens, max_seqlen, scale=0.3)
    check_grads(out, expected, (q, k, v), reference, ["q", "k", "v"])


# ---- torch.compile: no graph break, opaque kernels, eager's results ---------------------------


class RecordingBackend:
    """aot_eager that keeps the forward and backward graphs AOTAutograd traced."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        self.graphs = {"forward": [], "backward": []}

        def keep(kind):
            def compiler(graph, example_inputs):
                self.graphs[kind].append(graph)
                return make_boxed_func(graph.forward)
            return compiler

        self.backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    def __call__(self, graph, example_inputs):
        return self.backend(graph, example_inputs)

    def ops_in(self, kind: str) -> set[str]:
        return {str(node.target) for graph in self.graphs[kind] for node in graph.graph.nodes
                if node.op == "call_function"}


def check_compiles(fn, inputs, forward_op, backward_op):
    """fn(*inputs) under torch.compile(fullgraph=True): no graph break (torch._dynamo.explain),
    `forward_op` and `backward_op` each one opaque call in the forward and backward graph, and
    the output and the gradients of every input that requires grad equal eager's."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = fn(*inputs)
    grad = torch.randn_like(eager)
    needs_grad = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    recorder = RecordingBackend()
    compiled = torch.compile(fn, fullgraph=True, backend=recorder)(*inputs)
    assert f"flexikern.{forward_op}.default" in recorder.ops_in("forward")
    check_grads(compiled, eager, needs_grad, needs_grad, [f"input {i}" for i in range(99)])
    assert f"flexikern.{backward_op}.default" in recorder.ops_in("backward")


def test_compiled_patch_embed_triton():
    i = embed_inputs((4, 4), (2, 2))
    args = (i["x"], i["weight"], i["bias"], i["pos_embed"], i["size_embed"])

    def embed(x, weight, bias, pos_embed, size_embed):
        return patch_embed_triton(x, weight, bias, (2, 2), pos_embed, size_embed) * 2

    check_compiles(embed, args, "patch_embed_triton", "patch_embed_triton_grad_x")


def test_compiled_de_embed_triton():
    i = deembed_inputs((4, 4), (2, 2))

    def image(x, weight, bias):
        return de_embed_triton(x, weight, bias, (4, 4), (2, 2), i["size"]) * 2

    check_compiles(image, (i["x"], i["weight"], i["bias"]), "de_embed_triton",
                   "de_embed_triton_grad_x")


def test_compiled_varlen_attention_triton_backend():
    q, k, v, cu_seqlens, max_seqlen = varlen_inputs(fused_qkv=True)

    def attention(q, k, v, cu_seqlens):
        return TRITON_VARLEN(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen) * 2

    check_compiles(attention, (q, k, v, cu_seqlens), "varlen_attention_triton",
                   "varlen_attention_triton_backward")


def test_compiled_public_ops_forced_to_triton():
    # Through dispatch and the input checks: the public ops trace too when triton is forced.
    e = embed_inputs((4, 4), (2, 2))
    d = deembed_inputs((4, 4), (2, 2))
    q, k, v, cu_seqlens, max_seqlen = varlen_inputs()
    host = tuple(cu_seqlens.tolist())

    def model(x, weight, bias, pos_embed, out_weight, out_bias):
        tokens = ops.patch_embed(x, weight, bias, 2, pos_embed)
        return ops.de_embed(tokens, out_weight, out_bias, 4, 2, d["size"])

    def attention(q, k, v, cu_seqlens):
        return ops.varlen_attention(q, k, v, cu_seqlens, max_seqlen, cu_seqlens_host=host)

    with ops.use_backend(patch_embed="triton", de_embed="triton", varlen_attention="triton"):
        check_compiles(model, (e["x"], e["weight"], e["bias"], e["pos_embed"], d["weight"],
                               d["bias"]), "patch_embed_triton", "de_embed_triton_grad_x")
        check_compiles(attention, (q, k, v, cu_seqlens), "varlen_attention_triton",
                       "varlen_attention_triton_backward")
