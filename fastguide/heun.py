"""Heun's second-order method in sigma space (Karras et al. 2022, Algorithm 1; k-diffusion's sample_heun;
diffusers' HeunDiscreteScheduler) as a plan: two network evaluations per sigma interval, each a plan step.

The steps are built in fastguide.sigma_steps (stage 1 stores the state, stage 2 combines it with its own
input); the interval ending at sigma 0 is one Euler step, so N intervals cost 2N - 1 evaluations, as in
diffusers and k-diffusion. The plan's steps are evaluations: NFE =
``plan.steps``; stage 2 of an interval evaluates at sigma_next, so ReCFG reads the table row at that model time.
"""
from __future__ import annotations

import numpy as np

from fastguide.checks import check_choices, check_int
from fastguide.schedule import (NoiseSchedule, check_scheduler_keys, config_items, config_value,
                                schedule_from_scheduler_config, sigma_schedule_of)
from fastguide.sigma_steps import (SPACINGS, discrete_sigma_grid, second_order_plan, stage_rows, vp_init_scale,
                                   vp_sigma_model)
from fastguide.sigmas import SIGMA_SCHEDULES
from fastguide.solvers import check_schedule, vp_prediction


class Heun:
    """Heun's method on a discrete VP schedule, as diffusers' HeunDiscreteScheduler steps it: ``steps`` sigma
    intervals, 2 * steps - 1 network evaluations (``plan.steps``). ``sigma_schedule``: "training", "karras",
    "exponential" or "beta"; ``clip_sample_range``: clamp x0 to [-r, r] (diffusers' clip_sample)."""

    def __init__(self, schedule: NoiseSchedule, steps: int, sigma_schedule: str = "training", spacing: str = "linspace",
                 steps_offset: int = 0, prediction_type: str | None = None, clip_sample_range: float | None = None):
        check_schedule(schedule, steps)
        check_choices(("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES), ("spacing", spacing, SPACINGS))
        pred = vp_prediction(schedule, prediction_type)
        if clip_sample_range is not None and not (isinstance(clip_sample_range, (int, float)) and clip_sample_range > 0):
            raise ValueError(f"clip_sample_range: expected a positive number or None, got {clip_sample_range!r}")
        self.schedule, self.steps, self.sigma_schedule = schedule, steps, sigma_schedule
        t, sig = discrete_sigma_grid(schedule, steps, sigma_schedule, spacing, check_int(steps_offset, "steps_offset", 0), "zero")
        model = vp_sigma_model(pred)
        rows = stage_rows(sig[:-1], sig[1:], np.zeros(steps), model)
        times = np.concatenate([t[:1], np.repeat(t[1:], 2)])
        self.plan = second_order_plan(rows, model, times, pred, schedule, vp_init_scale(sig, spacing),
                                      None if clip_sample_range is None else float(clip_sample_range))

    @classmethod
    def from_diffusers(cls, config, steps: int) -> "Heun":
        """From a HeunDiscreteScheduler config."""
        cfg = config_items(config)
        check_scheduler_keys(cfg, "HeunDiscreteScheduler", "Heun", _HEUN_KEYS)
        schedule = schedule_from_scheduler_config(cfg, "linspace")
        sigma_schedule = sigma_schedule_of(cfg)
        clip = config_value(cfg, "clip_sample", bool, False)
        return cls(schedule, steps, sigma_schedule=sigma_schedule,
                   spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                   prediction_type=schedule.prediction_type,
                   clip_sample_range=float(cfg.get("clip_sample_range", 1.0)) if clip else None)

    def __repr__(self):
        return f"Heun(steps={self.steps}, sigma_schedule={self.sigma_schedule!r}, evaluations={self.plan.steps})"


_HEUN_KEYS = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "clip_sample", "clip_sample_range"}
