"""Euler and Euler-ancestral in sigma space (Karras et al. 2022's ODE form; k-diffusion's sample_euler /
sample_euler_ancestral) on a discrete VP schedule, as diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler step them.

diffusers keeps the state in VE form x_ve = sqrt(1 + sigma^2) x and feeds the model x_ve / sqrt(1 + sigma^2);
fastguide keeps the VP state x (what the model reads), so a step is x_next = (r x + dt d) / r_next with
r = sqrt(1 + sigma^2) and the derivative d linear in x and the model output: one-step plans with per-step
scalars. The first state is init_noise_sigma / r_0 times the noise, as diffusers scales it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from fastguide.checks import check_int, check_steps
from fastguide.kernels.reference import NUM_COEF
from fastguide.schedule import NoiseSchedule, config_items, config_value
from fastguide.sigmas import SIGMA_SCHEDULES, sigma_grid, sigma_to_t, training_sigmas
from fastguide.solvers import Plan, coef_row

SPACINGS = ("linspace", "leading", "trailing")
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
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a fastguide.NoiseSchedule, got {type(schedule).__name__}")
        check_steps(steps, schedule.num_train_timesteps)
        if not isinstance(ancestral, bool):
            raise TypeError(f"ancestral: expected True or False, got {ancestral!r}")
        for name, value, allowed in (("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES), ("spacing", spacing, SPACINGS),
                                     ("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if ancestral and (sigma_schedule != "training" or final_sigmas_type != "zero"):
            raise ValueError("sigma_schedule: Euler-ancestral steps the training grid down to sigma 0 (as diffusers' "
                             "EulerAncestralDiscreteScheduler does)")
        pred = schedule.prediction_type if prediction_type is None else prediction_type
        if pred not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type: expected epsilon, sample or v_prediction, got {pred!r}")
        self.schedule, self.steps, self.ancestral, self.sigma_schedule = schedule, steps, ancestral, sigma_schedule
        t, sig = euler_grid(schedule, steps, sigma_schedule, spacing, check_int(steps_offset, "steps_offset", 0),
                            final_sigmas_type, sigma_min, sigma_max)
        coef = np.array([euler_row(float(sig[i]), float(sig[i + 1]), pred, ancestral, last=i == steps - 1)
                         for i in range(steps)], dtype=np.float64).reshape(steps, NUM_COEF)
        if not np.isfinite(coef).all():
            raise ValueError("Euler: the plan has non-finite coefficients")
        r0 = math.sqrt(float(sig[0]) ** 2 + 1)
        init_sigma = float(sig.max()) if spacing in ("linspace", "trailing") else r0  # diffusers' init_noise_sigma
        eps_scale = [float(s) / math.sqrt(float(s) ** 2 + 1) for s in sig[:-1]]
        self.plan = Plan(torch.from_numpy(t.astype(np.float64)), torch.from_numpy(coef),
                         torch.tensor(eps_scale, dtype=torch.float64), None, pred, "discrete", schedule,
                         init_scale=init_sigma / r0)

    @classmethod
    def from_diffusers(cls, config, steps: int, ancestral: bool = False) -> "Euler":
        """From an EulerDiscreteScheduler (or, with ``ancestral``, EulerAncestralDiscreteScheduler) config."""
        cfg = config_items(config)
        allowed = _EULER_KEYS if not ancestral else _ANCESTRAL_KEYS
        inert = _EULER_INERT if not ancestral else _ANCESTRAL_INERT
        unknown = set(cfg) - allowed - set(inert) - _SCHEDULE_KEYS
        name = "EulerAncestralDiscreteScheduler" if ancestral else "EulerDiscreteScheduler"
        if unknown:
            raise ValueError(f"config: unsupported {name} keys {sorted(unknown)}")
        for key, value in inert.items():
            if cfg.get(key, value) not in (value, None):
                raise ValueError(f"config: {key}={cfg[key]!r} is not supported by fastguide's Euler")
        sched_cfg = {k: v for k, v in cfg.items() if k in _SCHEDULE_KEYS}
        sched_cfg.setdefault("timestep_spacing", "linspace")
        schedule = NoiseSchedule.from_diffusers(sched_cfg, float32_arithmetic=True)
        kinds = [k for k in ("karras", "exponential", "beta") if config_value(cfg, f"use_{k}_sigmas", bool, False)]
        if len(kinds) > 1:
            raise ValueError(f"config: only one of use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, "
                             f"got {kinds}")
        return cls(schedule, steps, ancestral=ancestral, sigma_schedule=kinds[0] if kinds else "training",
                   spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                   final_sigmas_type=cfg.get("final_sigmas_type", "zero"), prediction_type=schedule.prediction_type,
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"))

    def __repr__(self):
        kind = "EulerAncestral" if self.ancestral else "Euler"
        return f"{kind}(steps={self.steps}, sigma_schedule={self.sigma_schedule!r})"


_SCHEDULE_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                  "timestep_spacing", "steps_offset"}
_EULER_KEYS = {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
               "final_sigmas_type"}
_EULER_INERT = {"interpolation_type": "linear", "timestep_type": "discrete", "rescale_betas_zero_snr": False}
_ANCESTRAL_KEYS: set = set()
_ANCESTRAL_INERT = {"rescale_betas_zero_snr": False}


def euler_grid(schedule, steps, sigma_schedule, spacing, steps_offset, final_sigmas_type, sigma_min=None,
               sigma_max=None) -> tuple[np.ndarray, np.ndarray]:
    """(model times [S] float, sigmas [S + 1] float32), as EulerDiscreteScheduler's set_timesteps makes them."""
    train = training_sigmas(schedule)
    n = len(train)
    if spacing == "linspace":
        t = np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1].copy().astype(np.float32) + steps_offset
    else:
        t = np.arange(n, 0, -n / steps).round().copy().astype(np.float32) - 1
    if t.min() < 0 or t.max() > n - 1:
        raise ValueError(f"steps_offset: {steps_offset} pushes timesteps outside [0, {n - 1}]")
    sigmas = np.interp(t, np.arange(n), train)
    if sigma_schedule != "training":
        lo = float(sigmas[-1]) if sigma_min is None else sigma_min
        hi = float(sigmas[0]) if sigma_max is None else sigma_max
        sigmas = sigma_grid(sigma_schedule, train, steps, lo, hi)
        t = sigma_to_t(sigmas, train)
    last = float(train[0]) if final_sigmas_type == "sigma_min" else 0.0
    return t.astype(np.float32).astype(np.float64), np.concatenate([sigmas, [last]]).astype(np.float32)


def euler_row(sigma: float, sigma_next: float, prediction_type: str, ancestral: bool, last: bool = False
              ) -> list[float]:
    """One step x_next = (r x + dt d) / r_next (+ sigma_up / r_next z) in the VP state, d = Dx x + Dm m the
    VE derivative (x_ve - x0) / sigma written in the VP state and the model output. The ``last`` step returns
    the VE state, as diffusers does (it differs from the VP state when the final sigma is sigma_min)."""
    r = math.sqrt(sigma * sigma + 1)
    r_next = 1.0 if last else math.sqrt(sigma_next * sigma_next + 1)
    dx, dm = {"epsilon": (0.0, 1.0), "v_prediction": (sigma / r, 1 / r), "sample": (r / sigma, -1 / sigma)}[prediction_type]
    up = 0.0
    target = sigma_next
    if ancestral:
        up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        target = math.sqrt(sigma_next**2 - up**2)
    dt = target - sigma
    return coef_row(A=(r + dt * dx) / r_next, B=dt * dm / r_next, S=up / r_next)
