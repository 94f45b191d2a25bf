"""Guidance: classifier-free guidance and FlexiDiT's weak-model guidance.

Modes (`Guidance(scale, mode)`):

* "none": the conditional prediction only; the schedule's guidance column is not run.
* "cfg": classifier-free guidance, `eps = eps(null; p_g) + s * (eps(c; p_c) - eps(null; p_g))`, with
  the null class id `model.num_classes`. When both branches share a patch size they run as ONE
  batched forward (DiT's `forward_with_cfg`); otherwise as two forwards at their own sizes.
* "flexi" (FlexiDiT §3.4): when the guidance branch is weaker (a larger patch) than the
  conditional one, `eps = eps(c; weak) + s2 * (eps(c; powerful) - eps(c; weak))`, where the
  guidance branch is the weak model's CONDITIONAL prediction and `(1 - s) / (1 - s2) = ratio`
  (2.5 in the paper), i.e. `s2 = 1 - (1 - s) / ratio`. At equal sizes it is ordinary CFG with
  scale `s`; with the guidance branch more powerful than the conditional one (a weak-last
  schedule) it is CFG across the two sizes.

With learned sigma only the epsilon channels are combined (the first `first_channels` of them when
set: DiT's `forward_with_cfg` guides 3 of the 4 latent channels); the rest, variance included, come
from the conditional branch.

`interval=(lo, hi)` applies guidance only at steps whose model timestep t (the value the model
receives: DiT's original index in [0, 1000), or 1000 * t for flow models) satisfies lo <= t <= hi;
the other steps run the conditional branch alone and cost no guidance FLOPs.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flexikern.ops._checks import check_finite, check_positive_int, is_finite
from flexikern.diffusion.protocol import FlexibleDenoiser
from flexikern.diffusion.schedule import Phase
from flexikern.ops.patch_size import PatchSize

__all__ = ["Guidance", "GuidedDenoiser", "GUIDANCE_MODES"]

GUIDANCE_MODES = ("none", "cfg", "flexi")


@dataclass(frozen=True)
class Guidance:
    """How the two branches of a step are combined (see the module docstring)."""

    scale: float = 1.5
    mode: str = "flexi"
    interval: tuple[float, float] | None = None
    first_channels: int | None = None
    ratio: float = 2.5

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {', '.join(GUIDANCE_MODES)}")
        scale = check_finite(self.scale, "scale", "a finite float (1 = no guidance, DiT uses 1.5 to 4)")
        object.__setattr__(self, "scale", scale)
        if self.interval is not None:
            ok = (isinstance(self.interval, (tuple, list)) and len(self.interval) == 2
                  and all(is_finite(v) for v in self.interval) and 0 <= self.interval[0] <= self.interval[1])
            if not ok:
                raise ValueError(f"interval={self.interval!r}: expected (lo, hi) with 0 <= lo <= hi, finite, in "
                                 f"model timestep units, e.g. (0, 700) for DiT (timesteps are below 1000)")
            object.__setattr__(self, "interval", (float(self.interval[0]), float(self.interval[1])))
        if self.first_channels is not None:
            check_positive_int(self.first_channels, "first_channels", "a positive int or None (DiT's behaviour: 3)")
        if self.mode == "none" and (self.interval is not None or self.first_channels is not None):
            raise ValueError(f"mode='none' with interval={self.interval!r}, first_channels={self.first_channels!r}: "
                             f"these shape guidance, which mode 'none' does not run; pick mode 'cfg' or 'flexi'")
        ratio = check_finite(self.ratio, "ratio", "a finite float > 0 ((1 - s) / (1 - s2); paper: 2.5)")
        if not ratio > 0:
            raise ValueError(f"ratio={self.ratio!r}: expected a finite float > 0 ((1 - s) / (1 - s2); paper: 2.5)")
        object.__setattr__(self, "ratio", ratio)

    @classmethod
    def of(cls, guidance: Guidance | float | None) -> Guidance:
        """`fk.sample`'s `guidance` argument as a `Guidance`: None = the conditional branch only;
        a number s = `Guidance(s)` (the default mode, "flexi"), as diffusers' `guidance_scale`:
        1 means no guidance (`Guidance(1, "none")`: the same samples at half the cost).

        Raises:
            TypeError: any other type. ValueError: a NaN or infinite scale.
        """
        if guidance is None:
            return cls(1.0, "none")
        if isinstance(guidance, cls):
            return guidance
        if isinstance(guidance, numbers.Real) and not isinstance(guidance, bool):
            return cls(guidance, "none" if guidance == 1 else "flexi")
        raise TypeError(f"guidance={guidance!r}: expected a Guidance (e.g. Guidance(1.5, 'cfg')), a scale "
                        f"(a float: Guidance(scale)) or None (no guidance); got {type(guidance).__name__}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def weak_scale(self) -> float:
        """s2 for a weak guidance branch: (1 - scale) / (1 - s2) = ratio."""
        return 1.0 - (1.0 - self.scale) / self.ratio

    def active_steps(self, model_timesteps: torch.Tensor) -> list[bool]:
        """One bool per step: does guidance run at this step?"""
        t = [float(v) for v in model_timesteps.cpu()]
        if not self.enabled:
            return [False] * len(t)
        if self.interval is None:
            return [True] * len(t)
        lo, hi = self.interval
        return [lo <= v <= hi for v in t]


def _cat(a: Any, b: Any) -> Any:
    """Two conditions along the batch: label tensors, or text conditions (their `cat`)."""
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a.cat(b)


class GuidedDenoiser:
    """The model's guided prediction for one step: the one place both branches are run and combined.

    `__call__(x, t, cond_size, guid_size)` returns the model output (N, out_channels, H, W) with the
    guided epsilon (or velocity) channels. `guid_size=None` runs the conditional branch alone.

    Its per-run inputs are its `conditions` (the labels or text conditions, and their
    concatenations); the CUDA-graph runner makes them static buffers and refills them per run,
    through `conditions` and `with_conditions` only.

    Inside `fk.sample` a call never synchronises with the host: every concatenation of
    conditions it needs is made here, once (a text condition's `cat` reads its mask), `prepare`
    has the model build its per-size caches before the first step, and the model trusts the
    conditions' values (`flexikern.models.base.conditions_checked`).
    """

    def __init__(self, model: FlexibleDenoiser, y: Any, guidance: Guidance | float | None,
                 packed: bool | None = None, compiled: Any = None, y_null: Any = None):
        self.model = model
        # `flexikern.runtime.compiled.CompiledForwards`: the model's forwards under torch.compile.
        self.compiled = compiled
        self.guidance = Guidance.of(guidance)
        self.y = y
        # The null class (or caption), where the model has one, or the caller's (a negative prompt's
        # embeddings, checked by `fk.sample`); CFG needs it (`DenoisingLoop` checks).
        self.y_null = y_null if y_null is not None else model.null_condition(y) if model.has_null_class else None
        self.y_cfg = None if self.y_null is None else _cat(y, self.y_null)   # CFG's one batch or packed pass
        self.y_weak = _cat(y, y)   # both rows conditional: weak-model guidance's packed pass
        params = next(iter(model.parameters()), None)
        self.dtype = params.dtype if params is not None else torch.float32
        # Branches of different sizes run as ONE packed forward where that pays: with a fused
        # varlen attention kernel (CUDA). On CPU the reference loops over sequences and two
        # batched forwards are as fast, so auto (None) packs on CUDA only.
        self.packed = packed if packed is not None else params is not None and params.device.type == "cuda"

    @property
    def conditions(self) -> dict[str, Any]:
        """The per-run inputs, by name: the condition `y`, the null condition `y_null` (None without
        a null class), `y_cfg` = y then y_null and `y_weak` = y twice (the two-branch batches)."""
        return {"y": self.y, "y_null": self.y_null, "y_cfg": self.y_cfg, "y_weak": self.y_weak}

    def with_conditions(self, conditions: Mapping[str, Any], packed: bool | None = None) -> GuidedDenoiser:
        """A copy on the same model and guidance that reads `conditions` (some or all of
        `self.conditions`, by name) instead of its own; `packed`: None keeps `self.packed`."""
        unknown = set(conditions) - set(self.conditions)
        if unknown:
            raise KeyError(f"with_conditions: unknown conditions {sorted(unknown)}; expected some of "
                           f"{list(self.conditions)}")
        clone = copy.copy(self)
        for name, value in conditions.items():
            setattr(clone, name, value)
        if packed is not None:
            clone.packed = packed
        return clone

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: Any, size: PatchSize) -> torch.Tensor:
        forward = self.model if self.compiled is None else self.compiled.forward
        out = forward(x.to(self.dtype), t, y, patch_size=size)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def rule(self, cond_size: PatchSize, guid_size: PatchSize | None) -> str:
        """"cond" (no guidance), "cfg" or "weak" (FlexiDiT's weak-model guidance) for these sizes."""
        if guid_size is None or not self.guidance.enabled:
            return "cond"
        if self.guidance.mode == "flexi" and guid_size.volume > cond_size.volume:
            return "weak"
        return "cfg"

    def two_pass(self, x: torch.Tensor, t: torch.Tensor, y_guid: Any, y_both: Any,
                 cond_size: PatchSize, guid_size: PatchSize) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches at different sizes, conditioned on `self.y` and `y_guid`: one packed forward
        (`model.forward_packed` with `y_both`, the two concatenated: `y_cfg` or `y_weak`) or two."""
        if not self.packed:
            return self._forward(x, t, self.y, cond_size), self._forward(x, t, y_guid, guid_size)
        n = x.shape[0]
        forward_packed = self.model.forward_packed if self.compiled is None else self.compiled.forward_packed
        out = forward_packed(list(x.to(self.dtype).unbind(0)) * 2, torch.cat([t, t]), y_both,
                             [cond_size] * n + [guid_size] * n)
        out = torch.stack(out).to(x.dtype)
        return out[:n], out[n:]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond_size: PatchSize,
                 guid_size: PatchSize | None) -> torch.Tensor:
        rule = self.rule(cond_size, guid_size)
        if rule == "cond":
            return self._forward(x, t, self.y, cond_size)
        if rule == "weak":
            cond, other = self.two_pass(x, t, self.y, self.y_weak, cond_size, guid_size)
            return self.combine(cond, other, self.guidance.weak_scale, x.shape[1])
        if self.y_null is None:
            self.model.null_condition(self.y)   # raises: this model has no null class for CFG
        if cond_size == guid_size:
            n = x.shape[0]
            both = self._forward(torch.cat([x, x]), torch.cat([t, t]), self.y_cfg, cond_size)
            cond, other = both[:n], both[n:]
        else:
            cond, other = self.two_pass(x, t, self.y_null, self.y_cfg, cond_size, guid_size)
        return self.combine(cond, other, self.guidance.scale, x.shape[1])

    def prepare(self, x: torch.Tensor, phases: list[Phase]) -> list[torch.Tensor]:
        """Have the model build now what the forwards of these phases build on first use
        (`model.prepare`: positional tables, the kernels' resize matrices, packings) for states like `x`, so
        that no step copies between host and device; returns the device tensors it cached.
        `phases`: `DenoisingLoop.phases`."""
        return [tensor for _, _, cond_size, guid_size in phases
                for tensor in self.prepare_step(x, cond_size, guid_size)]

    def prepare_step(self, x: torch.Tensor, cond_size: PatchSize,
                     guid_size: PatchSize | None) -> list[torch.Tensor]:
        """`prepare` for the steps of one phase."""
        size, n = tuple(x.shape[2:]), len(self.y)
        if self.rule(cond_size, guid_size) == "cond":
            return self.model.prepare([cond_size], size, x.device)
        if self.packed and cond_size != guid_size:   # `two_pass`'s packed forward
            return self.model.prepare([cond_size] * n + [guid_size] * n, size, x.device, packed=True)
        return self.model.prepare([cond_size, guid_size], size, x.device)

    def layouts(self, x: torch.Tensor, phases: list[Phase]) -> set[tuple]:
        """The forwards the steps of `phases` call from states like `x`, each ("forward", patch
        size, batch) or ("packed", patch sizes, batch): what a compiled run compiles, once each
        (`flexikern.runtime.compiled`)."""
        n, layouts = x.shape[0], set()
        for _, _, cond_size, guid_size in phases:
            rule = self.rule(cond_size, guid_size)
            if rule == "cond":
                layouts.add(("forward", cond_size, n))
            elif cond_size == guid_size:   # CFG's one batch of 2N
                layouts.add(("forward", cond_size, 2 * n))
            elif self.packed:
                layouts.add(("packed", (cond_size, guid_size), 2 * n))
            else:
                layouts |= {("forward", cond_size, n), ("forward", guid_size, n)}
        return layouts

    def combine(self, cond: torch.Tensor, other: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
        """`other + scale * (cond - other)` on the guided channels, in place in `cond`; the rest from cond."""
        k = min(self.guidance.first_channels or channels, channels)
        guided = cond[:, :k]
        guided.copy_(other[:, :k].lerp_(guided, scale))
        return cond
