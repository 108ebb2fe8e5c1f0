"""DiT (class-conditional) pipelines."""
from __future__ import annotations

import torch

from fastguide.adapters import DiTAdapter
from fastguide.pipelines.common import FastPipeline, check_output_type, check_steps


class DiT(FastPipeline):
    """``DiTPipeline`` (class-conditional DiTTransformer2DModel, AutoencoderKL)."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        model = DiTAdapter(pipe.transformer, pipe.scheduler)
        super().__init__(pipe, model, model.null_cond, cond_first=True, backend=backend, progress=progress)

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, class_labels, *, num_inference_steps: int = 50, guidance_scale: float = 4.0, guidance=None,
                 generator=None, seeds=None, output_type: str = "pil"):
        """``pipe(class_labels, guidance_scale, generator, num_inference_steps, output_type).images``."""
        pipe = self.pipe
        labels = list(class_labels) if isinstance(class_labels, (list, tuple, torch.Tensor)) else None
        if not labels:
            raise TypeError(f"class_labels: expected a non-empty list of class ids, got {type(class_labels).__name__}")
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        device, cfg = pipe._execution_device, pipe.transformer.config
        shape = (len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size)
        noise = self._noise(shape, generator, seeds, device, pipe.transformer.dtype)
        cond = torch.tensor([int(c) for c in labels], device=device)
        latents = self._sample(noise, cond, self.model.null_cond, steps, rule, seeds, generator)
        if output_type == "latent":
            return latents
        with torch.no_grad():
            samples = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return samples
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        return pipe.numpy_to_pil(samples) if output_type == "pil" else samples
