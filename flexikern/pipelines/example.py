"""FlexiDiT through a diffusers pipeline, runnable anywhere (nothing is downloaded):

    python -m flexikern.pipelines.example --out out/pipeline_example.png

The shipped model (`flexikern/assets/shapes16`, a pixel-space class-conditional FlexiDiT, so
`vae=None`) in a `FlexiDiTPipeline` driven by diffusers' DPM-Solver++ (DPMSolverMultistepScheduler
with DiT's betas): every class once with the static schedule, then the same noise with
`budget=0.6`. The grid has the static row on top and the FlexiDiT row below.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from flexikern.arguments import add_threads_arg, fraction_arg, output_file_arg, positive_int, shipped_models
from flexikern.datasets import CLASS_NAMES
from flexikern.diffusion import Schedule
from flexikern.diffusion.schedulers import DIT_SCHEDULER_CONFIG
from flexikern.evaluate import SHIPPED_GUIDANCE
from flexikern.images import save_grid
from flexikern.models import FlexiDiT
from flexikern.pipelines.dit import FlexiDiTPipeline

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m flexikern.pipelines.example", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=output_file_arg(".png"), default="out/pipeline_example.png",
                   help="the PNG grid to write")
    p.add_argument("--num-images", type=positive_int, default=len(CLASS_NAMES), help="images per row (classes in turn)")
    p.add_argument("--steps", type=positive_int, default=20, help="num_inference_steps (default: 20)")
    p.add_argument("--budget", type=fraction_arg, default=0.6, help="relative FLOPs of the FlexiDiT row (default: 0.6)")
    add_threads_arg(p, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # The four lines a DiTPipeline user writes, with the model of flexikern/assets/:
    model = FlexiDiT.from_pretrained(shipped_models()["shapes16"])
    pipe = FlexiDiTPipeline(transformer=model, vae=None, id2label=dict(enumerate(CLASS_NAMES)),
                            scheduler=DPMSolverMultistepScheduler(**DIT_SCHEDULER_CONFIG))
    labels = pipe.get_label_ids([CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(args.num_images)])

    rows = []
    for budget in (None, args.budget):
        start = time.perf_counter()
        images = pipe(class_labels=labels, guidance_scale=SHIPPED_GUIDANCE, num_inference_steps=args.steps,
                      generator=torch.Generator().manual_seed(0), output_type="np", budget=budget).images
        seconds = time.perf_counter() - start
        schedule = (Schedule.static(args.steps, model.original_patch_size) if budget is None
                    else Schedule.for_budget(model, args.steps, budget))
        print(f"{'static' if budget is None else f'budget={budget:g}':>10}: {schedule!r}, relative FLOPs "
              f"{schedule.relative_flops(model):.3f}, {len(images)} images in {seconds:.1f} s")
        rows.append((images * 255).round().astype(np.uint8))
    save_grid(np.concatenate(rows), args.out, columns=args.num_images)
    print(f"wrote {args.out} (top: static, bottom: budget {args.budget:g}; same noise per column)")
    return Path(args.out)


if __name__ == "__main__":
    main()
