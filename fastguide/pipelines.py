"""Your pipeline, faster: a diffusers pipeline's own call (prompts or class labels in, its images out) with a
fastguide Sampler in place of its denoising loop.

    fast = fastguide.pipelines.from_pipe(pipe)                  # StableDiffusionPipeline or DiTPipeline
    images = fast(["a cat", "a dog"], negative_prompt=["", "blurry"], num_inference_steps=20, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(s) for s in (1, 2)])   # = pipe(...).images

What stays the pipeline's: its text encoder (``pipe.encode_prompt``, negative prompts per sample), its initial noise
(``randn_tensor`` with the given ``generator``: the same latents as ``pipe(...)``), its shipped scheduler (stepped
by the fastguide solver of :func:`fastguide.solver_from_diffusers`), its VAE decode and image post-processing
(``output_type`` "pil", "np", "pt" or "latent"). What fastguide adds: the guidance rule (``guidance=``: CFG,
CFG-Zero*, APG, ReCFG, ...), per-prompt seeds (``seeds=``), the fused step, ``compile()`` and CUDA graphs.
Stochastic schedulers (DDPM, Euler-ancestral, SDE-DPM-Solver) draw their per-step noise from fastguide's seeded
noise, not from the pipeline's generator, so their samples are not diffusers' bit for bit. docs/adapters.md has
what is supported and what is refused.
"""
from __future__ import annotations

import torch

from fastguide.adapters import (DiTAdapter, SD3Adapter, SDXLAdapter, UNet2DConditionAdapter,
                                pack_tokens_and_pooled)
from fastguide.diffusers_schedulers import solver_from_diffusers
from fastguide.guidance import CFG, check_guidance
from fastguide.noise import seeded_noise
from fastguide.sampler import Sampler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def from_pipe(pipe, *, backend: str = "auto", progress: bool = False) -> "FastPipeline":
    """The fast pipeline for ``pipe`` (one of ``PIPELINES``); a ValueError names an unsupported class."""
    name = type(pipe).__name__
    cls = PIPELINES.get(name)
    if cls is None:
        raise ValueError(f"pipe: {name} is not supported (supported: {', '.join(sorted(PIPELINES))}); for other "
                         "models wrap the denoiser with fastguide.adapters and sample with fastguide.Sampler")
    return cls(pipe, backend=backend, progress=progress)


class FastPipeline:
    """What every fast pipeline shares: the solvers of the pipeline's scheduler (one per step count), one Sampler
    (compiled once with :meth:`compile`), the noise convention and the guidance rule of a call."""

    def __init__(self, pipe, model, null_cond, *, cond_first: bool, backend: str, progress: bool):
        self.pipe, self.model, self.null_cond = pipe, model, null_cond
        self._solvers, self._compile_kw = {}, None
        self._sampler_kw = dict(backend=backend, cond_first=cond_first, progress=progress)
        self.sampler: Sampler | None = None  # made by the first call, with its solver

    def solver(self, steps: int):
        """The solver that steps like ``pipe.scheduler`` with ``steps`` steps (made once per count)."""
        if steps not in self._solvers:
            self._solvers[steps] = solver_from_diffusers(self.pipe.scheduler, steps)
        return self._solvers[steps]

    def compile(self, **kw) -> "FastPipeline":
        """``Sampler.compile(**kw)`` (mode, cuda_graph, ...): new prompts, scales and step counts never recompile."""
        self._compile_kw = kw
        if self.sampler is not None:
            self.sampler.compile(**kw)
        return self

    def _rule(self, guidance, guidance_scale):
        if guidance is not None:
            return check_guidance(guidance, self.null_cond)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale: expected a number, got {type(guidance_scale).__name__}")
        # the pipelines run no unconditional half at guidance_scale <= 1; CFG(1) gives m = m_cond on B rows too
        return CFG(max(float(guidance_scale), 1.0))

    @staticmethod
    def _noise(shape, generator, seeds, device, dtype) -> torch.Tensor:
        """x_T: the pipeline's ``randn_tensor(shape, generator)`` (its latents before init_noise_sigma, which the
        solver's plan applies), or fastguide's per-seed noise."""
        if seeds is not None:
            if generator is not None:
                raise ValueError("seeds: pass seeds or generator, not both")
            if len(seeds) != shape[0]:
                raise ValueError(f"seeds: expected {shape[0]} seeds (one per image), got {len(seeds)}")
            return seeded_noise(list(seeds), shape[1:], dtype=dtype, device=device)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for {shape[0]} images; expected one "
                             "per image")
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _sample(self, noise, cond, null, steps, rule, seeds):
        if self.sampler is None:
            self.sampler = Sampler(self.model, self.solver(steps), rule, null_cond=null, **self._sampler_kw)
            if self._compile_kw is not None:
                self.sampler.compile(**self._compile_kw)
        self.sampler.null_cond, self.sampler.solver = null, self.solver(steps)
        with torch.no_grad():
            return self.sampler.sample(noise, cond, guidance=rule, seeds=seeds)


def _check_output_type(output_type, allowed=OUTPUT_TYPES) -> str:
    if output_type not in allowed:
        raise ValueError(f"output_type: expected one of {allowed}, got {output_type!r}")
    return output_type


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {steps!r}")
    return steps


def _prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {type(prompt).__name__}")
    return prompts


def _negatives(negative_prompt, count: int, default=""):
    """One negative prompt per prompt (``default`` for None: "" or, where the pipeline treats None its own way,
    None itself)."""
    if negative_prompt is None:
        return default if default is None else [default] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt: expected a string or {count} strings (one per prompt), got {len(negatives)}")
    return negatives


def _latent_shape(pipe, height, width, channels: int, batch: int) -> tuple:
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height, width: expected multiples of {f}, got {height} x {width}")
    return batch, channels, height // f, width // f


class StableDiffusion(FastPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x: UNet2DConditionModel, CLIP text encoder, AutoencoderKL)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        if getattr(pipe, "safety_checker", None) is not None:
            raise ValueError("pipe: has a safety checker, which this fast pipeline does not run; build the pipeline "
                             "with safety_checker=None (and check images yourself) to use it")
        null = pipe.encode_prompt([""], pipe._execution_device, 1, True, negative_prompt=[""])[1][0]
        super().__init__(pipe, UNet2DConditionAdapter(pipe.unet, null, pipe.scheduler), null,
                         cond_first=False, backend=backend, progress=progress)

    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil"):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        output_type).images``, with ``guidance`` any fastguide rule (default CFG(guidance_scale)) and ``seeds``
        per-image seeds instead of ``generator``."""
        pipe = self.pipe
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        steps, output_type = _check_steps(num_inference_steps), _check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        device = pipe._execution_device
        cond, null = pipe.encode_prompt(prompts, device, 1, True, negative_prompt=negatives)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = _latent_shape(pipe, height, width, pipe.unet.config.in_channels, len(prompts))
        noise = self._noise(shape, generator, seeds, device, cond.dtype)
        latents = self._sample(noise, cond, null, steps, rule, seeds)
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
        null = self._encode(pipe, [""], None, ids)[1][0]  # the shape of a packed negative (each call packs its own)
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

    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 original_size=None, target_size=None, crops_coords_top_left=(0, 0), output_type: str = "pil"):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        original_size, target_size, crops_coords_top_left, output_type).images`` (a None negative prompt is the
        pipeline's: zeros with ``force_zeros_for_empty_prompt``)."""
        pipe = self.pipe
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts), default=None)
        steps, output_type = _check_steps(num_inference_steps), _check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = _latent_shape(pipe, height, width, pipe.unet.config.in_channels, len(prompts))
        time_ids = self._time_ids(pipe, len(prompts), (height, width), original_size, target_size,
                                  crops_coords_top_left, pipe.unet.dtype)
        cond, null = self._encode(pipe, prompts, negatives, time_ids)
        noise = self._noise(shape, generator, seeds, pipe._execution_device, cond.dtype)
        latents = self._sample(noise, cond, null, steps, rule, seeds)
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

    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 28, guidance_scale: float = 7.0,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256, output_type: str = "pil"):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        max_sequence_length, output_type).images``."""
        pipe = self.pipe
        prompts = _prompts(prompt)
        negatives = _negatives(negative_prompt, len(prompts))
        steps, output_type = _check_steps(num_inference_steps), _check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        size = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = _latent_shape(pipe, height, width, pipe.transformer.config.in_channels, len(prompts))
        cond, null = self._encode(pipe, prompts, negatives, max_sequence_length=max_sequence_length)
        if tuple(null.shape[1:]) != tuple(self.model.null_cond.shape):  # another max_sequence_length
            self.model, self.sampler = SD3Adapter(pipe.transformer, null[0], pipe.scheduler), None
        noise = self._noise(shape, generator, seeds, pipe._execution_device, cond.dtype)
        latents = self._sample(noise, cond, null, steps, rule, seeds)
        if output_type == "latent":
            return latents
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with torch.no_grad():
            image = pipe.vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)


class DiT(FastPipeline):
    """``DiTPipeline`` (class-conditional DiTTransformer2DModel, AutoencoderKL)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        model = DiTAdapter(pipe.transformer, pipe.scheduler)
        super().__init__(pipe, model, model.null_cond, cond_first=True, backend=backend, progress=progress)

    def __call__(self, class_labels, *, num_inference_steps: int = 50, guidance_scale: float = 4.0, guidance=None,
                 generator=None, seeds=None, output_type: str = "pil"):
        """``pipe(class_labels, guidance_scale, generator, num_inference_steps, output_type).images``."""
        pipe = self.pipe
        labels = list(class_labels) if isinstance(class_labels, (list, tuple, torch.Tensor)) else None
        if not labels:
            raise TypeError(f"class_labels: expected a non-empty list of class ids, got {type(class_labels).__name__}")
        steps, output_type = _check_steps(num_inference_steps), _check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        device, cfg = pipe._execution_device, pipe.transformer.config
        shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        noise = self._noise(shape, generator, seeds, device, pipe.transformer.dtype)
        cond = torch.tensor([int(c) for c in labels], device=device)
        latents = self._sample(noise, cond, self.model.null_cond, steps, rule, seeds)
        if output_type == "latent":
            return latents
        with torch.no_grad():
            samples = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return samples
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        return pipe.numpy_to_pil(samples) if output_type == "pil" else samples


PIPELINES = {"StableDiffusionPipeline": StableDiffusion, "StableDiffusionXLPipeline": StableDiffusionXL,
             "StableDiffusion3Pipeline": StableDiffusion3, "DiTPipeline": DiT}
