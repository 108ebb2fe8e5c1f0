"""Stable Diffusion pipelines: SD 1.x / 2.x, SDXL and SD3, each through the pipeline's own components."""
from __future__ import annotations

import torch

from fastguide.adapters import SD3Adapter, SDXLAdapter, UNet2DConditionAdapter, pack_tokens_and_pooled
from fastguide.pipelines.common import (FastPipeline, check_output_type, check_steps, latent_shape,
                                        negative_prompt_list, prompt_list)


class StableDiffusion(FastPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x: UNet2DConditionModel, CLIP text encoder, AutoencoderKL)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        if getattr(pipe, "safety_checker", None) is not None:
            raise ValueError("pipe: has a safety checker, which this fast pipeline does not run; build the pipeline "
                             "with safety_checker=None (and check images yourself) to use it")
        with torch.no_grad():  # a null embedding without the text encoder's autograd graph
            null = pipe.encode_prompt([""], pipe._execution_device, 1, True, negative_prompt=[""])[1][0]
        super().__init__(pipe, UNet2DConditionAdapter(pipe.unet, null, pipe.scheduler), null,
                         cond_first=False, backend=backend, progress=progress)

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil", condition_ids=None):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        output_type).images``, with ``guidance`` any fastguide rule (default CFG(guidance_scale)), ``seeds``
        per-image seeds instead of ``generator``, and ``condition_ids`` the prompts' rows of a ReCFG table (for
        ``guidance=fg.ReCFG(...)``; one negative prompt for all then)."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        negatives = negative_prompt_list(negative_prompt, len(prompts))
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        device = pipe._execution_device
        cond, null = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = latent_shape(pipe, height, width, pipe.unet.config.in_channels, len(prompts))
        noise = self._noise(shape, generator, seeds, device, cond.dtype)
        latents = self._sample_text(noise, cond, null, steps, rule, seeds, generator, condition_ids, negatives)
        if output_type == "latent":
            return latents
        with torch.no_grad():
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(prompts))


class StableDiffusionXL(FastPipeline):
    """``StableDiffusionXLPipeline`` (two CLIP text encoders; pooled embeddings and time ids as added conditions,
    carried per sample in the packed condition of :class:`fastguide.adapters.SDXLAdapter`)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        if pipe.text_encoder_2 is None:
            raise ValueError("pipe: needs text_encoder_2 (its projection dim sizes the pooled condition)")
        self.projection_dim = int(pipe.text_encoder_2.config.projection_dim)
        ids = self._time_ids(pipe, 1, (8, 8), None, None, (0, 0), torch.float32)
        with torch.no_grad():  # the shape of a packed negative (each call packs its own)
            null = self._encode(pipe, [""], None, ids)[1][0]
        adapter = SDXLAdapter(pipe.unet, null, self.projection_dim, pipe.scheduler)
        super().__init__(pipe, adapter, null, cond_first=False, backend=backend, progress=progress)

    def _time_ids(self, pipe, batch, size, original_size, target_size, crops, dtype) -> torch.Tensor:
        ids = pipe._get_add_time_ids(tuple(original_size or size), tuple(crops), tuple(target_size or size),
                                     dtype=dtype, text_encoder_projection_dim=self.projection_dim)
        return ids.repeat(batch, 1)

    @staticmethod
    def _encode(pipe, prompts, negatives, time_ids):
        """(cond, null): the packed prompt and negative conditions [B, L + k, D]."""
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=pipe._execution_device,
                                                             num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True,
                                                             negative_prompt=negatives)
        def pack(e, p, t):  # SDXLAdapter.pack, also before the adapter (which needs the packed null) exists
            vector = torch.cat([p.to(e), t.to(e)], dim=1)
            return pack_tokens_and_pooled(e, vector, e.shape[2], vector.shape[1])

        time_ids = time_ids.to(embeds.device)
        return pack(embeds, pooled, time_ids), pack(neg, neg_pooled, time_ids)

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 original_size=None, target_size=None, crops_coords_top_left=(0, 0), output_type: str = "pil",
                 condition_ids=None):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        original_size, target_size, crops_coords_top_left, output_type).images`` (a None negative prompt is the
        pipeline's: zeros with ``force_zeros_for_empty_prompt``)."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        negatives = negative_prompt_list(negative_prompt, len(prompts), default=None)
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = latent_shape(pipe, height, width, pipe.unet.config.in_channels, len(prompts))
        time_ids = self._time_ids(pipe, len(prompts), (height, width), original_size, target_size,
                                  crops_coords_top_left, pipe.unet.dtype)
        cond, null = self._encode(pipe, prompts, negatives, time_ids)
        noise = self._noise(shape, generator, seeds, cond.device, cond.dtype)  # encoded on the execution device
        latents = self._sample_text(noise, cond, null, steps, rule, seeds, generator, condition_ids, negatives)
        if output_type == "latent":
            return latents
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            view = dict(device=latents.device, dtype=latents.dtype)
            latents = (latents * torch.tensor(std).view(1, -1, 1, 1).to(**view) / vae.config.scaling_factor
                       + torch.tensor(mean).view(1, -1, 1, 1).to(**view))
        else:
            latents = latents / vae.config.scaling_factor
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type=output_type)


class StableDiffusion3(FastPipeline):
    """``StableDiffusion3Pipeline`` (SD3Transformer2DModel, two CLIP text encoders and an optional T5; rectified
    flow, stepped by :class:`fastguide.FlowEuler` from its FlowMatchEuler scheduler)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        with torch.no_grad():
            null = self._encode(pipe, [""], [""])[1][0]
        super().__init__(pipe, SD3Adapter(pipe.transformer, null, pipe.scheduler), null, cond_first=False,
                         backend=backend, progress=progress)

    @staticmethod
    def _encode(pipe, prompts, negatives, **kw):
        """(cond, null): the packed prompt and negative conditions [B, L + k, D] (SD3Adapter.pack)."""
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                             device=pipe._execution_device, num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True,
                                                             negative_prompt=negatives, **kw)
        return (SD3Adapter.pack_for(pipe.transformer, embeds, pooled),
                SD3Adapter.pack_for(pipe.transformer, neg, neg_pooled))

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256, output_type: str = "pil", condition_ids=None):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        max_sequence_length, output_type).images``."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        negatives = negative_prompt_list(negative_prompt, len(prompts))
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = latent_shape(pipe, height, width, pipe.transformer.config.in_channels, len(prompts))
        cond, null = self._encode(pipe, prompts, negatives, max_sequence_length=max_sequence_length)
        if tuple(null.shape[1:]) != tuple(self.model.null_cond.shape):  # another max_sequence_length
            self.model, self.sampler = SD3Adapter(pipe.transformer, null[0], pipe.scheduler), None
        noise = self._noise(shape, generator, seeds, cond.device, cond.dtype)  # encoded on the execution device
        latents = self._sample_text(noise, cond, null, steps, rule, seeds, generator, condition_ids, negatives)
        if output_type == "latent":
            return latents
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with torch.no_grad():
            image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
