"""Derived state never goes stale or leaks (issue 14, section 1).

* After any change to the weights (a `.data` write, an EMA swap, an optimizer step,
  `load_state_dict`, `.to()`), the next forward and `fk.sample` compute with the new weights:
  nothing derived from the weights is cached (the resized kernels are computed per forward).
* No cache returns an inference tensor: every cache (packings, resize matrices, positional tables,
  attention masks) built under `torch.inference_mode()` serves training with backward.
* A CUDA graph's key is derived from everything its captured step reads (`state_of`): a runner
  reused with another baked setting (the sampler's `clip_denoised`, a LoRA scale, an undeclared
  attribute) recaptures instead of replaying (checked through the runner's CPU seam).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import flexikern as fk
from flexikern.diffusion import DenoisingLoop, Guidance, Schedule, make_sampler, sample
from flexikern.flexi import pos_embed
from flexikern.models import FlexiDiT
from flexikern.ops import resize
from flexikern.ops.patch_size import PatchSize
from flexikern.runtime import graphs
from flexikern.runtime.graphs import GraphRunner
from test_graphs import FakeGraph
from test_nosync import _text, tiny_latte, tiny_pixart

from reference_dit import randomize_

varlen = importlib.import_module("flexikern.ops.varlen_attention")   # the module, not the op
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


def shared(seed=0):
    """A tiny shared-adapter DiT: one 4x4 kernel, PI-resized for patch size 2."""
    return randomize_(FlexiDiT(**TINY).flexify((2, 4), adapter="shared"), seed, std=0.2).eval()


def fresh_copy(model):
    """A model that never ran, with `model`'s current weights (nothing cached)."""
    clone = FlexiDiT(**TINY).flexify((2, 4), adapter="shared")
    clone.load_state_dict(model.state_dict())
    return clone.to(next(model.parameters()).dtype).eval()


def batch(n=3, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g, dtype=dtype), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


# ----------------------------------------------------------------------------- weight changes

def _data_copy(model):   # diffusers' EMAModel.copy_to, torch_ema: `param.data.copy_(shadow)`
    new = randomize_(FlexiDiT(**TINY).flexify((2, 4), adapter="shared"), seed=7, std=0.2)
    for p, q in zip(model.parameters(), new.parameters()):
        p.data.copy_(q.data)


def _data_slice(model):
    model.x_embedder.weight["shared"][:5].data.mul_(2)
    model.final_layer.linear.weight["shared"][3:].data.mul_(-1.5)


def _optimizer_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, t, y = batch(seed=3)
    model(x, t, y, patch_size=2).square().mean().backward()
    opt.step()
    model.eval()


def _load_state_dict(model):
    model.load_state_dict(randomize_(FlexiDiT(**TINY).flexify((2, 4), adapter="shared"), seed=8, std=0.2).state_dict())


def _to_bfloat16(model):
    model.to(torch.bfloat16)


CHANGES = {"data.copy_": _data_copy, "data slice": _data_slice, "optimizer step": _optimizer_step,
           "load_state_dict": _load_state_dict, ".to(bfloat16)": _to_bfloat16}


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_forward_after_a_weight_change_uses_the_new_weights(change, mode):
    model = shared()
    x, t, y = batch()
    grad_mode = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with grad_mode():
        before = model(x, t, y, patch_size=2)
        model.forward_packed(list(x), t, y, [2, 4, 2])
    change(model)
    dtype = next(model.parameters()).dtype
    reference = fresh_copy(model)
    x = x.to(dtype)
    with grad_mode():
        got, expected = model(x, t, y, patch_size=2), reference(x, t, y, patch_size=2)
        got_packed = model.forward_packed(list(x), t, y, [2, 4, 2])
        expected_packed = reference.forward_packed(list(x), t, y, [2, 4, 2])
    assert not torch.allclose(before.to(dtype), expected)   # the change matters
    assert torch.equal(got, expected)
    for a, b in zip(got_packed, expected_packed):
        assert torch.equal(a, b)


def test_sample_after_an_ema_swap_uses_the_new_weights():
    model = shared()
    kw = dict(schedule=Schedule.weak_first(4, 2, weak=4, powerful=2), guidance=Guidance(1.5, "flexi"),
              seed=2, progress=False)
    sample(model, [1, 5], **kw)
    _data_copy(model)
    assert torch.equal(sample(model, [1, 5], **kw), sample(fresh_copy(model), [1, 5], **kw))


@pytest.fixture
def fake_capture(monkeypatch):
    """The runner's CPU seam: 'capture' keeps the step, replay runs it (see tests/test_graphs.py)."""
    def capture(entry, pool, warmup):
        entry.graph = FakeGraph(entry._step)
    monkeypatch.setattr(graphs._PhaseGraph, "capture", capture)
    monkeypatch.setattr(GraphRunner, "_can_capture", lambda self, x: True)
    monkeypatch.setattr(GraphRunner, "_new_pool", lambda self: "pool")


def test_graphs_after_a_data_write_use_the_new_weights(fake_capture):
    model = shared()
    kw = dict(schedule=Schedule.weak_first(4, 2, weak=4, powerful=2), guidance=Guidance(1.5, "flexi"),
              seed=2, progress=False)
    runner = GraphRunner()
    sample(model, [1, 5], cuda_graphs=runner, **kw)
    _data_copy(model)
    graphed = sample(model, [1, 5], cuda_graphs=runner, **kw)
    assert runner.captures == 2 and runner.replays == 8   # in place: read live, no recapture
    assert torch.equal(graphed, sample(fresh_copy(model), [1, 5], **kw))


# ----------------------------------------------------------------------------- inference tensors

def _train_step(model, xs, t, y, sizes, packed):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if packed:
        out = torch.stack(model.forward_packed(xs, t, y, sizes))
    else:
        out = model(torch.stack(xs), t, y, patch_size=sizes[0])
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    model.eval()


# family: (model builder, condition, packed sizes, unpacked size (a resized or weak one), latent)
FAMILIES = {
    "dit-shared": (shared, lambda n: torch.tensor([1, 5, 2][:n]), [2, 4, 2], 2, (4, 8, 8)),
    "pixart": (tiny_pixart, lambda n: _text(n=n), [(2, 2), (4, 4), (2, 2)], (4, 4), (4, 8, 8)),
    "latte": (tiny_latte, lambda n: _text(n=n), [(1, 2, 2), (2, 2, 2), (1, 4, 4)], (2, 2, 2), (4, 4, 8, 8)),
}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_caches_built_in_inference_serve_training(family, packed):
    """The packings, positional tables and resize matrices a forward caches under
    `torch.inference_mode()` are ordinary tensors: the same forward then trains."""
    build, condition, sizes, size, shape = FAMILIES[family]
    for module in (pos_embed, resize):
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
    model = build()
    n = len(sizes) if packed else 2
    sizes = sizes if packed else [size] * n
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g) for _ in range(n)]
    t, y = torch.randint(0, 1000, (n,), generator=g), condition(n)
    with torch.inference_mode():
        if packed:
            model.forward_packed(xs, t, y, sizes)
        else:
            model(torch.stack(xs), t, y, patch_size=sizes[0])
    _train_step(model, xs, t, y, sizes, packed)


def test_prepare_in_inference_then_train():
    """`prepare` (what `fk.sample` runs first) builds nothing that training cannot use."""
    model = shared()
    with torch.inference_mode():
        built = model.prepare([2, 4, 2], (8, 8), torch.device("cpu"), packed=True)
    assert built and not any(t.is_inference() or t.requires_grad for t in built)
    x, t, y = batch()
    _train_step(model, list(x), t, y, [2, 4, 2], packed=True)


CACHES = {
    "resize_matrix": lambda: resize.resize_matrix((4, 4), (2, 2)),
    "pi_resize_matrix": lambda: resize.pi_resize_matrix((4, 4), (2, 2)),
    "pi_resize_matrix float64": lambda: resize.pi_resize_matrix((2, 2), (4, 4), dtype=torch.float64),
    "sincos_2d": lambda: pos_embed.sincos_2d(16, (4, 4), (2.0, 2.0)),
    "sincos_2d_scaled": lambda: pos_embed.sincos_2d_scaled(16, (4, 4), (2.0, 2.0), 4, 1.0, frames=2),
    "sincos_frames": lambda: pos_embed.sincos_frames(16, 4, 2),
}


@pytest.mark.parametrize("build", list(CACHES.values()), ids=list(CACHES))
def test_every_cache_returns_ordinary_constants(build):
    """Built first under inference mode, then under grad mode: an ordinary tensor without a graph,
    the same one both times."""
    for module in (pos_embed, resize):
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()
    with torch.inference_mode():
        first = build()
    with torch.enable_grad():
        again = build()
    assert again is first and not first.is_inference()
    assert not first.requires_grad and first.grad_fn is None


RESIZES = {
    "pi_resize": lambda w: resize.pi_resize(w, (2, 2)),
    "resize_deembed": lambda w: resize.resize_deembed(w, (2, 2)),
    "lift_embed": lambda w: resize.lift_embed(w, (8, 8)),
    "lift_deembed": lambda w: resize.lift_deembed(w, (8, 8)),
    "deembed_weight": lambda w: resize.deembed_weight(w.reshape(16, 6), None, (4, 4), (2, 2))[0],
    "lift_deembed_weight": lambda w: resize.lift_deembed_weight(w.reshape(16, 6), torch.zeros(16), (4, 4),
                                                                (8, 8))[0],
}


@pytest.mark.parametrize("fn", list(RESIZES.values()), ids=list(RESIZES))
def test_resizes_first_run_in_inference_then_backward(fn):
    """Each resize caches its matrix on first use; run first in inference, it still differentiates."""
    resize._resize_matrix_cached.cache_clear()
    resize._pi_resize_matrix_cached.cache_clear()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        fn(torch.randn(6, 4, 4, generator=g))
    w = torch.randn(6, 4, 4, generator=g, requires_grad=True)
    fn(w).square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_flex_block_mask_built_in_inference_is_ordinary():
    pytest.importorskip("torch.nn.attention.flex_attention")
    varlen._document_block_mask.cache_clear()
    with torch.inference_mode():
        mask = varlen._document_block_mask((0, 3, 8), torch.device("cpu"))
    tensors = [v for v in vars(mask).values() if isinstance(v, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)


# ----------------------------------------------------------------------------- CUDA-graph keys

def _eager(loop, x):
    with torch.inference_mode():
        for start, stop, cond_size, guid_size in loop.phases:
            for k in range(start, stop):
                x = loop.step(x, k, None, cond_size, guid_size)
    return x


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_reused_runner_with_clip_denoised(fake_capture, name):
    """`clip_denoised` is baked into a captured step: another value is another graph (before, the
    runner replayed the unclipped step, hundreds off)."""
    model = shared()
    kw = dict(schedule=Schedule.weak_first(4, 2, weak=4, powerful=2), guidance=Guidance(1.5, "cfg"),
              seed=2, progress=False)
    runner, captures = GraphRunner(), []
    for clip in (False, True, False):
        graphed = sample(model, [1, 7], sampler=make_sampler(name, 4, clip_denoised=clip), cuda_graphs=runner, **kw)
        assert torch.equal(graphed, sample(model, [1, 7], sampler=make_sampler(name, 4, clip_denoised=clip), **kw))
        captures.append(runner.captures)
    assert captures[0] > 0 and captures == [captures[0], 2 * captures[0], 2 * captures[0]]


def test_reused_runner_with_a_new_lora_scale(fake_capture):
    """A model setting read as a constant (a LoRA scale) is part of the key."""
    torch.manual_seed(0)
    model = randomize_(FlexiDiT(**TINY).flexify((2, 4), adapter="lora", lora_rank=4), seed=3, std=0.2).eval()
    loop = DenoisingLoop(model, torch.tensor([1, 7]), Schedule.static(3, 4), None, make_sampler("ddim", 3))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    runner = GraphRunner()
    assert torch.equal(runner.run(loop, x, None), _eager(loop, x))
    for module in model.modules():
        if isinstance(module, fk.flexi.layers.LoRALinear):
            module.lora_scale["4x4"] = 3.0
    assert torch.equal(runner.run(loop, x, None), _eager(loop, x))
    assert runner.captures == 2


def test_state_of():
    """Host tensors count by value, static ones by metadata, objects by all their attributes."""
    state = graphs.state_of
    a, b = torch.arange(4.0), torch.arange(4.0) + 1
    assert state(a) == state(torch.arange(4.0)) != state(b)
    assert state(a, frozenset({id(a)})) == state(b, frozenset({id(b)})) != state(a[:3], frozenset({id(a)}))
    sampler, other = make_sampler("ddim", 5), make_sampler("ddim", 5)
    assert state(sampler) == state(other) and hash(state(sampler)) == hash(state(other))
    other.clip_denoised = True
    assert state(sampler) != state(other)
    other = make_sampler("ddim", 5)
    other.note = {"extra": [1.5, (2, "x")]}   # any attribute, however nested
    assert state(sampler) != state(other)


# ----------------------------------------------------------------------------- model library (review)

def test_a_warm_model_pickles_and_copies_without_its_caches():
    """`torch.save(model)` (pickle) after a forward with a label tensor failed ("cannot pickle
    'weakref.ReferenceType'": the checked-labels memo); a copy carries no derived cache."""
    import copy
    import io
    import pickle
    model = shared()
    x, t, y = batch()
    expected, packed = model(x, t, y, patch_size=2), model.forward_packed(list(x), t, y, [2, 4, 2])
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert clone._checked_labels == [] and clone.__dict__.get("_packings", {}) == {}
        assert torch.equal(clone(x, t, y, patch_size=2), expected)
        for a, b in zip(clone.forward_packed(list(x), t, y, [2, 4, 2]), packed):
            assert torch.equal(a, b)
    assert model._checked_labels and model._packings   # the original keeps its own


def test_host_labels_written_through_data_are_checked_again():
    """A label tensor validated once, then changed through `.data` (which bumps no version): the
    next forward raised a raw IndexError from the embedding (trusted stale check)."""
    model = shared()
    x, t, y = batch()
    model(x, t, y)
    y.data[0] = 55
    with pytest.raises(ValueError, match=r"y: labels \[55\] out of range; expected 0..9"):
        model(x, t, y)


def test_a_cached_table_modified_by_a_caller_is_rebuilt():
    """`model.pos_embed(...)` and the resize matrices are shared cached tensors: a caller's
    in-place edit (`pe += ...`) changed every later forward. Now the edited tensor is never
    returned again."""
    model = shared()
    x, t, y = batch()
    expected = fresh_copy(model)(x, t, y, patch_size=2)
    model.pos_embed((8, 8), PatchSize.parse(2)).mul_(3)
    resize.pi_resize_matrix((4, 4), (2, 2)).zero_()
    assert torch.equal(model(x, t, y, patch_size=2), expected)
    assert resize.pi_resize_matrix((4, 4), (2, 2)).abs().sum() > 0


def test_two_threads_share_one_model_packing_cache():
    """Threads running one model evict from one packing cache: two evicting the same oldest
    layout raised KeyError (forced here with a tiny switch interval); then a packed forward from
    several threads equals the single-threaded one."""
    import sys
    import threading
    model = shared()
    errors = []

    def run(target, *args):
        threads = [threading.Thread(target=target, args=(k, *args)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def evict(k):
        try:
            for i in range(4000):
                model._cached_packing((k, i), lambda: (i,))
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run(evict)
    finally:
        sys.setswitchinterval(interval)
    assert not errors and len(model._packings) == 16
    x, t, y = batch(n=2)
    expected = model.forward_packed(list(x), t, y, [4, 2])
    results = []
    run(lambda k: results.append(model.forward_packed(list(x), t, y, [4, 2])))
    assert len(results) == 4 and all(torch.equal(a, b) for out in results for a, b in zip(out, expected))


def test_latte_reads_its_temporal_setting_per_call_and_checks_it():
    """`config["enable_temporal_attentions"]` edited after construction: False is applied, a
    non-bool ("no", truthy) is refused instead of silently running the temporal blocks."""
    model = tiny_latte()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([3, 700]), _text(n=2)
    off = model(x, t, y, enable_temporal_attentions=False)
    model.config["enable_temporal_attentions"] = False
    assert torch.equal(model(x, t, y), off)
    model.config["enable_temporal_attentions"] = "no"
    with pytest.raises(ValueError, match=r"config\['enable_temporal_attentions'\]='no': expected True or False"):
        model(x, t, y)


@pytest.mark.parametrize("setting", ["autocast", "matmul_precision"])
def test_reused_runner_after_a_global_torch_setting(fake_capture, setting):
    """Autocast and the float32 matmul precision choose the kernels a graph captures: sampling
    under another setting recaptures instead of replaying (before: one capture, replayed)."""
    import contextlib
    model = shared()
    loop = DenoisingLoop(model, torch.tensor([1, 7]), Schedule.static(3, 4), None, make_sampler("ddim", 3))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    runner = GraphRunner()
    runner.run(loop, x, None)
    previous = torch.get_float32_matmul_precision()
    changed = (torch.autocast("cpu", dtype=torch.bfloat16) if setting == "autocast"
               else contextlib.nullcontext(torch.set_float32_matmul_precision("medium")))
    try:
        with changed:
            runner.run(loop, x, None)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert runner.captures == 2
    runner.run(loop, x, None)   # back to the first setting: its graph again
    assert runner.captures == 2
