"""Sample quality versus FLOPs: a feature classifier, the Fréchet distance, the curves, calibration.

Quality is measured the way FID is, in the feature space of a network, but with a small
classifier that flexikern trains on its own generated data (`flexikern.datasets`), so nothing is
downloaded:

* `ShapesClassifier`: a 3-layer CNN; its 64-d penultimate activations are the features, its
  logits give the accuracy of class-conditional samples (does a sample of class c look like c?);
* `frechet_distance(mu1, sigma1, mu2, sigma2)`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),
  with the matrix square root through the symmetric product S1^(1/2) S2 S1^(1/2) (float64);
* `evaluate_curves`: FD of generated samples against held-out real images, and the accuracy,
  for the static model, FlexiDiT weak-first schedules at relative FLOPs {0.8, ..., 0.3}, the
  static model with fewer steps at the same FLOPs (the paper's baseline), weak-last schedules
  (control) and `Schedule.calibrate` schedules; mean and spread over seeds;
* `calibrate(model, steps, budget, tolerance)`: measures along the static model's own sampling
  trajectory how much running step k at the weak size would change that step's update (the
  paper's Fig. 4 profile: the gap is small at the early, noisy steps), and makes the steps with
  the smallest gap weak. Attached as `flexikern.Schedule.calibrate`.

`flexikern eval` writes eval.json (rows {"method", "relative_flops", "fd", "fd_std", "accuracy",
...}), eval.md (a table) and eval.png (the curves); `flexikern demo` samples the shipped model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShapesClassifier", "train_classifier", "frechet_distance", "feature_stats", "calibrate",
           "gap_profile", "generate", "evaluate_curves", "write_results", "load_shipped",
           "ASSETS", "EvalSettings"]

ASSETS = Path(__file__).resolve().parent / "assets"
FLOPS_LEVELS = (1.0, 0.8, 0.64, 0.5, 0.4, 0.3)


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
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path),
                  metadata={"config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path) -> "ShapesClassifier":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        model = cls(**config)
        model.load_state_dict(load_file(str(path)))
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


# ---------------------------------------------------------------------------------- calibration
@torch.no_grad()
def gap_profile(model: Any, steps: int, num_samples: int = 16, seed: int = 0, sampler: str = "ddim",
                weak: Any = None, y: Any = None, clip_denoised: bool = True) -> list[float]:
    """Per step k (0 = noisiest), how far the weak prediction is from the powerful one.

    Runs the static (powerful) sampler on `num_samples` noise draws; at each step it also runs
    the weak size on the same x_k and records mean ||update(eps_weak) - update(eps_powerful)||^2,
    the change running this one step weak would make to x_{k+1} (the eps gap weighted by the
    sampler's coefficient at that step, which is what a sample sees). Deterministic given `seed`.
    """
    from flexikern.diffusion import make_sampler
    from flexikern.flexi.resize import as_size

    powerful = model.original_patch_size
    if weak is None:
        larger = sorted((as_size(s) for s in model.patch_sizes if s[0] * s[1] > powerful[0] * powerful[1]),
                        key=lambda s: s[0] * s[1])
        if not larger:
            raise ValueError(f"calibrate: the model has no patch size larger than {powerful} "
                             f"(patch_sizes={list(model.patch_sizes)}); flexify it first")
        weak = larger[0]
    sampler_obj = make_sampler(sampler, steps, clip_denoised=clip_denoised)
    params = next(model.parameters())
    device = params.device
    sampler_obj.to(device)
    g = torch.Generator().manual_seed(seed)
    shape = (num_samples, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, generator=g).to(device)
    y = (torch.arange(num_samples) % model.num_classes if y is None else torch.as_tensor(y)).to(device)
    was_training = model.training
    model.eval()
    gaps = []
    try:
        for k in range(steps):
            kt = torch.tensor(k, device=device)
            t = sampler_obj.model_timesteps[k].expand(num_samples)
            out_p = model(x.to(params.dtype), t, y, patch_size=powerful).float()
            out_w = model(x.to(params.dtype), t, y, patch_size=weak).float()
            noise = torch.randn(shape, generator=g).to(device) if sampler_obj.stochastic else None
            zero = torch.zeros_like(x) if noise is not None else None
            nxt_p = sampler_obj.step(out_p, x, kt, zero)
            nxt_w = sampler_obj.step(out_w, x, kt, zero)
            gaps.append(float((nxt_w - nxt_p).pow(2).flatten(1).sum(1).mean()))
            x = nxt_p if noise is None else sampler_obj.step(out_p, x, kt, noise)
    finally:
        model.train(was_training)
    return gaps


def calibrate(model: Any, steps: int, budget: float | None = None, tolerance: float | None = None,
              guidance: bool = True, num_samples: int = 16, seed: int = 0, sampler: str = "ddim",
              weak: Any = None, profile: Sequence[float] | None = None) -> Any:
    """A schedule whose weak steps are the steps where the weak model is closest to the powerful one.

    Exactly one of `budget` (relative FLOPs: as many weak steps as fit, smallest gap first) and
    `tolerance` (every step whose gap, relative to the largest gap, is <= tolerance) is given.
    Both branches use the same size at each step. `profile` reuses a `gap_profile` result.
    """
    from flexikern.diffusion import Schedule
    from flexikern.flexi.resize import as_size

    if (budget is None) == (tolerance is None):
        raise ValueError(f"calibrate: pass exactly one of budget (e.g. 0.6) and tolerance (e.g. 0.05); "
                         f"got budget={budget!r}, tolerance={tolerance!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected a positive int")
    powerful = model.original_patch_size
    gaps = list(profile) if profile is not None else gap_profile(model, steps, num_samples, seed, sampler, weak)
    if len(gaps) != steps:
        raise ValueError(f"profile: expected {steps} gaps (one per step), got {len(gaps)}")
    if weak is None:
        weak = sorted((as_size(s) for s in model.patch_sizes if s[0] * s[1] > powerful[0] * powerful[1]),
                      key=lambda s: s[0] * s[1])[0]
    weak = as_size(weak)
    order = sorted(range(steps), key=lambda k: (gaps[k], k))
    if tolerance is not None:
        if not tolerance >= 0:
            raise ValueError(f"tolerance={tolerance!r}: expected a fraction >= 0 of the largest gap")
        top = max(gaps) or 1.0
        chosen = {k for k in range(steps) if gaps[k] / top <= tolerance}
    else:
        if not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"budget={budget!r}: expected a positive fraction of the static FLOPs, e.g. 0.6")
        f_w, f_p = model.flops(weak), model.flops(powerful)
        # The fewest weak steps that bring the cost under the budget: the most powerful schedule.
        n_weak = max(0, math.ceil((1 - budget) * steps * f_p / (f_p - f_w) - 1e-9))
        if n_weak > steps:
            raise ValueError(f"budget={budget}: even all {steps} steps at weak={weak} cost "
                             f"{f_w / f_p:.3f} of the static schedule; raise the budget")
        chosen = set(order[:max(0, n_weak)])
    sizes = [weak if k in chosen else powerful for k in range(steps)]
    schedule = Schedule.from_list(sizes, sizes)
    return schedule


# ---------------------------------------------------------------------------------- sampling
def generate(model: Any, schedule: Any, guidance: Any, n: int, seed: int, sampler: str = "ddim",
             batch_size: int = 500, clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples (labels i mod num_classes, sample i seeded `seed * 1_000_003 + i`).

    `clip_denoised`: clip the predicted x0 to [-1, 1] at every step (images in pixel space).
    """
    from flexikern.diffusion import make_sampler, sample
    y = torch.arange(n) % model.num_classes
    out = []
    for start in range(0, n, batch_size):
        yb = y[start:start + batch_size]
        steps_sampler = make_sampler(sampler, schedule.num_steps, clip_denoised=clip_denoised)
        out.append(sample(model, yb, schedule, guidance, sampler=steps_sampler, progress=False,
                          seed=[seed * 1_000_003 + i for i in range(start, start + len(yb))]).cpu())
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
    from flexikern.diffusion import Schedule
    powerful = model.original_patch_size
    out = [("static", 1.0, Schedule.static(s.steps, powerful), s.steps)]
    profile = None
    for level in s.levels:
        if level >= 1.0:
            continue
        # "x/x": both branches share a size at every step, so every step is ordinary CFG (the best
        # guidance for the static model); for_budget's default would also search x/y schedules,
        # which on a tie prefer a weak guidance branch (FlexiDiT's weak-model guidance rule).
        flexi = Schedule.for_budget(model, s.steps, level, guidance=guided, equal_branches=True)
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
            out.append(("calibrated", level, calibrate(model, s.steps, budget=level, sampler=s.sampler,
                                                       profile=profile), s.steps))
    return out


def evaluate_curves(model: Any, classifier: ShapesClassifier, reference: torch.Tensor, settings: EvalSettings,
                    progress: bool = True) -> list[dict[str, Any]]:
    """FD (vs `reference` images) and accuracy for every method and FLOPs level; one row each."""
    from tqdm.auto import tqdm

    from flexikern.diffusion import Guidance, Schedule, make_sampler
    guidance = Guidance(settings.guidance_scale, settings.guidance_mode)
    mu_ref, sigma_ref = feature_stats(classify(classifier, reference)[0])
    rows = []
    points = _schedules(model, settings, guidance.enabled)
    base_steps = settings.steps
    static_flops = None
    with tqdm(total=len(points) * len(settings.seeds), disable=not progress, desc="eval") as bar:
        for method, level, schedule, steps in points:
            guided = guidance.active_steps(make_sampler(settings.sampler, steps).model_timesteps)
            flops = schedule.flops(model, 1, guided)
            if static_flops is None:
                ref = Schedule.static(base_steps, model.original_patch_size)
                static_flops = ref.flops(model, 1, guidance.active_steps(
                    make_sampler(settings.sampler, base_steps).model_timesteps))
            fds, accs, seconds = [], [], 0.0
            for seed in settings.seeds:
                start = time.perf_counter()
                x, y = generate(model, schedule, guidance, settings.num_samples, seed, settings.sampler)
                seconds += time.perf_counter() - start
                feats, pred = classify(classifier, x)
                fds.append(frechet_distance(*feature_stats(feats), mu_ref, sigma_ref))
                accs.append(float((pred == y.numpy()).mean()))
                bar.update(1)
            rows.append({"method": method, "relative_flops": flops / static_flops, "level": level,
                         "steps": steps, "schedule": repr(schedule),
                         "fd": float(np.mean(fds)), "fd_std": float(np.std(fds)),
                         "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                         "fd_per_seed": fds, "seconds_per_seed": seconds / len(settings.seeds)})
    return rows


def write_results(rows: list[dict[str, Any]], out_dir: str | Path, meta: dict[str, Any]) -> list[Path]:
    """eval.json, eval.md (a table) and eval.png (FD and accuracy vs relative FLOPs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "eval.png"]
    paths[0].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    static = next((r for r in rows if r["method"] == "static"), None)
    lines = [f"# FD and accuracy vs relative FLOPs ({meta.get('model', 'model')})", "",
             f"{meta.get('num_samples')} samples per seed, seeds {meta.get('seeds')}, {meta.get('sampler')} "
             f"{meta.get('steps')} steps, guidance {meta.get('guidance')}; FD in the shapes-classifier "
             f"feature space against {meta.get('reference_samples')} held-out real images "
             "(lower is better); mean ± std over seeds.", "",
             "| method | relative FLOPs | FD | FD vs static | accuracy | schedule |",
             "|---|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["method"] != "static", r["method"], -r["relative_flops"])):
        rel = f"{100 * (r['fd'] / static['fd'] - 1):+.1f}%" if static else ""
        lines.append(f"| {r['method']} | {r['relative_flops']:.3f} | {r['fd']:.3f} ± {r['fd_std']:.3f} | {rel} | "
                     f"{r['accuracy']:.3f} | {r['schedule']} |")
    paths[1].write_text("\n".join(lines) + "\n")

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
    axes[0].set(xlabel="relative FLOPs", ylabel="FD (lower is better)", title="Fréchet distance")
    axes[1].set(xlabel="relative FLOPs", ylabel="classifier accuracy", title="class accuracy of samples")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------- CLI
def add_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="FD / accuracy vs relative FLOPs curves of a flexible model",
        description="Sample the static model, FlexiDiT weak-first schedules, fewer-steps and weak-last "
                    "baselines and calibrated schedules at relative FLOPs 1.0 ... 0.3; score each against "
                    "held-out real images with the shapes classifier. Writes eval.json, eval.md, eval.png.")
    p.add_argument("--model", default=None, help="a save_pretrained directory (default: the shipped model)")
    p.add_argument("--classifier", default=None, help="classifier .safetensors (default: the shipped one)")
    p.add_argument("--out", default="out/eval", help="output directory (default: out/eval)")
    p.add_argument("--quick", action="store_true", help="fewer samples, one seed (a few minutes on 2 cores)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per point and seed (default 200; quick 100)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 1)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the static model (default: 20)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale (default: 1 = none)")
    p.add_argument("--guidance-mode", choices=("none", "cfg", "flexi"), default="none")
    p.add_argument("--reference-samples", type=int, default=None, help="held-out real images (default 2000)")
    p.add_argument("--methods", default="static,flexi,fewer_steps,weak_last,calibrated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; small models run faster on one thread of a busy CPU)")
    p.set_defaults(run=run_eval, parser=p)


def run_eval(args: argparse.Namespace) -> int:
    from flexikern.datasets import shapes_split
    from flexikern.models import FlexiDiT

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        model = FlexiDiT.from_pretrained(args.model).eval()
        classifier = ShapesClassifier.load(args.classifier or ASSETS / "shapes_classifier.safetensors")
    else:
        model, classifier = load_shipped()
        if args.classifier:
            classifier = ShapesClassifier.load(args.classifier)
    quick = args.quick
    settings = EvalSettings(
        steps=args.steps, num_samples=args.num_samples or (100 if quick else 200),
        seeds=tuple(range(args.seeds or (1 if quick else 3))), sampler=args.sampler,
        guidance_scale=args.guidance, guidance_mode=args.guidance_mode if args.guidance != 1.0 else "none",
        methods=tuple(m.strip() for m in args.methods.split(",")),
        reference_samples=args.reference_samples or (1000 if quick else 2000))
    if settings.guidance_mode != "none" and model.num_classes >= model.y_embedder.embedding_table.num_embeddings:
        args.parser.error("--guidance: the model has no null class to guide with")
    x_ref, _ = shapes_split("heldout", settings.reference_samples, size=model.input_size)
    start = time.time()
    rows = evaluate_curves(model, classifier, torch.from_numpy(x_ref), settings)
    meta = {"model": args.model or "flexikern/assets/shapes16", "steps": settings.steps,
            "sampler": settings.sampler, "num_samples": settings.num_samples, "seeds": list(settings.seeds),
            "guidance": f"{settings.guidance_mode} {settings.guidance_scale}",
            "reference_samples": settings.reference_samples, "quick": quick,
            "wall_seconds": round(time.time() - start, 1), "threads": torch.get_num_threads()}
    paths = write_results(rows, args.out, meta)
    print(Path(paths[1]).read_text())
    print(f"wrote {', '.join(map(str, paths))} in {meta['wall_seconds']} s")
    return 0


def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="sample the shipped model: static vs FlexiDiT, side by side",
        description="Samples the shipped 16x16 shapes model with the static schedule and a FlexiDiT "
                    "weak-first schedule from the same noise, writes a side-by-side PNG, prints relative "
                    "FLOPs, wall times and quick quality figures (FD, classifier accuracy).")
    p.add_argument("--out", default="out/demo.png", help="PNG path (default: out/demo.png)")
    p.add_argument("--budget", type=float, default=0.6, help="relative FLOPs of the FlexiDiT schedule (default 0.6)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--num-samples", type=int, default=100, help="samples for the quality figures (default 100)")
    p.add_argument("--guidance", type=float, default=5.0,
                   help="guidance scale (default 5: the best of 1/1.5/3/5/8 for the static shipped model)")
    p.add_argument("--guidance-mode", choices=("none", "cfg", "flexi"), default="flexi")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; small models run faster on one thread of a busy CPU)")
    p.set_defaults(run=run_demo, parser=p)


def run_demo(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexikern.cli import to_uint8
    from flexikern.datasets import CLASS_NAMES, shapes_split
    from flexikern.diffusion import Guidance, Schedule

    if args.threads:
        torch.set_num_threads(args.threads)
    model, classifier = load_shipped()
    guidance = Guidance(args.guidance, args.guidance_mode if args.guidance != 1.0 else "none")
    static = Schedule.static(args.steps, model.original_patch_size)
    try:
        flexi = Schedule.for_budget(model, args.steps, args.budget, guidance=guidance.enabled,
                                    equal_branches=True)
    except ValueError as e:
        args.parser.error(f"--budget: {e}")
    relative = flexi.relative_flops(model, guidance=guidance.enabled)
    print(f"model: flexikern/assets/shapes16 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, patch sizes {[p[0] for p in model.patch_sizes]}), DDIM {args.steps} steps, "
          f"guidance {guidance.mode} {guidance.scale}")
    print(f"FlexiDiT schedule {flexi!r}: relative FLOPs {relative:.3f} "
          f"(F(4x4)/F(2x2) = {model.flops(4) / model.flops(2):.3f})")
    x_ref, _ = shapes_split("heldout", 1000, size=model.input_size)
    mu_ref, sigma_ref = feature_stats(classify(classifier, torch.from_numpy(x_ref))[0])
    n = max(args.num_samples, model.num_classes)
    results = {}
    for name, schedule in (("static", static), ("flexidit", flexi)):
        generate(model, schedule, guidance, 8, args.seed)             # warm-up, not timed
        start = time.perf_counter()
        x, y = generate(model, schedule, guidance, n, args.seed)
        seconds = time.perf_counter() - start
        feats, pred = classify(classifier, x)
        results[name] = (x, seconds, frechet_distance(*feature_stats(feats), mu_ref, sigma_ref),
                         float((pred == y.numpy()).mean()))
        print(f"{name:>9}: {n} samples in {seconds:.1f} s, FD {results[name][2]:.2f}, "
              f"class accuracy {results[name][3]:.3f}")
    print(f"speed-up {results['static'][1] / results['flexidit'][1]:.2f}x for {relative:.2f} of the FLOPs "
          f"(same noise: samples i of both runs start from the same x_T)")
    cols = min(2 * model.num_classes, n)
    fig, axes = plt.subplots(2, cols, figsize=(cols * 0.8, 2.2))
    for row, name in enumerate(("static", "flexidit")):
        images, _ = to_uint8(results[name][0][:cols])
        for j in range(cols):
            axes[row, j].imshow(images[j], interpolation="nearest")
            axes[row, j].set_xticks([])
            axes[row, j].set_yticks([])
            if row == 0:
                axes[row, j].set_title(CLASS_NAMES[j % model.num_classes][:8], fontsize=6)
        axes[row, 0].set_ylabel("static\n1.00" if row == 0 else f"FlexiDiT\n{relative:.2f}", fontsize=7)
    fig.suptitle("same noise, static (top) vs FlexiDiT (bottom); relative FLOPs on the left", fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def _main_classifier(argv: list[str] | None = None) -> int:
    """`python -m flexikern.evaluate --out PATH`: train the shapes classifier (the shipped one)."""
    from flexikern.datasets import shapes_split
    p = argparse.ArgumentParser(prog="python -m flexikern.evaluate",
                                description="Train the feature classifier on the generated shapes data.")
    p.add_argument("--out", default=str(ASSETS / "shapes_classifier.safetensors"))
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = shapes_split("train", args.num_images, size=args.image_size)
    start = time.time()
    clf = train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=args.epochs, progress=True)
    xt, yt = shapes_split("test", 2000, size=args.image_size)
    _, pred = classify(clf, torch.from_numpy(xt))
    clf.save(args.out)
    print(f"test accuracy {(pred == yt).mean():.4f} after {time.time() - start:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main_classifier())
