"""Adapters from diffusers models to fastguide's model contract (bring your own model).

    model(x [N, C, H, W], t [N] float, cond [N] long | [N, ...] tensor) -> [N, C, H, W]

Each adapter wraps a diffusers model (it does not copy weights or code) and knows three things a
:class:`fastguide.Sampler` needs besides the forward: the null condition, which half of the batched forward
diffusers puts the conditional rows in (``cond_first``, so a sample matches the pipeline's batch layout), and
the scheduler config it came with (``solver(steps)``).

- :class:`UNet2DAdapter`: ``UNet2DModel`` with class embeddings; cond = class ids, null = a given label.
- :class:`DiTAdapter`: ``DiTTransformer2DModel``; cond = class ids, null = ``num_embeds_ada_norm``.
- :class:`UNet2DConditionAdapter`: ``UNet2DConditionModel``; cond = prompt embeddings [N, L, D], null = the
  negative / empty-prompt embedding.
- :class:`SDXLAdapter`: SDXL's ``UNet2DConditionModel``; cond = packed prompt embeddings, pooled vector and time
  ids [N, L + k, D] (below), null = the packed negative.
- :class:`SD3Adapter`: ``SD3Transformer2DModel``; cond = packed [N, L + k, D] (below), null = the packed negative /
  empty prompt; FlowEuler (velocity).

Learned-sigma models (``out_channels == 2 * in_channels``, e.g. DiT) return the eps half. The SD3 transformer
takes two conditions (token embeddings [L, D] and a pooled vector [P]); :meth:`SD3Adapter.pack` stores the
pooled vector in ``k = ceil(P / D)`` extra zero-padded rows after the tokens so one tensor carries both, which
is what the sampler's batching and ``null_cond`` need. For ReCFG (integer condition ids), wrap any text adapter
with :meth:`with_condition_ids` (a :class:`ConditionIdModel`, which wraps any embedding-conditioned model the same
way). docs/adapters.md has examples.

diffusers is optional: it is imported only when an adapter is built.
"""
from __future__ import annotations

import math

import torch

from fastguide.diffusers_schedulers import solver_from_diffusers
from fastguide.sampler import Sampler


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("fastguide.adapters needs diffusers (an optional dependency): "
                          "pip install diffusers  (or: pip install fastguide[diffusers])") from e
    return diffusers


def _check_model(model, class_name: str, arg: str):
    cls = getattr(_diffusers(), class_name)
    if not isinstance(model, cls):
        raise TypeError(f"{arg}: expected a diffusers.{class_name}, got {type(model).__name__}")


def _check_null_tensor(null, arg: str, shape: tuple | None = None) -> torch.Tensor:
    if not isinstance(null, torch.Tensor) or not null.is_floating_point():
        raise TypeError(f"{arg}: expected a float tensor (one condition's embedding), got {type(null).__name__}")
    if shape is not None and tuple(null.shape) != tuple(shape):
        raise ValueError(f"{arg}: expected shape {tuple(shape)} (one condition), got {tuple(null.shape)}")
    return null.detach()


def _output_half(out: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The prediction half of a learned-sigma output ([N, 2C, ...] -> [N, C, ...], dense for the fused kernel)."""
    if out.shape[1] == in_channels:
        return out
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels].contiguous()
    raise ValueError(f"model: output has {out.shape[1]} channels, expected {in_channels} or {2 * in_channels} "
                     "(learned sigma)")


def _check_t(t: torch.Tensor, n: int) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"t: expected a [{n}] tensor of model times, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def _check_ids(cond: torch.Tensor, n: int) -> None:
    if not isinstance(cond, torch.Tensor) or cond.is_floating_point() or cond.ndim != 1 or cond.shape[0] != n:
        raise TypeError(f"cond: expected [{n}] integer class ids, got "
                        f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")


def _check_embeddings(cond: torch.Tensor, n: int, tail: tuple) -> None:
    if not isinstance(cond, torch.Tensor) or not cond.is_floating_point() or tuple(cond.shape) != (n, *tail):
        got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
        raise TypeError(f"cond: expected a float tensor of shape {(n, *tail)} (embeddings), got {got}")


def _with_class_name(scheduler_or_config) -> dict:
    """A scheduler's config (or a config) as a dict that names the scheduler class it belongs to."""
    from fastguide.diffusers_schedulers import scheduler_class

    config = scheduler_or_config.config if hasattr(scheduler_or_config, "set_timesteps") else scheduler_or_config
    return {**dict(config), "_class_name": scheduler_class(scheduler_or_config)}


class _Adapter(torch.nn.Module):
    """What every adapter adds to the forward: null condition, batch layout, scheduler config, sampler helpers."""

    cond_first: bool = True
    num_classes: int | None = None  # class-conditional adapters: labels in [0, num_classes) (or the null label)

    def __init__(self, model, null_cond, scheduler_config):
        super().__init__()
        self.model = model
        self.null_cond = null_cond
        self.scheduler_config = None if scheduler_config is None else _with_class_name(scheduler_config)

    def solver(self, steps: int, **kw):
        """The fastguide solver that steps like the wrapped pipeline's scheduler (from its config; see
        :func:`fastguide.diffusers_schedulers.solver_from_diffusers`)."""
        if self.scheduler_config is None:
            raise ValueError("scheduler_config: this adapter was built without one; pass scheduler_config= "
                             "(e.g. pipe.scheduler.config) or build the solver yourself")
        return solver_from_diffusers(self.scheduler_config, steps, **kw)

    def sampler(self, solver, guidance=None, **kw) -> Sampler:
        """A :class:`fastguide.Sampler` over this adapter (``solver`` may be a step count: see :meth:`solver`)."""
        if isinstance(solver, int) and not isinstance(solver, bool):
            solver = self.solver(solver)
        return Sampler(self, solver, guidance, null_cond=self.null_cond, cond_first=self.cond_first, **kw)


# ====================================================================== class-conditional
class UNet2DAdapter(_Adapter):
    """``UNet2DModel`` with class embeddings (``num_class_embeds``): cond = class ids, ``null_class`` the
    label the model was trained with for "no class" (diffusers has no convention, so it must be given)."""

    cond_first = True

    def __init__(self, unet, null_class: int, scheduler_config=None):
        _check_model(unet, "UNet2DModel", "unet")
        n = unet.config.num_class_embeds
        if unet.config.class_embed_type is not None or n is None:
            raise ValueError("unet: expected a class-conditional UNet2DModel (num_class_embeds set, "
                             f"class_embed_type None), got class_embed_type={unet.config.class_embed_type!r}, "
                             f"num_class_embeds={n!r}")
        if isinstance(null_class, bool) or not isinstance(null_class, int) or not 0 <= null_class < n:
            raise ValueError(f"null_class: expected an int in [0, {n}) (the unconditional label), got {null_class!r}")
        super().__init__(unet, null_class, scheduler_config)
        self.num_classes = int(n)

    @classmethod
    def from_pipeline(cls, pipe, null_class: int) -> "UNet2DAdapter":
        return cls(pipe.unet, null_class, pipe.scheduler)

    def forward(self, x, t, cond):
        _check_t(t, x.shape[0])
        _check_ids(cond, x.shape[0])
        return _output_half(self.model(x, t, class_labels=cond).sample, x.shape[1])


class DiTAdapter(_Adapter):
    """``DiTTransformer2DModel``: cond = class ids; null class = ``num_embeds_ada_norm`` (the extra CFG
    embedding row); the learned-sigma output's eps half. Batch layout as DiTPipeline: [cond | null]."""

    cond_first = True

    def __init__(self, transformer, scheduler_config=None):
        _check_model(transformer, "DiTTransformer2DModel", "transformer")
        super().__init__(transformer, int(transformer.config.num_embeds_ada_norm), scheduler_config)
        self.num_classes = self.null_cond  # labels 0..n-1; n is the extra CFG (null) embedding

    @classmethod
    def from_pipeline(cls, pipe) -> "DiTAdapter":
        return cls(pipe.transformer, pipe.scheduler)

    def forward(self, x, t, cond):
        _check_t(t, x.shape[0])
        _check_ids(cond, x.shape[0])
        return _output_half(self.model(x, timestep=t, class_labels=cond).sample, x.shape[1])


# ====================================================================== integer condition ids
class ConditionIdModel(torch.nn.Module):
    """Adapt a model conditioned on embeddings (e.g. text) to integer condition ids, for tables and samplers.

    ``embeddings`` [K, ...]: one model condition per id 0..K-1 (the caller maps prompts to ids);
    ``null_embedding``: the unconditional condition, reached by id K (use ``null_cond=K``).
    """

    def __init__(self, model, embeddings: torch.Tensor, null_embedding: torch.Tensor):
        super().__init__()
        if not callable(model):
            raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
        if not isinstance(embeddings, torch.Tensor) or embeddings.ndim < 1:
            raise TypeError("embeddings: expected a tensor [K, ...] of per-id conditions")
        if not isinstance(null_embedding, torch.Tensor) or tuple(null_embedding.shape) != tuple(embeddings.shape[1:]):
            raise ValueError(f"null_embedding: expected a tensor of shape {tuple(embeddings.shape[1:])} "
                             "(one condition)")
        self.model = model
        self.register_buffer("conditions", torch.cat([embeddings, null_embedding.unsqueeze(0).to(embeddings)]))

    @property
    def null_id(self) -> int:
        return self.conditions.shape[0] - 1

    @property
    def num_classes(self) -> int:
        """Condition ids 0..num_classes-1 (the id ``num_classes`` is the null condition)."""
        return self.null_id

    def forward(self, x, t, ids):
        if ids.is_floating_point() or ids.ndim != 1:
            raise TypeError("ids: expected integer condition ids [N]")
        if bool(((ids < 0) | (ids > self.null_id)).any()):
            raise ValueError(f"ids: expected condition ids in [0, {self.null_id}] ({self.null_id} = null)")
        return self.model(x, t, self.conditions[ids.to(self.conditions.device)])


# ====================================================================== text-conditional
class _TextAdapter(_Adapter):
    cond_first = False  # diffusers' text pipelines batch [negative | prompt]

    def with_condition_ids(self, embeddings: torch.Tensor) -> ConditionIdModel:
        """Integer condition ids (for ReCFG tables): id i -> ``embeddings[i]``, id ``len(embeddings)`` -> null.

        Use ``Sampler(wrapped, solver, guide, null_cond=wrapped.null_id, cond_first=adapter.cond_first)``."""
        return ConditionIdModel(self, embeddings, self.null_cond.to(embeddings))


class UNet2DConditionAdapter(_TextAdapter):
    """``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x): cond = prompt embeddings [N, L, D] (encoder hidden
    states); ``null_embedding`` [L, D] the negative / empty-prompt embedding. Batch layout as
    StableDiffusionPipeline: [negative | prompt]."""

    def __init__(self, unet, null_embedding: torch.Tensor, scheduler_config=None):
        _check_model(unet, "UNet2DConditionModel", "unet")
        cfg = unet.config
        extras = (cfg.addition_embed_type, cfg.time_cond_proj_dim, cfg.class_embed_type)
        if any(v is not None for v in extras):
            raise ValueError("unet: needs added conditions this adapter does not pass (addition_embed_type="
                             f"{cfg.addition_embed_type!r}, time_cond_proj_dim={cfg.time_cond_proj_dim!r}, "
                             f"class_embed_type={cfg.class_embed_type!r}); only text cross-attention is supported")
        null = _check_null_tensor(null_embedding, "null_embedding")
        if null.ndim != 2 or null.shape[1] != cfg.cross_attention_dim:
            raise ValueError(f"null_embedding: expected [L, {cfg.cross_attention_dim}] (one prompt's encoder hidden "
                             f"states), got {tuple(null.shape)}")
        super().__init__(unet, null, scheduler_config)

    @classmethod
    def from_pipeline(cls, pipe, negative_prompt: str = "", **encode_kw) -> "UNet2DConditionAdapter":
        """From a StableDiffusionPipeline; the null condition is ``negative_prompt``'s embedding ("" by default),
        encoded exactly as the pipeline encodes its negative prompt."""
        _, null = pipe.encode_prompt([""], pipe.device, 1, True, negative_prompt=[negative_prompt], **encode_kw)
        return cls(pipe.unet, null[0], pipe.scheduler)

    @staticmethod
    def encode(pipe, prompts: list[str], **encode_kw) -> torch.Tensor:
        """Prompt embeddings [N, L, D] (the ``cond`` of :meth:`fastguide.Sampler.sample`)."""
        embeds, _ = pipe.encode_prompt(list(prompts), pipe.device, 1, False, **encode_kw)
        return embeds

    def forward(self, x, t, cond):
        _check_t(t, x.shape[0])
        _check_embeddings(cond, x.shape[0], tuple(self.null_cond.shape))
        out = self.model(x, t, encoder_hidden_states=cond.to(x.dtype)).sample
        return _output_half(out, x.shape[1])


class SDXLAdapter(_TextAdapter):
    """``UNet2DConditionModel`` with SDXL's added conditions (``addition_embed_type="text_time"``): cond =
    :meth:`pack` (prompt embeddings [N, L, D], pooled [N, P], time ids [N, T]) -> [N, L + k, D], the pooled vector
    and the time ids zero-padded into k extra rows, so each sample carries its own (as SD3's pooled vector);
    ``null_cond`` the packed negative. Batch layout as StableDiffusionXLPipeline: [negative | prompt]."""

    def __init__(self, unet, null_cond: torch.Tensor, pooled_dim: int, scheduler_config=None):
        _check_model(unet, "UNet2DConditionModel", "unet")
        cfg = unet.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"unet: expected SDXL's added conditions (addition_embed_type 'text_time'), got "
                             f"{cfg.addition_embed_type!r}; use UNet2DConditionAdapter for SD 1.x / 2.x")
        if cfg.time_cond_proj_dim is not None or cfg.class_embed_type is not None:
            raise ValueError("unet: needs a guidance embedding or class embeddings this adapter does not pass "
                             f"(time_cond_proj_dim={cfg.time_cond_proj_dim!r}, class_embed_type={cfg.class_embed_type!r})")
        in_features = unet.add_embedding.linear_1.in_features
        ids, rest = divmod(in_features - int(pooled_dim), int(cfg.addition_time_embed_dim))
        if ids < 1 or rest:
            raise ValueError(f"pooled_dim: {pooled_dim} does not fit the UNet's added embedding ({in_features} inputs "
                             f"= {cfg.addition_time_embed_dim} x time ids + the pooled dim)")
        self.joint_dim, self.pooled_dim, self.time_ids = int(cfg.cross_attention_dim), int(pooled_dim), ids
        self.vector_dim = self.pooled_dim + ids
        self.pooled_rows = math.ceil(self.vector_dim / self.joint_dim)
        null = _check_null_tensor(null_cond, "null_cond")
        if null.ndim != 2 or null.shape[1] != self.joint_dim or null.shape[0] <= self.pooled_rows:
            raise ValueError(f"null_cond: expected a packed condition [L + {self.pooled_rows}, {self.joint_dim}] "
                             f"(SDXLAdapter.pack), got {tuple(null.shape)}")
        super().__init__(unet, null, scheduler_config)

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(time_ids, torch.Tensor) or tuple(time_ids.shape) != (embeds.shape[0], self.time_ids):
            raise ValueError(f"time_ids: expected [{embeds.shape[0]}, {self.time_ids}], got "
                             f"{tuple(time_ids.shape) if isinstance(time_ids, torch.Tensor) else type(time_ids).__name__}")
        vector = torch.cat([pooled.to(embeds), time_ids.to(embeds)], dim=1)
        return pack_tokens_and_pooled(embeds, vector, self.joint_dim, self.vector_dim)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: (embeddings, pooled, time ids)."""
        embeds, vector = unpack_tokens_and_pooled(cond, self.vector_dim)
        return embeds, vector[:, :self.pooled_dim], vector[:, self.pooled_dim:]

    def forward(self, x, t, cond):
        _check_t(t, x.shape[0])
        _check_embeddings(cond, x.shape[0], tuple(self.null_cond.shape))
        embeds, pooled, time_ids = self.unpack(cond.to(x.dtype))
        out = self.model(x, t, encoder_hidden_states=embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return _output_half(out, x.shape[1])


class SD3Adapter(_TextAdapter):
    """``SD3Transformer2DModel`` (rectified flow, velocity prediction) for :class:`fastguide.FlowEuler`.

    The model time is flow time sigma in [0, 1]; the transformer gets ``sigma * num_train_timesteps`` as
    StableDiffusion3Pipeline passes it. cond = :meth:`pack` (token embeddings [N, L, D], pooled [N, P]) ->
    [N, L + k, D]; ``null_cond`` the packed negative / empty-prompt condition. Layout: [negative | prompt].
    """

    def __init__(self, transformer, null_cond: torch.Tensor, scheduler_config=None,
                 num_train_timesteps: int | None = None):
        _check_model(transformer, "SD3Transformer2DModel", "transformer")
        cfg = transformer.config
        joint_dim, pooled_dim = int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim)
        null = _check_null_tensor(null_cond, "null_cond")
        k = math.ceil(pooled_dim / joint_dim)
        if null.ndim != 2 or null.shape[1] != joint_dim or null.shape[0] <= k:
            raise ValueError(f"null_cond: expected a packed condition [L + {k}, {joint_dim}] (SD3Adapter.pack), "
                             f"got {tuple(null.shape)}")
        super().__init__(transformer, null, scheduler_config)
        if num_train_timesteps is None:
            num_train_timesteps = int((self.scheduler_config or {}).get("num_train_timesteps", 1000))
        self.joint_dim, self.pooled_dim, self.pooled_rows = joint_dim, pooled_dim, k
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_pipeline(cls, pipe, negative_prompt: str = "", **encode_kw) -> "SD3Adapter":
        """From a StableDiffusion3Pipeline; null = ``negative_prompt``'s embeddings as the pipeline encodes them."""
        out = pipe.encode_prompt([""], None, None, device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=[negative_prompt], **encode_kw)
        _, neg, _, neg_pooled = out
        null = cls.pack_for(pipe.transformer, neg, neg_pooled)[0]
        return cls(pipe.transformer, null, pipe.scheduler)

    @classmethod
    def encode_for(cls, pipe, prompts: list[str], **encode_kw) -> torch.Tensor:
        """Packed prompt conditions [N, L + k, D] (the ``cond`` of :meth:`fastguide.Sampler.sample`)."""
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=pipe.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  **encode_kw)
        return cls.pack_for(pipe.transformer, embeds, pooled)

    @staticmethod
    def pack_for(transformer, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        cfg = transformer.config
        return pack_tokens_and_pooled(embeds, pooled, int(cfg.joint_attention_dim), int(cfg.pooled_projection_dim))

    def pack(self, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """[N, L, D] token embeddings + [N, P] pooled -> [N, L + k, D], pooled zero-padded into k = ceil(P/D) rows."""
        return pack_tokens_and_pooled(embeds, pooled, self.joint_dim, self.pooled_dim)

    def unpack(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`pack`: ([N, L, D] token embeddings, [N, P] pooled)."""
        return unpack_tokens_and_pooled(cond, self.pooled_dim)

    def forward(self, x, t, cond):
        _check_t(t, x.shape[0])
        _check_embeddings(cond, x.shape[0], tuple(self.null_cond.shape))
        embeds, pooled = self.unpack(cond.to(x.dtype))
        out = self.model(hidden_states=x, timestep=t * self.num_train_timesteps, encoder_hidden_states=embeds,
                         pooled_projections=pooled).sample
        return _output_half(out, x.shape[1])


def pack_tokens_and_pooled(embeds: torch.Tensor, pooled: torch.Tensor, joint_dim: int, pooled_dim: int
                           ) -> torch.Tensor:
    """[N, L, D] + [N, P] -> [N, L + ceil(P/D), D]: the pooled vector, zero-padded, as extra rows after the tokens."""
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[2] != joint_dim:
        raise ValueError(f"embeds: expected [N, L, {joint_dim}] token embeddings, got "
                         f"{tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__}")
    if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (embeds.shape[0], pooled_dim):
        raise ValueError(f"pooled: expected [{embeds.shape[0]}, {pooled_dim}] pooled embeddings, got "
                         f"{tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__}")
    k = math.ceil(pooled_dim / joint_dim)
    rows = torch.zeros(embeds.shape[0], k * joint_dim, dtype=embeds.dtype, device=embeds.device)
    rows[:, :pooled_dim] = pooled.to(embeds)
    return torch.cat([embeds, rows.view(-1, k, joint_dim)], dim=1)


def unpack_tokens_and_pooled(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_tokens_and_pooled`: ([N, L, D] token embeddings, [N, P] pooled)."""
    k = math.ceil(pooled_dim / cond.shape[2])
    return cond[:, :-k], cond[:, -k:].reshape(cond.shape[0], -1)[:, :pooled_dim]
