"""`flexikern` / `python -m flexikern`: the command line.

Each subcommand is one `add_<name>_parser(subparsers)` + `run_<name>(args) -> int` pair, listed in
`SUBCOMMANDS`; adding one is a self-contained edit. Shared pieces: `add_model_args` / `load_model`
(--model as a shipped model's name, a DiT config name, a `save_pretrained` directory or a DiT
checkpoint). Every flag is checked when parsed (`flexikern.arguments`), output paths included, so
a bad flag is one `error:` line (exit status 2) before any work.

    flexikern sample --model DiT-S/2 --classes 1,2,3 --steps 250 --budget 0.6 --out grid.png
    torchrun --nproc_per_node 8 -m flexikern sample --model DiT-XL-2-256x256.pt --num-samples 50000 \\
        --classes 0-999 --npz samples.npz
    flexikern flops --model DiT-XL/2
    flexikern info                       # what this machine can use (python -m flexikern.info)

A flag that does not apply to the run as asked (--weak with the static schedule, --guidance with
--guidance-mode none, ...) is refused, not ignored. Files the commands write are replaced if they
exist (atomically, `flexikern.files`); a full disk while writing is one `error:` line, exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from flexikern.arguments import (IMAGE_SUFFIXES, add_threads_arg, classes_arg, device_arg, finite_float,
                                 fraction_arg, interval_arg, model_arg, nonnegative_float, output_file_arg,
                                 patch_size_arg, patch_sizes_arg, positive_int, resolve_guidance, schedule_arg,
                                 seed_arg, shipped_models)
from flexikern.files import atomic_write
from flexikern.images import save_grid, to_uint8
from flexikern.ops._checks import max_seed

__all__ = ["main", "build_parser", "SUBCOMMANDS", "add_model_args", "load_model"]


# ----------------------------------------------------------------------------- shared: the model

def add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """--model and what shapes it: used by every subcommand that needs a model (--device only by
    those that run it)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, type=model_arg, metavar="NAME_OR_PATH",
                   help="a shipped model (shapes16), a DiT config name (random weights, e.g. DiT-S/2), a "
                        "directory written by FlexiDiT.save_pretrained, or a DiT .pt/.safetensors checkpoint")
    g.add_argument("--patch-sizes", type=patch_sizes_arg, default=None, metavar="P,P",
                   help="patch sizes to make available (default: the original and twice it; a "
                        "save_pretrained directory keeps its own)")
    g.add_argument("--adapter", choices=("lora", "shared"), default=None,
                   help="how weak sizes are added to a plain DiT (default: lora)")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="latent side for a config name (default: 32 = 256 px images)")
    if device:
        g.add_argument("--device", type=device_arg, default=None,
                       help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def load_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """The model --model names, flexified to --patch-sizes, in eval mode on the CPU."""
    import torch

    from flexikern.models import DIT_CONFIGS, FlexiDiT

    spec = args.model
    path = Path(spec)

    def sizes(original):
        return args.patch_sizes or (original, (2 * original[0], 2 * original[1]))

    try:
        if path.is_dir():
            model = FlexiDiT.from_pretrained(path)
        elif path.is_file():
            model = FlexiDiT.from_dit(path)
        elif spec in DIT_CONFIGS:
            torch.manual_seed(0)   # the same random weights in every process of a torchrun job
            model = FlexiDiT.from_config(spec, input_size=args.input_size or 32)
        else:
            parser.error(f"--model {spec!r}: no such file or folder, and not a shipped model "
                         f"({', '.join(shipped_models())}) or a DiT config name ({', '.join(DIT_CONFIGS)}); "
                         "a path to a save_pretrained folder or a DiT checkpoint also works")
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(f"--model {spec!r}: {e}")
    if args.input_size is not None and spec not in DIT_CONFIGS:
        parser.error(f"--input-size {args.input_size}: applies to a config name; {spec} has its own "
                     f"({model.input_size}): drop --input-size")
    if path.is_dir():
        if args.adapter and args.adapter != model.adapter:
            parser.error(f"--adapter {args.adapter}: {spec} was saved with adapter {model.adapter!r}; "
                         "drop --adapter")
        if args.patch_sizes and set(args.patch_sizes) != set(model.patch_sizes):
            parser.error(f"--patch-sizes {','.join(p.name for p in args.patch_sizes)}: {spec} was saved with "
                         f"patch sizes {list(model.patch_sizes)}; drop --patch-sizes or pick from those")
        return model.eval()
    try:
        model.flexify(sizes(model.original_patch_size), adapter=args.adapter or "lora")
    except (ValueError, TypeError) as e:
        parser.error(f"--patch-sizes / --adapter: {e}")
    return model.eval()


def pick_device(args: argparse.Namespace) -> Any:
    import torch
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- sample

IMAGENET_DEMO_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]   # DiT's sample.py
COMPARE_BUDGET = 0.6     # `sample --compare` without a schedule: the flexible schedule it compares with

def add_sample_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sample", help="sample images with a patch-size schedule",
        description="Sample a (flexible) DiT with weak steps first. Prints the relative FLOPs and the "
                    "wall time; writes a PNG grid and/or an ADM-format .npz. Under torchrun the samples "
                    "are sharded over the processes (sample i always uses seed + i).")
    add_model_args(p)
    g = p.add_argument_group("what to sample")
    g.add_argument("--classes", type=classes_arg, default=None,
                   help="class ids, e.g. 1,2,3 or 0-999 (sample i gets class i mod their number; default: "
                        "DiT's sample.py classes for ImageNet models, else the first 8)")
    g.add_argument("--num-samples", type=positive_int, default=None,
                   help="how many samples (default: one per class)")
    g.add_argument("--seed", type=seed_arg, default=0, help="sample i uses seed + i (default: 0)")
    g.add_argument("--batch-size", type=positive_int, default=16, help="samples per forward (default: 16)")
    add_threads_arg(g, default=None)
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=positive_int, default=250, help="denoising steps (default: 250)")
    g.add_argument("--sampler", choices=("ddpm", "ddim", "flow"), default="ddpm",
                   help="ddpm (DiT's), ddim, or flow (rectified-flow Euler for velocity models)")
    g.add_argument("--eta", type=nonnegative_float, default=0.0, help="DDIM eta (default: 0)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--schedule", type=schedule_arg, default=None,
                       help="static | weak_first:N[,M] | weak_last:N[,M] | x/y (default: static; with "
                            f"--compare: --budget {COMPARE_BUDGET})")
    which.add_argument("--budget", type=fraction_arg, default=None,
                       help="pick the weak-first x/x schedule (both branches at one size per step) with "
                            "the most powerful steps within this fraction of the static FLOPs, e.g. 0.6 "
                            "(Schedule.for_budget: the family flexikern eval verifies)")
    g.add_argument("--most-powerful-steps", action="store_true",
                   help="with --budget: also search x/y schedules (a weak guidance branch, FlexiDiT's "
                        "weak-model guidance) and take the one with the most powerful forwards "
                        "(Schedule.for_budget(..., equal_branches=False))")
    g.add_argument("--weak", type=patch_size_arg, default=None,
                   help="weak patch size of a flexible schedule (default: the next larger than the original)")
    g.add_argument("--powerful", type=patch_size_arg, default=None,
                   help="powerful patch size (default: the original)")
    g = p.add_argument_group("guidance")
    g.add_argument("--guidance", type=finite_float, default=None, metavar="SCALE",
                   help="guidance scale (default: 1.5; 1 = no guidance)")
    g.add_argument("--guidance-mode", choices=("flexi", "cfg", "none"), default=None,
                   help="flexi (weak-model guidance when the guidance branch is weaker, else CFG), "
                        "cfg, or none (default: flexi)")
    g.add_argument("--guidance-interval", type=interval_arg, default=None, metavar="LO,HI",
                   help="guide only where the model timestep is in [LO, HI], e.g. 0,700")
    g.add_argument("--guidance-channels", type=positive_int, default=None,
                   help="guide only the first N channels (DiT's sample.py guides 3)")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=output_file_arg(*IMAGE_SUFFIXES), default=None,
                   help="image grid, .png or .jpg, replaced if it exists (default: samples.png unless --npz "
                        "is given)")
    g.add_argument("--npz", type=output_file_arg(".npz"), default=None,
                   help="write all samples as uint8 NHWC under arr_0 (ADM/DiT eval format), replaced if it exists")
    g.add_argument("--compare", action="store_true",
                   help="also sample the static schedule from the same noise; the grid shows pairs "
                        f"(static, flexible); without --schedule/--budget the flexible one is --budget "
                        f"{COMPARE_BUDGET}")
    g.add_argument("--vae", default=None, help="a diffusers AutoencoderKL directory to decode latents")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_sample, parser=p)


def _build_schedule(args: argparse.Namespace, model: Any, guided: bool, parser: argparse.ArgumentParser) -> Any:
    from flexikern.diffusion import Schedule

    powerful = args.powerful or model.original_patch_size
    weak = args.weak or powerful.next_larger(model.patch_sizes)
    if args.weak is not None and args.budget is None and (args.schedule or ("static",))[0] == "static":
        parser.error(f"--weak {args.weak.name}: the static schedule has no weak steps; pass --budget or a "
                     "flexible --schedule, or drop --weak")
    if getattr(args, "compare", False) and args.schedule == ("static", ()):
        parser.error("--compare compares the static schedule with a flexible one, and --schedule static is "
                     f"the static one: drop --schedule (then --budget {COMPARE_BUDGET}) or pick a flexible one")
    try:
        if args.budget is not None:
            return Schedule.for_budget(model, args.steps, args.budget, guidance=guided, weak=weak,
                                       powerful=powerful, equal_branches=not args.most_powerful_steps)
        if args.most_powerful_steps:
            parser.error("--most-powerful-steps applies to --budget: add --budget F (e.g. 0.6), or drop it and "
                         "write the x/y schedule with --schedule")
        kind, counts = args.schedule or ("static", ())
        if kind == "static":
            return Schedule.static(args.steps, powerful).validate(model)
        if weak is None:
            parser.error(f"--schedule: the model has no patch size larger than {powerful} "
                         f"(patch sizes {list(model.patch_sizes)}); pass --patch-sizes or --weak")
        if kind == "notation":
            return Schedule.from_notation("/".join(map(str, counts)), args.steps, weak, powerful).validate(model)
        build = Schedule.weak_first if kind == "weak_first" else Schedule.weak_last
        return build(args.steps, counts[0], weak, powerful, guidance_weak_steps=counts[-1]).validate(model)
    except (ValueError, TypeError) as e:
        parser.error(f"{'--budget' if args.budget is not None else '--schedule'}: {e} (with --steps {args.steps})")


def _distributed() -> tuple[int, int, Any]:
    """(rank, world size, torch.distributed or None); joins the torchrun job if there is one."""
    import torch.distributed as dist

    from flexikern.train.trainer import init_distributed
    rank, world = init_distributed()
    return rank, world, (dist if world > 1 else None)


def _gather(arrays: dict[str, Any], batches: list[list[int]], rank: int, world: int, dist: Any,
            base: str) -> dict[str, Any] | None:
    """Collect each rank's arrays (its batches, in order) on rank 0 through files next to `base`."""
    import numpy as np
    if dist is None:
        return arrays
    for key, arr in arrays.items():
        np.save(f"{base}.{key}.rank{rank}-of-{world}.npy", arr)
    dist.barrier()
    out = None
    if rank == 0:
        out = {}
        for key in arrays:
            parts = [np.load(f"{base}.{key}.rank{r}-of-{world}.npy") for r in range(world)]
            pieces, offsets = [], [0] * world
            for j, batch in enumerate(batches):   # batch j ran on rank j mod world
                r = j % world
                pieces.append(parts[r][offsets[r]:offsets[r] + len(batch)])
                offsets[r] += len(batch)
            out[key] = np.concatenate(pieces)
            for r in range(world):
                os.remove(f"{base}.{key}.rank{r}-of-{world}.npy")
    dist.barrier()
    return out


def run_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from flexikern.diffusion import Guidance, Schedule, make_sampler, sample

    parser = args.parser
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or (None if args.npz else "samples.png")
    if out and not args.out:       # the default, checked like a given --out
        try:
            output_file_arg(*IMAGE_SUFFIXES)(out)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--out (default {out}): {e}")
    if args.compare and args.schedule is None and args.budget is None:
        args.budget = COMPARE_BUDGET
    try:
        scale, mode = resolve_guidance(args.guidance, args.guidance_mode, 1.5, "flexi")
        if mode == "none" and (args.guidance_interval or args.guidance_channels):
            flag = "--guidance-interval" if args.guidance_interval else "--guidance-channels"
            raise ValueError(f"{flag}: applies to guided sampling, and this run is not guided (--guidance "
                             f"{scale} --guidance-mode {mode}); drop {flag} or pass --guidance S")
        guidance = Guidance(scale, mode, interval=args.guidance_interval, first_channels=args.guidance_channels)
        sampler = make_sampler(args.sampler, args.steps, eta=args.eta)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    rank, world, dist = _distributed()
    device = pick_device(args)
    if dist is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    say = print if rank == 0 else (lambda *a, **k: None)

    model = load_model(args, parser).to(device)
    if args.classes is None:
        args.classes = IMAGENET_DEMO_CLASSES if model.num_classes == 1000 else list(range(min(8, model.num_classes)))
    bad = [c for c in args.classes if not 0 <= c < model.num_classes]
    if bad:
        parser.error(f"--classes: {bad[:5]} out of range; this model has classes 0..{model.num_classes - 1}")
    if guidance.enabled and not model.has_null_class:
        parser.error(f"--guidance {guidance.scale} --guidance-mode {guidance.mode}: this model has no null "
                     "class (it was trained without class dropout), so it cannot be guided; pass "
                     "--guidance-mode none")
    if args.guidance_channels is not None and args.guidance_channels > model.in_channels:
        parser.error(f"--guidance-channels {args.guidance_channels}: the model has {model.in_channels} channels")
    schedule = _build_schedule(args, model, guidance.enabled, parser)
    static = Schedule.static(args.steps, model.original_patch_size)
    guided = guidance.active_steps(sampler.model_timesteps)
    relative = schedule.flops(model, 1, guided) / static.flops(model, 1, guided)
    vae = None
    if args.vae:
        if args.vae.startswith((".", "/", "~")) and not Path(args.vae).expanduser().is_dir():
            parser.error(f"--vae {args.vae!r}: no such folder; give a diffusers AutoencoderKL folder or a "
                         "Hugging Face id (e.g. stabilityai/sd-vae-ft-ema)")
        try:
            from diffusers import AutoencoderKL
            vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
        except Exception as e:   # diffusers raises many types for a bad directory
            parser.error(f"--vae {args.vae!r}: could not load a diffusers AutoencoderKL ({type(e).__name__}: {e})")

    n = args.num_samples or len(args.classes)
    if args.seed > max_seed(n):
        parser.error(f"--seed {args.seed}: sample i uses seed + i, and seeds are below 2**63; with {n} samples "
                     f"pass --seed {max_seed(n)} or less")
    labels = [args.classes[i % len(args.classes)] for i in range(n)]
    batches = [list(range(s, min(s + args.batch_size, n))) for s in range(0, n, args.batch_size)]
    mine = batches[rank::world]
    progress = rank == 0 and not args.no_progress
    say(f"{schedule!r} on {device} ({world} process{'es' if world > 1 else ''}), {args.sampler}, "
        f"guidance {guidance.mode} {guidance.scale}")
    if args.compare:
        how = (f"--budget {args.budget}" + (" (the default for --compare)" if args.budget == COMPARE_BUDGET
                                             and args.schedule is None else "")
               if args.budget is not None else "--schedule")
        say(f"comparing the static schedule with the flexible {_describe(schedule)} ({how})")

    _warm_up(model, schedule.sizes | static.sizes, min(args.batch_size, n), device)

    def run(sched: Schedule) -> tuple[Any, float, str | None]:
        images, note = [], None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for batch in mine:
            x = sample(model, [labels[i] for i in batch], sched, guidance, sampler=args.sampler,
                       seed=[args.seed + i for i in batch], progress=progress, vae=vae, eta=args.eta)
            arr, note = to_uint8(x)
            images.append(arr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        h = w = model.input_size
        empty = np.zeros((0, h, w, 3), np.uint8)
        return (np.concatenate(images) if images else empty), seconds, note

    flexible, seconds, note = run(schedule)
    arrays = {"flexible": flexible}
    say(f"relative FLOPs {relative:.3f} ({_describe(schedule)}), "
        f"wall time {seconds:.2f} s for {len(flexible)} samples on rank 0")
    if args.compare:
        arrays["static"], static_seconds, _ = run(static)
        say(f"static: relative FLOPs 1.000, wall time {static_seconds:.2f} s; "
            f"speed-up {static_seconds / max(seconds, 1e-9):.2f}x")
    if note:
        say(f"note: {note}")
    base = args.npz or out
    gathered = _gather(arrays, batches, rank, world, dist, base)
    if rank == 0:
        if args.npz:
            Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(args.npz) as tmp, open(tmp, "wb") as f:
                np.savez(f, arr_0=gathered["flexible"])
            say(f"wrote {args.npz} (arr_0: {gathered['flexible'].shape} uint8)")
        if out:
            if args.compare:
                pairs = np.stack([gathered["static"], gathered["flexible"]], 1)
                images = pairs.reshape(-1, *pairs.shape[2:])
                columns = 2 * max(1, math.isqrt(len(pairs)))
                say("grid: pairs of (static, flexible) samples from the same noise")
            else:
                images, columns = gathered["flexible"], max(1, math.ceil(math.sqrt(len(gathered["flexible"]))))
            save_grid(images[:256], out, columns)
            say(f"wrote {out}")
    if dist is not None:
        dist.destroy_process_group()
    return 0


def _warm_up(model: Any, sizes: set, batch: int, device: Any) -> None:
    """One forward per size and batch shape, so first-call set-up (kernel selection) is not timed."""
    import torch
    x = torch.zeros(2 * batch, *model.latent_shape, device=device)
    t = torch.zeros(2 * batch, device=device)
    y = torch.zeros(2 * batch, dtype=torch.long, device=device)
    with torch.inference_mode():
        for size in sizes:
            for b in (batch, 2 * batch):
                model(x[:b], t[:b], y[:b], patch_size=size)


def _describe(schedule: Any) -> str:
    """The paper's x/y notation of a schedule, or "custom" when it has none."""
    try:
        return schedule.notation
    except ValueError:
        return "custom"


# ----------------------------------------------------------------------------- flops

def add_flops_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("flops", help="per-patch-size FLOPs of a model",
                              description="Forward FLOPs (a multiply-add counts 2) at every patch size of "
                                          "the model, and optionally the schedule a budget picks.")
    add_model_args(p, device=False)
    p.add_argument("--budget", type=fraction_arg, default=None,
                   help="also show the schedule Schedule.for_budget picks (with --steps)")
    p.add_argument("--steps", type=positive_int, default=None, help="steps for --budget (default: 250)")
    p.add_argument("--most-powerful-steps", action="store_true",
                   help="with --budget: the x/y rule, as sample --most-powerful-steps")
    p.set_defaults(run=run_flops, parser=p)


def run_flops(args: argparse.Namespace) -> int:
    from flexikern.diffusion import Schedule
    if args.most_powerful_steps and args.budget is None:
        args.parser.error("--most-powerful-steps applies to --budget: add --budget F (e.g. 0.6) or drop it")
    if args.steps is not None and args.budget is None:
        args.parser.error(f"--steps {args.steps}: applies to --budget (the table is per forward); pass --budget or "
                          "drop --steps")
    model = load_model(args, args.parser)
    base = model.flops(model.original_patch_size)
    side = model.input_size
    print(f"{'patch size':>10}  {'tokens':>6}  {'GFLOPs':>9}  {'relative':>8}")
    for ph, pw in sorted(model.patch_sizes, key=lambda s: s[0] * s[1]):
        f = model.flops((ph, pw))
        print(f"{f'{ph}x{pw}':>10}  {(side // ph) * (side // pw):>6}  {f / 1e9:>9.3f}  {f / base:>8.3f}")
    print("with guidance a step costs F(conditional size) + F(guidance size)")
    if args.budget is not None:
        try:
            schedule = Schedule.for_budget(model, args.steps or 250, args.budget,
                                           equal_branches=not args.most_powerful_steps)
        except ValueError as e:
            args.parser.error(f"--budget: {e}")
        print(f"budget {args.budget}: {schedule!r}, relative FLOPs {schedule.relative_flops(model):.3f}")
    return 0


# ----------------------------------------------------------------------------- entry point

def _add_training_parsers(subparsers: Any) -> None:
    """`train` and `finetune` (flexikern.train.commands)."""
    from flexikern.train.commands import add_finetune_parser, add_train_parser
    add_train_parser(subparsers)
    add_finetune_parser(subparsers)


def _add_evaluation_parsers(subparsers: Any) -> None:
    """`eval` and `demo` (flexikern.evaluate)."""
    from flexikern.evaluate import add_demo_parser, add_eval_parser
    add_eval_parser(subparsers)
    add_demo_parser(subparsers)


def add_info_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="what flexikern can use here (also: python -m flexikern.info)",
                              description="Versions, the device, the compiled extension's build, and every "
                                          "op's backends in priority order with why each one cannot run.")
    p.set_defaults(run=run_info, parser=p)


def run_info(args: argparse.Namespace) -> int:
    from flexikern.info import report
    print(report())
    return 0


SUBCOMMANDS: list[Callable[[Any], None]] = [add_sample_parser, add_flops_parser, _add_training_parsers,
                                            _add_evaluation_parsers, add_info_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexikern", description="FlexiDiT: sample DiTs with less compute.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


# What the machine refuses while a command writes (the flags were checked before): one error line.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        print(f"{args.parser.prog}: error: {e.strerror if e.filename is None else e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
