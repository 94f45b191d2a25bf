"""torch.compile: every model traces with fullgraph=True at every patch size, matches eager, and
compiles once per size; `fk.sample(compile=...)` compiles once per layout of a schedule.

Most checks use backend="aot_eager" (dynamo's graph, AOT autograd and functionalization, run by
torch's own kernels: what fullgraph and gradients need, without a C++ compile per graph); the
inductor tests compile a tiny DiT for real (about 10 s per graph on 2 cores).
"""

import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import flexikern as fk
import flexikern.ops as ops
from flexikern.models import FlexiDiT, FlexiLatte, FlexiPixArt, TextCondition
from flexikern.ops._dispatch import triton_interpreting
from flexikern.runtime.compiled import compile_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def dit(adapter="lora", sizes=(2, 4), std=0.2, **kw):
    model = FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     num_classes=10, **kw)
    return _randomize(model.flexify(sizes, adapter=adapter, lora_rank=4), std=std).eval()


def pixart():
    model = FlexiPixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                        caption_channels=24, text_len=5)
    return _randomize(model.flexify((2, 4), lora_rank=4)).eval()


def latte():
    model = FlexiLatte(input_size=8, num_frames=4, patch_size=(1, 2, 2), in_channels=4, hidden_size=32,
                       depth=1, num_heads=2, caption_channels=24, text_len=5)
    return _randomize(model.flexify([(1, 2, 2), (2, 2, 2), (1, 4, 4)], lora_rank=4)).eval()


def text():
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return TextCondition(torch.randn(2, 5, 24, generator=g), mask)


def image():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


T = torch.tensor([3.0, 500.0])

# name: (model builder, (x, t, y) builder, patch sizes run one by one, the packed call's sizes)
CASES = {
    "dit-lora": (dit, lambda: (image(), T, torch.tensor([1, 10])), [2, 4], [2, 4]),
    "dit-shared": (lambda: dit("shared"), lambda: (image(), T, torch.tensor([1, 7])), [2, 4], [4, 2]),
    "dit-rectangular": (lambda: dit(sizes=[(2, 2), (2, 4), (4, 2)]), lambda: (image(), T, torch.tensor([0, 9])),
                        [(2, 4), (4, 2)], [(2, 4), (2, 2)]),
    "dit-diffusers": (lambda: dit(pos_base_size=4, block_embedders=True, timestep_freq_shift=1),
                      lambda: (image(), T, torch.tensor([3, 4])), [2, 4], [2, 4]),
    "pixart": (pixart, lambda: (image(), T, text()), [2, 4], [2, 4]),
    "latte": (latte, lambda: (torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(2)), T, text()),
              [(1, 2, 2), (2, 2, 2), (1, 4, 4)], [(2, 2, 2), (1, 4, 4)]),
}


def calls(model, case):
    """(name, function, args) of every forward of a case: one per patch size, and the packed one."""
    _, inputs, sizes, packed = CASES[case]
    x, t, y = inputs()
    for p in sizes:
        yield f"p={p}", (lambda x, t, y, p=p: model(x, t, y, patch_size=p)), (x, t, y)
    yield "packed", (lambda xs, t, y: model.forward_packed(xs, t, y, packed)), ([x[0], x[1]], t, y)


def close(a, b, tol=1e-5):
    if isinstance(a, (list, tuple)):
        return all(close(u, v, tol) for u, v in zip(a, b, strict=True))
    return ((a - b).norm() / b.norm()).item() <= tol


# ----------------------------------------------------------------------------- no graph break

@pytest.mark.parametrize("case", list(CASES))
def test_no_graph_break(case):
    model = CASES[case][0]()
    for name, fn, args in calls(model, case):
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0, (name, [b.reason for b in explained.break_reasons])
        assert explained.graph_count == 1, name


@pytest.mark.parametrize("case", list(CASES))
def test_fullgraph_matches_eager(case):
    model = CASES[case][0]()
    for name, fn, args in calls(model, case):
        torch._dynamo.reset()
        with torch.no_grad():
            expected = fn(*args)
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        assert close(got, expected), name


@pytest.mark.parametrize("case", ["dit-lora", "dit-shared", "pixart", "latte"])
def test_fullgraph_gradients_match_eager(case):
    # Training: the adapters' (and, shared, every) trainable parameter's gradients, at each size.
    # (Under LoRA the original size trains nothing: its loss needs no gradient, and is skipped.)
    model = CASES[case][0]().train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trained = []
    for name, fn, args in calls(model, case):
        grads = []
        for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
            model.zero_grad(set_to_none=True)
            out = run(*args)
            loss = sum(o.square().mean() for o in out) if isinstance(out, list) else out.square().mean()
            if not loss.requires_grad:
                break
            loss.backward()
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable])
        torch._dynamo.reset()
        if grads:
            trained.append(name)
            assert any(g.abs().sum() > 0 for g in grads[1]), name
            assert all(close(a, b) for a, b in zip(grads[1], grads[0]) if b.abs().sum() > 0), name
    assert len(trained) >= 2, trained


def test_gradient_checkpointing_compiles():
    model = dit().train()
    model.gradient_checkpointing = True
    x, t, y = image(), T, torch.tensor([1, 2])
    fn = lambda x, t, y: model(x, t, y, patch_size=4)   # noqa: E731
    explained = torch._dynamo.explain(fn)(x, t, y)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


# ----------------------------------------------------------------------------- inductor

def test_inductor_matches_eager_forward_and_gradients():
    model = dit().train()
    x, t, y = image(), T, torch.tensor([1, 7])
    compiled = torch.compile(model, fullgraph=True)
    for p in (2, 4):
        with torch.no_grad():
            assert close(compiled(x, t, y, patch_size=p), model(x, t, y, patch_size=p)), p
    # The weak size trains its adapters: gradients through inductor's backward graph.
    grads = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        run(x, t, y, patch_size=4).square().mean().backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(close(a, b) for a, b in zip(grads[1], grads[0]))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- recompiles

def _counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


@pytest.mark.parametrize("kind", [int, tuple, fk.PatchSize.parse], ids=["int", "tuple", "PatchSize"])
def test_each_patch_size_compiles_once_with_default_dynamic_shapes(kind):
    # torch.compile's default (dynamic=None) makes an int argument (or a tuple's ints) symbolic
    # once it changed; the models specialise patch sizes, so each size still compiles one static
    # graph, once, however the size is given.
    model, graphs = dit(sizes=(2, 4, 8)), []
    x, t, y = image(), T, torch.tensor([1, 2])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=_counting_backend(graphs))
    with torch.no_grad():
        for p in (2, 4, 2, 8, 4, 8, 2):
            size = p if kind is int else kind((p, p))
            assert close(compiled(x, t, y, patch_size=size), model(x, t, y, patch_size=p)), p
    assert len(graphs) == 3


def test_sampling_a_model_the_user_compiled():
    # fk.sample passes PatchSize objects: a user's own torch.compile(model, fullgraph=True) runs a
    # whole guided weak-first schedule without a break, one graph per size and batch layout.
    torch._dynamo.reset()
    model, graphs = dit(std=0.02), []
    schedule = fk.Schedule.weak_first(6, 2, weak=4, powerful=2, guidance_weak_steps=4)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=_counting_backend(graphs))
    got = fk.sample(compiled, [1, 7], schedule, fk.Guidance(3.0), progress=False)
    assert close(got, fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False))
    assert len(graphs) == 4
    torch._dynamo.reset()


def test_sample_compiles_once_per_layout_and_matches_eager():
    # A weak-first schedule with guidance: both branches weak (one batch of 2N at p=4), the two
    # branches at their own sizes (N at p=2 and N at p=4, or one packed forward), both powerful
    # (2N at p=2): four layouts, each compiled once, and nothing more on a second run.
    # (Weights of DiT's scale, 0.02: with larger random weights sampling amplifies rounding.)
    torch._dynamo.reset()
    model = dit(std=0.02)
    schedule = fk.Schedule.weak_first(8, 3, weak=4, powerful=2, guidance_weak_steps=5)
    assert [(c, g) for _, _, c, g in schedule.phases([True] * 8)] == [((4, 4), (4, 4)), ((2, 2), (4, 4)),
                                                                    ((2, 2), (2, 2))]
    eager = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False)
    counters.clear()
    compiled = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False, compile=True)
    assert close(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 4
    again = fk.sample(model, [2, 3], schedule, fk.Guidance(3.0), progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] == 4
    assert close(again, fk.sample(model, [2, 3], schedule, fk.Guidance(3.0), progress=False))
    # Packed: the mixed step is one forward_packed graph; the rest are compiled already.
    packed = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False, packed=True,
                       compile=True)
    assert counters["stats"]["unique_graphs"] == 5
    assert close(packed, eager)
    torch._dynamo.reset()


def test_sample_raises_the_recompile_limit_for_its_layouts():
    # Dynamo's per-code-object limit (default 8) is shared by every model of a class; a compiled
    # run must compile its layouts, not fall back to eager past the limit.
    torch._dynamo.reset()
    import torch._dynamo.config as config
    with config.patch(recompile_limit=1):
        model = dit()
        schedule = fk.Schedule.weak_first(4, 1, weak=4, powerful=2, guidance_weak_steps=3)
        counters.clear()
        fk.sample(model, [1], schedule, fk.Guidance(2.0), progress=False, compile={"backend": "aot_eager"})
        assert counters["stats"]["unique_graphs"] == 4
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- checks inside a graph

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_label_and_timestep_values_are_checked_inside_the_graph(backend):
    # (Under inductor the embedding's own bounds check must not fire first.)
    torch._dynamo.reset()
    model = dit()
    x = image()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match=r"y: class labels out of range; expected 0\.\.10"):
            compiled(x, T, torch.tensor([1, 11]))
        with pytest.raises(RuntimeError, match="t: timesteps must be finite and >= 0"):
            compiled(x, torch.tensor([-1.0, 5.0]), torch.tensor([1, 2]))
        assert close(compiled(x, T, torch.tensor([1, 10])), model(x, T, torch.tensor([1, 10])))
        if backend == "inductor":
            torch._dynamo.reset()
            return
        with pytest.raises(Exception, match="y: class labels must be integers, got a torch.float32 tensor"):
            compiled(x, T, torch.tensor([1.0, 2.0]))
        # A host-value check fails while tracing: with fullgraph=True dynamo reports it as an
        # "Observed exception" that carries flexikern's message.
        with pytest.raises(Exception, match=r"patch_size=3 is not configured; this model has "
                                            r"patch_sizes=\[\(2, 2\), \(4, 4\)\]"):
            compiled(x, T, torch.tensor([1, 2]), patch_size=3)
    torch._dynamo.reset()


@pytest.mark.parametrize("bad,error,match", [
    ("fast", ValueError, "compile='fast': expected True, False, one of torch.compile's modes"),
    (1, TypeError, "compile=1: expected True, False"),
    ({"fullgraph": False}, ValueError, r"unknown torch.compile arguments \['fullgraph'\]"),
    ({"mode": "turbo"}, ValueError, "mode='turbo'"),
    ({"mode": "max-autotune", "options": {"epilogue_fusion": True}}, ValueError, "give `mode` or `options`"),
])
def test_compile_argument_errors(bad, error, match):
    with pytest.raises(error, match=match):
        compile_options(bad)


@pytest.mark.parametrize("compile", ["reduce-overhead", "max-autotune", {"backend": "cudagraphs"},
                                     {"options": {"triton.cudagraphs": True}}])
def test_compile_with_cuda_graphs_refuses_settings_with_their_own_graphs(compile):
    model = dit()
    with pytest.raises(ValueError, match="captures CUDA graphs of its own"):
        fk.sample(model, [1], fk.Schedule.static(2, 2), progress=False, compile=compile, cuda_graphs=True)


def test_unguided_first_step_compiles_once():
    # The first step's state is an inference tensor like every later one: one guard, one graph.
    torch._dynamo.reset()
    counters.clear()
    fk.sample(dit(std=0.02), [1, 7], fk.Schedule.static(3, 2), None, progress=False,
              compile={"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compile_settings_each_get_their_layouts_under_the_limit():
    # Each compile setting compiles its own graphs of the same functions; the raised limit counts
    # them all.
    torch._dynamo.reset()
    import torch._dynamo.config as config
    model = dit(std=0.02)
    schedule = fk.Schedule.weak_first(4, 1, weak=4, powerful=2, guidance_weak_steps=3)
    with config.patch(recompile_limit=2):
        for backend in ("aot_eager", "eager"):
            fk.sample(model, [1], schedule, fk.Guidance(2.0), progress=False, compile={"backend": backend})
    torch._dynamo.reset()


def test_compiled_sampling_keeps_no_model_alive():
    import gc
    import weakref
    model = dit(std=0.02)
    fk.sample(model, [1], fk.Schedule.static(2, 2), progress=False, compile={"backend": "aot_eager"})
    ref = weakref.ref(model)
    del model
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


def test_text_mask_of_zeros_and_ones_compiles():
    model = pixart()
    embeds, mask = text().embeds, text().mask.float()
    fn = lambda x: model(x, T, (embeds, mask), patch_size=4)   # noqa: E731
    explained = torch._dynamo.explain(fn)(image())
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()


def test_varlen_attention_under_compile_needs_host_boundaries():
    q = torch.randn(7, 2, 8)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(Exception, match="cu_seqlens_host: required under torch.compile"):
        torch.compile(lambda q: ops.varlen_attention(q, q, q, cu, 4), fullgraph=True, backend="eager")(q)
    out = torch.compile(lambda q: ops.varlen_attention(q, q, q, cu, 4, cu_seqlens_host=(0, 3, 7)),
                        fullgraph=True, backend="eager")(q)
    assert close(out, ops.varlen_attention(q, q, q, cu, 4))
    torch._dynamo.reset()


def test_compiled_forwards_inside_cuda_graph_phases():
    # compile and cuda_graphs together: the phases' steps call the compiled forwards (on CPU the
    # graph runner runs its phase bodies eagerly, with the same results).
    from flexikern.runtime.graphs import GraphRunner
    model = dit(std=0.02)
    schedule = fk.Schedule.weak_first(6, 2, weak=4, powerful=2, guidance_weak_steps=4)
    eager = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False)
    with warnings.catch_warnings():   # "CUDA graphs need a CUDA device", once per process
        warnings.simplefilter("ignore", RuntimeWarning)
        graphed = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False,
                            cuda_graphs=GraphRunner(), compile={"backend": "aot_eager"})
    assert close(graphed, eager)
    torch._dynamo.reset()


@pytest.mark.skipif(not triton_interpreting(), reason="the Triton backends on CPU need TRITON_INTERPRET=1")
def test_a_model_on_the_triton_backends_compiles_without_a_break():
    # The fused kernels are custom ops: one opaque call each in the graph, forward and backward.
    model = dit(std=0.02).train()
    x, y = image(), torch.tensor([1, 7])
    fn = lambda x: model(x, T, y, patch_size=4)   # noqa: E731
    with ops.use_backend(patch_embed="triton", de_embed="triton"):
        explained = torch._dynamo.explain(fn)(x)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        torch._dynamo.reset()
        graphs = []
        compiled = torch.compile(fn, fullgraph=True, backend=_recording_aot(graphs))
        outputs, grads = [], []
        for run in (fn, compiled):
            model.zero_grad(set_to_none=True)
            out = run(x)
            out.square().mean().backward()
            outputs.append(out.detach())
            grads.append([p.grad.clone() for p in model.trainable_parameters() if p.grad is not None])
    assert close(outputs[1], outputs[0])
    assert all(close(a, b) for a, b in zip(grads[1], grads[0]))
    called = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    # (The latents need no gradient: patch_embed's grad-x launch does not run.)
    assert {"flexikern.patch_embed_triton.default", "flexikern.de_embed_triton.default",
            "flexikern.de_embed_triton_grad_x.default"} <= called
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["two-forwards", "packed"])
def test_compiled_sampling_on_cuda(packed):
    # Inductor's Triton code, flexikern's custom ops (patch_embed, de_embed, varlen attention) and
    # device-side assertions in one compiled run, bf16, inside flexikern's CUDA graphs; equal to
    # eager sampling up to bf16 rounding, and a second run compiles nothing.
    from flexikern.runtime.graphs import GraphRunner
    torch._dynamo.reset()
    model = dit(std=0.02).to("cuda", torch.bfloat16)
    schedule = fk.Schedule.weak_first(6, 2, weak=4, powerful=2, guidance_weak_steps=4)
    eager = fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False, packed=packed)
    run = lambda: fk.sample(model, [1, 7], schedule, fk.Guidance(3.0), progress=False,   # noqa: E731
                            packed=packed, compile=True, cuda_graphs=GraphRunner())
    compiled = run()
    graphs = counters["stats"]["unique_graphs"]
    assert close(compiled.float(), eager.float(), 2e-2)
    run()
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def _recording_aot(graphs):
    """aot_eager that keeps the forward and backward graphs it runs."""
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def test_compiling_before_any_eager_call():
    # A fresh process compiles first: what forwards load on first use (the extension, backend
    # availability) loads while tracing, without a graph break.
    code = ("import torch, flexikern as fk\n"
            "m = fk.FlexiDiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=4).flexify((2, 4))\n"
            "x = torch.randn(1, 4, 8, 8)\n"
            "f = lambda x: m(x, torch.tensor([5]), torch.tensor([1]), patch_size=4)\n"
            "e = torch._dynamo.explain(f)(x)\n"
            "assert e.graph_break_count == 0, e.break_reasons\n"
            "torch._dynamo.reset()\n"
            "out = torch.compile(f, fullgraph=True, backend='eager')(x)\n"
            "assert torch.allclose(out, f(x), atol=1e-6)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
