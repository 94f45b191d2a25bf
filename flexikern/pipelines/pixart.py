"""`FlexiPixArtPipeline`: diffusers' `PixArtAlphaPipeline` with a flexible transformer.

Prompts are encoded, resolutions binned and images post-processed by diffusers' own pipeline
methods; the denoising loop is `fk.sample` driven by the pipeline's scheduler, each step at the
patch size the schedule gives it. The unconditional branch is the negative prompt's T5 encoding
(the empty prompt by default), as in `PixArtAlphaPipeline`, not PixArt's learned null caption.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtAlphaPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                    ASPECT_RATIO_1024_BIN)

from flexikern.diffusion import Schedule
from flexikern.models import FlexiPixArt, TextCondition
from flexikern.pipelines._base import FlexiPipelineMixin

__all__ = ["FlexiPixArtPipeline"]

_BINS = {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


class FlexiPixArtPipeline(FlexiPipelineMixin, PixArtAlphaPipeline):
    """Text-to-image generation with a flexible PixArt-alpha (FlexiDiT, arXiv 2502.20126).

    A `PixArtAlphaPipeline` (diffusers) whose transformer is a `flexikern.FlexiPixArt` (256/512
    models: the 1024 model's size conditions are not supported). Components as in diffusers:
    `tokenizer`, `text_encoder` (T5), `vae`, `transformer` (a FlexiPixArt, or a diffusers
    `PixArtTransformer2DModel`, made flexible with patch sizes p and 2p), `scheduler` (any).
    """

    _diffusers_pipeline = PixArtAlphaPipeline
    _transformer_classes = ("PixArtTransformer2DModel", "Transformer2DModel")
    _model_class = FlexiPixArt

    def __init__(self, tokenizer: Any, text_encoder: Any, vae: Any, transformer: Any, scheduler: Any):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                         transformer=self._flexible_transformer(transformer), scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str = "",
                 num_inference_steps: int = 20, timesteps: Any = None, sigmas: Any = None,
                 guidance_scale: float = 4.5, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, eta: float = 0.0, generator: Any = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback: Any = None, callback_steps: int = 1,
                 clean_caption: bool = True, use_resolution_binning: bool = True, max_sequence_length: int = 120,
                 *, budget: float | None = None, schedule: Schedule | None = None, guidance_mode: str = "flexi"
                 ) -> ImagePipelineOutput | tuple:
        """Generate images from `prompt` (`PixArtAlphaPipeline.__call__`'s arguments and defaults,
        plus FlexiDiT's `budget`, `schedule` and `guidance_mode`, as in `FlexiDiTPipeline.__call__`).

        `timesteps`, `sigmas` (custom timesteps) and `callback` are not supported and are refused.
        The latents stay float32 through the loop (the model runs in its own dtype).

        Raises:
            ValueError / TypeError: before any compute, naming the argument (diffusers' own checks
            of prompts and embeddings, then steps, scale, mode, output type, generators, budget, a
            schedule of the wrong length, a scheduler whose step cannot be driven).
        """
        self._refuse_unsupported(timesteps=timesteps, sigmas=sigmas, callback=callback)
        sample_size = self.transformer.input_size
        height = height or sample_size * self.vae_scale_factor
        width = width or sample_size * self.vae_scale_factor
        if use_resolution_binning:
            if sample_size not in _BINS:
                raise ValueError(f"use_resolution_binning=True: PixArt bins resolutions for sample sizes 32, 64 "
                                 f"and 128, this transformer's is {sample_size}; pass use_resolution_binning=False")
            orig_height, orig_width = height, width
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=_BINS[sample_size])
        self.check_inputs(prompt, height, width, negative_prompt, callback_steps, prompt_embeds,
                          negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask)
        n = self._check_text(prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                             max_sequence_length=max_sequence_length)
        steps, scale = self._check_call(n, num_inference_steps, guidance_scale, guidance_mode, output_type,
                                        generator, budget, schedule)
        shape = (n, self.transformer.in_channels, int(height) // self.vae_scale_factor,
                 int(width) // self.vae_scale_factor)
        self._check_latents(latents, shape, "images, latent channels, height and width / the VAE's factor")
        device = self._execution_device
        sampler, schedule, guidance = self._plan(steps, scale, guidance_mode, budget, schedule, generator, eta=eta)
        guided = scale > 1
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt, guided, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask, negative_prompt_attention_mask=negative_prompt_attention_mask,
            clean_caption=clean_caption, max_sequence_length=max_sequence_length)
        y = TextCondition(embeds, mask)
        y_null = TextCondition(negative_embeds, negative_mask) if guided else None
        noise = self._initial_noise(shape, generator, embeds.dtype, latents)
        out = self._denoise(y, noise, sampler, schedule, guidance, y_null=y_null)
        if output_type == "latent":
            images = out
        else:
            images = self.vae.decode(out.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            if use_resolution_binning:
                images = self.image_processor.resize_and_crop_tensor(images, orig_width, orig_height)
            images = self.image_processor.postprocess(images, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
