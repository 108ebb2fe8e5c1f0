"""Noise levels of a discrete VP schedule in sigma form (sigma = sqrt((1 - abar) / abar)), the sigma grids
diffusers' samplers offer (the training grid, Karras, exponential, beta), and the map back to model time
(a fractional training index), all as diffusers computes them."""
from __future__ import annotations

import math

import numpy as np

SIGMA_SCHEDULES = ("training", "karras", "exponential", "beta")


def training_sigmas(schedule) -> np.ndarray:
    """[N] sigma of every training timestep, ascending in t. With ``float32_arithmetic`` rounded as diffusers
    computes it (float32 alphas_cumprod, float32 arithmetic)."""
    abar = schedule.alphas_cumprod
    if schedule.float32_arithmetic:
        a = abar.float()
        return (((1 - a) / a) ** 0.5).numpy()
    return ((1 - abar) / abar).sqrt().numpy()


def sigma_grid(kind: str, train_sigmas: np.ndarray | None, steps: int, sigma_min=None, sigma_max=None,
               rho: float = 7.0) -> np.ndarray:
    """``steps`` sigmas from high to low on the grid ``kind`` ("karras": ``rho`` = 7, Karras et al. 2022;
    "exponential": log-uniform; "beta": Beta(0.6, 0.6) quantiles, Lee et al. 2024), between the training grid's
    extremes unless ``sigma_min`` / ``sigma_max`` are given."""
    lo = float(train_sigmas[0]) if sigma_min is None else float(sigma_min)
    hi = float(train_sigmas[-1]) if sigma_max is None else float(sigma_max)
    if kind == "karras":
        ramp = np.linspace(0, 1, steps)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    if kind == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    if kind == "beta":
        import scipy.stats

        return np.array([lo + ppf * (hi - lo) for ppf in scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)])
    raise ValueError(f"sigma_schedule: expected one of {SIGMA_SCHEDULES}, got {kind!r}")


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training index of each sigma: linear interpolation in log sigma between the two training
    sigmas around it (diffusers' ``_sigma_to_t``)."""
    log_sigmas = np.log(train_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def vp_alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of a VP process at noise level ``sigma``: alpha = 1 / sqrt(1 + sigma^2)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def as_float32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).astype(np.float32)
