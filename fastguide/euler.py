"""Euler and Euler-ancestral in sigma space (Karras et al. 2022's ODE form; k-diffusion's sample_euler /
sample_euler_ancestral) on a discrete VP schedule, as diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler step them.

diffusers keeps the state in VE form x_ve = sqrt(1 + sigma^2) x and feeds the model x_ve / sqrt(1 + sigma^2);
fastguide keeps the VP state x (what the model reads), so a step is x_next = (r x + dt d) / r_next with
r = sqrt(1 + sigma^2) and the derivative d linear in x and the model output (fastguide.sigma_steps):
one-step plans with per-step scalars. The first state is init_noise_sigma / r_0 times the noise, as diffusers
scales it; the last step returns the VE state, as diffusers does.
"""
from __future__ import annotations

import numpy as np

from fastguide.checks import check_choices, check_int
from fastguide.schedule import (NoiseSchedule, check_scheduler_keys, config_items, schedule_from_scheduler_config,
                                sigma_schedule_of)
from fastguide.sigma_steps import (SPACINGS, discrete_sigma_grid, second_order_plan, stage_rows, vp_init_scale,
                                   vp_sigma_model)
from fastguide.sigmas import SIGMA_SCHEDULES
from fastguide.solvers import check_schedule, vp_prediction

FINAL_SIGMAS = ("zero", "sigma_min")


class Euler:
    """Euler (``ancestral=False``, EulerDiscreteScheduler without churn) or Euler-ancestral (``ancestral=True``,
    EulerAncestralDiscreteScheduler: each step goes down to sigma_down and adds sigma_up noise).

    ``sigma_schedule``: "training" (the spacing's timesteps, sigmas interpolated linearly between training
    sigmas), "karras", "exponential" or "beta" (Euler only, as in diffusers). Model times may be fractional
    training indices. Defaults follow diffusers: linspace spacing, final sigma zero.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, ancestral: bool = False, sigma_schedule: str = "training",
                 spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero",
                 prediction_type: str | None = None, sigma_min=None, sigma_max=None):
        check_schedule(schedule, steps)
        if not isinstance(ancestral, bool):
            raise TypeError(f"ancestral: expected True or False, got {ancestral!r}")
        check_choices(("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES), ("spacing", spacing, SPACINGS),
                      ("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS))
        if ancestral and (sigma_schedule != "training" or final_sigmas_type != "zero"):
            raise ValueError("sigma_schedule: Euler-ancestral steps the training grid down to sigma 0 (as diffusers' "
                             "EulerAncestralDiscreteScheduler does)")
        pred = vp_prediction(schedule, prediction_type)
        self.schedule, self.steps, self.ancestral, self.sigma_schedule = schedule, steps, ancestral, sigma_schedule
        t, sig = discrete_sigma_grid(schedule, steps, sigma_schedule, spacing,
                                     check_int(steps_offset, "steps_offset", 0), final_sigmas_type, sigma_min, sigma_max)
        target, up = ancestral_split(sig) if ancestral else (sig[1:].astype(np.float64), np.zeros(steps))
        model = vp_sigma_model(pred)
        rows = stage_rows(sig[:-1].astype(np.float64), target, up, model, heun=False)
        self.plan = second_order_plan(rows, model, t, pred, schedule, vp_init_scale(sig, spacing), with_history=False)

    @classmethod
    def from_diffusers(cls, config, steps: int, ancestral: bool = False) -> "Euler":
        """From an EulerDiscreteScheduler (or, with ``ancestral``, EulerAncestralDiscreteScheduler) config."""
        cfg = config_items(config)
        name = "EulerAncestralDiscreteScheduler" if ancestral else "EulerDiscreteScheduler"
        check_scheduler_keys(cfg, name, "Euler", _ANCESTRAL_KEYS if ancestral else _EULER_KEYS,
                             _ANCESTRAL_INERT if ancestral else _EULER_INERT)
        schedule = schedule_from_scheduler_config(cfg, "linspace")
        sigma_schedule = sigma_schedule_of(cfg)
        return cls(schedule, steps, ancestral=ancestral, sigma_schedule=sigma_schedule,
                   spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                   final_sigmas_type=cfg.get("final_sigmas_type", "zero"), prediction_type=schedule.prediction_type,
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"))

    def __repr__(self):
        kind = "EulerAncestral" if self.ancestral else "Euler"
        return f"{kind}(steps={self.steps}, sigma_schedule={self.sigma_schedule!r})"


_EULER_KEYS = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
               "final_sigmas_type"}
_EULER_INERT = {"interpolation_type": "linear", "timestep_type": "discrete", "rescale_betas_zero_snr": False}
_ANCESTRAL_KEYS: set = set()
_ANCESTRAL_INERT = {"rescale_betas_zero_snr": False}


def ancestral_split(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_down, sigma_up) [S] of each step sigma -> sigma_next: go down to sigma_down, add sigma_up noise
    (sigma_down^2 + sigma_up^2 = sigma_next^2), as EulerAncestralDiscreteScheduler splits it."""
    s, s_next = sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)
    up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    return np.sqrt(s_next**2 - up**2), up
