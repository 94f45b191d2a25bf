"""`flexikern eval`, `flexikern demo` and `python -m flexikern.evaluate`: the quality commands.

    flexikern eval --quick --out out/eval      # FD / accuracy vs relative FLOPs: eval.json, eval.md, eval.png
    flexikern demo --out out/demo.png          # the shipped model, static vs FlexiDiT from the same noise
    python -m flexikern.evaluate --out PATH    # train the shapes classifier (the shipped one)

The measuring itself (classifier, Fréchet distance, curves, plots) is the library `flexikern.metrics`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from flexikern.arguments import (FIGURE_SUFFIXES, add_threads_arg, finite_float, fraction_arg, model_arg,
                                 output_dir_arg, output_file_arg, positive_int, resolve_guidance, seed_arg,
                                 shipped_models)
from flexikern.datasets import CLASS_NAMES, DEFAULT_VERSION, GEOMETRY, shapes_split
from flexikern.diffusion import Guidance, Schedule
from flexikern.diffusion.schedulers import make_scheduler
from flexikern.files import atomic_write
from flexikern.images import to_uint8
from flexikern.metrics import (ASSETS, FLOPS_LEVELS, SEED_STRIDE, EvalSettings, ShapesClassifier, classify,
                               evaluate_curves, feature_stats, generate, load_shipped, pyplot, score,
                               train_classifier, write_results)
from flexikern.ops._checks import max_seed

__all__ = ["add_eval_parser", "run_eval", "add_demo_parser", "run_demo"]

# The shipped model's guidance scale: the static model's best FD in docs/MODEL_CARD.md's sweep.
SHIPPED_GUIDANCE = 1.625


def _pyplot(parser: argparse.ArgumentParser) -> Any:
    """matplotlib.pyplot, or the command's usage error saying how to install it."""
    try:
        return pyplot()
    except ImportError as e:
        parser.error(str(e))


# ---------------------------------------------------------------------------------- eval
def add_eval_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="FD / accuracy vs relative FLOPs curves of a flexible model",
        description="Sample the static model, FlexiDiT weak-first schedules, fewer-steps and weak-last "
                    "baselines and calibrated schedules at relative FLOPs 1.0 ... 0.3; score each against "
                    "held-out real images with the shapes classifier. Writes eval.json, eval.md, eval.png.")
    p.add_argument("--model", type=model_arg, default=None,
                   help="a save_pretrained directory or a shipped model's name (default: shapes16)")
    p.add_argument("--classifier", default=None, help="classifier .safetensors (default: the shipped one)")
    p.add_argument("--out", type=output_dir_arg, default="out/eval",
                   help="output directory; its eval.json, eval.md and eval.png are replaced (default: out/eval)")
    p.add_argument("--quick", action="store_true", help="fewer samples, one seed (a few minutes on 2 cores)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="samples per point and seed, at least 2 (default 200; quick 100)")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default 3; quick 1)")
    p.add_argument("--steps", type=positive_int, default=20, help="sampling steps of the static model (default: 20)")
    p.add_argument("--sampler", type=_sampler_arg, default="ddim",
                   help="ddim or ddpm (flexikern's), or a diffusers scheduler class with DiT's diffusion, e.g. "
                        "DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler (default: ddim)")
    p.add_argument("--levels", type=_levels_arg, default=None,
                   help="comma-separated relative FLOPs levels below 1 to evaluate (default: "
                        f"{','.join(f'{v:g}' for v in FLOPS_LEVELS if v < 1)})")
    p.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default: 1 = none)")
    p.add_argument("--guidance-mode", choices=("none", "cfg", "flexi"), default=None,
                   help="how --guidance guides (default: flexi)")
    p.add_argument("--reference-samples", type=positive_int, default=None,
                   help="held-out real images, at least 2 (default 2000)")
    p.add_argument("--methods", type=_methods_arg, default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all; without calibrated with a "
                        "diffusers scheduler)")
    add_threads_arg(p, default=1)
    p.set_defaults(run=run_eval, parser=p)


METHODS = EvalSettings.methods


def _sampler_arg(text: str) -> str:
    """"ddim", "ddpm", or a diffusers scheduler class name that `make_scheduler` can build."""
    if text in ("ddim", "ddpm"):
        return text
    try:
        make_scheduler(text)
    except (ImportError, ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ddim, ddpm or a diffusers scheduler class "
                                         f"({e})") from None
    return text


def _levels_arg(text: str) -> tuple[float, ...]:
    levels = tuple(fraction_arg(v.strip()) for v in text.split(",") if v.strip())
    if not levels or any(v >= 1 for v in levels):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated fractions below 1, e.g. 0.8,0.6,0.4")
    return levels


def _methods_arg(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown method(s) {unknown}; expected a comma-separated "
                                         f"list from {','.join(METHODS)}")
    return methods


def _load_eval_models(args: argparse.Namespace) -> tuple[Any, ShapesClassifier]:
    """The model and classifier eval samples and scores with, or the usage error naming the flag."""
    from flexikern.models import FlexiDiT
    try:
        model = FlexiDiT.from_pretrained(args.model).eval() if args.model else load_shipped()[0]
    except (ValueError, TypeError, OSError) as e:
        args.parser.error(f"--model {args.model!r}: {e} (shipped models: {', '.join(shipped_models())}; a path "
                          "to a save_pretrained folder also works)")
    classifier_path = args.classifier or ASSETS / "shapes_classifier.safetensors"
    try:
        classifier = ShapesClassifier.load(classifier_path)
    except (ValueError, OSError) as e:    # load names the file and what is wrong with it
        args.parser.error(f"--classifier {str(classifier_path)!r}: {e}")
    return model, classifier


def _methods(args: argparse.Namespace) -> tuple[str, ...]:
    """--methods, checked against --sampler: calibration measures with flexikern's own samplers."""
    scheduler = args.sampler not in ("ddim", "ddpm")
    if args.methods is None:
        return tuple(m for m in METHODS if not (scheduler and m == "calibrated"))
    if scheduler and "calibrated" in args.methods:
        args.parser.error(f"--methods calibrated with --sampler {args.sampler}: Schedule.calibrate measures its "
                          "gaps with flexikern's ddim or ddpm sampler; drop calibrated or use --sampler ddim")
    return args.methods


def run_eval(args: argparse.Namespace) -> int:
    _pyplot(args.parser)   # before minutes of sampling: eval.png needs matplotlib
    for flag, value in (("--num-samples", args.num_samples), ("--reference-samples", args.reference_samples)):
        if value == 1:
            args.parser.error(f"{flag} 1: the Fréchet distance needs at least 2 samples")
    try:
        scale, mode = resolve_guidance(args.guidance, args.guidance_mode, 1.0, "flexi")
    except ValueError as e:
        args.parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, classifier = _load_eval_models(args)
    quick = args.quick
    settings = EvalSettings(
        steps=args.steps, num_samples=args.num_samples or (100 if quick else 200),
        seeds=tuple(range(args.seeds or (1 if quick else 3))), sampler=args.sampler,
        guidance_scale=scale, guidance_mode=mode,
        methods=_methods(args),
        levels=(1.0, *args.levels) if args.levels else FLOPS_LEVELS,
        reference_samples=args.reference_samples or (1000 if quick else 2000))
    if settings.guidance_mode != "none" and not model.has_null_class:
        args.parser.error(f"--guidance {scale}: the model has no null class to guide with (it was trained "
                          "without class dropout); pass --guidance 1")
    if len(model.patch_sizes) < 2:
        args.parser.error(f"--model {args.model!r}: has one patch size ({model.patch_sizes[0].name}), so there is "
                          "no flexible schedule to evaluate; make it flexible first (flexikern finetune)")
    x_ref, _ = shapes_split("heldout", settings.reference_samples, size=model.input_size)
    x_real, y_real = shapes_split("test", settings.num_samples * len(settings.seeds), size=model.input_size)
    start = time.time()
    rows = evaluate_curves(model, classifier, torch.from_numpy(x_ref), settings,
                           real=(torch.from_numpy(x_real), torch.from_numpy(y_real)))
    meta = {"model": args.model or "flexikern/assets/shapes16", "steps": settings.steps,
            "sampler": settings.sampler, "num_samples": settings.num_samples, "seeds": list(settings.seeds),
            "guidance": f"{settings.guidance_mode} {settings.guidance_scale}",
            "reference_samples": settings.reference_samples, "quick": quick,
            "classifier": str(args.classifier or "flexikern/assets/shapes_classifier.safetensors"),
            "shapes_version": DEFAULT_VERSION,
            "wall_seconds": round(time.time() - start, 1), "threads": torch.get_num_threads()}
    paths = write_results(rows, args.out, meta)
    print(Path(paths[1]).read_text())
    print(f"wrote {', '.join(map(str, paths))} in {meta['wall_seconds']} s")
    return 0


# ---------------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="sample the shipped model: static vs FlexiDiT, side by side",
        description="Samples the shipped 16x16 shapes model with the static schedule and a FlexiDiT "
                    "weak-first schedule from the same noise, writes a side-by-side PNG, prints relative "
                    "FLOPs, wall times and quick quality figures (FD, classifier accuracy).")
    p.add_argument("--out", type=output_file_arg(*FIGURE_SUFFIXES), default="out/demo.png",
                   help="figure path, .png, .pdf, .svg or .jpg, replaced if it exists (default: out/demo.png)")
    p.add_argument("--budget", type=fraction_arg, default=0.6,
                   help="relative FLOPs of the FlexiDiT schedule (default 0.6)")
    p.add_argument("--steps", type=positive_int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--num-samples", type=positive_int, default=100,
                   help="samples for the quality figures, at least 2 (default 100)")
    p.add_argument("--guidance", type=finite_float, default=None,
                   help=f"guidance scale (default {SHIPPED_GUIDANCE:g}: the best FD of the static shipped model, "
                        "docs/MODEL_CARD.md; 1 = none)")
    p.add_argument("--guidance-mode", choices=("none", "cfg", "flexi"), default=None,
                   help="how --guidance guides (default: flexi)")
    p.add_argument("--seed", type=seed_arg, default=0)
    add_threads_arg(p, default=1)
    p.set_defaults(run=run_demo, parser=p)


def run_demo(args: argparse.Namespace) -> int:
    plt = _pyplot(args.parser)
    n = args.num_samples
    if n == 1:
        args.parser.error("--num-samples 1: the Fréchet distance needs at least 2 samples")
    if args.seed > max_seed(max(n, 8), SEED_STRIDE):   # sample i is seeded seed * stride + i (metrics.generate)
        args.parser.error(f"--seed {args.seed}: too large; seeds are below 2**63 and sample i uses seed * "
                          f"{SEED_STRIDE} + i: pass --seed {max_seed(max(n, 8), SEED_STRIDE)} or less")
    try:
        guidance = Guidance(*resolve_guidance(args.guidance, args.guidance_mode, SHIPPED_GUIDANCE, "flexi"))
    except ValueError as e:
        args.parser.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, classifier = load_shipped()
    static = Schedule.static(args.steps, model.original_patch_size)
    try:
        flexi = Schedule.for_budget(model, args.steps, args.budget, guidance=guidance.enabled)
    except ValueError as e:
        args.parser.error(f"--budget: {e}")
    relative = flexi.relative_flops(model, guidance=guidance.enabled)
    print(f"model: flexikern/assets/shapes16 ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, patch sizes {[p[0] for p in model.patch_sizes]}), DDIM {args.steps} steps, "
          f"guidance {guidance.mode} {guidance.scale}")
    print(f"FlexiDiT schedule {flexi!r}: relative FLOPs {relative:.3f} "
          f"(F(4x4)/F(2x2) = {model.flops(4) / model.flops(2):.3f})")
    x_ref, _ = shapes_split("heldout", 1000, size=model.input_size)
    reference = feature_stats(classify(classifier, torch.from_numpy(x_ref))[0])
    results = {}
    for name, schedule in (("static", static), ("FlexiDiT", flexi)):
        generate(model, schedule, guidance, 8, args.seed)             # warm-up, not timed
        start = time.perf_counter()
        x, y = generate(model, schedule, guidance, n, args.seed)
        seconds = time.perf_counter() - start
        results[name] = (x, seconds, *score(classifier, x, y, reference))
        print(f"{name:>9}: {n} samples in {seconds:.1f} s, FD {results[name][2]:.2f}, "
              f"class accuracy {results[name][3]:.3f}")
    print(f"speed-up {results['static'][1] / results['FlexiDiT'][1]:.2f}x for {relative:.2f} of the FLOPs "
          f"(same noise: samples i of both runs start from the same x_T)")
    fig = _demo_figure(plt, model, {"static": (f"p={static.cond[0].name}", 1.0),
                                    "FlexiDiT": (f'"{flexi.notation}"', relative)}, results, guidance, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as tmp:
        fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def _demo_figure(plt: Any, model: Any, schedules: dict[str, tuple[str, float]],
                 results: dict[str, tuple[torch.Tensor, float, float, float]], guidance: Guidance,
                 steps: int) -> Any:
    """The demo's figure: one column per class (full names), `rows` samples per schedule from the
    same noise (sample i of each run starts from the same x_T), and beside each block its relative
    FLOPs, measured time, FD and accuracy."""
    classes = model.num_classes
    n = len(next(iter(results.values()))[0])
    rows = max(1, min(2, n // classes))
    cols = min(classes, n)
    fig, axes = plt.subplots(len(results) * rows, cols, squeeze=False,
                             figsize=(1.0 + 0.75 * cols, 0.35 + 0.8 * len(results) * rows))
    for b, (name, (x, seconds, fd, accuracy)) in enumerate(results.items()):
        images, _ = to_uint8(x[:rows * classes])
        for r in range(rows):
            for j in range(cols):
                ax = axes[b * rows + r, j]
                ax.imshow(images[r * classes + j], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if b == 0 and r == 0:
                    ax.set_title(CLASS_NAMES[j].replace("h_", "horizontal ").replace("v_", "vertical ")
                                 .replace("_", " ").replace(" ", "\n"), fontsize=6)
        schedule, relative = schedules[name]
        axes[b * rows, 0].set_ylabel(
            f"{name} {schedule}\nFLOPs {relative:.2f}\n{seconds:.1f} s\nFD {fd:.0f}\nacc {accuracy:.2f}",
            fontsize=6, rotation=0, ha="right", va="top", labelpad=4)
    fig.suptitle(f"shapes16: static vs FlexiDiT from the same noise (DDIM {steps} steps, guidance "
                 f"{guidance.mode} {guidance.scale:g}); time and FD over {n} samples", fontsize=7)
    return fig


# ---------------------------------------------------------------------------------- classifier
def _main_classifier(argv: list[str] | None = None) -> int:
    """`python -m flexikern.evaluate --out PATH`: train the shapes classifier (the shipped one)."""
    p = argparse.ArgumentParser(prog="python -m flexikern.evaluate",
                                description="Train the feature classifier on the generated shapes data.")
    p.add_argument("--out", type=output_file_arg(".safetensors"), required=True,
                   help="the classifier file, replaced if it exists (the shipped one: "
                        "flexikern/assets/shapes_classifier.safetensors)")
    p.add_argument("--num-images", type=positive_int, default=20000)
    p.add_argument("--epochs", type=positive_int, default=4)
    p.add_argument("--image-size", type=positive_int, default=16)
    p.add_argument("--shapes-version", type=int, choices=sorted(GEOMETRY), default=DEFAULT_VERSION,
                   help="geometry of the shapes (flexikern.datasets.GEOMETRY; 1: the T2I/video examples' "
                        f"shapes_classifier_v1.safetensors; default {DEFAULT_VERSION})")
    add_threads_arg(p, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        x, y = shapes_split("train", args.num_images, size=args.image_size, version=args.shapes_version)
    except ValueError as e:
        p.error(f"--image-size {args.image_size}: {e}")
    start = time.time()
    clf = train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=args.epochs, progress=True)
    xt, yt = shapes_split("test", 2000, size=args.image_size, version=args.shapes_version)
    _, pred = classify(clf, torch.from_numpy(xt))
    clf.save(args.out)
    print(f"test accuracy {(pred == yt).mean():.4f} after {time.time() - start:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main_classifier())
