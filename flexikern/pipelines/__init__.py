"""FlexiDiT inside diffusers: drop-in pipelines whose transformer runs each step at a chosen patch size.

    from flexikern.pipelines import FlexiDiTPipeline            # instead of diffusers' DiTPipeline
    pipe = FlexiDiTPipeline.from_pretrained(folder, flexible="runs/finetune/ema")
    images = pipe(class_labels=[207, 360], num_inference_steps=25, budget=0.6).images

`FlexiDiTPipeline` (class-conditional, diffusers' `DiTPipeline`) and `FlexiPixArtPipeline`
(text-to-image, `PixArtAlphaPipeline`) are diffusers `DiffusionPipeline`s: any diffusers scheduler
drives their steps; a flexikern `Schedule` (or `budget=`) only picks each step's patch sizes.
With the default static schedule they produce the diffusers pipeline's images. Needs diffusers
(and transformers for PixArt's text encoder). `python -m flexikern.pipelines.example` runs one.
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as e:   # pragma: no cover - the message is the point
    raise ImportError("flexikern.pipelines needs diffusers: pip install --no-deps diffusers (plus transformers "
                      "for FlexiPixArtPipeline's text encoder)") from e

from typing import Any

from flexikern.pipelines.dit import FlexiDiTPipeline

__all__ = ["FlexiDiTPipeline", "FlexiPixArtPipeline"]


def __getattr__(name: str) -> Any:
    if name == "FlexiPixArtPipeline":   # imports transformers (T5): only when asked for
        from flexikern.pipelines.pixart import FlexiPixArtPipeline
        return FlexiPixArtPipeline
    raise AttributeError(f"module 'flexikern.pipelines' has no attribute {name!r}")
