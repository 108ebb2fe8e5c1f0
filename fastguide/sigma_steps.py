"""Steps in sigma space as plan rows: the first-order (Euler) and second-order (Heun) updates of Karras et al.
2022 over a VE state x_ve, for models that read a rescaled state (a VP model reads x_ve / sqrt(1 + sigma^2), an
EDM model c_in x_ve) and give x0 = a x_ve + b m; and the discrete sigma grids diffusers' sigma-space
schedulers build. Used by fastguide.euler, fastguide.heun and fastguide.edm.

Over an interval sigma -> sigma_next (x0 the model's clean estimate at the evaluation):

    stage 1, at sigma:       d1 = (x_ve - x0) / sigma;   x_mid = x_ve + dt d1          (dt = sigma_next - sigma)
    stage 2, at sigma_next:  d2 = (x_mid - x0') / sigma_next;   x_next = x_ve + dt (d1 + d2) / 2

Stage 1 stores x_ve in a history slot; stage 2 recovers d1 = (x_mid - x_ve) / dt from its own input, so
x_next = (x_ve + x_mid) / 2 + dt d2 / 2 is linear in (its input, x0', the slot): one slot, one write, and x0
may be clamped (the clip form). A Heun interval ending at sigma 0 is one Euler step (its result is x0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fastguide.kernels.reference import NUM_COEF
from fastguide.sigmas import sigma_grid, sigma_to_t, training_sigmas
from fastguide.solvers import History, Plan, coef_row

SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class SigmaModel:
    """How a model sees sigma: it reads ``state_scale(sigma) * x_ve`` and its output m gives
    x0 = a x_ve + b m with (a, b) = ``to_x0(sigma)``."""

    state_scale: Callable[[float], float]
    to_x0: Callable[[float], tuple[float, float]]


@dataclass(frozen=True)
class SecondOrderRows:
    """A two-stage plan's per-evaluation rows (float64 lists): coef [E, NUM_COEF], history weights [E, 1],
    write coefficients [E, 1, 3], the sigma each evaluation runs at."""

    coef: list
    weights: list
    writes: list
    eval_sigmas: list


def stage_rows(sigma_hat: np.ndarray, sigma_next: np.ndarray, noise_next: np.ndarray, model: SigmaModel,
               heun: bool = True) -> SecondOrderRows:
    """Rows of Heun (``heun``) or Euler over intervals sigma_hat[i] -> sigma_next[i]; ``noise_next[i]``: the VE
    noise std added after interval i (EDM's churn for the next interval, whose stage 1 then starts at
    sigma_hat[i + 1]). The last interval's result is returned in VE form (diffusers returns its VE state)."""
    n = len(sigma_hat)
    coef, weights, writes, sigmas = [], [], [], []
    keep = [[0.0, 0.0, 1.0]]  # a stage that writes nothing rewrites slot 0 with itself
    for i in range(n):
        s, s_next = float(sigma_hat[i]), float(sigma_next[i])
        last = i == n - 1
        out_scale = 1.0 if last else model.state_scale(float(sigma_hat[i + 1]))
        noise = 0.0 if last else float(noise_next[i]) * out_scale
        dt = s_next - s
        second = heun and s_next > 0
        # stage 1 (or the whole Euler step): x_mid = (1 + dt / s) x_ve - (dt / s) x0, handed on at s_next
        mid_scale = model.state_scale(s_next) if second else out_scale
        coef.append(_x0_row(model, s, (1 + dt / s) * mid_scale, -dt / s * mid_scale, 0.0 if second else noise))
        weights.append([0.0])
        writes.append([[1.0 / model.state_scale(s), 0.0, 0.0]] if second else keep)
        sigmas.append(s)
        if second:
            # stage 2: x_next = slot / 2 + (1/2 + dt / (2 s')) x_mid - dt / (2 s') x0'
            coef.append(_x0_row(model, s_next, (0.5 + dt / (2 * s_next)) * out_scale, -dt / (2 * s_next) * out_scale,
                                noise))
            weights.append([0.5 * out_scale])
            writes.append(keep)
            sigmas.append(s_next)
    return SecondOrderRows(coef, weights, writes, sigmas)


def _x0_row(model: SigmaModel, sigma: float, cx_ve: float, c0: float, s: float) -> list[float]:
    """x_next = cx_ve x_ve + c0 x0 + s z at an evaluation at ``sigma`` (x_ve = state / state_scale(sigma)),
    in the clip form and its unclipped A / B."""
    scale = model.state_scale(sigma)
    a, b = model.to_x0(sigma)
    px, pm, cx = a / scale, b, cx_ve / scale
    return coef_row(A=cx + c0 * px, B=c0 * pm, S=s, PX=px, PM=pm, C0=c0, CX=cx, CM=0.0)


def second_order_plan(rows: SecondOrderRows, model: SigmaModel, model_times, prediction_type: str, schedule,
                      init_scale: float, clip_range: float | None = None, kind: str = "discrete",
                      with_history: bool = True) -> Plan:
    """The Plan of ``rows``: with ``with_history`` (Heun) one slot and one write per evaluation; without (Euler)
    none. Its score scale at each evaluation is -sigma^2 state_scale / b (x0 = a x_ve + b m gains sigma^2 times
    the gradient in x_ve, which is state_scale times the gradient in what the model reads)."""
    coef = np.asarray(rows.coef, dtype=np.float64).reshape(-1, NUM_COEF)
    if not np.isfinite(coef).all():
        raise ValueError("sigmas: the plan has non-finite coefficients (a sigma of 0 before the last step?)")
    e = coef.shape[0]
    history = None
    if with_history:
        history = History(torch.tensor(rows.weights, dtype=torch.float64), torch.zeros(e, 1, dtype=torch.int64),
                          torch.tensor(rows.writes, dtype=torch.float64))
    score_scale = torch.tensor([-s * s * model.state_scale(s) / model.to_x0(s)[1] for s in rows.eval_sigmas],
                               dtype=torch.float64)
    return Plan(torch.as_tensor(np.asarray(model_times, dtype=np.float64)), torch.from_numpy(coef), score_scale,
                clip_range, prediction_type, kind, schedule, history, init_scale=init_scale)


def vp_sigma_model(prediction_type: str) -> SigmaModel:
    """A discrete VP model in sigma form: it reads x_ve / sqrt(1 + sigma^2)."""
    return SigmaModel(lambda s: 1.0 / math.sqrt(s * s + 1), lambda s: vp_prediction_to_x0(s, prediction_type))




def vp_init_scale(sigmas: np.ndarray, spacing: str) -> float:
    """x_T / noise in the VP state: diffusers' init_noise_sigma (sigma_max for linspace / trailing spacing,
    sqrt(sigma_max^2 + 1) for leading) over the first state's VE scale sqrt(sigma_0^2 + 1)."""
    r0 = math.sqrt(float(sigmas[0]) ** 2 + 1)
    return (float(sigmas.max()) if spacing in ("linspace", "trailing") else r0) / r0


def vp_prediction_to_x0(sigma: float, prediction_type: str) -> tuple[float, float]:
    """(a, b) with x0 = a x_ve + b m for a VP model's output m at noise level sigma (as diffusers' sigma-space
    schedulers convert it)."""
    r2 = sigma * sigma + 1
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / r2, -sigma / math.sqrt(r2)
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type: expected epsilon, sample or v_prediction, got {prediction_type!r}")


def discrete_sigma_grid(schedule, steps, sigma_schedule, spacing, steps_offset, final_sigmas_type, sigma_min=None,
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
