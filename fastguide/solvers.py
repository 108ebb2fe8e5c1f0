"""Solvers as plans: per-step coefficients computed once on the host in float64.

Every solver here maps (x, guided model output m) to x_next with the element-wise form documented in
``fastguide.kernels.reference``; a solver is just the table of its per-step scalars, one column per
``Coef`` name.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from fastguide.checks import check_choices, check_int, check_steps
from fastguide.kernels.reference import NUM_COEF, Coef
from fastguide.schedule import PREDICTION_TYPES, NoiseSchedule, config_items, config_value


@dataclass(frozen=True, eq=False)
class Plan:
    """What a sampler needs from a solver. All tensors float64 on the CPU."""

    timesteps: torch.Tensor  # [S] model time input: training index (discrete) or flow time sigma in [0, 1]
    coef: torch.Tensor  # [S, NUM_COEF]: one column per Coef name
    # [S] k: classifier guidance adds -scale * k * grad log p(y | input) to the model output m (the gradient with
    # respect to what the model reads); sqrt(1 - abar_t) for a VP eps model (NaN where undefined: flow plans)
    score_scale: torch.Tensor
    clip_range: float | None
    prediction_type: str
    kind: str  # "discrete" | "flow"
    schedule: NoiseSchedule | None = None  # the discrete schedule the plan was built on (tables check against it)
    history: "History | None" = None  # a multistep solver's past states (None: one-step solvers)
    init_scale: float = 1.0  # x_T = init_scale * noise (sigma-space solvers whose first state is not unit noise)

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())

    @property
    def history_slots(self) -> int:
        return 0 if self.history is None else self.history.slots

    @functools.cached_property
    def stochastic(self) -> bool:
        return bool((self.coef[:, Coef.S] != 0).any())


@dataclass(frozen=True, eq=False)
class History:
    """A multistep solver's states beyond x: K slots [K, B, *shape] that steps read and write. At step i,
    x_next gains ``sum_j weights[i, j] * slot_j``, and the step writes W new states: slot ``write_slots[i, w]``
    becomes ``write_coef[i, w] . (x, m, slot_0, ..., slot_{K-1})`` (all read before any write). Slots start at
    zero; a slot is read with a non-zero weight only after a step wrote it. Float64 on the CPU."""

    weights: torch.Tensor  # [S, K]
    write_slots: torch.Tensor  # [S, W] int64
    write_coef: torch.Tensor  # [S, W, 2 + K]

    @property
    def slots(self) -> int:
        return int(self.weights.shape[-1])  # [S, K], or [S, B, K] for per-row plans


def coef_row(**values: float) -> list[float]:
    """One step's coefficients by name (``coef_row(A=..., B=..., PX=...)``); columns not named are 0."""
    row = [0.0] * NUM_COEF
    for name, value in values.items():
        row[Coef[name]] = value
    return row


def vp_score_scale(abar: float, prediction_type: str) -> float:
    """k of a VP model's output at abar (Plan.score_scale): the score gains grad log p when x0 = Px x + Pm m gains
    (1 - abar) / sqrt(abar) grad, so m gains that over Pm: eps sqrt(1 - abar) (Dhariwal & Nichol 2021), v
    sqrt((1 - abar) / abar), sample -(1 - abar) / sqrt(abar) (inf at zero terminal SNR)."""
    if prediction_type == "epsilon":
        return math.sqrt(1.0 - abar)
    if prediction_type not in ("v_prediction", "sample"):
        prediction_to_x0_eps(abar, prediction_type)  # raises, naming the argument
    if abar <= 0:
        return math.inf
    return math.sqrt((1.0 - abar) / abar) if prediction_type == "v_prediction" else -(1.0 - abar) / math.sqrt(abar)


def prediction_to_x0_eps(abar: float, prediction_type: str, roots: tuple[float, float] | None = None
                         ) -> tuple[float, float, float, float]:
    """(Px, Pm, Ex, Em) with x0 = Px*x + Pm*m and eps = Ex*x + Em*m for model output m.

    ``roots``: (sqrt(abar), sqrt(1 - abar)) when they must be rounded differently (diffusers' float32)."""
    sa, sb = roots if roots is not None else (math.sqrt(abar), math.sqrt(1.0 - abar))
    if prediction_type == "epsilon":
        return (1.0 / sa if sa > 0 else math.inf), (-sb / sa if sa > 0 else -math.inf), 0.0, 1.0
    if prediction_type == "sample":
        return 0.0, 1.0, (1.0 / sb if sb > 0 else math.inf), (-sa / sb if sb > 0 else -math.inf)
    if prediction_type == "v_prediction":
        return sa, -sb, sb, sa
    raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _ddim_scalars_float32(abar_t: float, abar_prev: float, eta: float) -> tuple[float, ...]:
    """sqrt(abar_t), sqrt(1 - abar_t), sqrt(abar_prev), direction and sigma, rounded to float32 step by step
    exactly as diffusers' DDIMScheduler.step computes them (where 1/sqrt(abar_t) is ~1e4, those roundings
    move the sample by ~1e-3)."""
    a_t, a_p = torch.tensor(abar_t, dtype=torch.float32), torch.tensor(abar_prev, dtype=torch.float32)
    b_t = 1 - a_t
    s = eta * (((1 - a_p) / b_t) * (1 - a_t / a_p)) ** 0.5
    d = (1 - a_p - s**2) ** 0.5
    return float(a_t**0.5), float(b_t**0.5), float(a_p**0.5), float(d), float(s)


def ddim_coefficients(abar_t: float, abar_prev: float, eta: float, prediction_type: str,
                      float32_arithmetic: bool = False) -> list[float]:
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z (Song et al. 2021, eq. 12)."""
    if float32_arithmetic:
        sa, sb, c0, d, s = _ddim_scalars_float32(abar_t, abar_prev, eta)
        px, pm, ex, em = prediction_to_x0_eps(abar_t, prediction_type, roots=(sa, sb))
        if not math.isfinite(d):
            raise ValueError(f"eta: {eta} makes the DDIM direction term imaginary (1 - abar_prev - sigma^2 < 0)")
        return _ddim_row(px, pm, ex, em, c0, d, s)
    px, pm, ex, em = prediction_to_x0_eps(abar_t, prediction_type)
    var = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    s = eta * math.sqrt(max(var, 0.0))
    d2 = 1 - abar_prev - s * s
    if d2 < -1e-12:
        raise ValueError(f"eta: {eta} makes the DDIM direction term imaginary (1 - abar_prev - sigma^2 < 0)")
    return _ddim_row(px, pm, ex, em, math.sqrt(abar_prev), math.sqrt(max(d2, 0.0)), s)


def _ddim_row(px: float, pm: float, ex: float, em: float, c0: float, d: float, s: float) -> list[float]:
    """x_prev = c0 x0 + d eps + s z with x0 = px x + pm m and eps = ex x + em m."""
    cx, cm = d * ex, d * em
    return coef_row(A=c0 * px + cx, B=c0 * pm + cm, S=s, PX=px, PM=pm, C0=c0, CX=cx, CM=cm)


def _ddpm_scalars_float32(abar_t: float, abar_prev: float, variance_type: str) -> tuple[float, ...]:
    """sqrt(abar_t), sqrt(1 - abar_t), the posterior-mean coefficients of x0 and x_t, and the noise std, rounded to
    float32 step by step as diffusers' DDPMScheduler.step computes them (its 1 - abar_t / abar_prev cancels at
    small t, which moves unstrided samples by ~1e-4)."""
    a_t, a_p = torch.tensor(abar_t, dtype=torch.float32), torch.tensor(abar_prev, dtype=torch.float32)
    b_t, b_p = 1 - a_t, 1 - a_p
    alpha_t = a_t / a_p
    beta_t = 1 - alpha_t
    var = torch.clamp((1 - a_p) / (1 - a_t) * beta_t, min=1e-20) if variance_type == "fixed_small" else beta_t
    c0, cx = (a_p**0.5 * beta_t) / b_t, alpha_t**0.5 * b_p / b_t
    return float(a_t**0.5), float(b_t**0.5), float(c0), float(cx), float(var**0.5)


def ddpm_coefficients(abar_t: float, abar_prev: float, prediction_type: str, variance_type: str,
                      last: bool, float32_arithmetic: bool = False) -> list[float]:
    """Posterior mean q(x_prev | x_t, x0) with x0 predicted, plus fixed_small / fixed_large noise (Ho et al. 2020)."""
    if float32_arithmetic:
        sa, sb, c0, cx, std = _ddpm_scalars_float32(abar_t, abar_prev, variance_type)
        px, pm, _, _ = prediction_to_x0_eps(abar_t, prediction_type, roots=(sa, sb))
        return _ddpm_row(px, pm, c0, cx, 0.0 if last else std)
    px, pm, _, _ = prediction_to_x0_eps(abar_t, prediction_type)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    c0 = math.sqrt(abar_prev) * beta_t / (1 - abar_t)
    cx = math.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)
    if variance_type == "fixed_small":
        var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
    else:
        var = beta_t
    return _ddpm_row(px, pm, c0, cx, 0.0 if last else math.sqrt(var))


def _ddpm_row(px: float, pm: float, c0: float, cx: float, s: float) -> list[float]:
    """x_prev = c0 x0 + cx x + s z with x0 = px x + pm m (the posterior mean, then the noise)."""
    return coef_row(A=c0 * px + cx, B=c0 * pm, S=s, PX=px, PM=pm, C0=c0, CX=cx)


def _check_finite_plan(coef: np.ndarray, what: str) -> None:
    if not np.isfinite(coef).all():
        raise ValueError(
            f"{what}: the plan has non-finite coefficients (e.g. epsilon/sample prediction where abar is 0 or 1, "
            "as with a zero-terminal-SNR schedule; use prediction_type='v_prediction' there)"
        )


def _resolve_clip(schedule: NoiseSchedule, clip_sample, clip_sample_range):
    if clip_sample is not None and not isinstance(clip_sample, (bool, np.bool_)):
        raise TypeError(f"clip_sample: expected True, False or None, got {clip_sample!r}")
    clip = schedule.clip_sample if clip_sample is None else bool(clip_sample)
    rng = schedule.clip_sample_range if clip_sample_range is None else clip_sample_range
    if isinstance(rng, bool) or not isinstance(rng, (int, float)) or not math.isfinite(rng) or not rng > 0:
        raise ValueError(f"clip_sample_range: expected a finite float > 0, got {rng!r}")
    return float(rng) if clip else None


def _check_prediction_type(pred) -> str:
    if not isinstance(pred, str) or pred not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {pred!r}")
    return pred


def check_schedule(schedule, steps: int | None = None) -> None:
    """A NoiseSchedule (TypeError naming it otherwise) and, with ``steps``, a step count it can take."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastguide.NoiseSchedule, got {type(schedule).__name__}")
    if steps is not None:
        check_steps(steps, schedule.num_train_timesteps)


def vp_prediction(schedule: NoiseSchedule, prediction_type: str | None) -> str:
    """``prediction_type``, or the schedule's when None: one of epsilon, sample, v_prediction."""
    pred = schedule.prediction_type if prediction_type is None else prediction_type
    if pred not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"prediction_type: expected epsilon, sample or v_prediction, got {pred!r}")
    return pred


class DDIM:
    """DDIM (eta >= 0; eta = 1 is DDPM-like ancestral sampling on the strided sub-sequence).

    Defaults (spacing, steps_offset, clip, prediction type, set_alpha_to_one) come from the schedule,
    so ``DDIM(NoiseSchedule.from_diffusers(cfg), steps=n)`` steps like ``DDIMScheduler(**cfg)``.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int, spacing: str | None = None, eta: float = 0.0,
                 clip_sample: bool | None = None, clip_sample_range: float | None = None,
                 prediction_type: str | None = None, steps_offset: int | None = None):
        check_schedule(schedule)
        check_steps(steps, schedule.num_train_timesteps)
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: expected a finite float >= 0, got {eta!r}")
        self.schedule, self.steps, self.eta = schedule, steps, float(eta)
        pred = _check_prediction_type(schedule.prediction_type if prediction_type is None else prediction_type)
        ts = schedule.timesteps(steps, spacing, steps_offset)
        abar = schedule.alphas_cumprod.numpy()
        stride = schedule.num_train_timesteps // steps
        rows = []
        for t in ts:
            prev = t - stride
            a_prev = abar[prev] if prev >= 0 else schedule.final_alpha_cumprod
            rows.append(ddim_coefficients(float(abar[t]), float(a_prev), self.eta, pred, schedule.float32_arithmetic))
        coef = np.array(rows, dtype=np.float64).reshape(len(ts), NUM_COEF)
        _check_finite_plan(coef, "DDIM")
        self.plan = Plan(torch.from_numpy(ts.astype(np.float64)), torch.from_numpy(coef),
                         torch.tensor([vp_score_scale(float(abar[t]), pred) for t in ts], dtype=torch.float64),
                         _resolve_clip(schedule, clip_sample, clip_sample_range),
                         pred, "discrete", schedule)

    def __repr__(self):
        return f"DDIM(steps={self.steps}, eta={self.eta}, prediction_type={self.plan.prediction_type!r})"


class DDPM:
    """DDPM ancestral sampling on a (possibly strided) timestep sequence, as diffusers' DDPMScheduler."""

    def __init__(self, schedule: NoiseSchedule, steps: int | None = None, spacing: str | None = None,
                 variance_type: str | None = None, clip_sample: bool | None = None,
                 clip_sample_range: float | None = None, prediction_type: str | None = None,
                 steps_offset: int | None = None):
        check_schedule(schedule)
        steps = schedule.num_train_timesteps if steps is None else steps
        check_steps(steps, schedule.num_train_timesteps)
        vt = schedule.variance_type if variance_type is None else variance_type
        if vt not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance_type: expected 'fixed_small' or 'fixed_large', got {vt!r}")
        pred = _check_prediction_type(schedule.prediction_type if prediction_type is None else prediction_type)
        self.schedule, self.steps, self.variance_type = schedule, steps, vt
        ts = schedule.timesteps(steps, spacing, steps_offset)
        abar = schedule.alphas_cumprod.numpy()
        rows = []
        for i, t in enumerate(ts):
            a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            rows.append(ddpm_coefficients(float(abar[t]), a_prev, pred, vt, bool(t == 0), schedule.float32_arithmetic))
        coef = np.array(rows, dtype=np.float64).reshape(len(ts), NUM_COEF)
        _check_finite_plan(coef, "DDPM")
        self.plan = Plan(torch.from_numpy(ts.astype(np.float64)), torch.from_numpy(coef),
                         torch.tensor([vp_score_scale(float(abar[t]), pred) for t in ts], dtype=torch.float64),
                         _resolve_clip(schedule, clip_sample, clip_sample_range),
                         pred, "discrete", schedule)

    def __repr__(self):
        return f"DDPM(steps={self.steps}, variance_type={self.variance_type!r})"


TIME_SHIFT_TYPES = ("exponential", "linear")


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000, *, mu: float | None = None,
                time_shift_type: str = "exponential", sigmas=None) -> np.ndarray:
    """Sigmas of diffusers' FlowMatchEulerDiscreteScheduler after ``set_timesteps(steps, sigmas=sigmas, mu=mu)``,
    with the final 0 appended, in its arithmetic: float32 values, as its ``scheduler.sigmas`` holds them.

    ``mu`` None: the static ``shift``; otherwise dynamic shifting (``use_dynamic_shifting``): the time shift
    ``exp(mu) / (exp(mu) + (1/s - 1))`` ("exponential") or ``mu / (mu + (1/s - 1))`` ("linear").
    ``sigmas``: the unshifted grid the scheduler is given (FluxPipeline passes ``linspace(1, 1/steps, steps)``);
    None is the scheduler's own, ``steps`` points from its largest to its smallest training sigma (which
    construction already shifts with a static shift, so the smallest is shifted twice; we reproduce that).
    """
    if sigmas is None:
        n = num_train_timesteps
        ends = torch.tensor([float(n), 1.0]) / n  # the first and last of the constructed float32 training sigmas
        if mu is None:
            ends = shift * ends / (1 + (shift - 1) * ends)
        base = np.linspace(ends[0].item() * n, ends[1].item() * n, steps) / n  # float64, as diffusers
    else:
        base = np.asarray(sigmas).astype(np.float32)  # given sigmas are shifted in float32, as diffusers
    if mu is None:
        shifted = shift * base / (1 + (shift - 1) * base)
    elif time_shift_type == "exponential":
        shifted = math.exp(mu) / (math.exp(mu) + (1 / base - 1) ** 1.0)
    else:
        shifted = mu / (mu + (1 / base - 1) ** 1.0)
    return np.concatenate([np.asarray(shifted).astype(np.float32).astype(np.float64), [0.0]])


def _check_base_sigmas(sigmas, steps: int) -> np.ndarray:
    try:
        values = np.asarray(sigmas, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"sigmas: expected {steps} numbers (the unshifted sigma grid), got {type(sigmas).__name__}"
                        ) from None
    if values.shape != (steps,) or not np.isfinite(values).all() or not ((values > 0) & (values <= 1)).all():
        raise ValueError(f"sigmas: expected {steps} finite values in (0, 1] (one per step, unshifted), got "
                         f"{np.asarray(sigmas).tolist() if values.size <= 8 else values.shape}")
    return values


# FlowMatchEulerDiscreteScheduler config keys; those other than num_train_timesteps, shift and the dynamic-shifting
# ones (use_dynamic_shifting, time_shift_type; base/max shift and image sequence lengths give a pipeline its mu)
# must keep their inert defaults (checked in FlowEuler.from_diffusers).
_FLOW_DIFFUSERS_KEYS = {
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type", "stochastic_sampling",
}


class FlowEuler:
    """Euler on the probability-flow ODE of a rectified-flow / flow-matching velocity model.

    x_t = (1 - sigma) x0 + sigma * noise, model predicts v = noise - x0; x <- x + (sigma_next - sigma) v.
    The model receives flow time sigma in [0, 1] (adapters rescale to 0..1000 where a model expects it).
    The sigma grid is diffusers' (:func:`flow_sigmas`): a static ``shift``, or with ``mu`` the resolution-dependent
    time shift of ``use_dynamic_shifting`` (``time_shift_type`` "exponential" or "linear"); ``sigmas`` an unshifted
    grid of ``steps`` values in (0, 1] in place of the scheduler's own (``set_timesteps(sigmas=...)``).
    """

    def __init__(self, steps: int, shift: float = 1.0, num_train_timesteps: int = 1000, *, mu: float | None = None,
                 time_shift_type: str = "exponential", sigmas=None):
        check_steps(steps)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or not shift > 0:
            raise ValueError(f"shift: expected a finite float > 0, got {shift!r}")
        check_int(num_train_timesteps, "num_train_timesteps", low=1)
        check_choices(("time_shift_type", time_shift_type, TIME_SHIFT_TYPES))
        if mu is not None:
            if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(mu) or (time_shift_type == "linear" and not mu > 0):
                bound = " > 0 (linear time shift)" if time_shift_type == "linear" else ""
                raise ValueError(f"mu: expected a finite float{bound}, got {mu!r}")
            if shift != 1.0:
                raise ValueError(f"shift: {shift!r} with mu: a static shift and dynamic shifting (mu) exclude "
                                 "each other")
            mu = float(mu)
        base = None if sigmas is None else _check_base_sigmas(sigmas, steps)
        self.steps, self.shift, self.num_train_timesteps = steps, float(shift), int(num_train_timesteps)
        self.mu, self.time_shift_type = mu, time_shift_type
        sig = flow_sigmas(steps, self.shift, self.num_train_timesteps, mu=mu, time_shift_type=time_shift_type,
                          sigmas=base)
        dt = sig[1:] - sig[:-1]
        # x <- x + dt v; x0 = x - sigma v (what a clip would clamp)
        coef = np.array([coef_row(A=1.0, B=d, PX=1.0, PM=-s, CX=1.0, CM=d) for d, s in zip(dt, sig[:-1])])
        self.plan = Plan(torch.from_numpy(sig[:-1].copy()), torch.from_numpy(coef),
                         torch.full((steps,), math.nan, dtype=torch.float64), None, "flow", "flow")

    @classmethod
    def from_diffusers(cls, config: dict, steps: int, mu: float | None = None, sigmas=None) -> "FlowEuler":
        """From a FlowMatchEulerDiscreteScheduler config: the scheduler after ``set_timesteps(steps, sigmas=sigmas,
        mu=mu)``. With ``use_dynamic_shifting`` the config's ``shift`` is unused and ``mu`` is required; without it
        ``mu`` is ignored, as ``set_timesteps`` ignores it."""
        cfg = config_items(config)
        unknown = set(cfg) - _FLOW_DIFFUSERS_KEYS
        if unknown:
            raise ValueError(f"config: unsupported FlowMatchEulerDiscreteScheduler keys {sorted(unknown)}")
        for key, inert in (("invert_sigmas", False), ("shift_terminal", None),
                           ("use_karras_sigmas", False), ("use_exponential_sigmas", False),
                           ("use_beta_sigmas", False), ("stochastic_sampling", False)):
            if cfg.get(key, inert) not in (inert, None) and cfg.get(key) != inert:
                raise ValueError(f"config: {key}={cfg[key]!r} is not supported by FlowEuler")
        ntt = config_value(cfg, "num_train_timesteps", int, 1000)
        if not config_value(cfg, "use_dynamic_shifting", bool, False):
            return cls(steps, shift=config_value(cfg, "shift", float, 1.0), num_train_timesteps=ntt, sigmas=sigmas)
        if mu is None:
            raise ValueError("mu: the config sets use_dynamic_shifting=True, so the sigma grid needs mu (as "
                             "set_timesteps(steps, mu=mu) does; pipelines compute it from the image size)")
        time_shift_type = cfg.get("time_shift_type") or "exponential"
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"config: time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        return cls(steps, num_train_timesteps=ntt, mu=mu, time_shift_type=time_shift_type, sigmas=sigmas)

    def __repr__(self):
        shifting = f"mu={self.mu}, time_shift_type={self.time_shift_type!r}" if self.mu is not None \
            else f"shift={self.shift}"
        return f"FlowEuler(steps={self.steps}, {shifting})"
