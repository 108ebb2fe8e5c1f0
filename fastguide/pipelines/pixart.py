"""PixArt-alpha and PixArt-sigma pipelines (PixArtTransformer2DModel, a T5 text encoder whose attention mask reaches
the transformer, AutoencoderKL), and the adapter that carries each prompt's mask in its condition."""
from __future__ import annotations

import math

import torch

from fastguide.adapters import ConditionIdModel, pack_tokens_and_pooled
from fastguide.diffusers_schedulers import scheduler_class, solver_from_diffusers
from fastguide.pipelines.common import (FastPipeline, check_output_type, check_steps, latent_shape,
                                        negative_prompt_list, prompt_list)
from fastguide.sampler import Sampler

SIZE_VALUES = 3  # height, width, aspect ratio: after the mask in the packed vector


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


class PixArtAdapter(torch.nn.Module):
    """``PixArtTransformer2DModel`` for the model contract ``model(x, t, cond) -> eps`` (the eps half of its
    learned-sigma output, as the PixArt pipelines use it).

    cond = :meth:`pack` (T5 prompt embeddings [N, L, D], their attention mask [N, L], the image height and width)
    -> [N, L + k, D]: the tokens, then the vector (mask, height, width, height / width) zero-padded into
    k = ceil((L + 3) / D) rows, so each sample carries its own mask (prompts of different lengths) through the
    sampler's batching and its per-sample null. The size values reach the transformer (``added_cond_kwargs``
    resolution and aspect ratio) only when it uses them (``use_additional_conditions``: PixArt-alpha at sample size
    128). ``null_cond``: the packed negative / empty prompt [L + k, D]. Batch layout as the pipelines:
    [negative | prompt]."""

    cond_first = False

    def __init__(self, transformer, null_cond: torch.Tensor, scheduler_config=None):
        super().__init__()
        try:
            from diffusers import PixArtTransformer2DModel
        except ImportError as e:
            raise ImportError("PixArtAdapter needs diffusers: pip install diffusers") from e
        if not isinstance(transformer, PixArtTransformer2DModel):
            raise TypeError(f"transformer: expected a diffusers.PixArtTransformer2DModel, got "
                            f"{type(transformer).__name__}")
        self.caption_dim = int(transformer.config.caption_channels)
        if not isinstance(null_cond, torch.Tensor) or not null_cond.is_floating_point():
            raise TypeError(f"null_cond: expected a float tensor (one packed condition), got "
                            f"{type(null_cond).__name__}")
        self.seq_len = self.tokens_for(null_cond.shape[0], self.caption_dim) if null_cond.ndim == 2 else None
        if self.seq_len is None or null_cond.shape[1] != self.caption_dim:
            raise ValueError(f"null_cond: expected a packed condition [L + ceil((L + 3) / {self.caption_dim}), "
                             f"{self.caption_dim}] (PixArtAdapter.pack), got {_shape(null_cond)}")
        self.model, self.null_cond = transformer, null_cond.detach()
        self.vector_dim = self.seq_len + SIZE_VALUES
        if scheduler_config is not None:
            config = scheduler_config.config if hasattr(scheduler_config, "set_timesteps") else scheduler_config
            scheduler_config = {**dict(config), "_class_name": scheduler_class(scheduler_config)}
        self.scheduler_config = scheduler_config

    @staticmethod
    def rows_for(seq_len: int, caption_dim: int) -> int:
        """Rows of a packed condition with ``seq_len`` tokens."""
        return seq_len + math.ceil((seq_len + SIZE_VALUES) / caption_dim)

    @classmethod
    def tokens_for(cls, rows: int, caption_dim: int) -> int | None:
        """The token count L of a packed condition with ``rows`` rows (None if no L packs to that many)."""
        return next((n for n in range(1, rows) if cls.rows_for(n, caption_dim) == rows), None)

    @staticmethod
    def pack(embeds: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[N, L, D] T5 embeddings + [N, L] attention mask + the image size in pixels -> [N, L + k, D]. The size
        values are rounded to the embeddings' dtype as the PixArt-alpha pipeline rounds its resolution and aspect
        ratio."""
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
            raise ValueError(f"embeds: expected [N, L, D] T5 prompt embeddings, got {_shape(embeds)}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"mask: expected a [{embeds.shape[0]}, {embeds.shape[1]}] attention mask, got "
                             f"{_shape(mask)}")
        size = torch.tensor([height, width, float(height / width)], dtype=torch.float32, device=embeds.device)
        vector = torch.cat([mask.to(device=embeds.device, dtype=torch.float32), size.expand(embeds.shape[0], -1)], 1)
        return pack_tokens_and_pooled(embeds, vector, embeds.shape[2], vector.shape[1])

    def unpack(self, cond: torch.Tensor):
        """The inverse of :meth:`pack`: (embeddings [N, L, D], mask [N, L], resolution [N, 2], aspect ratio [N, 1])."""
        n, L = cond.shape[0], self.seq_len
        vector = cond[:, L:].reshape(n, -1)
        return cond[:, :L], vector[:, :L], vector[:, L:L + 2], vector[:, L + 2:L + 3]

    def solver(self, steps: int, **kw):
        """The fastguide solver that steps like the pipeline's scheduler (from its config)."""
        if self.scheduler_config is None:
            raise ValueError("scheduler_config: this adapter was built without one; pass scheduler_config= "
                             "(e.g. pipe.scheduler) or build the solver yourself")
        return solver_from_diffusers(self.scheduler_config, steps, **kw)

    def sampler(self, solver, guidance=None, **kw) -> Sampler:
        """A :class:`fastguide.Sampler` over this adapter (``solver`` may be a step count: see :meth:`solver`)."""
        if isinstance(solver, int) and not isinstance(solver, bool):
            solver = self.solver(solver)
        return Sampler(self, solver, guidance, null_cond=self.null_cond, cond_first=self.cond_first, **kw)

    def with_condition_ids(self, conditions: torch.Tensor) -> ConditionIdModel:
        """Integer condition ids (for ReCFG tables): id i -> packed ``conditions[i]``, id ``len(conditions)`` ->
        null."""
        return ConditionIdModel(self, conditions, self.null_cond.to(conditions))

    def forward(self, x, t, cond):
        n = x.shape[0]
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"t: expected a [{n}] tensor of model times, got {_shape(t)}")
        want = (n, *self.null_cond.shape)
        if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or tuple(cond.shape) != want:
            raise ValueError(f"cond: expected packed conditions {want} (PixArtAdapter.pack), got {_shape(cond)}")
        embeds, mask, resolution, aspect_ratio = self.unpack(cond.to(x.dtype))
        added = ({"resolution": resolution, "aspect_ratio": aspect_ratio} if self.model.use_additional_conditions
                 else {"resolution": None, "aspect_ratio": None})
        out = self.model(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                         added_cond_kwargs=added, return_dict=False)[0]
        channels = x.shape[1]
        if out.shape[1] == 2 * channels:  # learned sigma
            return out[:, :channels].contiguous()
        if out.shape[1] != channels:
            raise ValueError(f"model: output has {out.shape[1]} channels, expected {channels} or {2 * channels}")
        return out


class _PixArt(FastPipeline):
    """What PixArt-alpha and PixArt-sigma share; the subclasses say where their pipelines differ."""

    pipeline_name: str
    default_max_sequence_length: int

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError("pipe: needs its tokenizer and text_encoder (T5) to encode prompts")
        if pipe.transformer.use_additional_conditions and not self._passes_size(pipe):
            raise ValueError(f"pipe: its transformer uses resolution / aspect-ratio conditions "
                             f"(use_additional_conditions) that {self.pipeline_name} does not pass at sample size "
                             f"{pipe.transformer.config.sample_size}, so the pipeline itself cannot run it")
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        with torch.no_grad():
            null = self._encode(pipe, [""], [""], self.default_max_sequence_length, size, size)[1][0]
        super().__init__(pipe, PixArtAdapter(pipe.transformer, null, pipe.scheduler), null, cond_first=False,
                         backend=backend, progress=progress)

    @staticmethod
    def _passes_size(pipe) -> bool:
        """Whether the pipeline passes resolution and aspect ratio to the transformer."""
        return False

    @staticmethod
    def _aspect_ratio_bins() -> dict:
        """Transformer sample size -> the pipeline's aspect-ratio bins (it refuses other sample sizes when binning)."""
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN,
                                                                            ASPECT_RATIO_512_BIN,
                                                                            ASPECT_RATIO_1024_BIN)

        return {128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}

    def _check_steps(self, steps) -> int:
        return check_steps(steps)

    @staticmethod
    def _encode(pipe, prompts, negatives, max_sequence_length, height, width):
        """(cond, null): the packed prompt and negative conditions [B, L + k, D] (PixArtAdapter.pack)."""
        embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts, True, negative_prompt=negatives,
                                                         num_images_per_prompt=1, device=pipe._execution_device,
                                                         clean_caption=False,
                                                         max_sequence_length=max_sequence_length)
        return PixArtAdapter.pack(embeds, mask, height, width), PixArtAdapter.pack(neg, neg_mask, height, width)

    def _decode(self, latents):
        return self.pipe.vae.decode(latents / self.pipe.vae.config.scaling_factor, return_dict=False)[0]

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, negative_prompt="", *, num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 guidance=None, generator=None, seeds=None, height: int | None = None, width: int | None = None,
                 use_resolution_binning: bool = True, max_sequence_length: int | None = None,
                 output_type: str = "pil"):
        """``pipe(prompt, negative_prompt, num_inference_steps, guidance_scale, generator, height, width,
        use_resolution_binning, max_sequence_length, output_type, clean_caption=False).images`` (a None negative
        prompt is ""), with ``guidance`` any fastguide rule (default CFG(guidance_scale)) and ``seeds`` per-image
        seeds instead of ``generator``."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        negatives = negative_prompt_list(negative_prompt, len(prompts))
        steps, output_type = self._check_steps(num_inference_steps), check_output_type(output_type)
        rule = self._rule(guidance, guidance_scale)
        if max_sequence_length is None:
            max_sequence_length = self.default_max_sequence_length
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: expected an int >= 1, got {max_sequence_length!r}")
        if not isinstance(use_resolution_binning, bool):
            raise TypeError(f"use_resolution_binning: expected a bool, got {type(use_resolution_binning).__name__}")
        cfg = pipe.transformer.config
        size = cfg.sample_size * pipe.vae_scale_factor
        height, width = height or size, width or size
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int (pixels), got {value!r}")
        orig_height, orig_width = height, width
        if use_resolution_binning:
            bins = self._aspect_ratio_bins()
            if cfg.sample_size not in bins:
                raise ValueError(f"use_resolution_binning: {self.pipeline_name} bins sizes only for transformer "
                                 f"sample sizes {', '.join(map(str, bins))} (this one's is {cfg.sample_size}; the "
                                 "pipeline refuses it too); pass use_resolution_binning=False")
            height, width = pipe.image_processor.classify_height_width_bin(height, width,
                                                                           ratios=bins[cfg.sample_size])
        if height % 8 or width % 8:
            raise ValueError(f"height, width: {self.pipeline_name} needs multiples of 8, got {height} x {width}")
        shape = latent_shape(pipe, height, width, cfg.in_channels, len(prompts))
        cond, null = self._encode(pipe, prompts, negatives, max_sequence_length, height, width)
        if tuple(null.shape[1:]) != tuple(self.model.null_cond.shape):  # another max_sequence_length
            self.model, self.sampler = PixArtAdapter(pipe.transformer, null[0], pipe.scheduler), None
            self.null_cond = self.model.null_cond
        noise = self._noise(shape, generator, seeds, cond.device, cond.dtype)  # encoded on the execution device
        latents = self._sample(noise, cond, null, steps, rule, seeds, generator)
        if output_type == "latent":
            return latents
        with torch.no_grad():
            image = self._decode(latents)
        if use_resolution_binning:
            image = pipe.image_processor.resize_and_crop_tensor(image, orig_width, orig_height)
        return pipe.image_processor.postprocess(image, output_type=output_type)


class PixArtAlpha(_PixArt):
    """``PixArtAlphaPipeline`` (T5 prompts up to 120 tokens; resolution and aspect-ratio conditions at sample size
    128, 1024 px)."""

    pipeline_name, default_max_sequence_length = "PixArtAlphaPipeline", 120

    @staticmethod
    def _passes_size(pipe) -> bool:
        return pipe.transformer.config.sample_size == 128

    def _check_steps(self, steps) -> int:
        steps = check_steps(steps)
        if steps == 1:
            raise ValueError("num_inference_steps: PixArtAlphaPipeline returns the scheduler's x0 prediction after a "
                             "single step (and fails for schedulers whose step returns none), which fastguide's "
                             "solvers do not reproduce; use 2 or more steps")
        return steps


class PixArtSigma(_PixArt):
    """``PixArtSigmaPipeline`` (T5 prompts up to 300 tokens; no resolution conditions; 2048 px bins at sample size
    256)."""

    pipeline_name, default_max_sequence_length = "PixArtSigmaPipeline", 300

    @staticmethod
    def _aspect_ratio_bins() -> dict:
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

        return {256: ASPECT_RATIO_2048_BIN, **_PixArt._aspect_ratio_bins()}

    def _decode(self, latents):
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
