"""LCM: the multistep consistency sampling of Latent Consistency Models (Luo et al. 2023), as diffusers'
LCMScheduler steps it.

Each step maps the state to the consistency function's estimate ``denoised`` and, except at the last step, noises it
again to the next timestep; every quantity is linear in the state x, the model output m and the noise z, so a step is
one plan row (the clip form when x0 is clamped):

    x0       = Px x + Pm m                         (epsilon / v / sample prediction, as DDIM's)
    denoised = c_out x0 + c_skip x                 c_skip = 1/4 / (s^2 + 1/4), c_out = s / sqrt(s^2 + 1/4),
                                                   s = t * timestep_scaling (sigma_data = 1/2)
    x_next   = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z        the last step: x_next = denoised

The plan's final state is the last step's ``denoised``, which is what LatentConsistencyModelPipeline decodes. The
timesteps are diffusers': of the ``original_inference_steps`` grid k - 1, 2k - 1, ..., T - 1 (k = T //
original_inference_steps), ``steps`` evenly spaced by index from the top.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastguide.checks import check_int, check_steps
from fastguide.kernels.reference import NUM_COEF
from fastguide.schedule import NoiseSchedule, check_scheduler_keys, config_items, config_value
from fastguide.solvers import Plan, check_schedule, coef_row, prediction_to_x0_eps, vp_prediction, vp_score_scale

SIGMA_DATA_SQUARED = 0.25  # LCMScheduler's sigma_data = 0.5

# LCMScheduler's own defaults, where they differ from fastguide.NoiseSchedule.from_diffusers' (DDIM's)
_SCHEDULE_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
                      "clip_sample_range": 1.0}
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                  "rescale_betas_zero_snr", "clip_sample", "clip_sample_range")
# LCMScheduler.set_timesteps and step never read these (final_alpha_cumprod only serves a negative previous timestep,
# which its timesteps never have; the thresholding settings only matter with thresholding=True, refused)
_UNREAD_KEYS = {"set_alpha_to_one", "steps_offset", "timestep_spacing", "dynamic_thresholding_ratio",
                "sample_max_value"}
_OPTIONS = ("original_inference_steps", "timestep_scaling", "clip_sample", "clip_sample_range", "prediction_type")


def lcm_timesteps(num_train_timesteps: int, steps: int, original_inference_steps: int) -> np.ndarray:
    """LCMScheduler.set_timesteps(steps, original_inference_steps=...)'s timesteps (training indices, descending)."""
    if original_inference_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps: expected <= num_train_timesteps ({num_train_timesteps}), got "
                         f"{original_inference_steps}")
    if steps > original_inference_steps:
        raise ValueError(f"steps: expected <= original_inference_steps ({original_inference_steps}: the timesteps are "
                         f"a subset of that grid), got {steps}")
    k = num_train_timesteps // original_inference_steps
    grid = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
    index = np.floor(np.linspace(0, original_inference_steps, num=steps, endpoint=False)).astype(np.int64)
    return grid[index].copy()


def consistency_scalings(t: int, timestep_scaling: float, float32_arithmetic: bool) -> tuple[float, float]:
    """(c_skip, c_out) of the boundary condition at training index ``t``; with ``float32_arithmetic`` rounded as
    LCMScheduler computes them from its integer timestep tensor (in float32)."""
    if float32_arithmetic:
        s = torch.tensor(int(t)) * timestep_scaling
        return float(SIGMA_DATA_SQUARED / (s**2 + SIGMA_DATA_SQUARED)), float(s / (s**2 + SIGMA_DATA_SQUARED) ** 0.5)
    s = t * timestep_scaling
    return SIGMA_DATA_SQUARED / (s * s + SIGMA_DATA_SQUARED), s / math.sqrt(s * s + SIGMA_DATA_SQUARED)


def _roots(abar: float, float32_arithmetic: bool) -> tuple[float, float]:
    """(sqrt(abar), sqrt(1 - abar)), in float32 as diffusers' step takes them from its float32 alphas_cumprod."""
    if float32_arithmetic:
        a = torch.tensor(abar, dtype=torch.float32)
        return float(a.sqrt()), float((1 - a).sqrt())
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def lcm_coefficients(abar_t: float, abar_prev: float | None, c_skip: float, c_out: float, prediction_type: str,
                     float32_arithmetic: bool = False) -> list[float]:
    """One consistency step's row: x_next = sqrt(abar_prev) (c_out x0 + c_skip x) + sqrt(1 - abar_prev) z, with
    x0 = Px x + Pm m; ``abar_prev`` None is the last step (x_next = denoised, no noise)."""
    sa, sb = _roots(abar_t, float32_arithmetic)
    px, pm, _, _ = prediction_to_x0_eps(abar_t, prediction_type, roots=(sa, sb))
    signal, noise = (1.0, 0.0) if abar_prev is None else _roots(abar_prev, float32_arithmetic)
    c0, cx = signal * c_out, signal * c_skip
    return coef_row(A=c0 * px + cx, B=c0 * pm, S=noise, PX=px, PM=pm, C0=c0, CX=cx)


def _check_clip(clip_sample, clip_sample_range) -> float | None:
    if not isinstance(clip_sample, (bool, np.bool_)):
        raise TypeError(f"clip_sample: expected True or False, got {clip_sample!r}")
    rng = clip_sample_range
    if isinstance(rng, bool) or not isinstance(rng, (int, float)) or not math.isfinite(rng) or not rng > 0:
        raise ValueError(f"clip_sample_range: expected a finite float > 0, got {rng!r}")
    return float(rng) if clip_sample else None


class LCM:
    """LCMScheduler's consistency sampling: ``steps`` consistency evaluations on the ``original_inference_steps``
    grid, fresh noise between them (a stochastic plan for steps > 1), the last step's ``denoised`` as the sample.

    ``clip_sample`` / ``prediction_type`` None take the schedule's; ``LCM.from_diffusers(scheduler.config, steps)``
    steps like ``LCMScheduler`` (float32 roundings included)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, original_inference_steps: int = 50,
                 timestep_scaling: float = 10.0, clip_sample: bool | None = None,
                 clip_sample_range: float | None = None, prediction_type: str | None = None):
        check_schedule(schedule)
        check_steps(steps, schedule.num_train_timesteps)
        original = check_int(original_inference_steps, "original_inference_steps", low=1)
        scaling = timestep_scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) \
                or not scaling > 0:
            raise ValueError(f"timestep_scaling: expected a finite float > 0, got {timestep_scaling!r}")
        pred = vp_prediction(schedule, prediction_type)
        clip = _check_clip(schedule.clip_sample if clip_sample is None else clip_sample,
                           schedule.clip_sample_range if clip_sample_range is None else clip_sample_range)
        self.schedule, self.steps = schedule, steps
        self.original_inference_steps, self.timestep_scaling = original, float(scaling)
        ts = lcm_timesteps(schedule.num_train_timesteps, steps, original)
        abar = schedule.alphas_cumprod.numpy()
        f32 = schedule.float32_arithmetic
        rows = []
        for i, t in enumerate(ts):
            c_skip, c_out = consistency_scalings(int(t), self.timestep_scaling, f32)
            a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else None
            rows.append(lcm_coefficients(float(abar[t]), a_prev, c_skip, c_out, pred, f32))
        coef = np.array(rows, dtype=np.float64).reshape(len(ts), NUM_COEF)
        if not np.isfinite(coef).all():
            raise ValueError("LCM: the plan has non-finite coefficients (epsilon or sample prediction where abar is 0 "
                             "or 1, as with rescale_betas_zero_snr; use prediction_type='v_prediction' there)")
        self.plan = Plan(torch.from_numpy(ts.astype(np.float64)), torch.from_numpy(coef),
                         torch.tensor([vp_score_scale(float(abar[t]), pred) for t in ts], dtype=torch.float64),
                         clip, pred, "discrete", schedule)

    @classmethod
    def from_diffusers(cls, config, steps: int, **kw) -> "LCM":
        """From an LCMScheduler config; ``kw`` (original_inference_steps, timestep_scaling, clip_sample,
        clip_sample_range, prediction_type; None: the config's) override it, as ``original_inference_steps`` does in
        ``LCMScheduler.set_timesteps`` and ``LatentConsistencyModelPipeline.__call__``. thresholding=True is refused."""
        cfg = config_items(config)
        check_scheduler_keys(cfg, "LCMScheduler", "LCM", set(_SCHEDULE_KEYS) | _UNREAD_KEYS | set(_OPTIONS),
                             inert={"thresholding": False})
        unknown = set(kw) - set(_OPTIONS)
        if unknown:
            raise ValueError(f"kw: LCM.from_diffusers takes {', '.join(_OPTIONS)}, got {sorted(unknown)}")
        schedule_cfg = {**_SCHEDULE_DEFAULTS, **{k: cfg[k] for k in _SCHEDULE_KEYS if cfg.get(k) is not None}}
        schedule = NoiseSchedule.from_diffusers(schedule_cfg, float32_arithmetic=True)
        options = {"original_inference_steps": config_value(cfg, "original_inference_steps", int, 50),
                   "timestep_scaling": config_value(cfg, "timestep_scaling", float, 10.0)}
        options.update({k: v for k, v in kw.items() if v is not None})
        return cls(schedule, steps, **options)

    def __repr__(self):
        return (f"LCM(steps={self.steps}, original_inference_steps={self.original_inference_steps}, "
                f"prediction_type={self.plan.prediction_type!r})")
