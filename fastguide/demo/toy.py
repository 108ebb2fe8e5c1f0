"""The paper's Gaussian toy (arXiv 2410.18737, seed 000): how far CFG and ReCFG move the sample mean.

Data ``q0(x0 | c) = N(c, 1)``, ``q(c) = N(0, 1)``; VE process ``sigma_t^2 = t``, so
``q_t(x | c) = N(c, 1 + t)`` and ``q_t(x) = N(0, 2 + t)``; exact scores
``s_c = -(x - c) / (1 + t)``, ``s_u = -x / (2 + t)``. The guided probability-flow ODE
``dx/dt = -1/2 (g1 s_c + g0(t) s_u)`` is linear in x, so started from ``q_T(x | c)`` it ends at a
Gaussian ``N(c * phi, var)``. Three guidance rules (``RULES``):

    cfg            g0 = 1 - g
    paper          g0 = (1 - g) * E[eps_c] / E[eps_u]                  (ReCFG, the paper's estimator)
    least_squares  g0 = (1 - g) * E[eps_c eps_u] / E[eps_u^2]          (ReCFG, the authors' released code)

with expectations over ``x_t ~ q_t(x_t | c)``. Three independent ways to the answer (docs/toy.md):
:func:`mean_factor` / :func:`variance` (closed form), :func:`ode_moments` (numerical ODE) and
:func:`sampler_moments` (fastguide's own Sampler + DDIM with an analytic eps-model).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from scipy.integrate import quad, solve_ivp
from scipy.special import hyp2f1

from fastguide.guidance import CFG, CFGZeroStar, ReCFG
from fastguide.kernels.reference import compute_dtype_for
from fastguide.sampler import Sampler
from fastguide.schedule import NoiseSchedule
from fastguide.solvers import DDIM
from fastguide.table import RatioTable

RULES = ("cfg", "paper", "least_squares")


# ---------------------------------------------------------------------------------------- checks
def check_gamma(g) -> float:
    if isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating)):
        raise TypeError(f"gamma: expected a float, got {type(g).__name__}")
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"gamma: expected a finite guidance scale >= 0, got {g}")
    return float(g)


def check_T(T, allow_inf: bool = True) -> float:
    if isinstance(T, bool) or not isinstance(T, (int, float, np.integer, np.floating)):
        raise TypeError(f"T: expected a float, got {type(T).__name__}")
    if math.isnan(T) or T <= 0 or (math.isinf(T) and not allow_inf):
        raise ValueError(f"T: expected a {'' if allow_inf else 'finite '}start time > 0, got {T}")
    return float(T)


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    return rule


# ---------------------------------------------------------------------------------------- exact expectations
def expected_scores(c, t):
    """Exact moments of the scores over ``x_t ~ q_t(x_t | c)``, numpy-broadcast over c and t:
    ``(E[s_c], E[s_u], E[s_c s_u], E[s_u^2])``."""
    c, t = np.asarray(c, dtype=np.float64), np.asarray(t, dtype=np.float64)
    shape = np.broadcast(c, t).shape
    e_c = np.zeros(shape)  # E[-(x - c) / (1 + t)] = 0: the conditional score has zero mean
    e_u = np.broadcast_to(-c / (2 + t), shape)
    e_cu = np.broadcast_to(1 / (2 + t), shape)  # E[(x - c) x] / ((1 + t)(2 + t)) = Var(x) / (...)
    e_uu = np.broadcast_to((1 + t + c**2) / (2 + t) ** 2, shape)  # E[x^2] / (2 + t)^2
    return e_c, e_u, e_cu, e_uu


def expected_eps(c, t):
    """The same moments for the eps-model, eps = -sigma_t * score (VE, sigma^2 = t):
    ``(E[eps_c], E[eps_u], E[eps_c eps_u], E[eps_u^2])``."""
    e_c, e_u, e_cu, e_uu = expected_scores(c, t)
    sigma = np.sqrt(np.asarray(t, dtype=np.float64))
    return -sigma * e_c, -sigma * e_u, sigma**2 * e_cu, sigma**2 * e_uu


def ratio(rule: str, c, t):
    """The ReCFG ratio R(c, t) an estimator gives with exact expectations (1 for CFG).

    ``paper`` = E[eps_c] / E[eps_u] is 0 for every c != 0 (the numerator is exactly 0) and 0/0 = NaN
    at c = 0; ``least_squares`` = E[eps_c eps_u] / E[eps_u^2] = (2 + t) / (1 + t + c^2). Computed from
    the score moments: eps = -sigma * score, and the sigma factors cancel (so t = 0 is its limit too).
    """
    check_rule(rule)
    e_c, e_u, e_cu, e_uu = expected_scores(c, t)
    if rule == "cfg":
        return np.ones_like(e_c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return e_c / e_u if rule == "paper" else e_cu / e_uu


def guidance_ratio(rule: str, c, t):
    """:func:`ratio` with the paper estimator's 0/0 at c = 0 replaced by its limit 0 (what the sampler uses)."""
    r = ratio(rule, c, t)
    return np.where(np.isnan(r), 0.0, r) if rule == "paper" else r


# ---------------------------------------------------------------------------------------- closed form
def _uncond_offset(rule: str, c):
    """k with g0(t) s_u(x) = -(1 - g) x / (1 + t + k): 1 for CFG, c^2 for least squares, None (no term) for paper."""
    if rule == "cfg":
        return np.ones_like(np.asarray(c, dtype=np.float64))
    if rule == "least_squares":
        return np.asarray(c, dtype=np.float64) ** 2
    return None


def _integral_from_zero(x, k, a):
    """int_0^x (1 + k v^2)^a dv = x * 2F1(-a, 1/2; 3/2; -k x^2)."""
    return x * hyp2f1(-a, 0.5, 1.5, -k * x * x)


def _k_family(g: float, T: float, k):
    """(phi, var) for the guided score -g (x - c)/(1 + t) - (1 - g) x / (1 + t + k), started at N(c, 1 + T)."""
    a = (g - 1) / 2
    k = np.asarray(k, dtype=np.float64)
    if math.isinf(T):
        head, v0 = 0.0, 0.0
        var = (1 + k) ** (1 - g)
    else:
        # (1+k)^-a (1+T)^(-g/2) (1+T+k)^a, written so no factor over- or underflows for large T
        head = (1 + T) ** -0.5 * ((1 + T + k) / ((1 + T) * (1 + k))) ** a
        v0 = (1 + T) ** -0.5
        var = ((1 + k) * (1 + T) / (1 + T + k)) ** (1 - g)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        log_scale = -a * np.log1p(k)
        span = np.exp(log_scale) * (_integral_from_zero(1.0, k, a) - _integral_from_zero(v0, k, a))
        # the integral is positive; near the float range's ends (g in the hundreds) the product of a huge
        # hypergeometric and a tiny scale is inf, nan, 0 or imprecise
        bad = ~np.isfinite(span) | (span <= 0) | (np.abs(log_scale) > 600)
    phi = head + g * _integrate_where(bad, span, k, a, v0)
    return phi, var


def _integrate_where(bad, span, k, a: float, v0: float):
    """Replace span where ``bad`` by adaptive quadrature of the same integral's bounded integrand
    ((1 + k v^2) / (1 + k))^a <= 1."""
    span = np.array(span, dtype=np.float64)
    flat_span = span.reshape(-1)  # a view: writes land in span
    flat_k = np.broadcast_to(np.asarray(k, dtype=np.float64), span.shape).reshape(-1)
    for i in np.flatnonzero(np.broadcast_to(bad, span.shape).reshape(-1)):
        kk = float(flat_k[i])
        flat_span[i] = quad(lambda v: ((1 + kk * v * v) / (1 + kk)) ** a, v0, 1.0,
                            epsabs=0.0, epsrel=1e-12, limit=200)[0]
    return span


def mean_factor(g, T, rule: str = "cfg", c=1.0):
    """phi with E[x0 | c] = c * phi for the guided PF-ODE from q_T(x | c); T = inf gives the limit.

    Vectorised over c (phi depends on c only through ReCFG's ratio). For ``paper`` phi = 1.
    """
    g, T, rule = check_gamma(g), check_T(T), check_rule(rule)
    k = _uncond_offset(rule, c)
    if k is None:
        return np.ones_like(np.asarray(c, dtype=np.float64))[()]
    return _k_family(g, T, k)[0][()]


def variance(g, T, rule: str = "cfg", c=1.0):
    """Var[x0 | c] of the guided PF-ODE sample from q_T(x | c); T = inf gives the limit.

    CFG: 2^(1-g) (T+1) / ((T+1)^g (T+2)^(1-g)) -> 2^(1-g); paper: (1+T)^(1-g) -> 0 for g > 1.
    """
    g, T, rule = check_gamma(g), check_T(T), check_rule(rule)
    k = _uncond_offset(rule, c)
    if k is None:
        shape = np.asarray(c, dtype=np.float64).shape
        if math.isinf(T):
            return np.full(shape, 0.0 if g > 1 else (1.0 if g == 1 else math.inf))[()]
        return np.full(shape, (1 + T) ** (1 - g))[()]
    return np.asarray(_k_family(g, T, k)[1])[()]


@functools.lru_cache(maxsize=4)
def _normal_half_line_rule(nodes: int):
    """Nodes and weights of E_c[f(c)], c ~ N(0, 1), for even f: Gauss-Legendre on [0, 12]."""
    x, w = np.polynomial.legendre.leggauss(nodes)
    c = 6.0 * (x + 1.0)
    return c, 12.0 * w * np.exp(-c * c / 2) / math.sqrt(2 * math.pi)


def population_summary(g, T, rule: str = "cfg", nodes: int = 240) -> dict:
    """Averages over c ~ N(0, 1): the regression slope of E[x0 | c] on c, E_c[c^2 phi(c)] (1 = no shift),
    and the average conditional variance E_c[Var[x0 | c]] (1 = the data's).

    Gauss-Legendre on c in [0, 12] (both integrands are even; the tail beyond 12 weighs < 1e-31). phi(c)
    is analytic with its nearest singularities at c = +-i, which makes Gauss-Hermite converge slowly but
    costs Gauss-Legendre on this interval nothing at this many nodes (error ~ 1.18^(-2 nodes))."""
    g, T, rule = check_gamma(g), check_T(T), check_rule(rule)
    c, w = _normal_half_line_rule(nodes)
    return {"slope": float(np.sum(w * c * c * mean_factor(g, T, rule, c))),
            "mean_variance": float(np.sum(w * variance(g, T, rule, c)))}


# ---------------------------------------------------------------------------------------- numerical ODE
def ode_moments(g, T, rule: str = "cfg", c: float = 1.0, rtol: float = 1e-11, atol: float = 1e-13):
    """(phi, var) by integrating the guided PF-ODE's mean and variance numerically (DOP853); phi is NaN at c = 0.

    With s(x, t) = -(p(t) x - q(t) c): dmu/dt = (p mu - q c) / 2, d log(var)/dt = p, from (c, 1 + T) at
    t = T down to t = 0, in tau = log(1 + t) (the coefficients decay like 1/t); log(var) keeps the
    relative error small when the variance collapses. The ratio comes from
    :func:`guidance_ratio`, i.e. from the exact expectations, not from the closed form's substitution.
    """
    return guided_ode_moments(g, T, check_rule(rule), c, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------- CFG-Zero*, schedules
def zero_star_alpha(c, t, mu, var):
    """CFG-Zero*'s alpha = <s_c, s_u> / |s_u|^2 over a sample of D i.i.d. coordinates that are N(mu, var) at time
    t, as D -> infinity (the law of large numbers): E[s_c s_u] / E[s_u^2] under the *current* marginal,
    (2 + t) / (1 + t) * (var + mu (mu - c)) / (var + mu^2). Under the data's own conditional marginal
    (mu = c, var = 1 + t) this is the least-squares ReCFG ratio (2 + t) / (1 + t + c^2): CFG-Zero* is that
    estimator evaluated online, on the guided distribution instead of the data's. With D = 1 alpha s_u = s_c
    exactly, so the rule is the conditional model: phi = 1, var = 1 for every g."""
    return (2 + t) / (1 + t) * (var + mu * (mu - c)) / (var + mu * mu)


def schedule_position(t, T: float, sigma_min: float = 1e-3, rho: float = 7.0):
    """r in [0, 1] of time t on the rho-spaced VE grid of :func:`ve_sigmas` (0 at t = T, 1 at sigma_min): the
    step fraction i / (S - 1) that fastguide's named schedules read, in the continuous-time limit."""
    hi, lo = math.sqrt(T) ** (1 / rho), sigma_min ** (1 / rho)
    return np.clip((hi - np.sqrt(t) ** (1 / rho)) / (hi - lo), 0.0, 1.0)


def scheduled_gamma(g: float, schedule: str | None, t, T: float):
    """The guidance scale at time t: g - 1 shaped by a named schedule (fastguide.guidance.schedule_shape's
    formulas in r = schedule_position(t)), or g itself without one."""
    if schedule is None or schedule == "constant":
        return g
    from fastguide.guidance import SCHEDULES

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    r = schedule_position(t, T)
    shape = {"linear": 2 * r, "linear-decreasing": 2 * (1 - r), "cosine": 1 - np.cos(math.pi * r),
             "cosine-decreasing": 1 + np.cos(math.pi * r)}[schedule]
    return 1 + (g - 1) * shape


def guided_ode_moments(g, T, rule: str = "cfg", c: float = 1.0, schedule: str | None = None,
                       zero_init_to: float | None = None, rtol: float = 1e-10, atol: float = 1e-12):
    """(phi, var) of the guided PF-ODE for the rules without a closed form: ``rule`` "cfg" / "paper" /
    "least_squares" (table ratios) or "zero_star" (CFG-Zero*'s alpha in the many-coordinates limit, which depends
    on the current mean and variance: :func:`zero_star_alpha`), with a named scale ``schedule`` and, for
    ``zero_init_to``, CFG-Zero*'s zero-init: eps = 0 (x held where it is, in VE) from T down to that time."""
    g, T = check_gamma(g), check_T(T, allow_inf=False)
    if rule != "zero_star":
        check_rule(rule)
    c = float(c)
    start = T if zero_init_to is None else float(zero_init_to)
    if not 0 < start <= T:
        raise ValueError(f"zero_init_to: expected a time in (0, T], got {zero_init_to}")

    def rhs(tau, y):
        t = math.expm1(tau)
        gt = float(scheduled_gamma(g, schedule, t, T))
        mu, var = y[0], math.exp(y[1])
        r = zero_star_alpha(c, t, mu, var) if rule == "zero_star" else float(guidance_ratio(rule, c, t))
        p = gt / (1 + t) + (1 - gt) * r / (2 + t)
        q = gt / (1 + t)
        return [(1 + t) * 0.5 * (p * y[0] - q * c), (1 + t) * p]

    # x_T ~ N(c, 1 + T), unchanged through the zero-init steps (VE: eps = 0 keeps x)
    sol = solve_ivp(rhs, (math.log1p(start), 0.0), [c, math.log1p(T)], method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"ODE integration failed: {sol.message}")
    mu, log_var = sol.y[:, -1]
    return (float(mu) / c if c != 0 else math.nan), math.exp(log_var)


# ---------------------------------------------------------------------------------------- fastguide's Sampler
def ve_sigmas(T: float, steps: int, sigma_min: float = 1e-3, rho: float = 7.0) -> np.ndarray:
    """Ascending VE noise levels sigma_0 = sigma_min .. sigma_{steps-1} = sqrt(T) (Karras et al. rho-spacing)."""
    T = check_T(T, allow_inf=False)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps: expected an int >= 2, got {steps!r}")
    if not 0 < sigma_min < math.sqrt(T):
        raise ValueError(f"sigma_min: expected 0 < sigma_min < sqrt(T) = {math.sqrt(T):g}, got {sigma_min}")
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1 / rho), math.sqrt(T) ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ve_schedule(T: float, steps: int, sigma_min: float = 1e-3, rho: float = 7.0) -> NoiseSchedule:
    """A discrete schedule whose training index i is the VE level sigma_i: abar_i = 1 / (1 + sigma_i^2)
    (x_vp = sqrt(abar) x_ve). DDIM(eta=0) on all of its steps is Euler in sigma on the PF-ODE."""
    abar = 1.0 / (1.0 + ve_sigmas(T, steps, sigma_min, rho) ** 2)
    betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    return NoiseSchedule.from_betas(betas, timestep_spacing="trailing")


def toy_eps_model(schedule: NoiseSchedule, c_values: torch.Tensor):
    """Exact eps-model of the toy on ``schedule``: ids 0..K-1 mean c = c_values[id], id K is the null label.

    eps(x_vp) = -sigma * score_ve(x_ve) with x_ve = x_vp / sqrt(abar), sigma^2 = 1 / abar - 1.
    """
    sigma2_grid = 1.0 / schedule.alphas_cumprod - 1.0
    c_values = c_values.to(torch.float64)
    null = c_values.numel()

    def model(x, t, ids):
        sigma2 = sigma2_grid.to(x.device, x.dtype)[t.long()].view(-1, 1, 1, 1)
        x_ve = x * (1 + sigma2).sqrt()
        is_cond = (ids < null).view(-1, 1, 1, 1)
        c = c_values.to(x.device, x.dtype)[ids.clamp(max=null - 1)].view(-1, 1, 1, 1)
        score = torch.where(is_cond, -(x_ve - c) / (1 + sigma2), -x_ve / (2 + sigma2))
        return -sigma2.sqrt() * score

    return model


def toy_ratio_table(rule: str, schedule: NoiseSchedule, c_values, width: int = 1,
                    dtype: torch.dtype = torch.float64) -> RatioTable:
    """RatioTable [K+1, N, 1, 1, width] of exact ratios at every training index (the same value across the
    width; last row: the mean row, R = 1, which is also the least-squares ratio pooled over c ~ N(0, 1))."""
    sigma2 = (1.0 / schedule.alphas_cumprod - 1.0).numpy()
    c = np.asarray(c_values, dtype=np.float64).reshape(-1, 1)
    rows = np.concatenate([guidance_ratio(rule, c, sigma2[None, :]), np.ones((1, sigma2.size))])
    ratios = torch.from_numpy(rows).to(dtype).reshape(len(rows), sigma2.size, 1, 1, 1)
    ratios = ratios.expand(-1, -1, 1, 1, width).contiguous()
    return RatioTable(ratios, timesteps=np.arange(sigma2.size, dtype=np.float64))


def sampler_moments(g, T, rule: str = "cfg", c_values=(1.0,), samples: int = 16384, steps: int = 500,
                    seed: int = 0, backend: str = "torch", dtype: torch.dtype = torch.float64,
                    width: int = 256, device="cpu", schedule: str | None = None,
                    zero_init_steps: int = 0) -> list[dict]:
    """Run fastguide.Sampler + DDIM(eta=0) on the toy from x_T ~ q_T(x | c), per c in ``c_values``.

    The samples of one c lie along the last latent axis, ``width`` per batch row (noise
    [rows, 1, 1, width]), so a Triton launch covers many samples per program. Per c it returns
    ``ddim_phi`` / ``ddim_var``, the exact moments of the discretised sampler (it is affine in x_T, so
    its outputs for x_T = c and x_T = c + sqrt(1 + T), run in one extra row, give them; their gap to
    the ODE is the discretisation error), and ``mc_phi`` +- ``mc_phi_se``, ``mc_var`` +- ``mc_var_se``
    from ``samples`` draws (rounded up to a multiple of ``width``). The noise is drawn on the CPU, so
    ``device`` changes only where the sampler runs. ``rule`` "zero_star" runs fastguide.CFGZeroStar (its alpha
    over each row's ``width`` coordinates, with ``zero_init_steps``); ``schedule``: a named scale schedule.
    """
    g, T = check_gamma(g), check_T(T, allow_inf=False)
    rule = rule if rule == "zero_star" else check_rule(rule)
    for name, v, lo in (("samples", samples, 2), ("width", width, 2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    c_values = torch.as_tensor(c_values, dtype=torch.float64).reshape(-1)
    if c_values.numel() == 0 or (c_values == 0).any() or not torch.isfinite(c_values).all():
        raise ValueError(f"c_values: expected finite c != 0 (phi = E[x0|c] / c), got {c_values.tolist()}")
    sched = ve_schedule(T, steps)
    k, per_c = c_values.numel(), -(-samples // width)  # MC rows per c (+ 1 deterministic row)
    table_dtype = compute_dtype_for(dtype)
    if rule == "zero_star":
        guide = CFGZeroStar(g, zero_init_steps=zero_init_steps, schedule=schedule)
    elif rule == "cfg":
        guide = CFG(g, schedule=schedule)
    else:
        guide = ReCFG(g, toy_ratio_table(rule, sched, c_values.numpy(), width, table_dtype), schedule=schedule)
    sampler = Sampler(toy_eps_model(sched, c_values), DDIM(sched, steps=steps, eta=0.0), guide,
                      null_cond=k, backend=backend, progress=False)
    z = torch.randn((k, per_c, width), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    probe = torch.zeros((k, 1, width), dtype=torch.float64)
    probe[:, :, 1] = 1.0  # element 0: x_T = c, element 1: x_T = c + sqrt(1 + T)
    z = torch.cat([z, probe], dim=1)
    abar_T = float(sched.alphas_cumprod[-1])
    x_T = math.sqrt(abar_T) * c_values.view(k, 1, 1) + z  # = sqrt(abar_T) (c + sqrt(1 + T) z): N(c, 1 + T) in VE
    ids = torch.arange(k).repeat_interleave(per_c + 1)
    x_T = x_T.reshape(-1, 1, 1, width).to(device=device, dtype=dtype)
    x0 = sampler.sample(x_T, ids).to("cpu", torch.float64).view(k, per_c + 1, width)
    out = []
    for j, c in enumerate(c_values.tolist()):
        mc = x0[j, :per_c].reshape(-1)
        at_mean, at_plus1 = float(x0[j, per_c, 0]), float(x0[j, per_c, 1])
        n, m, v = mc.numel(), float(mc.mean()), float(mc.var())
        affine = rule != "zero_star"  # CFG-Zero*'s alpha makes the sampler nonlinear in x_T: no probe moments
        out.append({
            "c": c,
            "samples": n,
            "ddim_phi": at_mean / c if affine else None,
            "ddim_var": (at_plus1 - at_mean) ** 2 if affine else None,
            "mc_phi": m / c,
            "mc_phi_se": math.sqrt(v / n) / abs(c),
            "mc_var": v,
            "mc_var_se": v * math.sqrt(2.0 / (n - 1)),
        })
    return out
