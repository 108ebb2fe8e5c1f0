"""Latent Consistency Models: ``LatentConsistencyModelPipeline`` (a guidance-distilled Stable Diffusion UNet stepped by
LCMScheduler, :class:`fastguide.lcm.LCM`).

The pipeline runs no unconditional branch: the guidance scale is an input of the distilled UNet, the embedding of
w = guidance_scale - 1 passed as ``timestep_cond``. fastguide carries that embedding per sample in the packed
condition (:class:`LatentConsistencyAdapter`), so every prompt can have its own scale, and samples with no guidance
rule (one forward of B rows a step)."""
from __future__ import annotations

import math

import torch

from fastguide.adapters import pack_tokens_and_pooled
from fastguide.checks import check_int
from fastguide.diffusers_schedulers import scheduler_class, solver_from_diffusers
from fastguide.guidance import NoGuidance
from fastguide.pipelines.common import FastPipeline, check_output_type, check_steps, latent_shape, prompt_list


class LatentConsistencyAdapter(torch.nn.Module):
    """A ``UNet2DConditionModel`` with a guidance embedding (``time_cond_proj_dim``), as LatentConsistencyModelPipeline
    calls it: cond = :meth:`pack` (prompt embeddings [N, L, D], guidance embeddings [N, P]) -> [N, L + k, D], the
    guidance embedding zero-padded into k = ceil(P / D) rows after the tokens (as SD3's pooled vector), so each
    sample carries its own scale. No null condition: LCM has no unconditional branch."""

    cond_first = True  # no null half is ever run; the Sampler asks
    null_cond = None

    def __init__(self, unet):
        from diffusers import UNet2DConditionModel

        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(f"unet: expected a diffusers.UNet2DConditionModel, got {type(unet).__name__}")
        cfg = unet.config
        if cfg.time_cond_proj_dim is None:
            raise ValueError("unet: expected a guidance-distilled UNet (time_cond_proj_dim set: the guidance scale "
                             "embedding LatentConsistencyModelPipeline passes as timestep_cond), got "
                             "time_cond_proj_dim=None")
        if cfg.addition_embed_type is not None or cfg.class_embed_type is not None:
            raise ValueError("unet: needs added conditions this adapter does not pass (addition_embed_type="
                             f"{cfg.addition_embed_type!r}, class_embed_type={cfg.class_embed_type!r})")
        if isinstance(cfg.cross_attention_dim, (list, tuple)):
            raise ValueError(f"unet: expected one cross_attention_dim, got {cfg.cross_attention_dim!r}")
        super().__init__()
        self.unet = unet
        self.joint_dim, self.embedding_dim = int(cfg.cross_attention_dim), int(cfg.time_cond_proj_dim)
        self.embedding_rows = math.ceil(self.embedding_dim / self.joint_dim)

    def pack(self, embeds: torch.Tensor, guidance_embedding: torch.Tensor) -> torch.Tensor:
        """[N, L, D] prompt embeddings + [N, P] guidance embeddings -> [N, L + k, D]."""
        return pack_tokens_and_pooled(embeds, guidance_embedding, self.joint_dim, self.embedding_dim)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: ([N, L, D] prompt embeddings, [N, P] guidance embeddings)."""
        k = self.embedding_rows
        return cond[:, :-k], cond[:, -k:].reshape(cond.shape[0], -1)[:, :self.embedding_dim]

    def forward(self, x, t, cond):
        n = x.shape[0]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
            raise ValueError(f"t: expected a [{n}] tensor of model times, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if (not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 3
                or cond.shape[0] != n or cond.shape[2] != self.joint_dim or cond.shape[1] <= self.embedding_rows):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise TypeError(f"cond: expected a packed condition [{n}, L + {self.embedding_rows}, {self.joint_dim}] "
                            f"(LatentConsistencyAdapter.pack), got {got}")
        embeds, guidance_embedding = self.unpack(cond.to(x.dtype))
        return self.unet(x, t, timestep_cond=guidance_embedding, encoder_hidden_states=embeds).sample


def guidance_scales(guidance_scale, count: int) -> list[float]:
    """One guidance scale per prompt: a number, or ``count`` numbers."""
    values = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale] * count
    ok = all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    if not ok or len(values) != count:
        raise ValueError(f"guidance_scale: expected a finite number or {count} of them (one per prompt), got "
                         f"{guidance_scale!r}")
    return [float(v) for v in values]


class LatentConsistency(FastPipeline):
    """``LatentConsistencyModelPipeline`` (CLIP text encoder, guidance-distilled ``UNet2DConditionModel``,
    LCMScheduler, AutoencoderKL)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        if getattr(pipe, "safety_checker", None) is not None:
            raise ValueError("pipe: has a safety checker, which this fast pipeline does not run; build the pipeline "
                             "with safety_checker=None (and check images yourself) to use it")
        super().__init__(pipe, LatentConsistencyAdapter(pipe.unet), None, cond_first=True, backend=backend,
                         progress=progress)
        self._lcm_solvers = {}

    def solver(self, steps: int, original_inference_steps: int | None = None):
        """The LCM solver of ``pipe.scheduler`` for ``steps`` steps on the ``original_inference_steps`` grid (None:
        the scheduler config's), made once per pair."""
        name = scheduler_class(self.pipe.scheduler)
        if name != "LCMScheduler":
            raise ValueError(f"pipe.scheduler: expected an LCMScheduler (LatentConsistencyModelPipeline passes "
                             f"original_inference_steps to it), got {name}")
        key = (steps, original_inference_steps)
        if key not in self._lcm_solvers:
            self._lcm_solvers[key] = solver_from_diffusers(self.pipe.scheduler, steps,
                                                           original_inference_steps=original_inference_steps)
        return self._lcm_solvers[key]

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, *, num_inference_steps: int = 4, original_inference_steps: int | None = None,
                 guidance_scale=8.5, guidance=None, generator=None, seeds=None, height: int | None = None,
                 width: int | None = None, output_type: str = "pil"):
        """``pipe(prompt, num_inference_steps, original_inference_steps, guidance_scale, generator, height, width,
        output_type).images``; ``guidance_scale`` may also be one number per prompt, and ``seeds`` per-image seeds
        instead of ``generator``. ``guidance`` must be None (or NoGuidance()): LCM has no unconditional branch."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        if guidance is not None and not isinstance(guidance, NoGuidance):
            raise ValueError(f"guidance: LatentConsistencyModelPipeline has no unconditional branch for a guidance "
                             f"rule to combine (its UNet reads the scale itself: pass guidance_scale=), got "
                             f"{type(guidance).__name__}")
        scales = guidance_scales(guidance_scale, len(prompts))
        original = pipe.scheduler.config.get("original_inference_steps", 50)
        if original_inference_steps is not None:
            original = check_int(original_inference_steps, "original_inference_steps", low=1)
        if steps > original:
            raise ValueError(f"num_inference_steps: expected <= original_inference_steps ({original}: LCM's timesteps "
                             f"are a subset of that grid), got {steps}")
        solver = self.solver(steps, original_inference_steps)
        device = pipe._execution_device
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False, negative_prompt=None)
        # the pipeline's w = guidance_scale - 1, embedded in float32 on the CPU, then moved to the latents' dtype
        w = torch.tensor([s - 1 for s in scales], dtype=torch.float32)
        w_embedding = pipe.get_guidance_scale_embedding(w, embedding_dim=pipe.unet.config.time_cond_proj_dim)
        cond = self.model.pack(embeds, w_embedding.to(device=device, dtype=embeds.dtype))
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        shape = latent_shape(pipe, height, width, pipe.unet.config.in_channels, len(prompts))
        noise = self._noise(shape, generator, seeds, device, embeds.dtype)
        denoised = self._sample(noise, cond, None, solver.plan.steps, NoGuidance(), seeds, generator, solver)
        if output_type == "latent":
            return denoised
        with torch.no_grad():
            image = pipe.vae.decode(denoised / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(prompts))
