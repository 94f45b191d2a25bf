"""Patch-size schedules: which patch size each denoising step runs, for each branch.

A `Schedule` is a validated per-step list of (conditional patch size, guidance patch size), in
sampling order (step 0 is the noisiest). FlexiDiT runs the weak (large) patch size for the first,
high-noise steps and the powerful (original) one for the rest; the paper writes a schedule as
"x/y": powerful for the last x conditional and the last y guidance steps.

Cost: a step costs F(p_cond) + F(p_guidance) with guidance and F(p_cond) without, where F is the
model's analytic forward FLOPs (`model.flops`). A schedule built for a budget (`for_budget`,
`calibrate`) records it and the guidance setting it assumed; `fk.sample` warns when a run (without
guidance, or with a guidance interval) would cost more than that budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from flexikern.ops._checks import check_flag, check_positive_int, is_finite, is_int, parse_counts
from flexikern.diffusion.calibrate import gap_profile, weak_size
from flexikern.ops.patch_size import PatchSize, PatchSizeLike

if TYPE_CHECKING:
    from flexikern.diffusion.protocol import FlexibleDenoiser

__all__ = ["Schedule", "Phase"]

Phase = tuple[int, int, PatchSize, "PatchSize | None"]
"""(start, stop, conditional patch size, guidance patch size or None): a run of steps."""


def _check_steps(steps: Any) -> int:
    return check_positive_int(steps, "steps")


def _check_budget(budget: Any) -> float:
    """`budget` as a float in (0, 1]: a fraction of the static schedule's FLOPs."""
    if is_finite(budget) and 0 < budget <= 1:
        return float(budget)
    hint = f"; {budget} looks like a percentage: pass {budget / 100:g}" if is_finite(budget) and 1 < budget <= 100 else ""
    raise ValueError(f"budget={budget!r}: expected a fraction in (0, 1] of the static schedule's FLOPs, "
                     f"e.g. 0.6{hint}")


def _weak_and_powerful(weak: PatchSizeLike, powerful: PatchSizeLike) -> tuple[PatchSize, PatchSize]:
    """Both parsed; raises if they are the same size (the schedule would be static)."""
    weak, powerful = PatchSize.parse(weak, name="weak"), PatchSize.parse(powerful, name="powerful")
    if weak == powerful:
        raise ValueError(f"weak={weak.name} == powerful={powerful.name}: a schedule of one size is static; "
                         f"pass a larger weak size, or use Schedule.static(steps, {powerful.name!r})")
    if weak.volume <= powerful.volume:
        raise ValueError(f"weak={weak.name} is not a larger patch than powerful={powerful.name}: the weak "
                         f"(cheaper) size has more pixels per patch; swap them, or use Schedule.from_list")
    return weak, powerful


def _check_sizes(sizes: Any, name: str) -> tuple:
    """A sequence of per-step patch sizes as a tuple; raises for a single size or a string."""
    if isinstance(sizes, (str, int, PatchSize)) or not isinstance(sizes, Iterable):
        raise TypeError(f"{name}={sizes!r}: expected a sequence of patch sizes, one per step, e.g. "
                        f"[4, 4, 2, 2]; for one size at every step use Schedule.static(steps, size)")
    return tuple(sizes)


def _check_count(value: Any, name: str, steps: int) -> int:
    if not is_int(value) or not 0 <= value <= steps:
        raise ValueError(f"{name}={value!r}: expected an int in [0, {steps}] (the schedule has {steps} steps)")
    return value


def _runs(sizes: Sequence[PatchSize]) -> list[tuple[PatchSize, int]]:
    runs: list[tuple[PatchSize, int]] = []
    for s in sizes:
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1] + 1)
        else:
            runs.append((s, 1))
    return runs


def _model_steps_flops(model: FlexibleDenoiser, sizes: Iterable[PatchSize], batch: int) -> int:
    cache: dict[PatchSize, int] = {}
    total = 0
    for s in sizes:
        if s not in cache:
            cache[s] = int(model.flops(s, batch=batch))
        total += cache[s]
    return total


@dataclass(frozen=True)
class Schedule:
    """Per-step (conditional, guidance) patch sizes; build with the class methods."""

    cond: tuple[PatchSize, ...]
    guidance: tuple[PatchSize, ...]
    # What `for_budget` / `calibrate` built it for (not part of its identity): the relative FLOPs,
    # and whether the guidance branch was counted. `fk.sample` warns when a run costs more.
    budget: float | None = field(default=None, compare=False)
    budget_guidance: bool | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        cond = tuple(PatchSize.parse(s, name=f"cond[{i}]") for i, s in enumerate(_check_sizes(self.cond, "cond")))
        guid = tuple(PatchSize.parse(s, name=f"guidance[{i}]")
                     for i, s in enumerate(_check_sizes(self.guidance, "guidance")))
        if not cond:
            raise ValueError("Schedule: expected at least one step")
        if len(cond) != len(guid):
            raise ValueError(f"Schedule: {len(cond)} conditional sizes but {len(guid)} guidance sizes; "
                             f"expected one of each per step")
        object.__setattr__(self, "cond", cond)
        object.__setattr__(self, "guidance", guid)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def static(cls, steps: int, patch_size: PatchSizeLike) -> Schedule:
        """Every step, both branches, at `patch_size` (the original model's sampling at its size)."""
        size = PatchSize.parse(patch_size)
        return cls((size,) * _check_steps(steps), (size,) * steps)

    @classmethod
    def weak_first(cls, steps: int, weak_steps: int, weak: PatchSizeLike, powerful: PatchSizeLike,
                   guidance_weak_steps: int | None = None) -> Schedule:
        """The first `weak_steps` conditional and `guidance_weak_steps` (default: the same) guidance
        steps at `weak`, the rest at `powerful` (FlexiDiT's schedule)."""
        steps = _check_steps(steps)
        wc = _check_count(weak_steps, "weak_steps", steps)
        wg = wc if guidance_weak_steps is None else _check_count(guidance_weak_steps, "guidance_weak_steps", steps)
        weak, powerful = _weak_and_powerful(weak, powerful)
        return cls((weak,) * wc + (powerful,) * (steps - wc), (weak,) * wg + (powerful,) * (steps - wg))

    @classmethod
    def weak_last(cls, steps: int, weak_steps: int, weak: PatchSizeLike, powerful: PatchSizeLike,
                  guidance_weak_steps: int | None = None) -> Schedule:
        """The control the paper shows is worse: powerful first, the LAST `weak_steps` steps weak."""
        steps = _check_steps(steps)
        wc = _check_count(weak_steps, "weak_steps", steps)
        wg = wc if guidance_weak_steps is None else _check_count(guidance_weak_steps, "guidance_weak_steps", steps)
        weak, powerful = _weak_and_powerful(weak, powerful)
        return cls((powerful,) * (steps - wc) + (weak,) * wc, (powerful,) * (steps - wg) + (weak,) * wg)

    @classmethod
    def from_notation(cls, notation: str, steps: int, weak: PatchSizeLike, powerful: PatchSizeLike) -> Schedule:
        """The paper's "x/y" (powerful for the last x conditional / last y guidance steps); "x" = "x/x"."""
        steps = _check_steps(steps)
        is_text = isinstance(notation, (str, int)) and not isinstance(notation, bool)   # "x/y", "x" or x
        counts = parse_counts(str(notation), "/") if is_text else None
        if counts is None or len(counts) not in (1, 2):
            raise ValueError(f"notation={notation!r}: expected 'x/y' (powerful for the last x conditional "
                             f"and last y guidance steps), e.g. '130/130'")
        x, y = counts[0], counts[-1]
        _check_count(x, "x (powerful conditional steps)", steps)
        _check_count(y, "y (powerful guidance steps)", steps)
        return cls.weak_first(steps, steps - x, weak, powerful, guidance_weak_steps=steps - y)

    @classmethod
    def from_list(cls, cond: Sequence[PatchSizeLike], guidance: Sequence[PatchSizeLike] | None = None) -> Schedule:
        """One patch size per step for the conditional branch and (default: the same) the guidance one.

        Raises:
            TypeError: `cond` or `guidance` is a single size, not one per step.
        """
        cond = _check_sizes(cond, "cond")
        return cls(cond, cond if guidance is None else _check_sizes(guidance, "guidance"))

    @classmethod
    def for_budget(cls, model: FlexibleDenoiser, steps: int, budget: float, guidance: bool = True,
                   weak: PatchSizeLike | None = None, powerful: PatchSizeLike | None = None,
                   equal_branches: bool = True) -> Schedule:
        """The weak-first schedule with the most powerful steps whose relative FLOPs <= `budget`.

        By default (`equal_branches=True`) the paper's "x/x" schedules: both branches share a size
        at every step (ordinary CFG at every step, ONE batched forward per step), with as many
        powerful steps as the budget allows. This is the family `flexikern eval` verifies on the
        shipped model (`results/shapes16/`, the row "flexi" at level 0.6 is `for_budget(0.6)`).

        `equal_branches=False` is the "most powerful steps" rule: it also searches "x/y" schedules
        (guidance weak for at least as many steps as the conditional branch, guided there by
        FlexiDiT's weak-model rule, `Guidance(mode="flexi")`) and takes the pair with the most
        powerful forwards, ties to more powerful conditional steps. For the same budget it keeps
        more powerful steps, but its guidance branch is often weak throughout ("N/0"), which the
        shipped model's evaluation does not cover, and a step with two smaller forwards of
        different sizes is slower per FLOP at small batch sizes.

        `powerful` defaults to the model's original patch size, `weak` to the next larger of its
        patch sizes (by area).

        The schedule records `budget` and `guidance`: `fk.sample` warns when a run costs more (e.g.
        a schedule for guidance, sampled without it, whose weak steps then save less).

        Raises:
            ValueError: `budget` is not a fraction in (0, 1] (60 for 0.6, True), no schedule fits it,
                `weak` is not larger than `powerful`, or the model lacks one of them.
            TypeError: `guidance` or `equal_branches` is not a bool.
        """
        steps = _check_steps(steps)
        budget = _check_budget(budget)
        guidance, equal_branches = check_flag(guidance, "guidance"), check_flag(equal_branches, "equal_branches")
        powerful = PatchSize.parse(model.original_patch_size if powerful is None else powerful, name="powerful")
        weak = weak_size(model, powerful, "for_budget") if weak is None else weak
        weak, powerful = _weak_and_powerful(weak, powerful)
        cls.static(1, powerful).validate(model)
        cls.static(1, weak).validate(model)
        f_weak, f_pow = int(model.flops(weak)), int(model.flops(powerful))
        branches = 2 if guidance else 1
        limit = budget * steps * f_pow * branches
        best = None
        for wc in range(steps + 1):
            for wg in (range(wc, steps + 1) if guidance and not equal_branches else (wc,)):
                cost = (wc * f_weak + (steps - wc) * f_pow
                        + (wg * f_weak + (steps - wg) * f_pow if guidance else 0))
                if cost > limit * (1 + 1e-12):
                    continue
                key = ((steps - wc) + (steps - wg if guidance else 0), steps - wc)
                if best is None or key > best[0]:
                    best = (key, wc, wg)
        if best is None:
            lowest = f_weak / f_pow
            raise ValueError(f"budget={budget}: no weak-first schedule of {steps} steps fits; the cheapest "
                             f"(all steps at weak={weak}) costs {lowest:.3f} of the static schedule. Raise "
                             f"the budget to at least {lowest:.3f} or add a weaker patch size")
        return replace(cls.weak_first(steps, best[1], weak, powerful, guidance_weak_steps=best[2]),
                       budget=budget, budget_guidance=guidance)

    @classmethod
    def calibrate(cls, model: FlexibleDenoiser, steps: int, budget: float | None = None,
                  tolerance: float | None = None, guidance: bool = True, num_samples: int = 16, seed: int = 0,
                  sampler: str = "ddim", weak: PatchSizeLike | None = None,
                  profile: Sequence[float] | None = None, y: Any = None) -> Schedule:
        """A schedule whose weak steps are the steps where the weak model is measured closest to
        the powerful one (`flexikern.diffusion.calibrate.gap_profile`).

        Exactly one of `budget` (relative FLOPs: as many weak steps as fit, smallest gap first) and
        `tolerance` (every step whose gap, relative to the largest gap, is <= tolerance) is given.
        Both branches use the same size at each step, so `guidance` does not change the choice.
        `weak` defaults to the next larger patch size; `profile` reuses a `gap_profile` result.
        `y`: the conditions to measure with (`gap_profile`; needed for a text model). Works for any
        `FlexibleDenoiser` (class or text conditions, image or video). With `budget`, the schedule
        records it, as `for_budget`'s does.

        Raises:
            ValueError: not exactly one of `budget` and `tolerance`, either out of range (`budget` a
                fraction in (0, 1], `tolerance` finite >= 0), a profile of the wrong length or with
                NaN/negative gaps, `weak` not larger than the original size.
        """
        if (budget is None) == (tolerance is None):
            raise ValueError(f"calibrate: pass exactly one of budget (e.g. 0.6) and tolerance (e.g. 0.05); "
                             f"got budget={budget!r}, tolerance={tolerance!r}")
        steps = _check_steps(steps)
        budget = None if budget is None else _check_budget(budget)
        if tolerance is not None and not (is_finite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance={tolerance!r}: expected a finite fraction >= 0 of the largest gap, "
                             f"e.g. 0.05")
        guidance = check_flag(guidance, "guidance")
        powerful = PatchSize.parse(model.original_patch_size, name="original_patch_size")
        weak = weak_size(model, powerful, "calibrate") if weak is None else weak
        weak, powerful = _weak_and_powerful(weak, powerful)
        cls.static(1, weak).validate(model)
        if profile is None:
            gaps = gap_profile(model, steps, num_samples, seed, sampler, weak, y=y)
        else:
            gaps = list(profile)
            if len(gaps) != steps or not all(is_finite(g) and g >= 0 for g in gaps):
                raise ValueError(f"profile: expected {steps} finite gaps >= 0 (one per step, from gap_profile), "
                                 f"got {len(gaps)}: {gaps[:4]}{' ...' if len(gaps) > 4 else ''}")
        if tolerance is not None:
            top = max(gaps) or 1.0
            chosen = {k for k in range(steps) if gaps[k] / top <= tolerance}
        else:
            f_w, f_p = model.flops(weak), model.flops(powerful)
            # The fewest weak steps that bring the cost under the budget: the most powerful schedule.
            n_weak = max(0, math.ceil((1 - budget) * steps * f_p / (f_p - f_w) - 1e-9))
            if n_weak > steps:
                raise ValueError(f"budget={budget}: even all {steps} steps at weak={weak} cost "
                                 f"{f_w / f_p:.3f} of the static schedule; raise the budget")
            chosen = set(sorted(range(steps), key=lambda k: (gaps[k], k))[:n_weak])
        sizes = [weak if k in chosen else powerful for k in range(steps)]
        return cls(tuple(sizes), tuple(sizes), budget=budget, budget_guidance=None if budget is None else guidance)

    # -- properties ---------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return len(self.cond)

    @property
    def sizes(self) -> set[PatchSize]:
        """Every patch size the schedule uses."""
        return set(self.cond) | set(self.guidance)

    def phases(self, guidance: bool | Sequence[bool] = True) -> list[Phase]:
        """Runs of steps with the same sizes: (start, stop, cond size, guidance size or None).

        `guidance`: whether the guidance branch runs, for every step or one bool per step.
        """
        out: list[Phase] = []
        for k, (c, g, on) in enumerate(zip(self.cond, self.guidance, self._guided(guidance))):
            key = (c, g if on else None)
            if out and (out[-1][2], out[-1][3]) == key:
                out[-1] = (out[-1][0], k + 1, *key)
            else:
                out.append((k, k + 1, *key))
        return out

    def _weak_first_form(self) -> tuple[int, int, PatchSize, PatchSize] | None:
        """(x, y, weak, powerful) if every branch runs weak then powerful, else None."""
        sizes = sorted(self.sizes, key=lambda s: s.volume)
        if len(sizes) > 2 or (len(sizes) == 2 and sizes[0].volume == sizes[1].volume):
            return None
        powerful, weak = sizes[0], sizes[-1]
        counts = []
        for branch in (self.cond, self.guidance):
            x = len(branch) - next((i for i, s in enumerate(branch) if s == powerful), len(branch))
            if any(s != powerful for s in branch[len(branch) - x:]):
                return None
            counts.append(x)
        return counts[0], counts[1], weak, powerful

    @property
    def notation(self) -> str:
        """The paper's "x/y": powerful for the last x conditional / y guidance steps (weak-first only)."""
        form = self._weak_first_form()
        if form is None:
            raise ValueError(f"{self!r} is not a weak-first schedule; 'x/y' notation does not apply")
        return f"{form[0]}/{form[1]}"

    def __repr__(self) -> str:
        form = self._weak_first_form()
        if form is not None:
            x, y, weak, powerful = form
            if weak == powerful:
                return f"Schedule.static({self.num_steps}, {powerful})"
            return f"Schedule('{x}/{y}', steps={self.num_steps}, weak={weak}, powerful={powerful})"

        def rle(sizes):
            return " ".join(f"{s.name}*{n}" for s, n in _runs(sizes))

        return f"Schedule(cond=[{rle(self.cond)}], guidance=[{rle(self.guidance)}])"

    # -- checks and cost ----------------------------------------------------------------------

    def validate(self, model: FlexibleDenoiser) -> Schedule:
        """Raise if a size is not one of `model.patch_sizes`; returns self."""
        allowed = set(model.patch_sizes)
        bad = sorted(self.sizes - allowed)
        if bad:
            raise ValueError(f"schedule uses patch sizes {_fmt_sizes(bad)} but the model supports only "
                             f"{_fmt_sizes(sorted(allowed))} (model.patch_sizes)")
        return self

    def flops(self, model: FlexibleDenoiser, batch: int = 1, guidance: bool | Sequence[bool] = True) -> int:
        """Forward FLOPs of the whole schedule for `batch` samples.

        `guidance`: True/False for every step, or one bool per step (e.g. a guidance interval).
        """
        check_positive_int(batch, "batch")
        self.validate(model)
        guided = self._guided(guidance)
        return (_model_steps_flops(model, self.cond, batch)
                + _model_steps_flops(model, (g for g, on in zip(self.guidance, guided) if on), batch))

    def relative_flops(self, model: FlexibleDenoiser, guidance: bool | Sequence[bool] = True) -> float:
        """FLOPs / the FLOPs of the static schedule at the model's original patch size."""
        reference = Schedule.static(self.num_steps, model.original_patch_size)
        return self.flops(model, 1, guidance) / reference.flops(model, 1, guidance)

    def _guided(self, guidance: bool | Sequence[bool]) -> list[bool]:
        if isinstance(guidance, bool):
            return [guidance] * self.num_steps
        guided = list(guidance) if isinstance(guidance, Iterable) and not isinstance(guidance, str) else None
        if guided is None or len(guided) != self.num_steps or not all(isinstance(g, bool) for g in guided):
            raise ValueError(f"guidance={guidance!r}: expected True, False or {self.num_steps} bools (one per "
                             f"step, e.g. Guidance.active_steps(sampler.model_timesteps))")
        return guided


def _fmt_sizes(sizes: Iterable[PatchSize]) -> str:
    return "[" + ", ".join(str(tuple(s)) for s in sizes) + "]"
