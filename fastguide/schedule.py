"""Discrete noise schedules: betas -> alphas_cumprod in float64, diffusers-config import."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fastguide.checks import check_int, check_steps

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers scheduler-config keys and what we do with them.
_DIFFUSERS_KEYS_USED = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "clip_sample",
    "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type", "timestep_spacing",
    "rescale_betas_zero_snr", "variance_type",
}
# Keys that are accepted only at their default (inert) value.
_DIFFUSERS_KEYS_INERT = {
    "thresholding": False,
    "dynamic_thresholding_ratio": None,
    "sample_max_value": None,
    "variance_type": None,
}


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift/scale sqrt(abar) so the last step has abar == 0 (dtype kept)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete diffusion schedule plus the solver defaults it was configured with.

    ``alphas_cumprod`` is float64 on the CPU. The remaining fields are defaults that solvers built on
    this schedule inherit (they mirror diffusers' DDIMScheduler config so an imported config behaves
    like the scheduler it came from).
    """

    betas: torch.Tensor
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    float32_arithmetic: bool = False
    alphas_cumprod: torch.Tensor = field(init=False)

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas: expected a 1-D sequence of at least 2 values, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
            raise ValueError("betas: expected finite values in [0, 1]")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {SPACINGS}, got {self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type: expected 'fixed_small' or 'fixed_large', got {self.variance_type!r}")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range: expected > 0, got {self.clip_sample_range}")
        if self.float32_arithmetic:
            # Reproduce diffusers, which rounds betas and the cumulative product to float32.
            betas = betas.float().double()
            abar = torch.cumprod(1.0 - betas.float(), dim=0).double()
        else:
            abar = torch.cumprod(1.0 - betas, dim=0)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", abar)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, **kw):
        _check_num_train(num_train_timesteps)
        return cls(torch.from_numpy(np.linspace(beta_start, beta_end, num_train_timesteps)), **kw)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, **kw):
        _check_num_train(num_train_timesteps)
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
        return cls(torch.from_numpy(betas), **kw)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, **kw):
        _check_num_train(num_train_timesteps)
        return cls(torch.from_numpy(_cosine_betas(num_train_timesteps)), **kw)

    @classmethod
    def from_betas(cls, betas, **kw):
        return cls(torch.as_tensor(np.asarray(betas, dtype=np.float64)), **kw)

    def rescaled_zero_snr(self) -> "NoiseSchedule":
        return replace(self, betas=rescale_zero_terminal_snr(self.betas))

    @classmethod
    def from_diffusers(cls, config: dict, float32_arithmetic: bool = False) -> "NoiseSchedule":
        """Build from a diffusers DDIMScheduler / DDPMScheduler config dict (``scheduler.config``) as it is.

        Keys starting with ``_`` are metadata and ignored. Unknown keys and unsupported settings
        (e.g. ``thresholding=True``) raise ValueError rather than being silently dropped.
        ``float32_arithmetic=True`` rounds the schedule like diffusers does (float32 betas and cumprod), and
        DDIM / DDPM plans built on it round their per-step scalars as diffusers' ``step()`` does: the way to
        match diffusers to 1e-4 where a step starts at abar ~ 1e-9 (cosine + trailing, no clipping) or the
        steps are unstrided (DDPM with 1000 steps).
        """
        cfg = config_items(config)
        unknown = set(cfg) - _DIFFUSERS_KEYS_USED - set(_DIFFUSERS_KEYS_INERT)
        if unknown:
            raise ValueError(f"config: unsupported scheduler keys {sorted(unknown)}")
        if config_value(cfg, "thresholding", bool, False):
            raise ValueError("config: thresholding=True (dynamic thresholding) is not supported")
        n = config_value(cfg, "num_train_timesteps", int, 1000)
        _check_num_train(n)
        kind = cfg.get("beta_schedule", "linear")
        trained = cfg.get("trained_betas")
        beta_start = config_value(cfg, "beta_start", float, 1e-4)
        beta_end = config_value(cfg, "beta_end", float, 0.02)
        for key, beta in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not 0 <= beta <= 1:
                raise ValueError(f"config: {key}: expected a number in [0, 1], got {beta}")
        dtype = torch.float32 if float32_arithmetic else torch.float64
        if trained is not None:
            try:
                betas = torch.tensor(np.asarray(trained, dtype=np.float64), dtype=dtype)
            except (TypeError, ValueError):
                raise ValueError(f"config: trained_betas: expected a list of numbers, got {trained!r:.80}") from None
            if tuple(betas.shape) != (n,):
                raise ValueError(f"config: trained_betas has shape {tuple(betas.shape)}, expected ({n},)")
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=dtype)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype) ** 2
        elif kind == "squaredcos_cap_v2":
            betas = torch.from_numpy(_cosine_betas(n)).to(dtype)
        else:
            raise ValueError(f"config: beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")
        if cfg.get("rescale_betas_zero_snr", False):
            betas = rescale_zero_terminal_snr(betas)
        variance_type = cfg.get("variance_type") or "fixed_small"
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"config: variance_type {variance_type!r} is not supported (fixed_small, fixed_large)")
        return cls(
            betas,
            timestep_spacing=cfg.get("timestep_spacing", "leading"),
            steps_offset=config_value(cfg, "steps_offset", int, 0),
            set_alpha_to_one=config_value(cfg, "set_alpha_to_one", bool, True),
            clip_sample=config_value(cfg, "clip_sample", bool, True),  # diffusers' default is True
            clip_sample_range=config_value(cfg, "clip_sample_range", float, 1.0),
            prediction_type=cfg.get("prediction_type", "epsilon"),
            variance_type=variance_type,
            float32_arithmetic=float32_arithmetic,
        )

    # ------------------------------------------------------------------ queries
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def final_alpha_cumprod(self) -> float:
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])

    def fingerprint(self) -> str:
        """A short hash of the schedule's alphas_cumprod (what a ratio table depends on)."""
        data = self.alphas_cumprod.numpy().astype("<f8").tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def timesteps(self, steps: int, spacing: str | None = None, steps_offset: int | None = None) -> np.ndarray:
        """Inference timesteps (training indices, descending), exactly as diffusers' set_timesteps."""
        n = self.num_train_timesteps
        spacing = self.timestep_spacing if spacing is None else spacing
        offset = self.steps_offset if steps_offset is None else check_int(steps_offset, "steps_offset", low=0)
        if offset >= n:
            raise ValueError(f"steps_offset: {offset} pushes timesteps outside [0, {n - 1}]")
        check_steps(steps, n)
        if spacing == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.int64) + offset
        elif spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        else:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
        if ts.min() < 0 or ts.max() >= n:
            raise ValueError(f"steps_offset: {offset} pushes timesteps outside [0, {n - 1}]")
        return ts


def config_items(config) -> dict:
    """A diffusers scheduler config (a dict, FrozenDict or ``scheduler.config``) without its ``_`` metadata keys."""
    if not hasattr(config, "items"):
        raise TypeError(f"config: expected a diffusers scheduler config (a dict), got {type(config).__name__}")
    return {k: v for k, v in dict(config).items() if not str(k).startswith("_")}


def config_value(cfg: dict, key: str, kind: type, default):
    """``cfg[key]`` as ``kind`` (int, float or bool; ``default`` when absent or None). Values that are not
    that kind (a float where an int belongs, a string, a non-finite float) are an error naming the key."""
    value = cfg.get(key)
    if value is None:
        return default
    ok = {int: isinstance(value, (int, np.integer)) and not isinstance(value, bool),
          float: isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and math.isfinite(value),
          bool: isinstance(value, (bool, np.bool_))}[kind]
    if not ok:
        what = {int: "an int", float: "a finite number", bool: "true or false"}[kind]
        raise ValueError(f"config: {key}: expected {what}, got {value!r}")
    return kind(value)


# The keys of a diffusers scheduler config that describe its noise schedule (the rest are the solver's options).
SCHEDULE_CONFIG_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                        "prediction_type", "timestep_spacing", "steps_offset"}


def schedule_from_scheduler_config(cfg: dict, default_spacing: str) -> "NoiseSchedule":
    """The NoiseSchedule of a sigma-space or multistep scheduler's config (its schedule keys; the scheduler's own
    default spacing when the config has none), rounded as diffusers rounds it (float32)."""
    sched_cfg = {k: v for k, v in cfg.items() if k in SCHEDULE_CONFIG_KEYS}
    sched_cfg.setdefault("timestep_spacing", default_spacing)
    return NoiseSchedule.from_diffusers(sched_cfg, float32_arithmetic=True)


def check_scheduler_keys(cfg: dict, scheduler: str, solver: str, options: set, inert: dict | None = None) -> None:
    """Refuse, by name, the keys of a ``scheduler`` config that ``solver`` does not take (``options`` and the
    schedule keys are taken; ``inert`` keys only at their default value or None)."""
    inert = inert or {}
    unknown = set(cfg) - set(options) - set(inert) - SCHEDULE_CONFIG_KEYS
    if unknown:
        raise ValueError(f"config: unsupported {scheduler} keys {sorted(unknown)}")
    for key, default in inert.items():
        if cfg.get(key, default) not in (default, None):
            raise ValueError(f"config: {key}={cfg[key]!r} is not supported by fastguide's {solver}")


def sigma_schedule_of(cfg: dict) -> str:
    """"training", or the one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas a config sets."""
    kinds = [k for k in ("karras", "exponential", "beta") if config_value(cfg, f"use_{k}_sigmas", bool, False)]
    if len(kinds) > 1:
        raise ValueError(f"config: only one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, "
                         f"got {kinds}")
    return kinds[0] if kinds else "training"


def _check_num_train(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"num_train_timesteps: expected an int >= 2, got {n!r}")


@dataclass(frozen=True)
class FlowSchedule:
    """The noising of rectified-flow / flow-matching models, ``x_t = (1 - sigma) x0 + sigma noise`` with model time
    sigma in [0, 1] (what fastguide.FlowEuler feeds the model). Ratio tables for flow models are built with it on a
    sigma grid (``accumulate_ratio_sums(model, FlowSchedule(), ..., timesteps=[0.1, ..., 1.0])``) and looked up by
    sigma, for any shift of the sampler's sigmas."""

    kind = "flow"

    def fingerprint(self) -> str:
        return "flow-matching:x_t=(1-sigma)x0+sigma*noise"

    def noising(self, sigmas) -> tuple[list[float], list[float]]:
        """(signal, noise) scales of x_t at each sigma."""
        return [1.0 - float(s) for s in sigmas], [float(s) for s in sigmas]
