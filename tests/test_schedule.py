"""Patch-size schedules: constructors, validation, the paper's x/y notation, FLOPs and for_budget."""

from __future__ import annotations

import itertools

import pytest

from flexikern.diffusion import Schedule
from flexikern.ops.patch_size import PatchSize


class CostModel:
    """Only what a schedule needs from a model: sizes and FLOPs (weak step = `ratio` of a powerful one)."""

    def __init__(self, ratio=0.245, patch_sizes=((2, 2), (4, 4)), base=1000):
        self.patch_sizes = tuple(PatchSize.parse(p) for p in patch_sizes)
        self.original_patch_size = PatchSize.parse(2)
        self.costs = {(2, 2): base, (4, 4): int(base * ratio), (8, 8): int(base * ratio / 4)}

    def flops(self, patch_size, batch=1):
        return self.costs[tuple(patch_size)] * batch


def test_static_and_weak_first():
    s = Schedule.static(5, 2)
    assert s.cond == ((2, 2),) * 5 and s.guidance == s.cond and s.notation == "5/5"
    assert repr(s) == "Schedule.static(5, (2, 2))"
    w = Schedule.weak_first(10, 4, weak=4, powerful=(2, 2), guidance_weak_steps=6)
    assert w.cond == ((4, 4),) * 4 + ((2, 2),) * 6
    assert w.guidance == ((4, 4),) * 6 + ((2, 2),) * 4
    assert w.notation == "6/4" and repr(w) == "Schedule('6/4', steps=10, weak=(4, 4), powerful=(2, 2))"
    assert Schedule.weak_first(10, 4, 4, 2).guidance == Schedule.weak_first(10, 4, 4, 2).cond
    assert Schedule.weak_first(10, 0, 4, 2) == Schedule.static(10, 2)
    assert Schedule.weak_first(10, 10, 4, 2).notation == "10/10"   # static at the weak size


def test_notation_round_trip_and_weak_last():
    for x, y in [(130, 130), (90, 50), (30, 0), (250, 250)]:
        s = Schedule.from_notation(f"{x}/{y}", 250, weak=4, powerful=2)
        assert s.notation == f"{x}/{y}"
        assert sum(c == (2, 2) for c in s.cond) == x and sum(g == (2, 2) for g in s.guidance) == y
    assert Schedule.from_notation("7", 10, 4, 2) == Schedule.weak_first(10, 3, 4, 2)
    last = Schedule.weak_last(10, 3, weak=4, powerful=2)
    assert last.cond == ((2, 2),) * 7 + ((4, 4),) * 3
    with pytest.raises(ValueError, match="not a weak-first"):
        _ = last.notation
    assert "4x4*3" in repr(last)
    with pytest.raises(ValueError, match="notation='a/b'"):
        Schedule.from_notation("a/b", 10, 4, 2)
    with pytest.raises(ValueError, match="x .powerful conditional steps.=11"):
        Schedule.from_notation("11/3", 10, 4, 2)


def test_from_list_and_validation():
    s = Schedule.from_list([4, (4, 4), 2], guidance=[4, 4, (2, 2)])
    assert s.cond == ((4, 4), (4, 4), (2, 2)) and s.guidance == ((4, 4), (4, 4), (2, 2))
    assert Schedule.from_list([(2, 4), 2]).cond == ((2, 4), (2, 2))   # a pair is one (ph, pw) size
    with pytest.raises(ValueError, match="3 conditional sizes but 2 guidance"):
        Schedule.from_list([2, 2, 2], guidance=[2, 2])
    with pytest.raises(ValueError, match=r"cond\[1\]=.*positive int"):
        Schedule.from_list([2, 0])
    with pytest.raises(ValueError, match="steps=0"):
        Schedule.static(0, 2)
    with pytest.raises(ValueError, match="weak_steps=11"):
        Schedule.weak_first(10, 11, 4, 2)
    with pytest.raises(ValueError, match="guidance_weak_steps=-1"):
        Schedule.weak_first(10, 1, 4, 2, guidance_weak_steps=-1)
    with pytest.raises(ValueError, match=r"patch sizes \[\(8, 8\)\] but the model supports only \[\(2, 2\), \(4, 4\)\]"):
        Schedule.weak_first(10, 3, 8, 2).validate(CostModel())


def test_phases():
    s = Schedule.weak_first(6, 2, 4, 2, guidance_weak_steps=3)
    assert s.phases() == [(0, 2, (4, 4), (4, 4)), (2, 3, (2, 2), (4, 4)), (3, 6, (2, 2), (2, 2))]
    assert s.phases(False) == [(0, 2, (4, 4), None), (2, 6, (2, 2), None)]
    assert s.phases([True, False, False, True, True, True]) == [
        (0, 1, (4, 4), (4, 4)), (1, 2, (4, 4), None), (2, 3, (2, 2), None), (3, 6, (2, 2), (2, 2))]


def test_flops_and_relative_flops():
    m = CostModel()
    s = Schedule.weak_first(250, 120, 4, 2)
    assert s.flops(m, batch=3) == 3 * 2 * (120 * 245 + 130 * 1000)
    assert s.flops(m, guidance=False) == 120 * 245 + 130 * 1000
    # The paper's 130/130 point: (130 + 120 * 0.245) / 250 ~ 0.64 with guidance or without.
    assert s.relative_flops(m) == pytest.approx((130 + 120 * 0.245) / 250)
    assert s.relative_flops(m, guidance=False) == pytest.approx((130 + 120 * 0.245) / 250)
    mixed = Schedule.from_notation("90/50", 250, 4, 2)
    assert mixed.relative_flops(m) == pytest.approx((90 + 160 * 0.245 + 50 + 200 * 0.245) / 500)
    on = [k % 2 == 0 for k in range(250)]
    assert mixed.flops(m, guidance=on) == (90 * 1000 + 160 * 245
                                           + sum((1000 if k >= 200 else 245) for k in range(250) if on[k]))
    with pytest.raises(ValueError, match="250 bools"):
        mixed.flops(m, guidance=[True])


@pytest.mark.parametrize("equal_branches", [True, False])
@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("budget", [0.3, 0.46, 0.6, 0.64, 0.9, 1.0])   # > 1 is refused (test_sampling_boundary)
def test_for_budget_is_the_best_weak_first_schedule(budget, guidance, equal_branches):
    m, steps = CostModel(), 20
    s = Schedule.for_budget(m, steps, budget, guidance=guidance, equal_branches=equal_branches)
    assert s.relative_flops(m, guidance) <= budget + 1e-12
    # Brute force over every weak-first pair (x/x; or guidance weak >= conditional weak).
    best = max(((steps - wc) + (steps - wg) * guidance, steps - wc)
               for wc, wg in itertools.product(range(steps + 1), repeat=2)
               if (wg >= wc if guidance and not equal_branches else wg == wc)
               and Schedule.weak_first(steps, wc, 4, 2, wg).relative_flops(m, guidance) <= budget + 1e-12)
    powerful_c = sum(c == (2, 2) for c in s.cond)
    powerful_g = sum(g == (2, 2) for g in s.guidance)
    assert (powerful_c + powerful_g * guidance, powerful_c) == best
    if budget >= 1:
        assert s == Schedule.static(steps, 2)


def test_for_budget_defaults_to_the_verified_x_x_family():
    m = CostModel()
    s = Schedule.for_budget(m, 10, 0.6)      # the paper's x/x, the family flexikern eval verifies
    assert s == Schedule.for_budget(m, 10, 0.6, equal_branches=True)
    assert s.cond == s.guidance and s.notation == "4/4"   # (4 + 6 * 0.245) / 10 = 0.547; 5/5 costs 0.62
    # The "most powerful steps" rule, asked for explicitly: more powerful forwards, weak guidance.
    assert Schedule.for_budget(m, 10, 0.6, equal_branches=False).notation == "9/0"
    # What the shipped model's eval table has a row for: 20 DDIM steps at 0.6 -> "9/9" (0.585).
    s20 = Schedule.for_budget(m, 20, 0.6)
    assert s20.notation == "9/9" and s20.relative_flops(m) <= 0.6


def test_for_budget_errors_and_weak_choice():
    m = CostModel()
    with pytest.raises(ValueError, match="no weak-first schedule.*0.245"):
        Schedule.for_budget(m, 10, 0.2)
    with pytest.raises(ValueError, match="budget=0"):
        Schedule.for_budget(m, 10, 0)
    with pytest.raises(ValueError, match="no patch size larger"):
        Schedule.for_budget(CostModel(patch_sizes=((2, 2),)), 10, 0.5)
    # The default weak size is the next larger one; a weaker one can be asked for.
    three = CostModel(patch_sizes=((2, 2), (4, 4), (8, 8)))
    assert Schedule.for_budget(three, 10, 0.5).sizes == {(2, 2), (4, 4)}
    assert (8, 8) in Schedule.for_budget(three, 10, 0.1, weak=8).sizes
