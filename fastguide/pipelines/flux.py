"""Flux: ``FluxPipeline`` (FluxTransformer2DModel, a CLIP and a T5 text encoder, AutoencoderKL), rectified flow
stepped by :class:`fastguide.FlowEuler` with the pipeline's resolution-dependent time shift.

fastguide's state is the unpacked latent [N, C, H, W] (C = ``in_channels / 4``); :class:`FluxAdapter` packs it
into the pipeline's 2x2-patch token sequence for the transformer and unpacks the velocity, so the step, the
noise and the guidance rules see ordinary latents. Guidance-distilled models (``guidance_embeds``) take the
call's ``guidance_scale`` as their guidance embedding and run one forward a step; ``true_cfg_scale > 1`` with a
negative prompt is classifier-free guidance over the packed negative (the pipeline's second forward)."""
from __future__ import annotations

import math

import numpy as np
import torch

from fastguide.adapters import pack_tokens_and_pooled, unpack_tokens_and_pooled
from fastguide.diffusers_schedulers import scheduler_class, solver_from_diffusers
from fastguide.guidance import CFG, GuidanceRule, NoGuidance, check_guidance
from fastguide.pipelines.common import FastPipeline, check_output_type, check_steps, negative_prompt_list, prompt_list
from fastguide.sampler import Sampler

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts


def flux_mu(scheduler, image_seq_len: int) -> float | None:
    """The pipeline's ``mu`` (``calculate_shift`` over the scheduler config) for ``image_seq_len`` packed latent
    tokens; None for a scheduler without dynamic shifting (its ``set_timesteps`` ignores mu)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return None
    return float(calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15)))


def flux_solver(scheduler, steps: int, mu: float | None):
    """The solver that steps like FluxPipeline's scheduler: ``set_timesteps(sigmas=linspace(1, 1/steps, steps),
    mu=mu)`` (the scheduler's own grid where its config sets ``use_flow_sigmas``, as the pipeline does)."""
    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    return solver_from_diffusers(scheduler, steps, mu=mu, sigmas=sigmas)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/2)(W/2), 4C]: FluxPipeline's ``_pack_latents`` (2x2 patches as tokens)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` (FluxPipeline's ``_unpack_latents``) for an [h, w] latent."""
    n, _, channels = tokens.shape
    return tokens.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, channels // 4, h, w)


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


class FluxAdapter(torch.nn.Module):
    """``FluxTransformer2DModel`` -> the model contract ``model(x [N, C, H, W], t [N] flow sigma, cond) -> velocity``.

    cond = :meth:`pack` (T5 token embeddings [N, L, D], pooled CLIP vector [N, P]) -> [N, L + k, D], the pooled
    vector zero-padded into k = ceil(P / D) rows as for SD3 (any L: ``max_sequence_length`` is the caller's).
    The transformer gets the packed latent, the position ids FluxPipeline builds (zeros for the text tokens, row and
    column for the latent patches; made once per shape), ``timestep`` = (sigma * num_train_timesteps) / 1000 as the
    pipeline passes its scheduler's timestep, and for guidance-distilled models (``guidance_embeds``) the guidance
    embedding :attr:`guidance_scale` for every row (a buffer: set it with :meth:`set_guidance_scale`, compiled
    code and captured graphs read the new value). ``null_cond``: a packed negative, or None (Flux has no trained
    unconditional condition; a rule that needs one then takes per-call nulls). Layout [prompt | negative]: the
    pipeline runs the prompt's forward first.
    """

    cond_first = True
    num_classes = None

    def __init__(self, transformer, null_cond: torch.Tensor | None = None, scheduler_config=None,
                 num_train_timesteps: int | None = None, guidance_scale: float = 3.5):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        if not isinstance(transformer, FluxTransformer2DModel):
            raise TypeError("transformer: expected a diffusers.FluxTransformer2DModel, got "
                            f"{type(transformer).__name__}")
        cfg = transformer.config
        out_channels = cfg.out_channels or cfg.in_channels
        if cfg.patch_size != 1 or cfg.in_channels % 4 or out_channels != cfg.in_channels:
            raise ValueError("transformer: expected FluxPipeline's layout (patch_size 1, in_channels = out_channels = "
                             f"4 x latent channels), got patch_size={cfg.patch_size}, in_channels={cfg.in_channels}, "
                             f"out_channels={cfg.out_channels}")
        self.model = transformer
        self.joint_dim, self.pooled_dim = int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)
        self.pooled_rows = math.ceil(self.pooled_dim / self.joint_dim)
        self.latent_channels = int(cfg.in_channels) // 4
        self.guidance_embeds = bool(cfg.guidance_embeds)
        if null_cond is not None:
            self._check_cond(null_cond[None] if isinstance(null_cond, torch.Tensor) else null_cond, 1, "null_cond")
            null_cond = null_cond.detach()
        self.null_cond = null_cond
        self.scheduler_config = None
        if scheduler_config is not None:
            config = scheduler_config.config if hasattr(scheduler_config, "set_timesteps") else scheduler_config
            self.scheduler_config = {**dict(config), "_class_name": scheduler_class(scheduler_config)}
        if num_train_timesteps is None:
            num_train_timesteps = int((self.scheduler_config or {}).get("num_train_timesteps", 1000))
        self.num_train_timesteps = int(num_train_timesteps)
        self.register_buffer("guidance_scale", torch.tensor(0.0, dtype=torch.float32), persistent=False)
        self.set_guidance_scale(guidance_scale)
        self._ids = {}  # (what, shape, device, dtype) -> position ids

    @classmethod
    def from_pipeline(cls, pipe, guidance_scale: float = 3.5) -> "FluxAdapter":
        return cls(pipe.transformer, None, pipe.scheduler, guidance_scale=guidance_scale)

    def set_guidance_scale(self, value: float, device=None) -> None:
        """The guidance embedding of a guidance-distilled model (unused without ``guidance_embeds``), kept on
        ``device`` (the transformer's; moved there once, outside any compiled or captured code)."""
        value = _check_number(value, "guidance_scale")
        if device is not None and self.guidance_scale.device != torch.device(device):
            self.guidance_scale = self.guidance_scale.to(device)
        self.guidance_scale.fill_(value)

    @staticmethod
    @torch.no_grad()
    def encode_for(pipe, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                   device=None) -> torch.Tensor:
        """Packed prompt conditions [N, L + k, D] as FluxPipeline encodes prompts (the ``cond`` of a sample), on
        ``device`` (default: the pipeline's execution device)."""
        device = pipe._execution_device if device is None else device
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               num_images_per_prompt=1, max_sequence_length=max_sequence_length)
        cfg = pipe.transformer.config
        return pack_tokens_and_pooled(embeds, pooled, int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim))

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return pack_tokens_and_pooled(embeds, pooled, self.joint_dim, self.pooled_dim)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: ([N, L, D] token embeddings, [N, P] pooled)."""
        return unpack_tokens_and_pooled(cond, self.pooled_dim)

    def solver(self, steps: int, image_seq_len: int):
        """The solver FluxPipeline's scheduler steps with for ``image_seq_len`` = (H/2)(W/2) packed tokens."""
        if self.scheduler_config is None:
            raise ValueError("scheduler_config: this adapter was built without one; pass the pipeline's scheduler")
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        return flux_solver(scheduler, steps, flux_mu(scheduler, image_seq_len))

    def sampler(self, solver, guidance=None, **kw) -> Sampler:
        return Sampler(self, solver, guidance, null_cond=self.null_cond, cond_first=self.cond_first, **kw)

    def _check_cond(self, cond, n: int, name: str = "cond") -> None:
        k, d = self.pooled_rows, self.joint_dim
        if (not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or cond.ndim != 3
                or cond.shape[0] != n or cond.shape[1] <= k or cond.shape[2] != d):
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise TypeError(f"{name}: expected a float tensor [{n}, L + {k}, {d}] (FluxAdapter.pack), got {got}")

    def _position_ids(self, what: str, shape: tuple, device, dtype) -> torch.Tensor:
        key = (what, shape, device, dtype)
        ids = self._ids.get(key)
        if ids is None:
            if what == "text":
                ids = torch.zeros(shape[0], 3)
            else:  # FluxPipeline._prepare_latent_image_ids over the (H/2, W/2) patch grid
                rows, cols = shape
                ids = torch.zeros(rows, cols, 3)
                ids[..., 1] += torch.arange(rows)[:, None]
                ids[..., 2] += torch.arange(cols)[None, :]
                ids = ids.reshape(rows * cols, 3)
            ids = self._ids[key] = ids.to(device=device, dtype=dtype)
        return ids

    def forward(self, x, t, cond):
        n, c, h, w = x.shape
        if c != self.latent_channels or h % 2 or w % 2:
            raise ValueError(f"x: expected [N, {self.latent_channels}, H, W] latents with even H, W, "
                             f"got {tuple(x.shape)}")
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"t: expected a [{n}] tensor of flow sigmas, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        self._check_cond(cond, n)
        embeds, pooled = self.unpack(cond.to(x.dtype))
        # the pipeline's scheduler timestep (float32 sigma * num_train_timesteps) in the latents' dtype, over 1000
        timestep = (t.to(torch.float32) * self.num_train_timesteps).to(x.dtype) / 1000
        guidance = self.guidance_scale.to(x.device).expand(n) if self.guidance_embeds else None
        out = self.model(hidden_states=pack_latents(x), timestep=timestep, guidance=guidance,
                         pooled_projections=pooled, encoder_hidden_states=embeds,
                         txt_ids=self._position_ids("text", (embeds.shape[1],), x.device, x.dtype),
                         img_ids=self._position_ids("image", (h // 2, w // 2), x.device, x.dtype),
                         return_dict=False)[0]
        return unpack_latents(out, h, w)


class Flux(FastPipeline):
    """``FluxPipeline`` (FLUX.1 dev / schnell and their fine-tunes) through a fastguide Sampler."""

    def __init__(self, pipe, *, backend: str = "auto", progress: bool = False):
        name = scheduler_class(pipe.scheduler)
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"pipe: scheduler {name} is not supported here; FluxPipeline's schedule (its sigmas and "
                             "mu) is FlowMatchEulerDiscreteScheduler's")
        super().__init__(pipe, FluxAdapter(pipe.transformer, None, pipe.scheduler), None, cond_first=True,
                         backend=backend, progress=progress)

    def solver(self, steps: int, mu: float | None = None):
        """The solver of ``steps`` steps with time shift ``mu`` (see :func:`flux_mu`; made once per pair)."""
        if (steps, mu) not in self._solvers:
            self._solvers[(steps, mu)] = flux_solver(self.pipe.scheduler, steps, mu)
        return self._solvers[(steps, mu)]

    def _encode(self, prompts, max_sequence_length: int, device) -> torch.Tensor:
        return FluxAdapter.encode_for(self.pipe, prompts, max_sequence_length, device)

    @torch.no_grad()  # as the pipeline's own call (no autograd graph kept alive with the embeddings)
    def __call__(self, prompt, negative_prompt=None, *, true_cfg_scale: float = 1.0, num_inference_steps: int = 28,
                 guidance_scale: float = 3.5, guidance=None, generator=None, seeds=None, height: int | None = None,
                 width: int | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 output_type: str = "pil"):
        """``pipe(prompt, negative_prompt, true_cfg_scale, num_inference_steps, guidance_scale, generator, height,
        width, max_sequence_length, output_type).images``. ``guidance_scale`` is the guidance embedding of a
        guidance-distilled model (ignored otherwise, as the pipeline ignores it); ``true_cfg_scale > 1`` with a
        negative prompt is CFG over the negatives. ``guidance``: any fastguide rule instead (over the negative
        prompts, "" by default; not with ``true_cfg_scale``). ``output_type="latent"`` returns what the pipeline
        returns: the packed latents [B, (H/2)(W/2), 4C]."""
        pipe = self.pipe
        prompts = prompt_list(prompt)
        steps, output_type = check_steps(num_inference_steps), check_output_type(output_type)
        true_cfg_scale = _check_number(true_cfg_scale, "true_cfg_scale")
        device = pipe._execution_device  # once a call: diffusers walks every component's modules for it (~2 ms)
        self.model.set_guidance_scale(guidance_scale, device)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length: expected an int in [1, {MAX_SEQUENCE_LENGTH}], "
                             f"got {max_sequence_length!r}")
        if guidance is not None:
            if true_cfg_scale != 1.0:
                raise ValueError("true_cfg_scale: pass guidance= (a fastguide rule) or true_cfg_scale, not both")
            if not isinstance(guidance, GuidanceRule):
                check_guidance(guidance, None)  # the TypeError naming guidance
            rule, needs_negatives = guidance, guidance.needs_null
        else:
            needs_negatives = true_cfg_scale > 1 and negative_prompt is not None  # the pipeline's do_true_cfg
            rule = CFG(true_cfg_scale) if needs_negatives else NoGuidance()
        f = pipe.vae_scale_factor * 2  # the VAE's factor times the 2x2 packing
        size = pipe.default_sample_size * pipe.vae_scale_factor
        height, width = size if height is None else height, size if width is None else width
        for value in (height, width):
            if isinstance(value, bool) or not isinstance(value, int) or value < f or value % f:
                raise ValueError(f"height, width: expected positive multiples of {f} (the VAE's scale factor times "
                                 f"Flux's 2x2 packing), got {height!r} x {width!r}")
        cond = self._encode(prompts, max_sequence_length, device)
        null = None
        if needs_negatives:
            null = self._encode(negative_prompt_list(negative_prompt, len(prompts)), max_sequence_length, device)
        shape = (len(prompts), self.model.latent_channels, height // pipe.vae_scale_factor,
                 width // pipe.vae_scale_factor)
        noise = self._noise(shape, generator, seeds, device, cond.dtype)
        image_seq_len = (shape[2] // 2) * (shape[3] // 2)
        solver = self.solver(steps, flux_mu(pipe.scheduler, image_seq_len))
        latents = self._sample(noise, cond, null, steps, rule, seeds, generator, solver=solver)
        if output_type == "latent":
            return pack_latents(latents)
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
