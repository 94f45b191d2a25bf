"""diffusers schedulers as `fk.sample` samplers: `SchedulerSampler(scheduler, num_inference_steps)`.

Any diffusers scheduler (DDPM, DDIM, DPMSolverMultistep, Euler, FlowMatchEuler, ...) can drive
the denoising steps while the patch-size schedule only chooses the sizes each step's branches run
at. One step is what diffusers' pipelines do in their loops (`DiTPipeline`, `PixArtAlphaPipeline`):

    model_input = scheduler.scale_model_input(x, t)          # where the scheduler has it
    output = guided model output at t (the schedule's sizes)  # variance dropped unless it is learned
    x = scheduler.step(output, t, x, **extra).prev_sample    # extra: generator, eta if it takes them

A step of the schedule is one model evaluation: one entry of `scheduler.timesteps`. For most
schedulers that is one per inference step; a second-order one (Heun, KDPM2) evaluates the model
twice per step but the last, so its schedule has `len(scheduler.timesteps)` steps.

Schedulers keep state between steps (their step index, a multistep solver's past outputs):
`fk.sample` calls `begin()` before its first step, which sets the timesteps again and so resets
it. The scheduler draws its own step noise (DDPM, DDIM with eta > 0, ancestral samplers) from
`generator`, as in diffusers' pipelines, so the loop hands it none (`stochastic` is False). The
initial noise is scaled by `init_noise_sigma` (diffusers' `prepare_latents`); `fk.sample` does it.

No import of diffusers happens here: a scheduler is checked by what it has (`check_scheduler`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from flexikern.diffusion.gaussian import _Sampler, _split_output
from flexikern.ops._checks import check_finite, check_positive_int

__all__ = ["SchedulerSampler", "check_scheduler", "is_scheduler", "DIT_SCHEDULER_CONFIG", "make_scheduler"]

# DiT's diffusion as a diffusers scheduler config: 1000 training steps of linear betas 1e-4 -> 0.02
# (facebook/DiT-XL-2-256's scheduler_config.json), epsilon prediction.
DIT_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                            prediction_type="epsilon")


def is_scheduler(obj: Any) -> bool:
    """Whether `obj` looks like a diffusers scheduler or its class (rather than a flexikern sampler)."""
    return not isinstance(obj, _Sampler) and callable(getattr(obj, "set_timesteps", None))


def _parameters(fn: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def check_scheduler(scheduler: Any, name: str = "scheduler") -> None:
    """Check that `scheduler` can drive the loop: `set_timesteps(num_inference_steps)`, then a
    `timesteps` tensor and `step(model_output, timestep, sample, return_dict=...)`. `name`: the
    argument, for the message ("sampler" is `fk.sample`'s, which also takes flexikern's samplers).

    Raises:
        TypeError: a class rather than an instance; naming the scheduler's class and each missing part.
    """
    if isinstance(scheduler, type):
        raise TypeError(f"{name}={scheduler.__name__}: a class, not a scheduler; pass an instance, e.g. "
                        f"{scheduler.__name__}.from_config(pipe.scheduler.config) or {scheduler.__name__}()")
    missing = []
    if not callable(getattr(scheduler, "set_timesteps", None)):
        missing.append("a set_timesteps(num_inference_steps) method")
    step = getattr(scheduler, "step", None)
    if not callable(step):
        missing.append("a step(model_output, timestep, sample) method")
    else:
        params = _parameters(step)
        absent = [p for p in ("model_output", "timestep", "sample", "return_dict") if p not in params]
        if absent:
            missing.append(f"step() parameters {', '.join(absent)} (it takes {', '.join(params) or 'none'})")
    if missing:
        ours = " or a flexikern sampler ('ddpm', 'ddim', 'flow')" if name == "sampler" else ""
        raise TypeError(f"{name}: a {type(scheduler).__name__} cannot drive the denoising steps: it lacks "
                        f"{'; '.join(missing)}. Expected a diffusers scheduler (e.g. DDIMScheduler, "
                        f"DPMSolverMultistepScheduler, EulerDiscreteScheduler){ours}")


class SchedulerSampler(_Sampler):
    """A diffusers scheduler as a sampler of `fk.sample` (see the module docstring).

    Args:
        scheduler: a diffusers scheduler (checked by `check_scheduler`); its state is reset at the
            start of every run.
        num_inference_steps: diffusers' argument of `set_timesteps`: a positive int.
        generator: a torch.Generator (or one per sample) for schedulers that draw step noise;
            passed to `step` where it takes one, as diffusers' pipelines do.
        eta: DDIM's eta, passed to `step` where it takes one (None: the scheduler's default).
        device: where the timesteps live (diffusers' `set_timesteps(device=)`); `to()` moves them.
    Raises:
        TypeError: the scheduler cannot be driven. ValueError: bad `num_inference_steps`, `eta`
        given to a scheduler whose step takes none, or a scheduler that sets no timesteps.
    """

    stochastic = False   # the scheduler draws its own step noise, from `generator`

    def __init__(self, scheduler: Any, num_inference_steps: int, generator: Any = None, eta: float | None = None,
                 device: torch.device | str | None = None):
        check_scheduler(scheduler, "sampler")
        self.scheduler = scheduler
        self.name = type(scheduler).__name__
        self.num_inference_steps = check_positive_int(num_inference_steps, "num_inference_steps")
        step_params = _parameters(scheduler.step)
        self.extra: dict[str, Any] = {}
        if eta is not None:
            eta = check_finite(eta, "eta", "a finite float >= 0 (DDIM's eta)")
            if "eta" not in step_params:
                raise ValueError(f"eta={eta!r}: {self.name}.step takes no eta (DDIMScheduler's does); leave "
                                 f"eta unset with this scheduler")
            self.extra["eta"] = eta
        if "generator" in step_params:
            self.extra["generator"] = generator
        self.device = None if device is None else torch.device(device)
        self.begin()
        if self.num_steps == 0:
            raise ValueError(f"num_inference_steps={num_inference_steps}: {self.name}.set_timesteps made no "
                             f"timesteps")

    def begin(self) -> None:
        """Set the timesteps (again): the scheduler's state starts afresh, as in a pipeline call."""
        takes = _parameters(self.scheduler.set_timesteps)
        kwargs = {"device": self.device} if "device" in takes and self.device is not None else {}
        self.scheduler.set_timesteps(self.num_inference_steps, **kwargs)
        if callable(getattr(self.scheduler, "set_begin_index", None)):
            self.scheduler.set_begin_index(0)
        timesteps = getattr(self.scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.dim() != 1:
            raise TypeError(f"scheduler: {self.name}.set_timesteps left no 1-D tensor of timesteps in "
                            f".timesteps; expected a diffusers scheduler")
        self.timesteps = timesteps
        self.num_steps = len(timesteps)
        # What the model sees at step k: the scheduler's timestep, as a float (DiT embeds floats).
        self.model_timesteps = timesteps.float()
        if self.device is not None:
            self.model_timesteps = self.model_timesteps.to(self.device)

    @classmethod
    def for_evaluations(cls, scheduler: Any, evaluations: int, **kwargs: Any) -> SchedulerSampler:
        """The sampler whose run evaluates the model `evaluations` times: `num_inference_steps` is
        `evaluations` for a first-order scheduler, and found for others (Heun: 2N - 1 evaluations
        for N steps, so 9 evaluations are 5 steps). `kwargs` as for the constructor.

        Raises:
            ValueError: no step count gives that many evaluations (naming the nearest counts).
        """
        check_scheduler(scheduler, "sampler")
        check_positive_int(evaluations, "evaluations")
        counts = {}
        for steps in [evaluations, *range(1, evaluations)]:
            scheduler.set_timesteps(steps)
            counts[steps] = len(scheduler.timesteps)
            if counts[steps] == evaluations:
                return cls(scheduler, steps, **kwargs)
        made = sorted(set(counts.values()))
        near = [c for c in made if c < evaluations][-1:] + [c for c in made if c > evaluations][:1]
        raise ValueError(f"schedule: {evaluations} steps, but no num_inference_steps makes "
                         f"{type(scheduler).__name__} evaluate the model {evaluations} times (a schedule has one "
                         f"step per model evaluation); build a schedule of {' or '.join(map(str, near))} steps, "
                         f"or pass SchedulerSampler(scheduler, num_inference_steps) with a schedule of its "
                         f"num_steps")

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The initial noise's standard deviation (1 for DDPM, DDIM, DPM-Solver; larger for Euler)."""
        return getattr(self.scheduler, "init_noise_sigma", 1.0)

    def to(self, device: torch.device | str) -> SchedulerSampler:
        self.device = torch.device(device)
        self.model_timesteps = self.model_timesteps.to(device)
        return self

    def model_input(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """`scheduler.scale_model_input(x, t)` where the scheduler has it (Euler divides by sqrt(sigma^2 + 1))."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        return x if scale is None else scale(x, self.timesteps[k])

    def step(self, model_output: torch.Tensor, x: torch.Tensor, k: int, noise: torch.Tensor | None) -> torch.Tensor:
        # A learned variance goes to a scheduler that uses it (DDPMScheduler(variance_type="learned_range"));
        # other schedulers get the prediction alone (LattePipeline's rule; DiTPipeline and
        # PixArtAlphaPipeline always drop it).
        if not self.learned_variance:
            model_output, _ = _split_output(model_output, x.shape[1])
        return self.scheduler.step(model_output, self.timesteps[k], x, **self.extra, return_dict=False)[0]

    @property
    def learned_variance(self) -> bool:
        """Whether the scheduler takes the model's variance channels (its config's variance_type)."""
        config = getattr(self.scheduler, "config", None)
        return getattr(config, "variance_type", None) in ("learned", "learned_range")


def make_scheduler(name: str, **config: Any) -> Any:
    """A diffusers scheduler by class name with DiT's diffusion (`DIT_SCHEDULER_CONFIG`) and
    `config` on top, each key only where the class takes it (DDIM's `clip_sample`, ...).

    Raises:
        ImportError: diffusers is not installed. ValueError: no scheduler of that name.
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"scheduler {name!r}: needs diffusers (pip install --no-deps diffusers)") from e
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("Flax"))
        raise ValueError(f"scheduler {name!r}: not a diffusers scheduler class; expected one of "
                         f"{', '.join(known)}")
    takes = _parameters(cls.__init__)
    return cls(**{k: v for k, v in {**DIT_SCHEDULER_CONFIG, **config}.items() if k in takes})
