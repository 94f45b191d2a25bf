"""`FlexiDiTPipeline`: diffusers' `DiTPipeline` with a flexible transformer.

    pipe = FlexiDiTPipeline.from_pretrained("facebook/DiT-XL-2-256", flexible="runs/finetune/ema")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(class_labels=pipe.get_label_ids(["white shark"]), num_inference_steps=25,
                  generator=torch.manual_seed(33), budget=0.6).images

With the default static schedule and guidance it produces `DiTPipeline`'s images (same folder,
same generator; tests/test_pipelines.py), with a FlexiDiT schedule the same loop at a fraction
of the FLOPs.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from flexikern.diffusion import Schedule
from flexikern.models import FlexiDiT
from flexikern.ops._checks import check_positive_int
from flexikern.pipelines._base import FlexiPipelineMixin

__all__ = ["FlexiDiTPipeline"]


class FlexiDiTPipeline(FlexiPipelineMixin, DiTPipeline):
    """Class-conditional image generation with a flexible DiT (FlexiDiT, arXiv 2502.20126).

    A `DiTPipeline` (diffusers) whose transformer is a `flexikern.FlexiDiT`: each step runs at the
    patch size a `Schedule` gives it, and any diffusers scheduler (DDPM, DDIM,
    DPMSolverMultistep, Euler, ...) drives the steps. `labels`, `get_label_ids`, `to`,
    `set_progress_bar_config` and swapping `pipe.scheduler` work as in diffusers.

    Args:
        transformer: a `FlexiDiT`, or a diffusers `DiTTransformer2DModel` (made flexible with patch
            sizes p and 2p and LoRA: its weak size is then untrained; load fine-tuned weights
            for good budgeted samples).
        vae: diffusers' `AutoencoderKL`, or None for a pixel-space model (its samples are the images).
        scheduler: any diffusers scheduler.
        id2label: ImageNet-style {class id: "name, other name"} for `get_label_ids`.
    """

    _diffusers_pipeline = DiTPipeline
    _transformer_classes = ("DiTTransformer2DModel", "Transformer2DModel")
    _model_class = FlexiDiT

    def __init__(self, transformer: Any, vae: Any, scheduler: Any, id2label: dict[int, str] | None = None):
        super().__init__(transformer=self._flexible_transformer(transformer), vae=vae, scheduler=scheduler,
                         id2label=id2label)
        self.register_to_config(id2label=id2label)   # kept by save_pretrained (both libraries read it)

    def _images_without_vae(self) -> bool:
        return self.transformer.in_channels == 3   # a pixel-space model: its samples are RGB images

    @classmethod
    def _extra_init(cls, index: dict[str, Any]) -> dict[str, Any]:
        return {"id2label": index.get("id2label")}

    def _extra_save(self) -> dict[str, Any]:
        return {"id2label": self.config.get("id2label")}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names (`DiTPipeline.get_label_ids`; one name may be a plain string)."""
        return super().get_label_ids([label] if isinstance(label, str) else label)

    @torch.no_grad()
    def __call__(self, class_labels: Any, guidance_scale: float = 4.0, generator: Any = None,
                 num_inference_steps: int = 50, output_type: str = "pil", return_dict: bool = True, *,
                 budget: float | None = None, schedule: Schedule | None = None, guidance_mode: str = "flexi",
                 guidance_channels: int | None = None) -> ImagePipelineOutput | tuple:
        """Generate images of `class_labels` (`DiTPipeline.__call__`'s arguments and defaults, plus
        FlexiDiT's).

        Args:
            class_labels: N class ids (ints, `get_label_ids`).
            guidance_scale: classifier-free guidance scale, > 1 guides (DiT: 1.5 to 4).
            generator: a torch.Generator or one per image (initial noise; a stochastic scheduler's
                step noise too, which `DiTPipeline` draws from the global generator).
            num_inference_steps: the scheduler's steps.
            output_type: "pil" (PIL images), "np" ((N, H, W, 3) floats in [0, 1]), "pt" ((N, 3, H, W)
                in [0, 1]) or "latent" (the (N, C, h, w) latents, before decoding).
            return_dict: diffusers' `ImagePipelineOutput`, else a tuple `(images,)`.
            budget: relative FLOPs in (0, 1]: `Schedule.for_budget(transformer, steps, budget)`, the
                paper's "x/x" schedule with the most powerful steps that fit (e.g. 0.6).
            schedule: a `Schedule` with one entry per model evaluation instead (not with `budget`).
                Neither: every step at the original patch size, `DiTPipeline`'s images.
            guidance_mode: "flexi" (default: where a step's guidance branch runs at a weaker size,
                FlexiDiT's weak-model guidance; elsewhere plain CFG, so static and "x/x" schedules
                guide exactly as CFG) or "cfg".
            guidance_channels: guide only the first k latent channels. Default None guides all of
                them, as `DiTPipeline` does; facebookresearch/DiT's sample.py guides 3 of the 4
                (`guidance_channels=3` reproduces it).
        Returns:
            `ImagePipelineOutput(images=...)` or `(images,)`.
        Raises:
            ValueError / TypeError: before any compute, naming the argument (labels, steps, scale,
            mode, output type, generators, budget, a schedule of the wrong length, a scheduler whose
            step cannot be driven).
        """
        labels = self.transformer.check_condition(class_labels)
        n = len(labels)
        if guidance_channels is not None:
            check_positive_int(guidance_channels, "guidance_channels",
                               f"an int in [1, {self.transformer.in_channels}] (DiT's sample.py: 3) or None (all)")
            if guidance_channels > self.transformer.in_channels:
                raise ValueError(f"guidance_channels={guidance_channels}: the latents have "
                                 f"{self.transformer.in_channels} channels; expected at most that (DiT's sample.py: 3)")
        steps, scale = self._check_call(n, num_inference_steps, guidance_scale, guidance_mode, output_type,
                                        generator, budget, schedule)
        sampler, schedule, guidance = self._plan(steps, scale, guidance_mode, budget, schedule, generator,
                                                 first_channels=guidance_channels)
        noise = self._initial_noise((n, *self.transformer.latent_shape), generator, self.transformer.dtype)
        latents = self._denoise(labels, noise, sampler, schedule, guidance)
        if output_type == "latent":
            samples = latents
        else:
            if self.vae is not None:   # DiTPipeline's decoding, operation for operation
                latents = 1 / self.vae.config.scaling_factor * latents.to(self.vae.dtype)
                samples = self.vae.decode(latents).sample
            else:
                samples = latents
            samples = (samples / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    samples = self.numpy_to_pil(samples)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=samples) if return_dict else (samples,)
