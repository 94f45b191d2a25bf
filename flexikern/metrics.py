"""Sample quality versus FLOPs: a feature classifier, the Fréchet distance, the curves and their plot.

Quality is measured the way FID is, in the feature space of a network, but with a small
classifier that flexikern trains on its own generated data (`flexikern.datasets`), so nothing is
downloaded:

* `ShapesClassifier`: a 3-layer CNN; its 64-d penultimate activations are the features, its
  logits give the accuracy of class-conditional samples (does a sample of class c look like c?);
* `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
  with the matrix square root through the symmetric product S1^(1/2) S2 S1^(1/2) (float64);
* `evaluate_curves`: FD of generated samples against held-out real images, and the accuracy,
  for the static model, FlexiDiT weak-first schedules at relative FLOPs {0.8, 0.6, ..., 0.3}
  (`Schedule.for_budget`'s default x/x: the level 0.6 is exactly what `--budget 0.6` picks), the
  static model with fewer steps at the same FLOPs (the paper's baseline), weak-last schedules
  (control) and calibrated schedules (`Schedule.calibrate`); mean and spread over seeds; and the
  row "real" (real images scored the same way: the real-vs-real floor; no FLOPs);
* `write_results`: eval.json (rows {"method", "relative_flops", "fd", "fd_std", "accuracy", ...}),
  eval.md (a table) and eval.png (the curves; matplotlib, the `eval` extra).

The `eval` and `demo` commands that drive this are in `flexikern.evaluate`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexikern.diffusion import SAMPLERS, Guidance, Schedule, make_sampler, sample
from flexikern.diffusion.schedulers import SchedulerSampler, make_scheduler
from flexikern.diffusion.calibrate import gap_profile
from flexikern.files import atomic_write
from flexikern.models.convert import load_state_dict_strict
from flexikern.ops._checks import check_seed, max_seed

__all__ = ["ShapesClassifier", "train_classifier", "classify", "frechet_distance", "feature_stats", "score",
           "generate", "evaluate_curves", "write_results", "load_shipped", "pyplot", "ASSETS",
           "EvalSettings"]

ASSETS = Path(__file__).resolve().parent / "assets"
FLOPS_LEVELS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3)
SEED_STRIDE = 1_000_003   # `generate`'s sample i is seeded seed * stride + i: runs' seeds never overlap


# ---------------------------------------------------------------------------------- classifier
class ShapesClassifier(nn.Module):
    """A small CNN for 3-channel images in [-1, 1]; `features` is the 64-d space of the FD."""

    def __init__(self, num_classes: int = 10, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file
        with atomic_write(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> "ShapesClassifier":
        """The classifier in a file written by `save`, in eval mode.

        Raises FileNotFoundError (no such file, or a folder) and ValueError (another file), naming it.
        """
        from safetensors import safe_open
        if not Path(path).is_file():
            what = "a folder" if Path(path).is_dir() else "no such file"
            raise FileNotFoundError(f"{path}: {what}; expected a classifier file written by ShapesClassifier.save "
                                    f"(.safetensors)")
        try:
            with safe_open(str(path), "pt") as f:
                config = json.loads(f.metadata()["config"])
                state = {k: f.get_tensor(k) for k in f.keys()}
            model = cls(**config)
        except Exception as e:
            raise ValueError(f"{path}: not a classifier written by ShapesClassifier.save (a .safetensors file "
                             f"with its config; {type(e).__name__}: {e})") from e
        load_state_dict_strict(model, state, str(path))
        return model.eval()


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 3, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = False) -> ShapesClassifier:
    """Adam on (x, y) with random flips as augmentation (no class here depends on handedness)."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    model = ShapesClassifier(num_classes=int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    with tqdm(total=steps, disable=not progress, desc="classifier") as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch_size):
                xb = x[idx]
                xb = torch.where(torch.rand(len(xb), 1, 1, 1, generator=g) < 0.5, xb.flip(3), xb)
                loss = F.cross_entropy(model(xb), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
    return model.eval()


@torch.no_grad()
def classify(classifier: ShapesClassifier, x: torch.Tensor, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float64, predicted labels (N,)) for images in [-1, 1]."""
    feats, preds = [], []
    for xb in x.float().split(batch_size):
        f = classifier.features(xb.clamp(-1, 1))
        feats.append(f.double().numpy())
        preds.append(classifier.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


# ---------------------------------------------------------------------------------- FD
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected (N >= 2, D), got {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): the eigenvalues of a symmetric PSD matrix,
    so no complex parts to discard (the usual `scipy.linalg.sqrtm(S1 @ S2)` route).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes disagree: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    root = _sqrt_psd(s1)
    product = root @ s2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def score(classifier: ShapesClassifier, x: torch.Tensor, labels: torch.Tensor | np.ndarray,
          reference: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """(FD, accuracy) of images x (N >= 2, 3, H, W) in [-1, 1] whose classes are `labels` (N,): the FD of
    their features against `reference` = `feature_stats` of real images, and the fraction the
    classifier labels as `labels`."""
    feats, pred = classify(classifier, x)
    accuracy = float((pred == np.asarray(labels)).mean())
    return frechet_distance(*feature_stats(feats), *reference), accuracy


# ---------------------------------------------------------------------------------- sampling
def step_sampler(name: str, steps: int, clip_denoised: bool = True) -> Any:
    """A fresh sampler for one run of `steps` steps: flexikern's ("ddpm", "ddim", "flow") or a
    diffusers scheduler by class name ("DPMSolverMultistepScheduler", ...) with DiT's diffusion
    (`make_scheduler`; stateful, so one per run).

    `clip_denoised`: clip the predicted x0 to [-1, 1] at every step (images in pixel space):
    flexikern's DDPM and DDIM; a diffusers scheduler's dynamic thresholding with
    `sample_max_value=1` (exactly that clip: DDIM, DDPM, DPM-Solver, UniPC, ...), else its
    `clip_sample`. The flow sampler and Euler have neither.
    """
    if name in SAMPLERS:
        return make_sampler(name, steps, clip_denoised=clip_denoised if name != "flow" else False)
    return make_scheduler(name, clip_sample=clip_denoised, thresholding=clip_denoised, sample_max_value=1.0)


def model_timesteps(name: str, steps: int) -> torch.Tensor:
    """The model timesteps of `step_sampler(name, steps)`'s steps (what a guidance interval selects)."""
    sampler = step_sampler(name, steps)
    return (sampler if name in SAMPLERS else SchedulerSampler(sampler, steps)).model_timesteps


def generate(model: Any, schedule: Any, guidance: Any, n: int, seed: int, sampler: str = "ddim",
             batch_size: int = 500, clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples (labels i mod num_classes, sample i seeded `seed * SEED_STRIDE + i`).

    `sampler` and `clip_denoised`: see `step_sampler`.
    """
    if check_seed(seed) > max_seed(n, SEED_STRIDE):
        raise ValueError(f"seed={seed}: sample i is seeded seed * {SEED_STRIDE} + i, below 2**63; with n={n} "
                         f"pass a seed in [0, {max_seed(n, SEED_STRIDE)}]")
    y = torch.arange(n) % model.num_classes
    out = []
    for start in range(0, n, batch_size):
        yb = y[start:start + batch_size]
        out.append(sample(model, yb, schedule, guidance, progress=False,
                          sampler=step_sampler(sampler, schedule.num_steps, clip_denoised),
                          seed=[seed * SEED_STRIDE + i for i in range(start, start + len(yb))]).cpu())
    return torch.cat(out), y


def load_shipped() -> tuple[Any, ShapesClassifier]:
    """The shipped flexible model and the feature classifier from `flexikern/assets/`."""
    from flexikern.models import FlexiDiT
    model_dir, clf = ASSETS / "shapes16", ASSETS / "shapes_classifier.safetensors"
    if not (model_dir / "model.safetensors").exists() or not clf.exists():
        raise FileNotFoundError(f"the shipped weights are missing under {ASSETS} (see docs/MODEL_CARD.md "
                                "for the commands that make them)")
    return FlexiDiT.from_pretrained(model_dir).eval(), ShapesClassifier.load(clf)


@dataclass
class EvalSettings:
    steps: int = 20
    num_samples: int = 200
    seeds: tuple[int, ...] = (0, 1, 2)
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    guidance_mode: str = "none"
    levels: tuple[float, ...] = FLOPS_LEVELS
    methods: tuple[str, ...] = ("static", "flexi", "fewer_steps", "weak_last", "calibrated")
    reference_samples: int = 2000


def _schedules(model: Any, s: EvalSettings, guided: bool) -> list[tuple[str, float, Any, int]]:
    """(method, nominal level, schedule, steps) for every point of the curves."""
    powerful = model.original_patch_size
    out = [("static", 1.0, Schedule.static(s.steps, powerful), s.steps)]
    profile = None
    for level in s.levels:
        if level >= 1.0:
            continue
        # for_budget's default, "x/x": at level 0.6 this row is exactly what `--budget 0.6` picks.
        flexi = Schedule.for_budget(model, s.steps, level, guidance=guided)
        if "flexi" in s.methods:
            out.append(("flexi", level, flexi, s.steps))
        if "weak_last" in s.methods:
            n = s.steps
            mirror = Schedule.from_list(flexi.cond[::-1], flexi.guidance[::-1])
            out.append(("weak_last", level, mirror, n))
        if "fewer_steps" in s.methods:
            k = max(1, math.floor(level * s.steps + 1e-9))    # within the level, like the others
            out.append(("fewer_steps", level, Schedule.static(k, powerful), k))
        if "calibrated" in s.methods:
            if profile is None:
                profile = gap_profile(model, s.steps, sampler=s.sampler)
            calibrated = Schedule.calibrate(model, s.steps, budget=level, sampler=s.sampler, profile=profile)
            out.append(("calibrated", level, calibrated, s.steps))
    return out


def evaluate_curves(model: Any, classifier: ShapesClassifier, reference: torch.Tensor, settings: EvalSettings,
                    progress: bool = True, real: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> list[dict[str, Any]]:
    """FD (vs `reference` images) and accuracy for every method and FLOPs level; one row each.

    `real`: (images, labels), `num_samples` per seed, other real images than `reference`: scored
    the same way as the samples, they give the row "real", the floor of the FD (real vs real).
    """
    from tqdm.auto import tqdm
    guidance = Guidance(settings.guidance_scale, settings.guidance_mode)
    reference_stats = feature_stats(classify(classifier, reference)[0])
    rows = []
    if real is not None:
        n = settings.num_samples
        if len(real[0]) < n * len(settings.seeds):
            raise ValueError(f"real: {len(real[0])} images, expected num_samples * seeds = {n * len(settings.seeds)}")
        scores = [score(classifier, real[0][i * n:(i + 1) * n], real[1][i * n:(i + 1) * n], reference_stats)
                  for i in range(len(settings.seeds))]
        rows.append({"method": "real", "relative_flops": None, "level": None, "steps": 0, "schedule": "real images",
                     **_over_seeds(scores), "seconds_per_seed": 0.0})

    def flops(schedule: Any, steps: int) -> float:
        return schedule.flops(model, 1, guidance.active_steps(model_timesteps(settings.sampler, steps)))

    static_flops = flops(Schedule.static(settings.steps, model.original_patch_size), settings.steps)
    points = _schedules(model, settings, guidance.enabled)
    with tqdm(total=len(points) * len(settings.seeds), disable=not progress, desc="eval") as bar:
        for method, level, schedule, steps in points:
            scores, seconds = [], 0.0
            for seed in settings.seeds:
                start = time.perf_counter()
                x, y = generate(model, schedule, guidance, settings.num_samples, seed, settings.sampler)
                seconds += time.perf_counter() - start
                scores.append(score(classifier, x, y, reference_stats))
                bar.update(1)
            rows.append({"method": method, "relative_flops": flops(schedule, steps) / static_flops, "level": level,
                         "steps": steps, "schedule": repr(schedule), **_over_seeds(scores),
                         "seconds_per_seed": seconds / len(settings.seeds)})
    return rows


def _over_seeds(scores: list[tuple[float, float]]) -> dict[str, Any]:
    """A row's quality columns from one (FD, accuracy) per seed: mean, std and the per-seed FDs."""
    fds, accs = [fd for fd, _ in scores], [acc for _, acc in scores]
    return {"fd": float(np.mean(fds)), "fd_std": float(np.std(fds)), "accuracy": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)), "fd_per_seed": fds}


# ---------------------------------------------------------------------------------- results and plots
def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files (Agg); matplotlib comes with the `eval` extra."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('the figures (eval.png, the demo\'s PNG) need matplotlib: '
                          'pip install "flexikern[eval]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """eval.json, eval.md (a table) and eval.png (FD and accuracy vs relative FLOPs)."""
    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "eval.png"]
    with atomic_write(paths[0]) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    static = next((r for r in rows if r["method"] == "static"), None)
    lines = [f"# FD and accuracy vs relative FLOPs ({meta.get('model', 'model')})", "",
             f"{meta.get('num_samples')} samples per seed, seeds {meta.get('seeds')}, {meta.get('sampler')} "
             f"{meta.get('steps')} steps, guidance {meta.get('guidance')}; FD in the shapes-classifier "
             f"feature space against {meta.get('reference_samples')} held-out real images "
             "(lower is better); mean ± std over seeds.", "",
             "| method | relative FLOPs | FD | FD vs static | accuracy | schedule |",
             "|---|---:|---:|---:|---:|---|"]
    order = {"real": 0, "static": 1}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], 2), r["method"], -(r["relative_flops"] or 0))):
        rel = f"{100 * (r['fd'] / static['fd'] - 1):+.1f}%" if static and r["method"] != "real" else ""
        flops = "" if r["method"] == "real" else f"{r['relative_flops']:.3f}"
        lines.append(f"| {r['method']} | {flops} | {r['fd']:.3f} ± {r['fd_std']:.3f} | {rel} | "
                     f"{r['accuracy']:.3f} | {r['schedule']} |")
    with atomic_write(paths[1]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"flexi": ("C0", "o"), "calibrated": ("C2", "s"), "fewer_steps": ("C1", "^"),
              "weak_last": ("C3", "x")}
    for method, (color, marker) in styles.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["relative_flops"])
        if static:
            pts = pts + [static]
        if len(pts) < 2:
            continue
        xs = [r["relative_flops"] for r in pts]
        axes[0].errorbar(xs, [r["fd"] for r in pts], yerr=[r["fd_std"] for r in pts], color=color,
                         marker=marker, label=method, capsize=3)
        axes[1].plot(xs, [r["accuracy"] for r in pts], color=color, marker=marker, label=method)
    if static:
        axes[0].axhline(static["fd"] * 1.05, color="gray", ls="--", lw=1, label="static FD + 5%")
    real = next((r for r in rows if r["method"] == "real"), None)
    if real:
        axes[0].axhline(real["fd"], color="black", ls=":", lw=1, label="real images")
        axes[1].axhline(real["accuracy"], color="black", ls=":", lw=1, label="real images")
    axes[0].set(xlabel="relative FLOPs", ylabel="FD (lower is better)", title="Fréchet distance")
    axes[1].set(xlabel="relative FLOPs", ylabel="classifier accuracy", title="class accuracy of samples")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(paths[2]) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return paths
