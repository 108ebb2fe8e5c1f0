"""Multistep solvers as plans: DPM-Solver and DPM-Solver++ (Lu et al. 2022, arXiv 2206.00927 / 2211.01095) and
UniPC (Zhao et al. 2023, arXiv 2302.04867), as diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler
step them.

Each step is linear in x, the guided model output m and the solver's past converted outputs (x0 predictions for
DPM-Solver++, noise predictions for DPM-Solver), so a plan is per-step scalars plus a :class:`History`: step i
writes its converted output c_i = Dx x + Dm m into slot i mod K and reads the slots holding c_{i-1}, c_{i-2}.
Coefficients are computed in float64 on the host from diffusers' float32 sigma grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastguide.checks import check_choices, check_int
from fastguide.kernels.reference import NUM_COEF
from fastguide.schedule import (NoiseSchedule, check_scheduler_keys, config_items, config_value,
                                schedule_from_scheduler_config, sigma_schedule_of)
from fastguide.sigmas import SIGMA_SCHEDULES, sigma_grid, sigma_to_t, training_sigmas, vp_alpha_sigma
from fastguide.solvers import History, Plan, check_schedule, coef_row, vp_prediction, vp_score_scale

ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
FINAL_SIGMAS = ("zero", "sigma_min")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class DPMOptions:
    order: int
    algorithm_type: str
    solver_type: str
    lower_order_final: bool
    euler_at_final: bool
    final_sigmas_type: str



def multistep_plan(t: np.ndarray, sigmas: np.ndarray, coef, history: History, prediction_type: str, schedule) -> Plan:
    """The Plan of a VP multistep solver: model times ``t`` [S], rows ``coef`` over ``sigmas`` [S + 1]."""
    score_scale = [vp_score_scale(1 / (1 + float(s) ** 2), prediction_type) for s in sigmas[:-1]]
    return Plan(torch.from_numpy(t.astype(np.float64)), torch.tensor(coef, dtype=torch.float64),
                torch.tensor(score_scale, dtype=torch.float64), None, prediction_type, "discrete", schedule, history)

class DPMSolver:
    """DPM-Solver(++) multistep, orders 1-3, ODE or SDE, on a discrete VP schedule.

    ``sigma_schedule``: "training" (the training timesteps at ``spacing``), "karras", "exponential" or "beta"
    (diffusers' ``use_karras_sigmas`` ...). The model times of a non-training sigma grid are training indices as
    diffusers makes them: rounded (``round_timesteps``, the default for "karras" except on cosine schedules) or
    truncated. Defaults follow
    DPMSolverMultistepScheduler: order 2, "dpmsolver++", "midpoint", ``lower_order_final``, final sigma zero,
    linspace spacing; ``prediction_type`` defaults to the schedule's.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, order: int = 2, algorithm_type: str = "dpmsolver++",
                 solver_type: str = "midpoint", lower_order_final: bool = True, euler_at_final: bool = False,
                 final_sigmas_type: str = "zero", sigma_schedule: str = "training", spacing: str = "linspace",
                 steps_offset: int = 0, prediction_type: str | None = None, round_timesteps: bool | None = None,
                 lambda_min_clipped: float = -math.inf):
        check_schedule(schedule, steps)
        opts = _check_options(order, algorithm_type, solver_type, lower_order_final, euler_at_final,
                              final_sigmas_type, steps)
        check_choices(("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES), ("spacing", spacing, SPACINGS))
        pred = vp_prediction(schedule, prediction_type)
        self.schedule, self.steps, self.options, self.sigma_schedule = schedule, steps, opts, sigma_schedule
        t, sigmas = dpm_grid(schedule, steps, sigma_schedule, spacing, check_int(steps_offset, "steps_offset", 0),
                             final_sigmas_type, sigma_schedule == "karras" if round_timesteps is None else round_timesteps,
                             lambda_min_clipped)
        coef, history = dpm_coefficients(sigmas, pred, opts, schedule.float32_arithmetic)
        self.plan = multistep_plan(t, sigmas, coef, history, pred, schedule)

    @classmethod
    def from_diffusers(cls, config, steps: int) -> "DPMSolver":
        """From a DPMSolverMultistepScheduler config (``scheduler.config``); options it cannot step exactly are
        refused by name. The schedule is rounded as diffusers rounds it (float32)."""
        cfg = config_items(config)
        check_scheduler_keys(cfg, "DPMSolverMultistepScheduler", "DPMSolver", _DPM_KEYS, _DPM_INERT)
        schedule = schedule_from_scheduler_config(cfg, "linspace")
        sigma_schedule = sigma_schedule_of(cfg)
        return cls(schedule, steps, order=config_value(cfg, "solver_order", int, 2),
                   algorithm_type=cfg.get("algorithm_type", "dpmsolver++"),
                   solver_type=cfg.get("solver_type", "midpoint"),
                   lower_order_final=config_value(cfg, "lower_order_final", bool, True),
                   euler_at_final=config_value(cfg, "euler_at_final", bool, False),
                   final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
                   sigma_schedule=sigma_schedule, spacing=schedule.timestep_spacing,
                   steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type,
                   round_timesteps=bool(sigma_schedule == "karras" and cfg.get("beta_schedule") != "squaredcos_cap_v2"),
                   lambda_min_clipped=_lambda_min_clipped(cfg.get("lambda_min_clipped")))

    def __repr__(self):
        o = self.options
        return (f"DPMSolver(steps={self.steps}, order={o.order}, algorithm_type={o.algorithm_type!r}, "
                f"solver_type={o.solver_type!r}, sigma_schedule={self.sigma_schedule!r})")


_DPM_KEYS = {"solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
             "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "final_sigmas_type",
             "lambda_min_clipped", "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"}
# Keys accepted only at their inert default.
_DPM_INERT = {"thresholding": False, "use_lu_lambdas": False, "use_flow_sigmas": False, "variance_type": None,
              "rescale_betas_zero_snr": False, "use_dynamic_shifting": False}


def _lambda_min_clipped(value) -> float:
    if value is None:
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"config: lambda_min_clipped: expected a number, got {value!r}")
    return float(value)


def _check_options(order, algorithm_type, solver_type, lower_order_final, euler_at_final, final_sigmas_type,
                   steps) -> DPMOptions:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if order > steps:
        raise ValueError(f"order: {order} needs at least {order} steps, got {steps}")
    check_choices(("algorithm_type", algorithm_type, ALGORITHMS), ("solver_type", solver_type, SOLVER_TYPES),
                  ("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS))
    for name, value in (("lower_order_final", lower_order_final), ("euler_at_final", euler_at_final)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
        raise ValueError(f"final_sigmas_type: 'zero' is not defined for {algorithm_type} (noise prediction ends at "
                         "sigma 0 with log 0); use 'sigma_min'")
    if algorithm_type == "sde-dpmsolver" and order == 3:
        raise ValueError("order: 3 is not defined for sde-dpmsolver (diffusers has no third-order update for it)")
    return DPMOptions(order, algorithm_type, solver_type, lower_order_final, euler_at_final, final_sigmas_type)


def dpm_grid(schedule, steps, sigma_schedule, spacing, steps_offset, final_sigmas_type, round_timesteps,
             lambda_min_clipped=-math.inf, final_from_grid=False, sigma_min=None, sigma_max=None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(model times [S], sigmas [S + 1] float32 with the final sigma appended), as DPMSolverMultistepScheduler's
    set_timesteps computes them (``final_from_grid``: a "sigma_min" final sigma is the grid's last, as
    UniPCMultistepScheduler has it on non-training grids; ``sigma_min`` / ``sigma_max``: the grid's bounds)."""
    train = training_sigmas(schedule)
    n_train = len(train)
    lambdas = -np.log(train.astype(np.float64))  # log(alpha / sigma_vp) = -log(sigma)
    clipped = int(np.searchsorted(np.flip(lambdas), lambda_min_clipped))
    last = n_train - clipped
    if spacing == "linspace":
        t = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    else:
        t = np.arange(last, 0, -n_train / steps).round().copy().astype(np.int64) - 1
    if t.min() < 0 or t.max() >= n_train:
        raise ValueError(f"steps_offset: {steps_offset} pushes timesteps outside [0, {n_train - 1}]")
    if sigma_schedule == "training":
        sigmas = np.interp(t, np.arange(n_train), train)
    else:
        sigmas = sigma_grid(sigma_schedule, train, steps, sigma_min, sigma_max)
        t = sigma_to_t(sigmas, train)
        t = (t.round() if round_timesteps else t).astype(np.int64)  # diffusers keeps int64 timesteps
    last_sigma = 0.0
    if final_sigmas_type == "sigma_min":
        last_sigma = float(sigmas[-1]) if (final_from_grid and sigma_schedule != "training") else float(train[0])
    return t, np.concatenate([sigmas, [last_sigma]]).astype(np.float32)


def _converted(sigma: float, prediction_type: str, data_prediction: bool, float32: bool) -> tuple[float, float]:
    """(Dx, Dm): the solver's converted output Dx x + Dm m (x0 for DPM-Solver++, eps for DPM-Solver)."""
    alpha, s, _ = _vp_scalars(sigma, float32)
    if data_prediction:
        return {"epsilon": (1 / alpha, -s / alpha), "sample": (0.0, 1.0), "v_prediction": (alpha, -s)}[prediction_type]
    return {"epsilon": (0.0, 1.0), "sample": (1 / s, -alpha / s), "v_prediction": (s, alpha)}[prediction_type]


def _lambda(sigma: float) -> float:
    alpha, s = vp_alpha_sigma(sigma)
    return math.inf if s == 0 else math.log(alpha) - math.log(s)


def _vp_scalars(sigma: float, float32: bool) -> tuple[float, float, float]:
    """(alpha, sigma_vp, lambda) at noise level ``sigma``; with ``float32`` rounded step by step as diffusers
    computes them in float32 (alpha = 1 / (sigma^2 + 1)^0.5, lambda = log alpha - log sigma_vp)."""
    if not float32:
        alpha, s = vp_alpha_sigma(sigma)
        return alpha, s, _lambda(sigma)
    sig = torch.tensor(sigma, dtype=torch.float32)
    alpha = 1 / ((sig**2 + 1) ** 0.5)
    s = sig * alpha
    return float(alpha), float(s), float(torch.log(alpha) - torch.log(s))


def step_orders(n: int, opts: DPMOptions) -> list[int]:
    """The order diffusers uses at each of n steps (lower at the start and, per the options, at the end)."""
    orders = []
    for i in range(n):
        final = i == n - 1 and (opts.euler_at_final or (opts.lower_order_final and n < 15)
                                or opts.final_sigmas_type == "zero")
        second = i == n - 2 and opts.lower_order_final and n < 15
        done = min(i, opts.order)
        if opts.order == 1 or done < 1 or final:
            orders.append(1)
        elif opts.order == 2 or done < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _update_weights(sig: np.ndarray, i: int, order: int, opts: DPMOptions, float32: bool
                    ) -> tuple[float, list[float], float]:
    """(a, [w0, w1, w2], noise): x_next = a x + w0 c_i + w1 c_{i-1} + w2 c_{i-2} + noise z at step i."""
    alpha_t, s_t, lam_t = _vp_scalars(float(sig[i + 1]), float32)
    alpha_s, s_s, lam_s = _vp_scalars(float(sig[i]), float32)
    h = lam_t - lam_s
    algo, heun = opts.algorithm_type, opts.solver_type == "heun"
    em, ep = math.exp(-h), (math.exp(h) if math.isfinite(h) else math.inf)
    sde_pp = algo == "sde-dpmsolver++"
    a = s_t / s_s * (em if sde_pp else 1.0) if algo in ("dpmsolver++", "sde-dpmsolver++") else alpha_t / alpha_s
    noise = 0.0
    if sde_pp:
        noise = s_t * math.sqrt(1.0 - math.exp(-2 * h))
    elif algo == "sde-dpmsolver":
        noise = s_t * math.sqrt(math.exp(2 * h) - 1.0)
    k = _order_weights(algo, heun, order, h, em, ep, alpha_t, s_t)
    if order == 1:
        return a, [k[0], 0.0, 0.0], noise
    lam_s1 = _vp_scalars(float(sig[i - 1]), float32)[2]
    r0 = (lam_s - lam_s1) / h
    if order == 2:
        return a, [k[0] + k[1] / r0, -k[1] / r0, 0.0], noise
    r1 = (lam_s1 - _vp_scalars(float(sig[i - 2]), float32)[2]) / h
    q = r0 / (r0 + r1)
    e0 = k[1] * (1 + q) + k[2] / (r0 + r1)  # weight of D1_0 = (c_i - c_{i-1}) / r0
    e1 = -k[1] * q - k[2] / (r0 + r1)  # weight of D1_1 = (c_{i-1} - c_{i-2}) / r1
    return a, [k[0] + e0 / r0, -e0 / r0 + e1 / r1, -e1 / r1], noise


def _order_weights(algo: str, heun: bool, order: int, h: float, em: float, ep: float, alpha_t: float, s_t: float):
    """The weights diffusers gives D0, D1, D2 in its first / second / third-order updates."""
    if algo == "dpmsolver++":
        k0 = -alpha_t * (em - 1.0)
        k1 = alpha_t * ((em - 1.0) / h + 1.0) if (heun or order == 3) else -0.5 * alpha_t * (em - 1.0)
        k2 = -alpha_t * ((em - 1.0 + h) / h**2 - 0.5) if order == 3 else 0.0
    elif algo == "dpmsolver":
        k0 = -s_t * (ep - 1.0)
        k1 = -s_t * ((ep - 1.0) / h - 1.0) if (heun or order == 3) else -0.5 * s_t * (ep - 1.0)
        k2 = -s_t * ((ep - 1.0 - h) / h**2 - 0.5) if order == 3 else 0.0
    elif algo == "sde-dpmsolver++":
        e2 = math.exp(-2.0 * h)
        k0 = alpha_t * (1 - e2)
        k1 = alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0) if (heun or order == 3) else 0.5 * alpha_t * (1 - e2)
        k2 = alpha_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5) if order == 3 else 0.0
    else:  # sde-dpmsolver
        k0 = -2.0 * s_t * (ep - 1.0)
        k1 = -2.0 * s_t * ((ep - 1.0) / h - 1.0) if heun else -s_t * (ep - 1.0)
        k2 = 0.0
    return k0, k1, k2


def dpm_coefficients(sig: np.ndarray, prediction_type: str, opts: DPMOptions, float32: bool = False):
    """The per-step coefficient rows and the History of a DPM-Solver plan over the sigma grid ``sig`` [S + 1]
    (``float32``: its scalars rounded as diffusers rounds them)."""
    n = len(sig) - 1
    slots = max(opts.order - 1, 1)
    data_pred = opts.algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    rows, weights, write_slots, write_coef = [], [], [], []
    for i, order in enumerate(step_orders(n, opts)):
        dx, dm = _converted(float(sig[i]), prediction_type, data_pred, float32)
        a, w, noise = _update_weights(sig, i, order, opts, float32)
        rows.append(coef_row(A=a + w[0] * dx, B=w[0] * dm, S=noise))
        hist = [0.0] * slots
        for back in (1, 2):
            if w[back] != 0.0:
                hist[(i - back) % slots] += w[back]
        weights.append(hist)
        write_slots.append([i % slots])
        write_coef.append([[dx, dm] + [0.0] * slots])
    coef = np.array(rows, dtype=np.float64).reshape(n, NUM_COEF)
    if not np.isfinite(coef).all() or not np.isfinite(np.array(weights)).all():
        raise ValueError("DPMSolver: the plan has non-finite coefficients (epsilon / sample prediction where alpha or "
                         "sigma is 0; use v_prediction there)")
    if opts.order == 1:
        return coef, None
    history = History(torch.tensor(weights, dtype=torch.float64), torch.tensor(write_slots, dtype=torch.int64),
                      torch.tensor(write_coef, dtype=torch.float64))
    return coef, history


# ====================================================================== UniPC
UNIPC_TYPES = ("bh1", "bh2")


@dataclass(frozen=True)
class UniPCOptions:
    order: int
    solver_type: str
    predict_x0: bool
    lower_order_final: bool
    disable_corrector: tuple
    final_sigmas_type: str


class UniPC:
    """UniPC multistep (Zhao et al. 2023, arXiv 2302.04867) as diffusers' UniPCMultistepScheduler steps it: at each
    step a corrector first refines the current sample with the new model output (UniC; not at step 0, nor after
    the steps listed in ``disable_corrector``), then a predictor of order <= ``order`` (UniP) makes the next one.

    Both are linear in the sample, the model output and past converted outputs, so the plan's History holds the
    last corrected sample (slot 0) and the last ``order`` converted outputs (x0 with ``predict_x0``, else eps).
    Defaults follow UniPCMultistepScheduler: order 2, "bh2", predict_x0, lower_order_final, final sigma zero,
    linspace spacing. ``sigma_min`` / ``sigma_max`` bound a non-training sigma grid.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, order: int = 2, solver_type: str = "bh2",
                 predict_x0: bool = True, lower_order_final: bool = True, disable_corrector=(),
                 final_sigmas_type: str = "zero", sigma_schedule: str = "training", spacing: str = "linspace",
                 steps_offset: int = 0, prediction_type: str | None = None, sigma_min=None, sigma_max=None):
        check_schedule(schedule, steps)
        opts = _check_unipc_options(order, solver_type, predict_x0, lower_order_final, disable_corrector,
                                    final_sigmas_type, steps)
        check_choices(("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES), ("spacing", spacing, SPACINGS))
        pred = vp_prediction(schedule, prediction_type)
        self.schedule, self.steps, self.options, self.sigma_schedule = schedule, steps, opts, sigma_schedule
        t, sigmas = dpm_grid(schedule, steps, sigma_schedule, spacing, check_int(steps_offset, "steps_offset", 0),
                             final_sigmas_type, sigma_schedule == "karras", final_from_grid=True,
                             sigma_min=sigma_min, sigma_max=sigma_max)
        coef, history = unipc_coefficients(sigmas, pred, opts, schedule.float32_arithmetic)
        self.plan = multistep_plan(t, sigmas, coef, history, pred, schedule)

    @classmethod
    def from_diffusers(cls, config, steps: int) -> "UniPC":
        """From a UniPCMultistepScheduler config; options it cannot step exactly are refused by name."""
        cfg = config_items(config)
        check_scheduler_keys(cfg, "UniPCMultistepScheduler", "UniPC", _UNIPC_KEYS, _UNIPC_INERT)
        schedule = schedule_from_scheduler_config(cfg, "linspace")
        sigma_schedule = sigma_schedule_of(cfg)
        return cls(schedule, steps, order=config_value(cfg, "solver_order", int, 2),
                   solver_type=cfg.get("solver_type", "bh2"), predict_x0=config_value(cfg, "predict_x0", bool, True),
                   lower_order_final=config_value(cfg, "lower_order_final", bool, True),
                   disable_corrector=tuple(cfg.get("disable_corrector") or ()),
                   final_sigmas_type=cfg.get("final_sigmas_type", "zero"),
                   sigma_schedule=sigma_schedule, spacing=schedule.timestep_spacing,
                   steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type,
                   sigma_min=cfg.get("sigma_min"), sigma_max=cfg.get("sigma_max"))

    def __repr__(self):
        o = self.options
        return (f"UniPC(steps={self.steps}, order={o.order}, solver_type={o.solver_type!r}, "
                f"predict_x0={o.predict_x0}, sigma_schedule={self.sigma_schedule!r})")


_UNIPC_KEYS = {"solver_order", "solver_type", "predict_x0", "lower_order_final", "disable_corrector",
               "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "final_sigmas_type",
               "dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type", "sigma_min",
               "sigma_max"}
_UNIPC_INERT = {"thresholding": False, "solver_p": None, "use_flow_sigmas": False, "rescale_betas_zero_snr": False,
                "use_dynamic_shifting": False, "shift_terminal": None}


def _check_unipc_options(order, solver_type, predict_x0, lower_order_final, disable_corrector, final_sigmas_type,
                         steps) -> UniPCOptions:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if order > steps:
        raise ValueError(f"order: {order} needs at least {order} steps, got {steps}")
    check_choices(("solver_type", solver_type, UNIPC_TYPES), ("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS))
    for name, value in (("predict_x0", predict_x0), ("lower_order_final", lower_order_final)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    try:
        disabled = tuple(check_int(v, "disable_corrector", 0) for v in disable_corrector)
    except TypeError:
        raise TypeError(f"disable_corrector: expected a list of step indices, got {disable_corrector!r}") from None
    if not predict_x0 and final_sigmas_type == "zero":
        raise ValueError("final_sigmas_type: 'zero' is not defined with predict_x0=False (noise prediction ends at "
                         "sigma 0 with log 0); use 'sigma_min'")
    return UniPCOptions(order, solver_type, predict_x0, lower_order_final, disabled, final_sigmas_type)


def unipc_orders(n: int, opts: UniPCOptions) -> list[int]:
    """The predictor's order at each of n steps (warm-up from 1, lower at the end with lower_order_final)."""
    orders = []
    for i in range(n):
        order = min(opts.order, n - i) if opts.lower_order_final else opts.order
        orders.append(min(order, min(i, opts.order) + 1))
    return orders


def _unipc_update(sig, t: int, s0: int, prev: list[int], order: int, opts: UniPCOptions, float32: bool,
                  corrector: bool) -> tuple[float, float, dict, float]:
    """(a, w_m0, {j: w_j}, w_this): x_out = a x_in + w_m0 m0 + sum_j w_j c_j + w_this c_this, UniPC's update from
    noise level sig[s0] to sig[t] with m0 the converted output at s0 and c_j the earlier ones (``prev``)."""
    alpha_t, s_t, lam_t = _vp_scalars(float(sig[t]), float32)
    alpha_s, s_s, lam_s = _vp_scalars(float(sig[s0]), float32)
    h = lam_t - lam_s
    if h == 0:
        raise ValueError("final_sigmas_type: 'sigma_min' on this sigma grid repeats its last sigma, a step of length "
                         "zero (diffusers divides by zero there too); use 'zero'")
    rks = [(_vp_scalars(float(sig[j]), float32)[2] - lam_s) / h for j in prev] + [1.0]
    hh = -h if opts.predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if opts.solver_type == "bh1" else math.expm1(hh)
    h_phi_k, factorial, rows, rhs = h_phi_1 / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(np.array(rows), np.array(rhs)))
    else:
        rhos = [] if order == 1 else [0.5] if order == 2 else list(np.linalg.solve(np.array(rows)[:-1, :-1],
                                                                                     np.array(rhs)[:-1]))
    a, g = (s_t / s_s, alpha_t) if opts.predict_x0 else (alpha_t / alpha_s, s_t)
    w_m0, weights = -g * h_phi_1, {}
    for k, j in enumerate(prev):
        weights[j] = -g * b_h * rhos[k] / rks[k]
        w_m0 += g * b_h * rhos[k] / rks[k]
    w_this = 0.0
    if corrector:
        w_this = -g * b_h * rhos[-1]
        w_m0 += g * b_h * rhos[-1]
    return a, w_m0, weights, w_this


def unipc_coefficients(sig: np.ndarray, prediction_type: str, opts: UniPCOptions, float32: bool = False):
    """Coefficient rows and History of a UniPC plan over the sigma grid ``sig`` [S + 1]. Slot 0 holds the last
    corrected sample, slot 1 + (j mod order) the converted output c_j of step j."""
    n, p = len(sig) - 1, opts.order
    orders = unipc_orders(n, opts)
    slots = p + 1
    rows, weights, write_slots, write_coef = [], [], [], []
    for i in range(n):
        dx, dm = _converted(float(sig[i]), prediction_type, opts.predict_x0, float32)
        c_i = {"x": dx, "m": dm}
        xc = {"x": 1.0}  # the corrected sample: x itself unless the corrector runs
        if i > 0 and (i - 1) not in opts.disable_corrector:
            o = orders[i - 1]
            a, w0, w, w_this = _unipc_update(sig, i, i - 1, [i - 1 - k for k in range(1, o)], o, opts, float32, True)
            xc = _combine({"L": a, ("c", i - 1): w0, **{("c", j): v for j, v in w.items()}}, (w_this, c_i))
        o = orders[i]
        a, w0, w, _ = _unipc_update(sig, i + 1, i, [i - k for k in range(1, o)], o, opts, float32, False)
        x_next = _combine({**{("c", j): v for j, v in w.items()}}, (a, xc), (w0, c_i))
        row, hist = _as_inputs(x_next, slots, p)
        rows.append(coef_row(A=row[0], B=row[1]))
        weights.append(hist)
        write_slots.append([0, 1 + i % p])
        write_coef.append([_as_write(xc, slots, p), _as_write(c_i, slots, p)])
    coef = np.array(rows, dtype=np.float64).reshape(n, NUM_COEF)
    if not np.isfinite(coef).all() or not np.isfinite(np.array(weights)).all():
        raise ValueError("UniPC: the plan has non-finite coefficients (a final sigma of zero with "
                         "lower_order_final=False divides by zero, as in diffusers; use lower_order_final=True)")
    return coef, History(torch.tensor(weights, dtype=torch.float64), torch.tensor(write_slots, dtype=torch.int64),
                         torch.tensor(write_coef, dtype=torch.float64))


def _combine(base: dict, *scaled: tuple[float, dict]) -> dict:
    """base + sum of weight * form, for linear forms as {symbol: coefficient}."""
    out = dict(base)
    for w, form in scaled:
        for key, v in form.items():
            out[key] = out.get(key, 0.0) + w * v
    return out


def _slot(key, p: int) -> int:
    return 0 if key == "L" else 1 + key[1] % p


def _as_inputs(form: dict, slots: int, p: int) -> tuple[tuple[float, float], list[float]]:
    """A linear form as ((x coefficient, m coefficient), history slot weights)."""
    hist = [0.0] * slots
    for key, v in form.items():
        if key not in ("x", "m"):
            hist[_slot(key, p)] += v
    return (form.get("x", 0.0), form.get("m", 0.0)), hist


def _as_write(form: dict, slots: int, p: int) -> list[float]:
    (x, m), hist = _as_inputs(form, slots, p)
    return [x, m, *hist]
