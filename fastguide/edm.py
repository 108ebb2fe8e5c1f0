"""The EDM sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 2): Heun (or Euler) on the rho-7 sigma grid from sigma_max to sigma_min, then to 0, with optional
stochastic churn, for models in the EDM parameterization; and diffusers' EDMEulerScheduler.

Two ways a model can take sigma (``prediction_type``):
- "epsilon" / "v_prediction": the raw network F of diffusers' EDM schedulers, reading c_in x and model time
  c_noise = log(sigma) / 4, with x0 = c_skip x + c_out F (c_out negative for v);
- "denoiser": a denoiser D(x, sigma) -> x0 (the EDM / EDM2 releases' preconditioned nets, k-diffusion's
  model wrappers): it reads the VE state itself and model time sigma.

Churn: the interval from sigma_i first raises the noise to sigma_hat_i = (1 + gamma_i) sigma_i, gamma_i =
min(s_churn / steps, sqrt(2) - 1) inside [s_tmin, s_tmax]. The plan adds that noise at the end of the previous
evaluation (its S z), so the noise of interval i is the step noise of the evaluation before it; the first
interval's churn widens the initial noise instead (same distribution, not the same draw as Algorithm 2's).
"""
from __future__ import annotations

import math

import numpy as np

from fastguide.checks import check_choices, check_steps
from fastguide.schedule import config_items, config_value
from fastguide.sigma_steps import SigmaModel, second_order_plan, stage_rows
from fastguide.sigmas import sigma_grid

EDM_PREDICTIONS = ("epsilon", "v_prediction", "denoiser")
EDM_SCHEDULES = ("karras", "exponential")


def edm_sigma_model(prediction_type: str, sigma_data: float) -> SigmaModel:
    if prediction_type == "denoiser":
        return SigmaModel(lambda s: 1.0, lambda s: (0.0, 1.0))
    sign = 1.0 if prediction_type == "epsilon" else -1.0
    d2 = sigma_data * sigma_data
    return SigmaModel(lambda s: 1.0 / math.sqrt(s * s + d2),
                      lambda s: (d2 / (s * s + d2), sign * s * sigma_data / math.sqrt(s * s + d2)))


class EDM:
    """EDM sampling over ``steps`` sigmas (Heun: 2 * steps - 1 evaluations, ``plan.steps``; Euler: ``steps``).

    Defaults are Algorithm 2's (sigma_min 0.002, sigma_max 80, rho 7, sigma_data 0.5, no churn, x_0 = sigma_max
    * noise); ``init_noise_sigma`` overrides the initial noise std (diffusers' EDMEulerScheduler uses
    sqrt(sigma_max^2 + 1)); ``final_sigmas_type`` "sigma_min" (Euler only) stops at sigma_min.
    """

    def __init__(self, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, heun: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = math.inf, s_noise: float = 1.0, prediction_type: str = "denoiser",
                 sigma_schedule: str = "karras", final_sigmas_type: str = "zero", init_noise_sigma: float | None = None):
        check_steps(steps, 10**6)
        for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho),
                            ("sigma_data", sigma_data)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
        if sigma_min >= sigma_max:
            raise ValueError(f"sigma_min: expected below sigma_max ({sigma_max}), got {sigma_min}")
        for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: expected a non-negative finite number, got {value!r}")
        if not isinstance(heun, bool):
            raise TypeError(f"heun: expected True or False, got {heun!r}")
        check_choices(("prediction_type", prediction_type, EDM_PREDICTIONS),
                      ("sigma_schedule", sigma_schedule, EDM_SCHEDULES),
                      ("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min")))
        if heun and final_sigmas_type != "zero":
            raise ValueError("final_sigmas_type: Heun ends at sigma 0 (its last interval is an Euler step)")
        if heun and steps < 2:
            raise ValueError(f"steps: Heun needs at least 2 sigmas, got {steps}")
        self.steps, self.heun, self.prediction_type, self.s_churn = steps, heun, prediction_type, float(s_churn)
        sig = sigma_grid(sigma_schedule, None, steps, sigma_min, sigma_max, rho=rho).astype(np.float32).astype(np.float64)
        last = sig[-1] if final_sigmas_type == "sigma_min" else 0.0
        in_range = (sig >= s_tmin) & (sig <= s_tmax)
        gamma = np.where(in_range, min(s_churn / steps, math.sqrt(2) - 1), 0.0)
        sig_hat = sig * (1 + gamma)
        churn = s_noise * np.sqrt(sig_hat**2 - sig**2)  # the VE noise std that raises sigma_i to sigma_hat_i
        model = edm_sigma_model(prediction_type, float(sigma_data))
        rows = stage_rows(sig_hat, np.append(sig[1:], last), np.append(churn[1:], 0.0), model, heun=heun)
        times = [self._model_time(s) for s in rows.eval_sigmas]
        init = float(sig[0]) if init_noise_sigma is None else float(init_noise_sigma)
        init = math.sqrt(init * init + churn[0] ** 2)
        self.sigmas = np.append(sig, last)
        self.plan = second_order_plan(rows, model, times, "sample" if prediction_type == "denoiser" else prediction_type,
                                      None, init * model.state_scale(float(sig_hat[0])), kind="edm", with_history=heun)

    def _model_time(self, sigma: float) -> float:
        if self.prediction_type == "denoiser":
            return sigma
        return float(np.float32(0.25 * math.log(np.float32(sigma))))  # diffusers' float32 c_noise

    @classmethod
    def from_diffusers(cls, config, steps: int) -> "EDM":
        """From an EDMEulerScheduler config (Euler, no churn: the scheduler's step defaults)."""
        cfg = config_items(config)
        unknown = set(cfg) - _EDM_EULER_KEYS
        if unknown:
            raise ValueError(f"config: unsupported EDMEulerScheduler keys {sorted(unknown)}")
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"config: prediction_type={pred!r} is not one of EDMEulerScheduler's (epsilon, "
                             "v_prediction)")
        sigma_max = config_value(cfg, "sigma_max", float, 80.0)
        return cls(steps, sigma_min=config_value(cfg, "sigma_min", float, 0.002), sigma_max=sigma_max,
                   rho=config_value(cfg, "rho", float, 7.0), sigma_data=config_value(cfg, "sigma_data", float, 0.5),
                   heun=False, prediction_type=pred, sigma_schedule=cfg.get("sigma_schedule", "karras"),
                   final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
                   init_noise_sigma=math.sqrt(sigma_max**2 + 1))

    def __repr__(self):
        return (f"EDM(steps={self.steps}, heun={self.heun}, s_churn={self.s_churn:g}, "
                f"prediction_type={self.prediction_type!r}, evaluations={self.plan.steps})")


_EDM_EULER_KEYS = {"sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "num_train_timesteps", "prediction_type",
                   "rho", "final_sigmas_type"}
