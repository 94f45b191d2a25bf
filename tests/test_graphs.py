"""CUDA graphs per patch-size phase (`flexikern.runtime.graphs`) and `sample(..., cuda_graphs=True)`.

CPU: the phase plan and cache keys (pure functions), the runner's static-buffer step run eagerly
equals plain sampling bit for bit, the once-per-process warning, `noise_device`. CUDA (skipped
without a GPU): graphed sampling equals eager within dtype tolerance, and repeated sampling
replays without recapturing.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

import flexikern as fk
from flexikern.diffusion import DenoisingLoop, Guidance, Schedule, make_sampler, sample
from flexikern.models import FlexiDiT
from flexikern.runtime import graphs
from flexikern.runtime.graphs import GraphRunner, graph_key, plan_phases



def tiny(seed=0, device="cpu", dtype=torch.float32, learn_sigma=True):
    """A 2-block flexible DiT with random non-zero weights (adaLN and outputs included)."""
    torch.manual_seed(seed)
    m = FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 num_classes=10, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    m.flexify((2, 4), adapter="lora")
    with torch.no_grad():   # LoRA B starts at zero: make the weak mode differ from the pooled one
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return m.to(device=device, dtype=dtype).eval()


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(graphs, "_warned_cpu", False)


def key(cond, guid, rule="cfg", guidance=Guidance(1.5, "flexi"), batch=2, dtype=torch.float32):
    return graph_key(cond, guid, rule=rule, guidance=guidance, batch=batch, state_dtype=torch.float32,
                     model_dtype=dtype, sampler=("DDPMSampler", True, 7), device="cuda:0")


# ---------------------------------------------------------------- pure functions

def test_cache_keys():
    assert key((2, 2), (4, 4)) == key((2, 2), (4, 4))
    assert hash(key((2, 2), (4, 4))) == hash(key((2, 2), (4, 4)))
    different = [key((4, 4), (4, 4)), key((2, 2), (2, 2)), key((2, 2), (4, 4), batch=8),
                 key((2, 2), (4, 4), dtype=torch.bfloat16), key((2, 2), (4, 4), rule="weak"),
                 key((2, 2), (4, 4), guidance=Guidance(4.0, "flexi")),
                 key((2, 2), (4, 4), guidance=Guidance(1.5, "cfg"))]
    assert len({key((2, 2), (4, 4)), *different}) == len(different) + 1
    # A conditional-only step does not depend on the guidance settings: one graph serves all.
    assert key((2, 2), None, rule="cond") == key((2, 2), (4, 4), rule="cond", guidance=Guidance(4.0, "cfg"))
    assert key((2, 2), None, rule="cond").guid_size is None


def test_plan_phases_min_steps_and_shared_keys():
    phases = [(0, 3, (4, 4), (4, 4)), (3, 4, (2, 2), (4, 4)), (4, 6, (2, 2), None), (6, 9, (4, 4), (4, 4))]
    plan = plan_phases(phases, lambda c, g: key(c, g, rule="cond" if g is None else "cfg"), min_phase_steps=2)
    assert [(s, e) for s, e, _ in plan] == [(0, 3), (3, 4), (4, 6), (6, 9)]
    assert plan[1][2] is None                       # one step: eager
    assert plan[0][2] == plan[3][2] is not None     # the same sizes again: the same graph
    assert plan[2][2].rule == "cond"
    everything_eager = plan_phases(phases, key, graphable=lambda k: False)
    assert all(k is None for _, _, k in everything_eager)


def test_phases_of_a_flexi_schedule(model):
    """A weak-first schedule with separate guidance counts is three phases with distinct keys."""
    sched = Schedule.weak_first(10, 4, weak=4, powerful=2, guidance_weak_steps=7)
    loop = DenoisingLoop(model, torch.tensor([1, 2]), sched, Guidance(1.5, "flexi"), make_sampler("ddpm", 10))
    x = torch.zeros(2, 4, 8, 8)
    runner = GraphRunner()
    keys = [runner.key(loop, x, c, g) for _, _, c, g in loop.phases]
    assert [(s, e) for s, e, _, _ in loop.phases] == [(0, 4), (4, 7), (7, 10)]
    assert [k.rule for k in keys] == ["cfg", "weak", "cfg"]
    assert len(set(keys)) == 3


def test_bad_runner_arguments():
    with pytest.raises(ValueError, match="max_graphs"):
        GraphRunner(max_graphs=-1)
    with pytest.raises(ValueError, match="min_phase_steps"):
        GraphRunner(min_phase_steps=0)


# ---------------------------------------------------------------- CPU: eager with the same results

@pytest.mark.parametrize("guidance", [Guidance(1.5, "flexi"), Guidance(3.0, "cfg"), None,
                                      Guidance(2.0, "flexi", interval=(0, 600))], ids=str)
def test_cpu_graphed_equals_eager(model, guidance, fresh_warning):
    sched = Schedule.weak_first(8, 3, weak=4, powerful=2, guidance_weak_steps=5)
    kw = dict(schedule=sched, guidance=guidance, seed=3, progress=False)
    eager = sample(model, [1, 7, 10], **kw)
    runner = GraphRunner(min_phase_steps=1)   # every phase through the static-buffer step
    with pytest.warns(RuntimeWarning, match="eagerly"):
        graphed = sample(model, [1, 7, 10], cuda_graphs=runner, **kw)
    assert torch.equal(graphed, eager)
    assert runner.eager_steps == 8 and runner.captures == 0 and len(runner) == 0
    # Through the default runner (short phases run by the plain loop), and for DDIM.
    assert torch.equal(sample(model, [1, 7, 10], cuda_graphs=True, **kw), eager)
    for other in (make_sampler("ddim", 8, eta=0.5), make_sampler("flow", 8)):   # stochastic or not
        kw_other = dict(kw, sampler=other)
        assert torch.equal(sample(model, [1, 7, 10], cuda_graphs=runner, **kw_other),
                           sample(model, [1, 7, 10], **kw_other))


class FakeGraph:
    """Stands in for a captured CUDA graph on CPU: replay() runs the step it was 'captured' from."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        self.replays += 1
        self.step()

    def reset(self):
        self.step = None


def test_caching_logic_with_a_fake_capture(monkeypatch):
    """The runner's cache on CPU: static buffers reused across runs with new labels and seeds
    (results still equal plain sampling), the LRU bound; weights changed in place are read live
    (no recapture), new parameter storage recaptures."""
    def capture(entry, pool, warmup):
        entry.graph = FakeGraph(entry._step)
    monkeypatch.setattr(graphs._PhaseGraph, "capture", capture)
    monkeypatch.setattr(GraphRunner, "_can_capture", lambda self, x: True)
    monkeypatch.setattr(GraphRunner, "_new_pool", lambda self: "pool")
    model = tiny(seed=1)
    sched = Schedule.weak_first(6, 2, weak=4, powerful=2, guidance_weak_steps=4)
    kw = dict(schedule=sched, guidance=Guidance(1.5, "flexi"), progress=False)
    runner = GraphRunner()
    for labels, seed in (([1, 7, 10], 3), ([4, 4, 0], 9)):
        graphed = sample(model, labels, seed=seed, cuda_graphs=runner, **kw)
        assert torch.equal(graphed, sample(model, labels, seed=seed, **kw))
    assert runner.captures == 3 and runner.replays == 12 and runner.eager_steps == 0
    assert [k.rule for k in runner.keys()] == ["cfg", "weak", "cfg"]
    # The LRU bound: with room for one graph, phases evict each other and results stay right.
    small = GraphRunner(max_graphs=1)
    assert torch.equal(sample(model, [3, 1, 2], seed=5, cuda_graphs=small, **kw),
                       sample(model, [3, 1, 2], seed=5, **kw))
    assert small.captures == 3 and len(small) == 1
    # A phase of one step runs eagerly.
    short = Schedule.weak_first(3, 1, weak=4, powerful=2)
    one = GraphRunner()
    assert torch.equal(sample(model, [1], seed=0, cuda_graphs=one, schedule=short, progress=False),
                       sample(model, [1], seed=0, schedule=short, progress=False))
    assert one.eager_steps == 1 and one.replays == 2 and one.captures == 1
    # Weights changed in place: the graphs read them live, nothing to recapture.
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight.mul_(0.5)
    after = sample(model, [1, 7, 10], seed=3, cuda_graphs=runner, **kw)
    assert runner.captures == 3 and torch.equal(after, sample(model, [1, 7, 10], seed=3, **kw))
    # A parameter with new storage: the graphs read the old address, so they are recaptured.
    model.blocks[1].attn.qkv.weight.data = model.blocks[1].attn.qkv.weight.data * 0.5
    after = sample(model, [1, 7, 10], seed=3, cuda_graphs=runner, **kw)
    assert runner.captures == 6 and torch.equal(after, sample(model, [1, 7, 10], seed=3, **kw))
    runner.release()
    assert len(runner) == 0 and runner.keys() == []


def test_runner_inputs_are_the_declared_conditions_only(monkeypatch):
    """The static inputs are the denoiser's declared `conditions`: a tensor attribute it does not
    declare is not a static buffer but a constant of the graphs, so part of the key (a new value
    recaptures)."""
    def capture(entry, pool, warmup):
        entry.graph = FakeGraph(entry._step)
    monkeypatch.setattr(graphs._PhaseGraph, "capture", capture)
    monkeypatch.setattr(GraphRunner, "_can_capture", lambda self, x: True)
    monkeypatch.setattr(GraphRunner, "_new_pool", lambda self: "pool")
    model = tiny(seed=2)
    sched = Schedule.weak_first(4, 2, weak=4, powerful=2)
    loop = DenoisingLoop(model, torch.tensor([1, 7]), sched, Guidance(1.5, "cfg"), make_sampler("ddim", 4))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        eager = x
        for start, stop, cond_size, guid_size in loop.phases:
            for k in range(start, stop):
                eager = loop.step(eager, k, None, cond_size, guid_size)
    loop.denoiser.scratch = torch.zeros(3)   # undeclared: not an input of the graphs
    runner = GraphRunner()
    assert torch.equal(runner.run(loop, x, None), eager)
    declared = ["y", "y_cfg", "y_null", "y_weak"]
    assert sorted(loop.denoiser.conditions) == declared
    assert all([name for name, _ in k.conditions] == declared for k in runner.keys())
    assert all(sorted(entry.conditions) == declared for entry in runner._graphs.values())
    loop.denoiser.scratch = torch.zeros(3)   # the same value: the same graphs
    assert torch.equal(runner.run(loop, x, None), eager)
    assert runner.captures == 2 and runner.replays == 8
    loop.denoiser.scratch = torch.ones(3)    # another value: other graphs
    assert torch.equal(runner.run(loop, x, None), eager)
    assert runner.captures == 4 and runner.replays == 12


def test_text_conditions_rebound_with_a_fake_capture(monkeypatch):
    """A text-conditioned model: the TextCondition's tensors are static buffers refilled per run,
    and their shapes are part of the key (a longer caption is another graph)."""
    from test_pixart import text, tiny_flexi   # skips without diffusers
    def capture(entry, pool, warmup):
        entry.graph = FakeGraph(entry._step)
    monkeypatch.setattr(graphs._PhaseGraph, "capture", capture)
    monkeypatch.setattr(GraphRunner, "_can_capture", lambda self, x: True)
    monkeypatch.setattr(GraphRunner, "_new_pool", lambda self: "pool")
    model, _ = tiny_flexi()
    kw = dict(schedule=Schedule.weak_first(4, 2, weak=4, powerful=2), guidance=Guidance(2.0, "cfg"),
              progress=False, seed=0)
    runner = GraphRunner()
    for seed in (0, 1):
        y = text(n=2, seed=seed)
        assert torch.equal(sample(model, y, cuda_graphs=runner, **kw), sample(model, y, **kw))
    assert runner.captures == 2
    longer = text(n=2, length=7, seed=2)
    assert torch.equal(sample(model, longer, cuda_graphs=runner, **kw), sample(model, longer, **kw))
    assert runner.captures == 4


def test_cpu_warning_once(model, fresh_warning):
    sched = Schedule.static(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            sample(model, [1], sched, progress=False, cuda_graphs=True)
    messages = [w for w in caught if "cuda_graphs=True" in str(w.message)]
    assert len(messages) == 1 and "cpu" in str(messages[0].message)


def test_noise_device(model):
    sched = Schedule.weak_first(4, 2, weak=4, powerful=2)
    kw = dict(schedule=sched, guidance=Guidance(1.5, "flexi"), progress=False)
    a = sample(model, [1, 2], seed=1, noise_device="model", **kw)
    assert torch.equal(a, sample(model, [1, 2], seed=1, noise_device="model", **kw))
    # One batch generator: a different noise stream from the per-sample default.
    assert not torch.allclose(a, sample(model, [1, 2], seed=1, **kw))
    with pytest.raises(ValueError, match="noise_device='gpu'"):
        sample(model, [1], seed=1, noise_device="gpu", **kw)


# ---------------------------------------------------------------- CUDA

def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=str)
def test_cuda_graphed_equals_eager_and_no_recapture(dtype, tol):
    model = tiny(device="cuda", dtype=dtype)
    sched = Schedule.weak_first(12, 4, weak=4, powerful=2, guidance_weak_steps=7)
    kw = dict(schedule=sched, guidance=Guidance(1.5, "flexi"), progress=False)
    eager = sample(model, [1, 7, 10], seed=3, **kw)
    runner = GraphRunner()
    graphed = sample(model, [1, 7, 10], seed=3, cuda_graphs=runner, **kw)
    assert runner.captures == 3 and len(runner) == 3 and runner.replays == 12
    assert graphed.dtype == eager.dtype and graphed.device == eager.device
    assert _relative_error(graphed, eager) < tol
    # Again, with new labels and seeds: replays only, and still the eager result.
    again = sample(model, [4, 4, 9], seed=11, cuda_graphs=runner, **kw)
    assert runner.captures == 3 and runner.replays == 24
    assert _relative_error(again, sample(model, [4, 4, 9], seed=11, **kw)) < tol
    # The result is a fresh tensor, not a static buffer the next run overwrites.
    before = again.clone()
    sample(model, [0, 1, 2], seed=0, cuda_graphs=runner, **kw)
    assert torch.equal(again, before)
    # Weights changed in place (an optimizer step, an EMA swap through `.data`, the kernel a weak
    # size resizes): the graphs read them live, no recapture.
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.mul_(1.5)
    model.x_embedder.weight["4x4"].data.mul_(2)
    changed = sample(model, [1, 7, 10], seed=3, cuda_graphs=runner, **kw)
    assert runner.captures == 3
    assert _relative_error(changed, sample(model, [1, 7, 10], seed=3, **kw)) < tol
    # New storage for a parameter: the runner recaptures instead of reading the old address.
    model.blocks[0].mlp.fc1.weight.data = model.blocks[0].mlp.fc1.weight.data * 0.5
    changed = sample(model, [1, 7, 10], seed=3, cuda_graphs=runner, **kw)
    assert runner.captures == 6
    assert _relative_error(changed, sample(model, [1, 7, 10], seed=3, **kw)) < tol
    runner.release()
    assert len(runner) == 0


@pytest.mark.gpu
def test_cuda_lru_bound_and_default_runner():
    model = tiny(device="cuda")
    kw = dict(schedule=Schedule.static(3, 2), guidance=Guidance(1.5, "cfg"), progress=False)
    runner = GraphRunner(max_graphs=2)
    for batch in (1, 2, 3):
        sample(model, list(range(batch)), cuda_graphs=runner, **kw)
    assert runner.captures == 3 and len(runner) == 2
    assert [k.batch for k in runner.keys()] == [2, 3]
    graphs.release_graphs(model)
    sample(model, [1], cuda_graphs=True, **kw)
    sample(model, [2], cuda_graphs=True, **kw)
    assert graphs.runner_for(model).captures == 1
    # The default runner does not keep its model alive: both go together.
    alive, registered = weakref.ref(model), len(graphs._RUNNERS)
    del model
    gc.collect()
    assert alive() is None and len(graphs._RUNNERS) == registered - 1


@pytest.mark.gpu
def test_cuda_noise_on_device_graphed():
    model = tiny(device="cuda")
    kw = dict(schedule=Schedule.weak_first(6, 3, weak=4, powerful=2), guidance=Guidance(1.5, "flexi"),
              progress=False, noise_device="model", seed=2)
    eager = sample(model, [1, 2], **kw)
    graphed = sample(model, [1, 2], cuda_graphs=GraphRunner(), **kw)
    assert _relative_error(graphed, eager) < 1e-4


def test_public_name():
    assert fk.runtime.graphs.GraphRunner is GraphRunner
