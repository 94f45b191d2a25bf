"""One training loop for pre-training, shared fine-tuning and LoRA distillation.

Recipes (`TrainConfig.recipe`):

* "pretrain": DiT's diffusion loss at the original patch size (`flexikern train`);
* "shared":   the same loss with a random patch size per sample among `model.patch_sizes`
              (FlexiDiT's class-conditional recipe; all weights train);
* "distill":  `||eps_powerful(x_t) - eps_weak(x_t)||^2` at a random WEAK patch size per sample,
              the target from the frozen original at its own size (FlexiDiT's LoRA recipe; with
              `adapter="lora"` the model's powerful mode IS the frozen original, otherwise a
              frozen copy is taken at the start).

Each step draws, from one CPU `torch.Generator` (state checkpointed), the GLOBAL batch's
timesteps, noise, label dropout (to the null class `num_classes`) and patch sizes; process r of W
takes rows [r B/W, (r+1) B/W) and computes its rows' losses grouped by patch size (samples with
the same size run as one forward). Losses are summed and divided by the global batch size, the
gradients are summed over processes (one all-reduce of a flat buffer), so 1 or W processes do
the same math up to float summation order. AdamW, gradient clipping, an EMA of the weights, bf16
autocast on CUDA, optional gradient checkpointing.

Checkpoints (`<out>/checkpoint.pt`) hold model, EMA, optimiser, step, every RNG state (the
trainer's generator, torch, numpy, python) and the run's settings (config, model shape, data);
they are written with `flexikern.files.atomic_write`, so a crash or a full disk never leaves a
half-written checkpoint, and loaded with `weights_only=True`. Resuming continues bit for bit (the
data order is a function of the step, `BatchOrder`), and is refused when the settings differ
unless `allow_changes=True`. The log is `<out>/log.jsonl`: one row per `log_every` steps (loss overall
and per patch size, gradient norm, lr, it/s, `train_seconds`: wall time spent in steps, over all
resumes) and, with `evaluate`, one row per evaluation (its scores, the step and `train_seconds`,
no "loss"); a line torn by a kill is dropped on resume. One run at a time holds
`<out>/.lock`; a second one is refused, naming the holder.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from flexikern.diffusion import GaussianDiffusion
from flexikern.files import atomic_write
from flexikern.models.convert import load_checkpoint as read_checkpoint
from flexikern.ops._checks import check_positive_int, check_seed, is_finite, is_int
from flexikern.train.data import BatchOrder, TensorData
from flexikern.train.losses import diffusion_loss, distillation_loss

__all__ = ["TrainConfig", "train", "EMA", "save_checkpoint", "load_checkpoint", "RECIPES", "TrainSetupError"]

RECIPES = ("pretrain", "shared", "distill")
LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: "TrainConfig", step: int) -> float:
    """The learning rate of 0-based `step`: linear warm-up over `warmup_steps` (lr * (step + 1) /
    warmup_steps), then constant or a cosine decay from `lr` to 0 at `steps` (after the warm-up,
    diffusers' `get_cosine_schedule_with_warmup`). With "cosine", the schedule depends on `steps`:
    resuming with another --steps (--allow-changes) bends the remaining curve."""
    warmup = max(1, config.warmup_steps)
    if step < config.warmup_steps or config.lr_schedule == "constant":
        return config.lr * min(1.0, (step + 1) / warmup)
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainSetupError(ValueError):
    """A run that cannot start as asked, raised before any training step: data that does not fit
    the model, a checkpoint from other settings, a corrupt log, another run holding the directory."""


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (stored in the checkpoint and in `<out>/train_config.json`)."""

    out_dir: str
    recipe: str = "pretrain"
    steps: int = 1000
    batch_size: int = 64            # global: split evenly over processes
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"   # after warm-up: "constant", or "cosine" decay to 0 at `steps`
    grad_clip: float = 1.0          # max global grad norm; <= 0 disables
    ema_decay: float = 0.9999
    class_dropout: float = 0.1      # labels replaced by the null class (classifier-free guidance)
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (diffusion loss; None: DiT's plain MSE)
    distill_sigma: bool = True      # distillation: also match the variance channels (learn_sigma)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    gradient_checkpointing: bool = False
    max_steps: int | None = None    # stop (as if killed) after this step, without a final export
    progress: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}: expected one of {RECIPES}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        if self.lr_schedule == "cosine" and is_int(self.warmup_steps) and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} >= steps={self.steps}: a cosine schedule would "
                             "never decay; use fewer warm-up steps or lr_schedule='constant'")
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            value = getattr(self, name)
            check_positive_int(value, name)
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps < 1):
            raise ValueError(f"max_steps={self.max_steps!r}: expected None or a positive int")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: expected an int >= 0")
        check_seed(self.seed)
        for name, ok, expected in (("lr", lambda v: v > 0, "a positive finite number"),
                                   ("weight_decay", lambda v: v >= 0, "a finite number >= 0"),
                                   ("grad_clip", lambda v: True, "a finite number (<= 0 turns clipping off)")):
            value = getattr(self, name)
            if not (is_finite(value) and ok(value)):
                raise ValueError(f"{name}={value!r}: expected {expected}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout={self.class_dropout!r}: expected a probability in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay!r}: expected a value in [0, 1)")
        if self.snr_gamma is not None and not (is_finite(self.snr_gamma) and self.snr_gamma > 0):
            raise ValueError(f"snr_gamma={self.snr_gamma!r}: expected None (plain MSE) or a positive finite number "
                             "(5 is the paper's and diffusers' usual value)")
        if self.snr_gamma is not None and self.recipe == "distill":
            raise ValueError(f"snr_gamma={self.snr_gamma!r}: weights the diffusion loss of recipes 'pretrain' and "
                             "'shared'; 'distill' matches the teacher's output: drop snr_gamma (--snr-gamma)")


class EMA:
    """Exponential moving average of a model's trainable parameters (DiT's `update_ema`)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        """One update; with `step` (0-based) the decay warms up as min(decay, (1 + step) / (10 + step)),
        so that short runs are not dominated by the initial weights (0.999^1000 is still 0.37)."""
        decay = self.decay if step is None else min(self.decay, (1 + step) / (10 + step))
        ema = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if param.requires_grad:
                ema[name].mul_(decay).add_(param.detach(), alpha=1 - decay)


# ---------------------------------------------------------------------------------- checkpoints
def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """torch.save through `atomic_write`: readers see the old or the new file; a failed write (a
    full disk) leaves the old one and no temporary file, and raises OSError naming `path`."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint`, loaded with `weights_only=True`.

    Raises FileNotFoundError when `path` does not exist, ValueError naming it when it is not a
    readable checkpoint (e.g. truncated).
    """
    try:
        return read_checkpoint(path)
    except ValueError as e:
        raise ValueError(f"{e}; delete it to start the run afresh") from e


# ---------------------------------------------------------------------------------- the run directory
@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold `<out>/.lock` (an flock, released when the process ends, even by kill -9) for the run;
    the file names the holder. TrainSetupError when another run holds it."""
    import fcntl
    path = out / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise TrainSetupError(f"{path}: cannot open the run's lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "a process that did not say"
        os.close(fd)
        raise TrainSetupError(f"{out}: another training run is using this directory ({holder}; lock file "
                              f"{path}); wait for it to end, or give this run another output directory") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)      # the holder's name goes with the lock
        os.close(fd)


# Settings that change neither the weights nor the data order: free to change on resume.
_FREE_SETTINGS = ("out_dir", "max_steps", "progress", "log_every", "ckpt_every", "gradient_checkpointing")
_CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "rng")
# Settings added later, with the value every run before them had (a checkpoint without the key).
_ADDED_SETTINGS = {"snr_gamma": None, "lr_schedule": "constant"}


def _run_settings(config: TrainConfig, model: torch.nn.Module, data: TensorData) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the config, the model's shape, the data
    (size, shape and a checksum of up to 1024 evenly spaced samples and all labels)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _FREE_SETTINGS}
    model_desc = {"class": type(model).__name__, **model.config, "patch_sizes": [list(p) for p in model.patch_sizes],
                  "adapter": model.adapter, "lora_rank": model.lora_rank}
    settings.update({f"model.{k}": v for k, v in model_desc.items()})
    rows = torch.linspace(0, len(data) - 1, min(len(data), 1024)).long()
    digest = hashlib.sha1(data.x[rows].numpy().tobytes())
    digest.update(data.y.numpy().tobytes())
    settings.update({"data.size": len(data), "data.shape": list(data.x.shape[1:]),
                     "data.checksum": digest.hexdigest()[:16]})
    return json.loads(json.dumps(settings))     # tuples -> lists: comparable with a loaded checkpoint


def _check_resume(ckpt: dict[str, Any], settings: dict[str, Any], path: Path, allow_changes: bool) -> None:
    """Refuse (TrainSetupError) to resume `path` with other settings unless `allow_changes`."""
    old = ckpt.get("settings")
    if old is None:    # a checkpoint from before settings were stored: compare the config only
        old = {k: v for k, v in ckpt.get("config", {}).items() if k not in _FREE_SETTINGS}
        settings = {k: v for k, v in settings.items() if k in old}
    # A setting added after the checkpoint was written: the value those runs had.
    old = {**{k: v for k, v in _ADDED_SETTINGS.items() if k in settings and k not in old}, **old}
    def show(values: dict[str, Any], key: str) -> str:
        return repr(values[key]) if key in values else "(unset)"

    changes = [f"{k} {show(old, k)} -> {show(settings, k)}" for k in sorted(set(old) | set(settings))
               if show(old, k) != show(settings, k)]
    if not changes:
        return
    message = f"{path} was written with other settings: {'; '.join(changes)}"
    if not allow_changes:
        raise TrainSetupError(f"{message}. Rerun with the original settings, use a new output directory, or "
                              "pass allow_changes=True (command line: --allow-changes) to continue with the "
                              "new ones")
    warnings.warn(f"{message}; continuing with the new ones (allow_changes)", stacklevel=3)


def _log_until(log_path: Path, step: int) -> str:
    """The log's rows up to `step`. A torn last line (a write cut by a kill) is dropped with a
    warning; any other line that is not a JSON row raises TrainSetupError naming it."""
    try:
        lines = log_path.read_bytes().decode(errors="replace").splitlines()
    except OSError as e:
        raise TrainSetupError(f"{log_path}: cannot read the run's log ({e.strerror or e})") from None
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
            if not isinstance(row_step, int):
                raise TypeError(f"step {row_step!r} is not an int")
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                warnings.warn(f"{log_path}, line {i + 1}: dropped a torn last line ({line[:60]!r}), "
                              "cut off when the run was interrupted", stacklevel=3)
                break
            raise TrainSetupError(f"{log_path}, line {i + 1}: not a log row ({type(e).__name__}: {e}): the log "
                                  "is corrupt; delete that line (or the file, losing the history) to "
                                  "resume") from None
        if row_step <= step:
            kept.append(line + "\n")
    return "".join(kept)


def _append_line(path: Path, line: str) -> None:
    """One log row; a failed write (a full disk) raises OSError naming the log (a torn row is dropped
    on resume)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror or e} while appending to {path}") from e


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------------- distributed
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun (gloo on CPU, NCCL
    on CUDA, one GPU per local rank)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local_rank >= gpus:
                raise RuntimeError(f"LOCAL_RANK={local_rank}, but this machine has {gpus} GPU(s): run "
                                   f"torchrun with --nproc_per_node <= {gpus}, or CUDA_VISIBLE_DEVICES= "
                                   "for CPU processes (gloo)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return _world()


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum gradients over processes: one all-reduce of one flat buffer."""
    if world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# ---------------------------------------------------------------------------------- the loop
def _sizes_for(recipe: str, model: torch.nn.Module) -> list[tuple[int, int]]:
    if recipe == "pretrain":
        return [model.original_patch_size]
    if recipe == "shared":
        return list(model.patch_sizes)
    weak = [p for p in model.patch_sizes if p != model.original_patch_size]
    if not weak:
        raise ValueError("recipe='distill' needs a flexible model with a weak patch size "
                         f"(model.patch_sizes={list(model.patch_sizes)}); call model.flexify first")
    return weak


def train(model: torch.nn.Module, data: TensorData, config: TrainConfig, resume: bool = True,
          device: str | torch.device | None = None, allow_changes: bool = False,
          evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
          eval_every: int = 0) -> torch.nn.Module:
    """Run (or resume) `config` on `model` with `data`; returns the EMA model.

    Resuming from `<out>/checkpoint.pt` needs the settings it was written with (config, model
    shape, data) unless `allow_changes`. At the end, rank 0 writes `<out>/ema/` and `<out>/model/`
    with `save_pretrained`.

    `evaluate(ema_model) -> {name: number}`, when given, runs on rank 0 every `eval_every` steps and
    at the last one, after that step's checkpoint (e.g. sample quality, `flexikern train
    --eval-every`); its row goes to the log with the step and the training seconds so far. Every RNG
    state is restored after it, so evaluating does not change the run.

    Raises TrainSetupError (a ValueError), before any step, when the data does not fit the model
    or the recipe, the checkpoint was written with other settings, the log is corrupt, or another
    run holds `<out>`.
    """
    rank, world = _world()
    if evaluate is not None and not (is_int(eval_every) and eval_every >= 1):
        raise TrainSetupError(f"eval_every={eval_every!r}: with evaluate, expected the number of steps between "
                              "evaluations, an int >= 1 (command line: --eval-every N)")
    if config.batch_size % world:
        raise TrainSetupError(f"batch_size={config.batch_size} must be divisible by the number of processes "
                              f"({world})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        sizes = _sizes_for(config.recipe, model)
    except ValueError as e:
        raise TrainSetupError(str(e)) from None
    if tuple(data.x.shape[1:]) != model.latent_shape:
        raise TrainSetupError(f"data: images are {tuple(data.x.shape[1:])} but the model expects "
                              f"{model.latent_shape}")
    if int(data.y.max()) >= model.num_classes:
        raise TrainSetupError(f"data: label {int(data.y.max())} >= model.num_classes={model.num_classes}")
    out = Path(config.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    with _run_lock(out) if rank == 0 else contextlib.nullcontext():
        return _train(model, data, config, sizes, device, resume, allow_changes, evaluate, eval_every)


def _train(model: torch.nn.Module, data: TensorData, config: TrainConfig, sizes: list, device: torch.device,
           resume: bool, allow_changes: bool, evaluate: Any, eval_every: int) -> torch.nn.Module:
    rank, world = _world()
    out = Path(config.out_dir)
    settings = _run_settings(config, model, data)
    model.to(device).train()
    model.gradient_checkpointing = config.gradient_checkpointing
    params = model.trainable_parameters()
    teacher = None
    if config.recipe == "distill" and model.adapter != "lora":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)    # the frozen original
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay)
    diffusion = GaussianDiffusion.dit(1000)
    generator = torch.Generator().manual_seed(config.seed)
    order = BatchOrder(len(data), config.seed)
    null_class = model.num_classes
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"

    start = 0
    if resume and ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except (ValueError, OSError) as e:
            raise TrainSetupError(str(e)) from None
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise TrainSetupError(f"{ckpt_path}: not a training checkpoint of flexikern.train (no {missing}); "
                                  "move it away to start the run afresh, or use a new output directory")
        _check_resume(ckpt, settings, ckpt_path, allow_changes)
        try:
            model.load_state_dict(ckpt["model"])
            ema.model.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, ValueError, KeyError) as e:   # allow_changes cannot change the weights' shapes
            why = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise TrainSetupError(f"{ckpt_path}: its weights do not fit this model ({why[:300]}); only the "
                                  "original model continues from it: rerun with the original model settings, or "
                                  "use a new output directory") from None
        _set_rng_state(ckpt["rng"], generator)
        start = int(ckpt["step"])
        if rank == 0 and log_path.exists():      # drop log lines written after the checkpoint
            _write_text(log_path, _log_until(log_path, start))
    elif rank == 0:
        _write_text(log_path, "")
    if rank == 0:
        _write_text(out / "train_config.json", json.dumps(dataclasses.asdict(config), indent=2))

    b_local = config.batch_size // world
    lo, hi = rank * b_local, (rank + 1) * b_local
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop = config.steps if config.max_steps is None else min(config.steps, config.max_steps)
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=start, disable=not config.progress or rank != 0,
               desc=f"{config.recipe}", dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    t_last = time.time()
    train_seconds = float(ckpt.get("train_seconds", 0.0)) if start else 0.0   # wall time in steps, all runs
    for step in range(start, stop):
        t_step = time.perf_counter()
        # The global batch's randomness, identical on every process.
        x0, y = data[order.indices(step, config.batch_size)]
        t = torch.randint(0, diffusion.num_timesteps, (config.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.class_dropout
        which = torch.randint(0, len(sizes), (config.batch_size,), generator=generator)
        y = torch.where(drop, torch.full_like(y, null_class), y)
        x0, y, t, noise, which = (v[lo:hi].to(device) for v in (x0, y, t, noise, which))
        x_t = diffusion.q_sample(x0, t, noise)

        for lr_group in opt.param_groups:
            lr_group["lr"] = learning_rate(config, step)
        opt.zero_grad(set_to_none=False)     # zeros, not None: every process reduces every grad
        stats = torch.zeros(len(sizes), 2, dtype=torch.float64)   # (sum of losses, count) per size
        for i, patch in enumerate(sizes):
            rows = (which == i).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xs, ts, ys = x_t[rows], t[rows], y[rows]
            with autocast:
                out_student = model(xs, ts, ys, patch_size=patch)
                if config.recipe == "distill":
                    with torch.no_grad():
                        src = teacher if teacher is not None else model
                        target = src(xs, ts, ys, patch_size=model.original_patch_size)
                    losses = distillation_loss(out_student, target, model.in_channels, config.distill_sigma)
                else:
                    losses = diffusion_loss(out_student, x0[rows], xs, ts, noise[rows], diffusion,
                                            config.snr_gamma)
            (losses.sum() / config.batch_size).backward()
            stats[i] += torch.tensor([losses.detach().double().sum().item(), rows.numel()])
        _all_reduce_grads(params, world)
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip > 0
                     else torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)))
        opt.step()
        ema.update(model, step)
        train_seconds += time.perf_counter() - t_step

        if world > 1:
            dist.all_reduce(stats)
        for i, patch in enumerate(sizes):
            if stats[i, 1] > 0:
                window.setdefault(f"loss_{patch.name}", []).append(float(stats[i, 0] / stats[i, 1]))
        window.setdefault("loss", []).append(float(stats[:, 0].sum() / stats[:, 1].sum()))
        window.setdefault("grad_norm", []).append(float(grad_norm))
        bar.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            now = time.time()
            row = {"step": done, **{k: sum(v) / len(v) for k, v in window.items()},
                   "lr": opt.param_groups[0]["lr"], "it_s": len(window["loss"]) / max(now - t_last, 1e-9),
                   "train_seconds": round(train_seconds, 3)}
            window, t_last = {}, now
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if rank == 0:
                _append_line(log_path, json.dumps(row))
        if done % config.ckpt_every == 0 or done == config.steps:
            if rank == 0:
                save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.model.state_dict(),
                                            "opt": opt.state_dict(), "step": done, "train_seconds": train_seconds,
                                            "rng": _rng_state(generator),
                                            "config": dataclasses.asdict(config), "settings": settings})
            if world > 1:
                dist.barrier()
        if evaluate is not None and (done % eval_every == 0 or done == config.steps) and rank == 0:
            started, rng = time.time(), _rng_state(generator)
            try:
                scores = evaluate(ema.model)
            finally:        # the run continues as if nothing had happened
                _set_rng_state(rng, generator)
                ema.model.eval()
            _append_line(log_path, json.dumps({**scores, "step": done, "train_seconds": round(train_seconds, 3)}))
            t_last += time.time() - started     # the evaluation is not in the next row's it/s
    bar.close()
    if stop == config.steps and rank == 0:
        ema.model.save_pretrained(out / "ema")
        model.save_pretrained(out / "model")
    return ema.model
