"""FlexiDiT inside diffusers: drop-in pipelines whose transformer runs each step at a chosen patch size.

    from flexikern.pipelines import FlexiDiTPipeline            # instead of diffusers' DiTPipeline
    pipe = FlexiDiTPipeline.from_pretrained(folder, flexible="runs/finetune/ema")
    images = pipe(class_labels=[207, 360], num_inference_steps=25, budget=0.6).images

`FlexiDiTPipeline` (class-conditional, diffusers' `DiTPipeline`), `FlexiPixArtPipeline`
(text-to-image, `PixArtAlphaPipeline`) and `FlexiLattePipeline` (text-to-video, `LattePipeline`)
are diffusers `DiffusionPipeline`s: any diffusers scheduler drives their steps; a flexikern
`Schedule` (or `budget=`) only picks each step's patch sizes. With the default static schedule
they produce the diffusers pipeline's outputs. Needs diffusers (and transformers for the T5 text
encoder of PixArt and Latte). `python -m flexikern.pipelines.example` runs one.
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as e:   # pragma: no cover - the message is the point
    raise ImportError("flexikern.pipelines needs diffusers: pip install --no-deps diffusers (plus transformers "
                      "for FlexiPixArtPipeline's text encoder)") from e

from typing import Any

from flexikern.pipelines.dit import FlexiDiTPipeline

__all__ = ["FlexiDiTPipeline", "FlexiPixArtPipeline", "FlexiLattePipeline"]


def __getattr__(name: str) -> Any:
    # The text pipelines import transformers (T5): only when asked for.
    if name == "FlexiPixArtPipeline":
        from flexikern.pipelines.pixart import FlexiPixArtPipeline
        return FlexiPixArtPipeline
    if name == "FlexiLattePipeline":
        from flexikern.pipelines.latte import FlexiLattePipeline
        return FlexiLattePipeline
    raise AttributeError(f"module 'flexikern.pipelines' has no attribute {name!r}")
