"""`FlexiLattePipeline`: diffusers' `LattePipeline` (text-to-video) with a flexible transformer.

Prompts are encoded, latents decoded frame by frame and videos post-processed by diffusers' own
pipeline methods; the denoising loop is `fk.sample` driven by the pipeline's scheduler, each step
at the patch size (1, p, p) the schedule gives it. As in `LattePipeline`, the unconditional branch
is the negative prompt's T5 encoding (the empty prompt by default).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import LattePipeline
from diffusers.pipelines.latte.pipeline_latte import LattePipelineOutput

from flexikern.diffusion import Schedule
from flexikern.models import FlexiLatte, TextCondition
from flexikern.pipelines._base import FlexiPipelineMixin

__all__ = ["FlexiLattePipeline"]


class FlexiLattePipeline(FlexiPipelineMixin, LattePipeline):
    """Text-to-video generation with a flexible Latte (FlexiDiT, arXiv 2502.20126).

    A `LattePipeline` (diffusers) whose transformer is a `flexikern.FlexiLatte`. Components as in
    diffusers: `tokenizer`, `text_encoder` (T5), `vae`, `transformer` (a FlexiLatte, or a diffusers
    `LatteTransformer3DModel`, made flexible with patch sizes (1, p, p) and (1, 2p, 2p)), `scheduler`.
    """

    _diffusers_pipeline = LattePipeline
    _transformer_classes = ("LatteTransformer3DModel",)
    _model_class = FlexiLatte

    def __init__(self, tokenizer: Any, text_encoder: Any, vae: Any, transformer: Any, scheduler: Any):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                         transformer=self._flexible_transformer(transformer), scheduler=scheduler)

    @classmethod
    def _default_sizes(cls, transformer: Any) -> tuple:
        p = transformer.config.patch_size
        return ((1, p, p), (1, 2 * p, 2 * p))

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str = "",
                 num_inference_steps: int = 50, timesteps: Any = None, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, video_length: int = 16, height: int = 512, width: int = 512,
                 eta: float = 0.0, generator: Any = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end: Any = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None, clean_caption: bool = True,
                 mask_feature: bool = True, enable_temporal_attentions: bool = True,
                 decode_chunk_size: int | None = None, *, budget: float | None = None,
                 schedule: Schedule | None = None, guidance_mode: str = "flexi") -> LattePipelineOutput | tuple:
        """Generate videos from `prompt` (`LattePipeline.__call__`'s arguments and defaults, plus
        FlexiDiT's `budget`, `schedule` and `guidance_mode`, as in `FlexiDiTPipeline.__call__`).

        `enable_temporal_attentions` sets the transformer's setting for this call. `timesteps` and
        `callback_on_step_end` are not supported and are refused. Returns `LattePipelineOutput(frames=...)`.

        Raises:
            ValueError / TypeError: before any compute, naming the argument (diffusers' own checks of
            prompts and embeddings, then FlexiDiT's as in `FlexiDiTPipeline.__call__`).
        """
        self._refuse_unsupported(timesteps=timesteps, callback_on_step_end=callback_on_step_end)
        self.check_inputs(prompt, height, width, negative_prompt, callback_on_step_end_tensor_inputs,
                          prompt_embeds, negative_prompt_embeds)
        chunk = {} if decode_chunk_size is None else {"decode_chunk_size": decode_chunk_size}
        n = self._check_text(prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
                             video_length=video_length, **chunk)
        steps, scale = self._check_call(n, num_inference_steps, guidance_scale, guidance_mode, output_type,
                                        generator, budget, schedule)
        if not isinstance(enable_temporal_attentions, bool):
            raise ValueError(f"enable_temporal_attentions={enable_temporal_attentions!r}: expected True or False")
        shape = (n, self.transformer.in_channels, video_length, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        self._check_latents(latents, shape, "videos, latent channels, video_length, height and width / the "
                                            "VAE's factor")
        device = self._execution_device
        sampler, schedule, guidance = self._plan(steps, scale, guidance_mode, budget, schedule, generator, eta=eta)
        guided = scale > 1
        embeds, negative_embeds = self.encode_prompt(
            prompt, guided, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            device=device, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            clean_caption=clean_caption, mask_feature=mask_feature)
        y_null = TextCondition(negative_embeds) if guided else None
        noise = self._initial_noise(shape, generator, embeds.dtype, latents)
        config, setting = self.transformer.config, self.transformer.config["enable_temporal_attentions"]
        config["enable_temporal_attentions"] = enable_temporal_attentions
        try:
            out = self._denoise(TextCondition(embeds), noise, sampler, schedule, guidance, y_null=y_null)
        finally:
            config["enable_temporal_attentions"] = setting
        if output_type == "latent":
            video = out
        else:
            video = self.decode_latents(out.to(self.vae.dtype), video_length,
                                        decode_chunk_size=decode_chunk_size or video_length)
            video = self.video_processor.postprocess_video(video=video, output_type=output_type)
        self.maybe_free_model_hooks()
        return LattePipelineOutput(frames=video) if return_dict else (video,)
