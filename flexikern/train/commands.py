"""`flexikern train` and `flexikern finetune`: the command-line front of `flexikern.train`.

    flexikern train --data shapes --image-size 16 --hidden-size 128 --depth 4 --steps 2000 --out runs/pre
    flexikern finetune --model runs/pre/ema --recipe shared --patch-sizes 2,4 --steps 500 --out runs/ft
    torchrun --nproc_per_node 2 -m flexikern finetune ...      # data parallel (gloo on CPU, NCCL on GPU)

Both run `flexikern.train.train` (one loop); `train` builds a randomly initialised single-size DiT
and uses the "pretrain" recipe, `finetune` loads a model, makes it flexible and runs "shared" or
"distill". Re-running a command with the same --out resumes from `<out>/checkpoint.pt`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flexikern.arguments import patch_size_arg, patch_sizes_arg, positive_int

__all__ = ["add_train_parser", "run_train", "add_finetune_parser", "run_finetune", "load_data"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="shapes",
                   help="'shapes' (the generated dataset, flexikern.datasets), an .npz with x/y "
                        "(images or latents + labels), an image folder (one subfolder per class), or "
                        "'teacher' (data-free: x0 sampled from the model itself; finetune only)")
    g.add_argument("--num-images", type=positive_int, default=20000,
                   help="shapes: how many images to generate; teacher: how many samples (default: 20000)")
    g.add_argument("--image-size", type=positive_int, default=16,
                   help="shapes / image folder: image side in pixels (default: 16)")
    g.add_argument("--teacher-steps", type=positive_int, default=50,
                   help="teacher: DDPM steps per sample (default: 50)")
    g.add_argument("--teacher-clip", action="store_true",
                   help="teacher: clip predicted x0 to [-1, 1] while sampling (pixel-space models)")


def _add_loop_args(p: argparse.ArgumentParser, steps: int, lr: float, ema: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--out", required=True, help="run directory (checkpoint.pt, log.jsonl, ema/, model/)")
    g.add_argument("--steps", type=positive_int, default=steps, help=f"optimiser steps (default: {steps})")
    g.add_argument("--batch-size", type=positive_int, default=64, help="global batch (default: 64)")
    g.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate (default: {lr})")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up (default: 0)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, <= 0 off (default: 1)")
    g.add_argument("--ema-decay", type=float, default=ema, help=f"EMA decay (default: {ema})")
    g.add_argument("--class-dropout", type=float, default=0.1,
                   help="probability of training on the null class, for guidance (default: 0.1)")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and noise")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps per log.jsonl line")
    g.add_argument("--ckpt-every", type=positive_int, default=100, help="steps per checkpoint")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_data(args: argparse.Namespace, parser: argparse.ArgumentParser, model: Any = None) -> Any:
    """The --data source as a `TensorData`."""
    from flexikern.train.data import TensorData, image_folder, shapes_data, teacher_samples

    spec = args.data
    try:
        if spec == "shapes":
            return shapes_data(args.num_images, size=args.image_size, seed=0)
        if spec == "teacher":
            if model is None:
                parser.error("--data teacher: data-free distillation needs a model to sample from (finetune)")
            cache = Path(args.out) / "teacher_samples.npz"
            return teacher_samples(model, args.num_images, steps=args.teacher_steps, cache=cache,
                                   seed=args.seed, progress=not args.no_progress,
                                   clip_denoised=args.teacher_clip)
        path = Path(spec)
        if path.is_dir():
            return image_folder(path, args.image_size)
        if path.suffix == ".npz" and path.exists():
            return TensorData.from_npz(path)
    except ValueError as e:
        parser.error(f"--data {spec!r}: {e}")
    parser.error(f"--data {spec!r}: expected 'shapes', 'teacher', an .npz file or an image folder")


def _config(args: argparse.Namespace, recipe: str) -> Any:
    from flexikern.train.trainer import TrainConfig
    try:
        return TrainConfig(out_dir=args.out, recipe=recipe, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                           grad_clip=args.grad_clip, ema_decay=args.ema_decay,
                           class_dropout=args.class_dropout, seed=args.seed, log_every=args.log_every,
                           ckpt_every=args.ckpt_every, gradient_checkpointing=args.gradient_checkpointing,
                           distill_sigma=not getattr(args, "no_distill_sigma", False),
                           progress=not args.no_progress)
    except ValueError as e:
        args.parser.error(str(e))


def _run(args: argparse.Namespace, model: Any, data: Any, recipe: str) -> int:
    import time

    from flexikern.train.trainer import init_distributed, train

    rank, world = init_distributed()
    config = _config(args, recipe)
    start = time.time()
    train(model, data, config, device=args.device)
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
    data = load_data(args, parser)
    torch.manual_seed(args.seed)
    try:
        model = FlexiDiT(input_size=data.x.shape[-1], patch_size=args.patch_size, in_channels=data.x.shape[1],
                         hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads,
                         num_classes=data.num_classes, learn_sigma=args.learn_sigma,
                         class_dropout_prob=max(args.class_dropout, 1e-6))
    except ValueError as e:
        parser.error(str(e))
    return _run(args, model, data, "pretrain")


# ----------------------------------------------------------------------------- finetune

def add_finetune_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "finetune", help="make a DiT flexible: LoRA distillation or shared fine-tuning",
        description="Fine-tune a DiT for weak patch sizes. --recipe distill (with --adapter lora): "
                    "||eps_powerful - eps_weak||^2 against the frozen original; --recipe shared (with "
                    "--adapter shared): DiT's loss at a random patch size per sample.")
    p.add_argument("--model", required=True,
                   help="a save_pretrained directory (e.g. runs/pre/ema) or a DiT .pt/.safetensors checkpoint")
    p.add_argument("--recipe", choices=("shared", "distill"), default="shared")
    p.add_argument("--adapter", choices=("lora", "shared"), default=None,
                   help="default: lora for distill, shared for shared")
    p.add_argument("--patch-sizes", type=patch_sizes_arg, default="2,4",
                   help="patch sizes, original included, e.g. 2,4 or 2,2x4 (default: 2,4)")
    p.add_argument("--lora-rank", type=positive_int, default=32)
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
    path = Path(args.model)
    try:
        model = FlexiDiT.from_pretrained(path) if path.is_dir() else FlexiDiT.from_dit(path)
        adapter = args.adapter or ("lora" if args.recipe == "distill" else "shared")
        if len(model.patch_sizes) == 1:
            model.flexify(args.patch_sizes, adapter=adapter, lora_rank=args.lora_rank)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--model {args.model!r}: {e}")
    data = load_data(args, parser, model=model)
    return _run(args, model, data, args.recipe)
