"""No host synchronisation inside a denoising step after the first (`fk.sample`).

A step of `fk.sample` must not read anything back from the device, nor copy host data into a
tensor: either one stalls the host until the GPU catches up, so the next step's kernels are not
queued while the current ones run. The first step may (it builds the cached packings, resized
kernels and tables and validates inputs); every later one may not.

On CPU this is checked with `NoSync`, a `TorchFunctionMode` that raises on every call that reads
tensor values on the host (`.item()`, `bool(t)`, `nonzero`, boolean masks, ...) or builds a tensor
from host data (`torch.tensor(list)`), armed after the first step by wrapping
`DenoisingLoop.step`. Every tensor is a CPU tensor here, so the rule is strict: during a step no
such call may happen at all, whatever the device; host bookkeeping uses Python numbers. Every
model family runs, packed and unpacked, with and without guidance, with static and mixed
schedules, stochastic (DDPM: noise is drawn between steps, inside the guard) and deterministic
(DDIM). On a GPU, `test_no_sync_on_cuda` checks the same with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from types import ModuleType

import pytest
import torch
from torch.overrides import TorchFunctionMode

import flexikern as fk
from flexikern.diffusion import DenoisingLoop, Guidance, Schedule
from flexikern.flexi import pos_embed
from flexikern.models import FlexiDiT, FlexiLatte, FlexiPixArt, TextCondition
from flexikern.ops import resize


class HostSync(RuntimeError):
    """A host synchronisation (or host-to-device copy) inside an armed `NoSync`."""


# Calls that read tensor values on the host (a device-to-host copy on a GPU), whatever their
# arguments: scalars and lists, Python conversions, the data-dependent shapes of nonzero, unique
# and bincount, whole-tensor comparisons.
_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__",
          "__format__", "__array__", "__contains__", "cpu", "numpy", "equal", "allclose",
          "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}


def _names_a_device(value) -> bool:
    """An argument of `Tensor.to` that moves the tensor: a device (or its name), or a tensor."""
    return isinstance(value, (str, torch.device, torch.Tensor))


def _index_reads(index) -> bool:
    """Whether indexing with `index` reads values on the host: a boolean mask (its nonzero), a
    0-dim tensor (its value) or a Python list (copied into an index tensor)."""
    for part in index if isinstance(index, tuple) else (index,):
        if isinstance(part, list):
            return True
        if isinstance(part, torch.Tensor) and (part.dtype in (torch.bool, torch.uint8) or part.dim() == 0):
            return True
    return False


def sync_reason(func, args, kwargs) -> str | None:
    """Why calling `func(*args, **kwargs)` synchronises with (or copies from) the host; None if not."""
    name = getattr(func, "__name__", "")
    if name in _READS:
        return "reads tensor values on the host"
    if name in ("tensor", "as_tensor") and args and not isinstance(args[0], torch.Tensor):
        return "copies host data into a tensor (a host-to-device copy on a GPU)"
    if name == "cuda" or (name == "to" and (any(map(_names_a_device, args[1:])) or "device" in kwargs)):
        return "moves a tensor between devices (inside a step tensors are already where they are used)"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "torch.where(condition) is nonzero"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
        if isinstance(repeats, torch.Tensor):
            return "repeat_interleave with tensor repeats and no output_size sums them on the host"
    if name in ("__getitem__", "__setitem__") and len(args) > 1 and _index_reads(args[1]):
        return "indexing with a boolean mask, a 0-dim tensor or a list reads or copies host values"
    return None


def _call_site() -> str:
    """Where the offending call was made: the innermost frame outside torch and the guard."""
    for frame in reversed(traceback.extract_stack()[:-2]):   # without this frame and the guard's
        if "/torch/" not in frame.filename.replace(os.sep, "/"):
            return f"{frame.filename}:{frame.lineno} ({frame.name}): {frame.line}"
    return "unknown"


class NoSync(TorchFunctionMode):
    """Raises `HostSync` on every call of `sync_reason` while `armed` (and counts what it let pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.armed:
            self.calls += 1
            reason = sync_reason(func, args, kwargs)
            if reason is not None:
                name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
                raise HostSync(f"{name} inside a denoising step: {reason}; called at {_call_site()}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def armed_after_first_step(monkeypatch, arm, disarm):
    """Call `arm()` after the first `DenoisingLoop.step` and `disarm()` at exit; yields the list of
    the steps run (0, 1, ...)."""
    steps = []
    step = DenoisingLoop.step

    def counting(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append(len(steps))
        if len(steps) == 1:
            arm()
        return out

    monkeypatch.setattr(DenoisingLoop, "step", counting)
    try:
        yield steps
    finally:
        disarm()


@contextlib.contextmanager
def no_sync_after_first_step(monkeypatch):
    """`NoSync` around the block, armed from the end of the first denoising step to the end."""
    guard = NoSync()
    with guard, armed_after_first_step(monkeypatch, lambda: setattr(guard, "armed", True),
                                       lambda: setattr(guard, "armed", False)) as steps:
        yield guard, steps


# ----------------------------------------------------------------------------- tiny models

def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_dit():
    model = _randomize(FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                num_heads=2, num_classes=10))
    return model.flexify((2, 4), lora_rank=4).eval()


def tiny_pixart():
    model = _randomize(FlexiPixArt(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                   num_heads=2, caption_channels=24, text_len=5))
    return model.flexify((2, 4), lora_rank=4).eval()


def tiny_latte():
    model = _randomize(FlexiLatte(input_size=8, num_frames=4, patch_size=(1, 2, 2), in_channels=4,
                                  hidden_size=32, depth=1, num_heads=2, caption_channels=24, text_len=5))
    return model.flexify([(1, 2, 2), (2, 2, 2), (1, 4, 4)], lora_rank=4).eval()


def _text(n=2, length=5, masked=True):
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(n, length, dtype=torch.bool)
    if masked:
        mask[0, 3:] = False
    return TextCondition(torch.randn(n, length, 24, generator=g), mask)


# family: (model builder, condition, weak size, powerful size)
FAMILIES = {
    "dit": (tiny_dit, lambda: [1, 7], 4, 2),
    "pixart": (tiny_pixart, _text, 4, 2),
    "latte": (tiny_latte, _text, (2, 2, 2), (1, 2, 2)),
}


def cold_caches(*modules: ModuleType) -> None:
    """Empty the modules' functools caches (positional tables, resize matrices): the guarded run
    must build everything it needs itself, as in a fresh process. Models (their packings and
    resized kernels) are built fresh per test."""
    for module in modules:
        for value in vars(module).values():
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def _schedule(kind, weak, powerful, steps=5):
    if kind == "static":
        return Schedule.static(steps, powerful)
    # Both branches weak, then the conditional one powerful with a weak guidance branch (two
    # sizes in one step: the packed two-pass forward), then both powerful.
    return Schedule.weak_first(steps, 2, weak=weak, powerful=powerful, guidance_weak_steps=4)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("schedule", ["mixed", "static"])
@pytest.mark.parametrize("guidance", ["none", "cfg", "flexi"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_sync_after_the_first_step(monkeypatch, family, packed, guidance, schedule, sampler):
    build, condition, weak, powerful = FAMILIES[family]
    model, sched = build(), _schedule(schedule, weak, powerful)
    g = None if guidance == "none" else Guidance(2.0, guidance)
    forward_packed, packed_calls = model.forward_packed, []

    def counted(*args, **kwargs):
        packed_calls.append(1)
        return forward_packed(*args, **kwargs)

    monkeypatch.setattr(model, "forward_packed", counted)
    cold_caches(pos_embed, resize)
    with no_sync_after_first_step(monkeypatch) as (guard, steps):
        out = fk.sample(model, condition(), sched, g, sampler=sampler, seed=3, progress=False, packed=packed)
    assert steps == list(range(sched.num_steps)) and guard.calls > 0
    # The packed two-pass forward ran (steps 2 and 3, armed) exactly where a step has two sizes.
    assert len(packed_calls) == (2 if packed and schedule == "mixed" and guidance != "none" else 0)
    monkeypatch.undo()
    expected = fk.sample(model, condition(), sched, g, sampler=sampler, seed=3, progress=False, packed=packed)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)   # the guard changes nothing


def test_the_guard_catches_a_planted_sync(monkeypatch):
    """A model that reads a value back at its second step fails the check, naming the call."""
    model = tiny_dit()
    forward, calls = model.forward, []

    def planted(x, t, y, patch_size=None):
        calls.append(1)
        if len(calls) == 2:
            t.max().item()
        return forward(x, t, y, patch_size=patch_size)

    monkeypatch.setattr(model, "forward", planted)
    with pytest.raises(HostSync, match=r"item inside a denoising step.*\(planted\): t\.max\(\)\.item\(\)"):
        with no_sync_after_first_step(monkeypatch):
            fk.sample(model, [1, 2], Schedule.static(3, 2), None, sampler="ddim", progress=False)
    assert len(calls) == 2


_x = torch.arange(6.0)
_i = torch.arange(3)


HOST_READS = {
    "item": lambda: _x[0].item(), "tolist": lambda: _x.tolist(), "bool": lambda: bool(_x[0]),
    "int": lambda: int(_x[1]), "float": lambda: float(_x[0]), "index": lambda: [1, 2, 3][_i[1]],
    "format": lambda: f"{_x[0]}", "nonzero": lambda: _x.nonzero(), "torch.nonzero": lambda: torch.nonzero(_x),
    "where(condition)": lambda: torch.where(_x > 2), "cpu": lambda: _x.cpu(), "numpy": lambda: _x.numpy(),
    "to('cpu')": lambda: _x.to("cpu"), "to(device=)": lambda: _x.to(device=torch.device("cpu")),
    "equal": lambda: torch.equal(_x, _x), "allclose": lambda: torch.allclose(_x, _x),
    "unique": lambda: torch.unique(_x), "bincount": lambda: torch.bincount(_i),
    "mask index": lambda: _x[_x > 2], "masked_select": lambda: _x.masked_select(_x > 2),
    "list index": lambda: _x[[0, 1]], "0-dim index": lambda: _x[torch.tensor(1)],
    "repeat_interleave": lambda: torch.repeat_interleave(_i, _i),
    "Tensor.repeat_interleave": lambda: _i.repeat_interleave(_i),
    "tensor(list)": lambda: torch.tensor([1, 2]),
}


@pytest.mark.parametrize("call", list(HOST_READS.values()), ids=list(HOST_READS))
def test_the_guard_raises_on_every_host_read(call):
    with NoSync() as guard:
        call()   # unarmed: passes
        guard.armed = True
        with pytest.raises(HostSync):
            call()


def test_the_guard_lets_device_work_pass():
    with NoSync() as guard:
        guard.armed = True
        _x.to(torch.float64), _x[_i], _x[1:3], _x[None, 0], torch.where(_x > 2, _x, 0 * _x)
        _i.repeat_interleave(2), torch.repeat_interleave(_i, _i, output_size=3), _x.unbind(0)
        torch.randn(3, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("noise_device", ["model", "cpu"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
def test_no_sync_on_cuda(monkeypatch, packed, noise_device):
    """`torch.cuda.set_sync_debug_mode("error")` from the end of the first step to the last.

    The debug mode raises on synchronising CUDA calls: device-to-host copies (`.item()`,
    `nonzero`, ...), blocking host-to-device copies from pageable memory (`torch.tensor(list,
    device=cuda)`) and stream or device synchronisation. Both noise paths are run.
    `noise_device="model"` draws on the device. The default "cpu" draws per-sample on the host
    into a pinned buffer and copies it with `non_blocking=True` (not a synchronising copy); before
    refilling that buffer it waits on a CUDA event for the previous step's copy. `Event.synchronize`
    is not among the calls the debug mode reports, and it waits only for a copy queued a step
    earlier (so the host stays up to one step ahead of the GPU instead of arbitrarily far).
    """
    model = tiny_dit().cuda()
    sched = _schedule("mixed", 4, 2)
    g = Guidance(2.0, "flexi")
    previous = torch.cuda.get_sync_debug_mode()
    with armed_after_first_step(monkeypatch, lambda: torch.cuda.set_sync_debug_mode("error"),
                                lambda: torch.cuda.set_sync_debug_mode(previous)) as steps:
        out = fk.sample(model, [1, 7], sched, g, seed=3, progress=False, packed=packed,
                        noise_device=noise_device)
    assert steps == list(range(sched.num_steps)) and torch.cuda.get_sync_debug_mode() == previous
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
