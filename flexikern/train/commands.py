"""`flexikern train` and `flexikern finetune`: the command-line front of `flexikern.train`.

    flexikern train --data shapes --image-size 16 --hidden-size 128 --depth 4 --steps 2000 --out runs/pre
    flexikern finetune --model runs/pre/ema --recipe shared --patch-sizes 2,4 --steps 500 --out runs/ft
    torchrun --nproc_per_node 2 -m flexikern finetune ...      # data parallel (gloo on CPU, NCCL on GPU)

Both run `flexikern.train.train` (one loop); `train` builds a randomly initialised single-size DiT
and uses the "pretrain" recipe, `finetune` loads a model, makes it flexible and runs "shared" or
"distill". Re-running a command with the same --out resumes from `<out>/checkpoint.pt` (with the
same settings, unless --allow-changes). Every random choice (initialisation, LoRA init, data
order, noise, teacher samples) comes from --seed: two identical commands give identical runs.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any

from flexikern.arguments import (add_threads_arg, device_arg, finite_float, model_arg, nonnegative_float,
                                 nonnegative_int, output_dir_arg, patch_size_arg, patch_sizes_arg, positive_float,
                                 positive_int, probability_arg, seed_arg, shipped_models)

__all__ = ["add_train_parser", "run_train", "add_finetune_parser", "run_finetune", "load_data"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes",
                   help="'shapes' (the generated dataset, flexikern.datasets), an .npz with x/y "
                        "(images or latents + labels), an image folder (one subfolder per class), or "
                        "'teacher' (data-free: x0 sampled from the model itself; finetune only)")
    g.add_argument("--num-images", type=positive_int, default=None,
                   help="shapes: how many images to generate; teacher: how many samples (default: 20000)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="shapes / image folder: image side in pixels (default: 16)")
    g.add_argument("--teacher-steps", type=positive_int, default=None,
                   help="teacher: DDPM steps per sample (default: 50)")
    g.add_argument("--teacher-clip", action="store_true",
                   help="teacher: clip predicted x0 to [-1, 1] while sampling (pixel-space models)")


def _add_loop_args(p: argparse.ArgumentParser, steps: int, lr: float, ema: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--out", type=output_dir_arg, required=True,
                   help="run directory (checkpoint.pt, log.jsonl, ema/, model/)")
    g.add_argument("--allow-changes", action="store_true",
                   help="resume --out even if its checkpoint was written with other settings (--lr, --seed, "
                        "--steps, model, data, ...); without it such a resume is refused, naming the changes")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimiser steps (default: {steps})")
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch (default: 64)")
    g.add_argument("--lr", type=positive_float, default=lr, help=f"AdamW learning rate (default: {lr})")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--warmup-steps", type=nonnegative_int, default=0, help="linear learning-rate warm-up (default: 0)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warm-up: constant, or cosine decay to 0 at --steps (default: constant)")
    g.add_argument("--grad-clip", type=finite_float, default=1.0, help="max gradient norm, <= 0 off (default: 1)")
    g.add_argument("--ema-decay", type=probability_arg, default=ema, help=f"EMA decay in [0, 1) (default: {ema})")
    g.add_argument("--snr-gamma", type=positive_float, default=None,
                   help="Min-SNR-gamma loss weighting, min(SNR, gamma) / SNR on the eps MSE (arXiv 2303.09556; "
                        "diffusers' --snr_gamma; 5 is usual). Default: DiT's plain MSE")
    g.add_argument("--class-dropout", type=probability_arg, default=0.1,
                   help="probability of training on the null class, for guidance (default: 0.1)")
    g.add_argument("--seed", type=seed_arg, default=0,
                   help="seed of every random choice: initialisation, data order, noise, teacher samples")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps per log.jsonl line")
    g.add_argument("--ckpt-every", type=positive_int, default=100, help="steps per checkpoint")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    g.add_argument("--eval-every", type=nonnegative_int, default=0,
                   help="--data shapes: every N steps, sample the EMA model at its original patch size (DDIM "
                        "20 steps, --eval-guidance) and log its FD and class accuracy (flexikern eval's classifier "
                        "and held-out images) to log.jsonl (default: 0, never)")
    g.add_argument("--eval-samples", type=positive_int, default=100,
                   help="samples per --eval-every evaluation, at least 2 (default: 100)")
    g.add_argument("--eval-guidance", type=finite_float, default=5.0, metavar="SCALE",
                   help="--eval-every's guidance scale, FlexiDiT's rule where the branches differ; 1 = none "
                        "(default: 5; the shipped model's scale is in docs/MODEL_CARD.md)")
    add_threads_arg(g, default=None)
    g.add_argument("--device", type=device_arg, default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser, model: Any = None) -> Any:
    """The --data source as a `TensorData`."""
    from flexikern.train.data import TensorData, image_folder, shapes_data, teacher_samples

    spec = args.data
    kind = spec if spec in ("shapes", "teacher") else "an image folder" if Path(spec).is_dir() else "a file"
    for flag, kinds in (("--num-images", ("shapes", "teacher")), ("--image-size", ("shapes", "an image folder")),
                        ("--teacher-steps", ("teacher",)), ("--teacher-clip", ("teacher",))):
        if getattr(args, flag[2:].replace("-", "_")) not in (None, False) and kind not in kinds:
            parser.error(f"{flag}: applies to --data {' or '.join(kinds)}, not to --data {spec!r} ({kind}); "
                         f"drop {flag}")
    num_images, image_size = args.num_images or 20000, args.image_size or 16
    try:
        if spec == "shapes":
            return shapes_data(num_images, size=image_size, seed=0)
        if spec == "teacher":
            if model is None:
                parser.error("--data teacher: data-free distillation needs a model to sample from (finetune)")
            cache = Path(args.out) / "teacher_samples.npz"
            return teacher_samples(model, num_images, steps=args.teacher_steps or 50, cache=cache,
                                   seed=args.seed, progress=not args.no_progress,
                                   clip_denoised=args.teacher_clip)
        path = Path(spec)
        if path.is_dir():
            return image_folder(path, image_size)
        if path.suffix == ".npz":
            return TensorData.from_npz(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        parser.error(f"--data {spec!r}: {e}")
    parser.error(f"--data {spec!r}: expected 'shapes', 'teacher', an .npz file or an image folder")


def _config(args: argparse.Namespace, recipe: str) -> Any:
    """The run's TrainConfig, or the usage error (built before any data or model work)."""
    from flexikern.train.trainer import TrainConfig
    if args.eval_every and args.data != "shapes":
        args.parser.error(f"--eval-every {args.eval_every}: scores samples with the shapes classifier, so it needs "
                          f"--data shapes, not {args.data!r}; drop --eval-every")
    if args.eval_every and args.eval_samples < 2:
        args.parser.error(f"--eval-samples {args.eval_samples}: the Fréchet distance needs at least 2 samples; "
                          "pass 2 or more (default 100)")
    if args.eval_every > args.steps:
        args.parser.error(f"--eval-every {args.eval_every}: more than --steps {args.steps}, so the run would "
                          f"evaluate only at its end; pass --eval-every {args.steps} or less")
    try:
        return TrainConfig(out_dir=args.out, recipe=recipe, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                           lr_schedule=args.lr_schedule,
                           grad_clip=args.grad_clip, ema_decay=args.ema_decay,
                           class_dropout=args.class_dropout, snr_gamma=args.snr_gamma, seed=args.seed,
                           log_every=args.log_every,
                           ckpt_every=args.ckpt_every, gradient_checkpointing=args.gradient_checkpointing,
                           distill_sigma=not getattr(args, "no_distill_sigma", False),
                           progress=not args.no_progress)
    except ValueError as e:
        args.parser.error(str(e))


def _sample_quality(args: argparse.Namespace, model: Any) -> Any:
    """--eval-every's evaluation: EMA model -> {"eval_guidance", "fd", "accuracy"} of --eval-samples static samples
    (DDIM 20 steps, --eval-guidance, seed 0: the same noise each time) against 1000 held-out images, with
    the shipped classifier (`flexikern eval`'s); a flexible model adds "fd_0.6" and "accuracy_0.6"
    for `Schedule.for_budget(model, 20, 0.6)`. Everything it needs is checked here, before training."""
    if not args.eval_every:
        return None
    import torch

    from flexikern.datasets import CLASS_NAMES, shapes_split
    from flexikern.diffusion import Guidance, Schedule
    from flexikern.metrics import ASSETS, ShapesClassifier, classify, feature_stats, generate, score

    flag = f"--eval-every {args.eval_every}"
    if model.input_size != 16 or model.num_classes != len(CLASS_NAMES):
        args.parser.error(f"{flag}: the shapes classifier scores 16x16 images of {len(CLASS_NAMES)} classes; this "
                          f"model makes {model.input_size}x{model.input_size} images of {model.num_classes}; drop "
                          f"{flag.split()[0]}")
    guidance = Guidance.of(args.eval_guidance)    # 1: no guidance (mode "none")
    if guidance.enabled and not model.has_null_class:
        args.parser.error(f"{flag}: samples with --eval-guidance {args.eval_guidance:g}, and the model has no null "
                          f"class (--class-dropout 0); pass --eval-guidance 1 or drop {flag.split()[0]}")
    schedules = {"": Schedule.static(20, model.original_patch_size)}
    if len(model.patch_sizes) > 1:
        try:
            schedules["_0.6"] = Schedule.for_budget(model, 20, 0.6, guidance=guidance.enabled)
        except ValueError as e:
            args.parser.error(f"{flag}: the flexible schedule it scores, for_budget(0.6): {e}")
    classifier = ShapesClassifier.load(ASSETS / "shapes_classifier.safetensors")
    x_ref, _ = shapes_split("heldout", 1000)
    reference = feature_stats(classify(classifier, torch.from_numpy(x_ref))[0])

    def evaluate(model: Any) -> dict[str, float]:
        row = {"eval_guidance": args.eval_guidance}
        for suffix, schedule in schedules.items():
            x, y = generate(model, schedule, guidance, args.eval_samples, seed=0)
            fd, accuracy = score(classifier, x, y, reference)
            row[f"fd{suffix}"] = round(fd, 2)
            row[f"accuracy{suffix}"] = round(accuracy, 4)
        return row
    return evaluate


def _run(args: argparse.Namespace, model: Any, data: Any, config: Any) -> int:
    import time

    from flexikern.train.trainer import TrainSetupError, init_distributed, train

    rank, world = init_distributed()
    recipe = config.recipe
    evaluate = _sample_quality(args, model)
    start = time.time()
    try:
        train(model, data, config, device=args.device, allow_changes=args.allow_changes, evaluate=evaluate,
              eval_every=args.eval_every)
    except TrainSetupError as e:    # raised before any step: a usage error, not a crash
        args.parser.error(str(e))
    if rank == 0:
        print(f"{recipe}: {config.steps} steps on {world} process{'es' if world > 1 else ''} in "
              f"{time.time() - start:.0f} s; EMA weights in {Path(args.out) / 'ema'}")
    return 0


# ----------------------------------------------------------------------------- train

def add_train_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train", help="pre-train a small class-conditional DiT from scratch",
        description="Pre-train a class-conditional DiT (pixel space or latents) with DiT's diffusion "
                    "loss at one patch size. Resumes from --out/checkpoint.pt.")
    _add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--patch-size", type=patch_size_arg, default="2", help="patch size, e.g. 2 or 2x4 (default: 2)")
    g.add_argument("--hidden-size", type=positive_int, default=128)
    g.add_argument("--depth", type=positive_int, default=4)
    g.add_argument("--num-heads", type=positive_int, default=4)
    g.add_argument("--learn-sigma", action="store_true", help="also predict the variance (DiT's default)")
    _add_loop_args(p, steps=2000, lr=3e-4, ema=0.999)
    p.set_defaults(run=run_train, parser=p)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from flexikern.models import FlexiDiT

    if args.threads:
        torch.set_num_threads(args.threads)
    parser = args.parser
    if args.data == "teacher":
        parser.error("--data teacher: pre-training needs real data ('shapes', an .npz or an image folder)")
    config = _config(args, "pretrain")
    data = load_data(args, parser)
    side, (ph, pw) = data.x.shape[-1], args.patch_size
    if data.x.shape[-2] % ph or side % pw:
        parser.error(f"--patch-size {args.patch_size.name}: the images are {data.x.shape[-2]}x{side}, not a multiple "
                     f"of the patch size; pick a patch size that divides the image size (--image-size)")
    if args.hidden_size % args.num_heads:
        parser.error(f"--hidden-size {args.hidden_size}: not a multiple of --num-heads {args.num_heads}")
    torch.manual_seed(args.seed)
    try:
        model = FlexiDiT(input_size=side, patch_size=args.patch_size, in_channels=data.x.shape[1],
                         hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                         num_classes=data.num_classes, learn_sigma=args.learn_sigma,
                         class_dropout_prob=max(args.class_dropout, 1e-6))
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return _run(args, model, data, config)


# ----------------------------------------------------------------------------- finetune

DEFAULT_PATCH_SIZES = "2,4"


def add_finetune_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune", help="make a DiT flexible: LoRA distillation or shared fine-tuning",
        description="Fine-tune a DiT for weak patch sizes. --recipe distill (with --adapter lora): "
                    "||eps_powerful - eps_weak||^2 against the frozen original; --recipe shared (with "
                    "--adapter shared): DiT's loss at a random patch size per sample.")
    p.add_argument("--model", type=model_arg, required=True,
                   help="a save_pretrained directory (e.g. runs/pre/ema), a DiT .pt/.safetensors checkpoint, "
                        "or a shipped model's name (shapes16)")
    p.add_argument("--recipe", choices=("shared", "distill"), default="shared")
    p.add_argument("--adapter", choices=("lora", "shared"), default=None,
                   help="default: lora for distill, shared for shared")
    p.add_argument("--patch-sizes", type=patch_sizes_arg, default=None,
                   help=f"patch sizes, original included, e.g. 2,4 or 2,2x4 (default: {DEFAULT_PATCH_SIZES}; a "
                        "model that is already flexible keeps its own)")
    p.add_argument("--lora-rank", type=positive_int, default=None,
                   help="rank of the LoRA adapters (--adapter lora) a plain DiT gets (default: 32)")
    p.add_argument("--no-distill-sigma", action="store_true",
                   help="distill: match the eps channels only, not the learned variance")
    _add_data_args(p)
    _add_loop_args(p, steps=500, lr=1e-4, ema=0.999)
    p.set_defaults(run=run_finetune, parser=p)


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from flexikern.models import FlexiDiT

    if args.threads:
        torch.set_num_threads(args.threads)
    parser = args.parser
    if args.no_distill_sigma and args.recipe != "distill":
        parser.error(f"--no-distill-sigma: applies to --recipe distill, not {args.recipe}; drop it")
    config = _config(args, args.recipe)
    path = Path(args.model)
    try:
        model = FlexiDiT.from_pretrained(path) if path.is_dir() else FlexiDiT.from_dit(path)
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(f"--model {args.model!r}: {e} (shipped models: {', '.join(shipped_models())}; a path to a "
                     "save_pretrained folder or a DiT checkpoint also works)")
    adapter = args.adapter or ("lora" if args.recipe == "distill" else "shared")
    if args.lora_rank is not None and (adapter != "lora" or len(model.patch_sizes) > 1):
        why = (f"{args.model} is already flexible (adapter {model.adapter!r})" if len(model.patch_sizes) > 1
               else f"the adapter is {adapter!r} (--adapter lora adds LoRA)")
        parser.error(f"--lora-rank {args.lora_rank}: applies to the LoRA adapters of a plain DiT, and {why}; "
                     "drop --lora-rank")
    torch.manual_seed(args.seed)   # the new weights of flexify (LoRA, weak embedders) come from --seed
    if len(model.patch_sizes) == 1:
        sizes = args.patch_sizes or patch_sizes_arg(DEFAULT_PATCH_SIZES)
        try:
            model.flexify(sizes, adapter=adapter, lora_rank=args.lora_rank or 32)
        except (ValueError, TypeError) as e:
            parser.error(f"--patch-sizes {','.join(p.name for p in sizes)} / --adapter {adapter}: {e}")
    elif args.patch_sizes and set(args.patch_sizes) != set(model.patch_sizes):
        parser.error(f"--patch-sizes {','.join(p.name for p in args.patch_sizes)}: {args.model} is already flexible "
                     f"with patch sizes {[p.name for p in model.patch_sizes]}; drop --patch-sizes")
    elif args.adapter and args.adapter != model.adapter:
        parser.error(f"--adapter {args.adapter}: {args.model} is already flexible with adapter {model.adapter!r}; "
                     "drop --adapter")
    data = load_data(args, parser, model=model)
    return _run(args, model, data, config)
