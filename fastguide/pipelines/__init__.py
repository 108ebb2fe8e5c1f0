"""Your pipeline, faster: a diffusers pipeline's own call (prompts or class labels in, its images out) with a
fastguide Sampler in place of its denoising loop.

    fast = fastguide.pipelines.from_pipe(pipe)                  # any pipeline class of PIPELINES
    images = fast(["a cat", "a dog"], negative_prompt=["", "blurry"], num_inference_steps=20, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(s) for s in (1, 2)])   # = pipe(...).images

What stays the pipeline's: its text encoders (``pipe.encode_prompt``, negative prompts per sample), its initial
noise (``randn_tensor`` with the given ``generator``: the same latents as ``pipe(...)``) and, for stochastic
schedulers, its per-step noise (drawn from the generator in the scheduler's order), its shipped scheduler (stepped
by the fastguide solver of :func:`fastguide.solver_from_diffusers`), its VAE decode and image post-processing
(``output_type`` "pil", "np", "pt" or "latent"). What fastguide adds: the guidance rule (``guidance=``: CFG,
CFG-Zero*, APG, ReCFG, ...), per-prompt seeds (``seeds=``), the fused step, ``compile()`` and CUDA graphs. One
module per family; docs/adapters.md has what is supported and what is refused.
"""
from __future__ import annotations

from fastguide.pipelines.common import FastPipeline
from fastguide.pipelines.dit import DiT
from fastguide.pipelines.flux import Flux
from fastguide.pipelines.lcm import LatentConsistency
from fastguide.pipelines.pixart import PixArtAlpha, PixArtSigma
from fastguide.pipelines.stable_diffusion import StableDiffusion, StableDiffusion3, StableDiffusionXL

PIPELINES = {"StableDiffusionPipeline": StableDiffusion, "StableDiffusionXLPipeline": StableDiffusionXL,
             "StableDiffusion3Pipeline": StableDiffusion3, "DiTPipeline": DiT, "PixArtAlphaPipeline": PixArtAlpha,
             "PixArtSigmaPipeline": PixArtSigma, "LatentConsistencyModelPipeline": LatentConsistency,
             "FluxPipeline": Flux}


def from_pipe(pipe, *, backend: str = "auto", progress: bool = False) -> FastPipeline:
    """The fast pipeline for ``pipe`` (a class of ``PIPELINES``); a ValueError names an unsupported class."""
    name = type(pipe).__name__
    cls = PIPELINES.get(name)
    if cls is None:
        raise ValueError(f"pipe: {name} is not supported (supported: {', '.join(sorted(PIPELINES))}); for other "
                         "models wrap the denoiser with fastguide.adapters and sample with fastguide.Sampler")
    return cls(pipe, backend=backend, progress=progress)


__all__ = ["PIPELINES", "FastPipeline", "from_pipe", "StableDiffusion", "StableDiffusionXL", "StableDiffusion3", "DiT",
           "PixArtAlpha", "PixArtSigma", "LatentConsistency", "Flux"]
