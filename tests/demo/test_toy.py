"""The Gaussian toy (fastguide.demo.toy, docs/toy.md): closed form vs numerical ODE vs fastguide's Sampler.

Tolerances and why:
- closed form vs ODE: 1e-8 relative. The ODE is DOP853 at rtol 1e-11 (worst measured gap 6e-12 over
  g in [0, 30], T in [1e-3, 1e6], all rules), so 1e-8 leaves room for the integrator and nothing else.
- closed form vs an independent quadrature of the same integral: 1e-10 relative (quad at epsrel 1e-13).
- DDIM vs closed form: DDIM(eta=0) is Euler in sigma on the PF-ODE, first order. The test measures the
  sampler's exact moments (its outputs are affine in x_T) and checks (a) the error halves when the
  steps double (ratio in [1.85, 2.15]) and (b) the Richardson extrapolation 2 D(2N) - D(N) removes it
  to second order: measured residuals <= 3e-6 (phi) and 2.2e-3 relative (variance, worst case ReCFG-paper
  g=4) at N=500; the bounds are 1e-5 and 5e-3.
- Monte Carlo: 5 standard errors (fixed seed), against the discretised sampler's exact moments (pure MC
  error) and against the closed form plus the measured discretisation bias |DDIM - closed form|.
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from fastguide.demo import toy
from fastguide.cli import main

GAMMAS = [0.0, 0.5, 1.0, 2.5, 4.0, 12.0]
TIMES = [0.5, 10.0, 1000.0]
CASES = [("cfg", 1.0), ("cfg", -3.0), ("paper", 1.0), ("paper", -0.3), ("least_squares", 0.5),
         ("least_squares", 1.0), ("least_squares", -2.5)]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny element-wise tensors: extra intra-op threads only add contention on the shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_cfg_variance(g, T):
    """REFERENCE.md section 2 / seed 000, written out independently."""
    return 2 ** (1 - g) * (T + 1) / ((T + 1) ** g * (T + 2) ** (1 - g))


def quad_phi(g, T, k):
    """phi from the derivation's integral (docs/toy.md, eq. for phi_k), by adaptive quadrature."""
    a = (g - 1) / 2
    v0 = 0.0 if math.isinf(T) else (1 + T) ** -0.5
    head = 0.0 if math.isinf(T) else (1 + T) ** -0.5 * ((1 + T + k) / ((1 + T) * (1 + k))) ** a
    integral = quad(lambda v: ((1 + k * v * v) / (1 + k)) ** a, v0, 1.0, epsabs=0.0, epsrel=1e-13, limit=200)[0]
    return head + g * integral


def phi_limit_g4(k):
    """phi(g=4, T=inf) for uncond offset k (CFG: k=1, least squares: k=c^2) in elementary functions:
    4 (1+k)^(-3/2) int_0^1 (1+k v^2)^(3/2) dv, with int (1+u^2)^(3/2) du = u(2u^2+5)sqrt(1+u^2)/8 + 3 asinh(u)/8."""
    if k == 0:
        return 4.0
    u = math.sqrt(k)
    integral = (u * (2 * u * u + 5) * math.sqrt(1 + u * u) / 8 + 3 * math.asinh(u) / 8) / u
    return 4 * (1 + k) ** -1.5 * integral


# ---------------------------------------------------------------------------------------- closed form
@pytest.mark.parametrize("T", [0.1, 1.0, 10.0, 1000.0, 1e6])
@pytest.mark.parametrize("g", [0.0, 0.5, 1.0, 2.0, 4.0, 7.5, 12.0])
def test_cfg_variance_is_the_reference_formula(g, T):
    assert toy.variance(g, T) == pytest.approx(reference_cfg_variance(g, T), rel=1e-12)


@pytest.mark.parametrize("rule,c", CASES)
@pytest.mark.parametrize("T", TIMES)
@pytest.mark.parametrize("g", GAMMAS)
def test_closed_form_matches_numerical_ode(g, T, rule, c):
    phi_ode, var_ode = toy.ode_moments(g, T, rule, c)
    assert toy.mean_factor(g, T, rule, c) == pytest.approx(phi_ode, rel=1e-8)
    assert toy.variance(g, T, rule, c) == pytest.approx(var_ode, rel=1e-8)


@pytest.mark.parametrize("T", [10.0, math.inf])
@pytest.mark.parametrize("g", [0.5, 4.0, 40.0, 1000.0])
@pytest.mark.parametrize("k", [1.0, 0.25, 9.0])
def test_hypergeometric_matches_quadrature(g, T, k):
    # k = 1: CFG; k = c^2: least squares (k = 9 puts the hypergeometric's argument at -9, outside |z| < 1;
    # g = 1000 takes the overflow fallback)
    rule, c = ("cfg", 1.0) if k == 1.0 else ("least_squares", math.sqrt(k))
    assert toy.mean_factor(g, T, rule, c) == pytest.approx(quad_phi(g, T, k), rel=1e-10)


def test_vectorised_over_c():
    c = np.array([[0.5, -1.0], [2.0, 3.0]])
    phi, var = toy.mean_factor(4.0, 10.0, "least_squares", c), toy.variance(4.0, 10.0, "least_squares", c)
    assert phi.shape == var.shape == (2, 2)
    for idx in np.ndindex(2, 2):
        assert phi[idx] == toy.mean_factor(4.0, 10.0, "least_squares", float(c[idx]))
        assert var[idx] == toy.variance(4.0, 10.0, "least_squares", float(c[idx]))


@pytest.mark.parametrize("rule,c", CASES + [("least_squares", 0.0)])
@pytest.mark.parametrize("T", [0.5, 10.0, 1e6, math.inf])
def test_g_equal_one_has_no_shift_and_the_true_variance(T, rule, c):
    assert toy.mean_factor(1.0, T, rule, c) == pytest.approx(1.0, abs=1e-14)
    assert toy.variance(1.0, T, rule, c) == pytest.approx(1.0, abs=1e-14)


@pytest.mark.parametrize("g,phi", [(3, 2.0), (5, 7 / 3), (7, 12 / 5)])
def test_cfg_limit_exact_values_for_odd_g(g, phi):
    # odd g makes (1 + v^2)^((g-1)/2) a polynomial: phi(g) = g 2^((1-g)/2) int_0^1 (1 + v^2)^((g-1)/2) dv;
    # g=3: 3/2 * 4/3 = 2; g=5: 5/4 * 28/15 = 7/3; g=7: 7/8 * 96/35 = 12/5
    assert toy.mean_factor(g, math.inf) == pytest.approx(phi, rel=1e-14)
    assert toy.variance(g, math.inf) == pytest.approx(2.0 ** (1 - g), rel=1e-14)


def test_cfg_limit_is_not_monotone_and_tends_to_two():
    phi = {g: toy.mean_factor(g, math.inf) for g in (1.0, 2.0, 4.0, 7.0, 12.0, 100.0, 1000.0)}
    assert 1 < phi[2.0] < phi[4.0] < phi[7.0]  # the shift grows up to g ~ 7 ...
    assert phi[7.0] > phi[12.0] > phi[100.0] > phi[1000.0] > 2.0  # ... then falls back towards 2
    for g in (100.0, 1000.0):
        assert 0 < phi[g] - 2.0 < 3.0 / g  # phi(g) = 2 + O(1/g) (Laplace at v = 1)


@pytest.mark.parametrize("g", [0.5, 2.0, 4.0, 12.0])
def test_T_to_infinity_limit_and_rate(g):
    # phi(g, T) - phi(g, inf) = (1 - g) 2^((1-g)/2) (1+T)^(-1/2) (1 + O(1/T)): the limit and its T^(-1/2) rate
    for T in (1e6, 1e10):
        lead = (1 - g) * 2 ** ((1 - g) / 2) * (1 + T) ** -0.5
        assert toy.mean_factor(g, T) - toy.mean_factor(g, math.inf) == pytest.approx(lead, rel=1e-4)
    assert toy.variance(g, 1e12) == pytest.approx(toy.variance(g, math.inf), rel=1e-10)


# ---------------------------------------------------------------------------------------- ReCFG
def test_exact_expectations_and_ratios():
    t = np.array([0.0, 0.5, 10.0, 1e4])
    for c in (-2.0, 0.3, 1.0):
        e_c, e_u, e_cu, e_uu = toy.expected_eps(c, t)
        sigma = np.sqrt(t)
        np.testing.assert_array_equal(e_c, 0.0)  # the conditional eps has mean zero over q_t(x|c)
        np.testing.assert_allclose(e_u, sigma * c / (2 + t), rtol=1e-15)
        np.testing.assert_array_equal(toy.ratio("paper", c, t[1:]), 0.0)
        np.testing.assert_allclose(toy.ratio("least_squares", c, t), (2 + t) / (1 + t + c * c), rtol=1e-14)
    # at c = 0 the paper estimator is 0/0: E[eps_u] vanishes linearly in c
    assert np.isnan(toy.ratio("paper", 0.0, 5.0))
    assert toy.guidance_ratio("paper", 0.0, 5.0) == 0.0
    assert toy.expected_eps(1e-6, 5.0)[1] == pytest.approx(1e-6 * math.sqrt(5.0) / 7.0, rel=1e-12)
    np.testing.assert_array_equal(toy.ratio("least_squares", 1.0, t), 1.0)  # |c| = 1: least squares is CFG


@pytest.mark.parametrize("c", [-2.0, 0.5, 1.5])
def test_eps_model_and_expectations_by_monte_carlo(c):
    """The analytic eps-model on the VE-as-VP schedule, averaged over x_t ~ q_t(x|c), gives expected_eps."""
    sched = toy.ve_schedule(10.0, 64)
    model = toy.toy_eps_model(sched, torch.tensor([c]))
    n, gen = 200_000, torch.Generator().manual_seed(7)
    for i in (5, 40, 63):
        abar = float(sched.alphas_cumprod[i])
        t = 1 / abar - 1
        x_ve = c + math.sqrt(1 + t) * torch.randn(n, generator=gen, dtype=torch.float64)  # q_t(x|c) = N(c, 1+t)
        x = (math.sqrt(abar) * x_ve).view(n, 1, 1, 1)
        ts = torch.full((n,), float(i), dtype=torch.float64)
        eps_c = model(x, ts, torch.zeros(n, dtype=torch.long)).view(-1)
        eps_u = model(x, ts, torch.ones(n, dtype=torch.long)).view(-1)
        expected = toy.expected_eps(c, t)
        for got, want in zip((eps_c, eps_u, eps_c * eps_u, eps_u * eps_u), expected):
            se = float(got.std()) / math.sqrt(n)
            assert abs(float(got.mean()) - float(want)) < 5 * se


@pytest.mark.parametrize("T", [10.0, 1000.0, math.inf])
@pytest.mark.parametrize("g", [0.5, 2.0, 4.0, 12.0])
def test_paper_estimator_restores_the_mean_and_collapses_the_variance(g, T):
    # R = 0 exactly, so ReCFG-paper is eps = g * eps_c: x0 - c = (x_T - c) (1+T)^(-g/2)
    for c in (-2.0, 0.5, 3.0):
        assert toy.mean_factor(g, T, "paper", c) == 1.0
        want = (0.0 if g > 1 else math.inf) if math.isinf(T) else (1 + T) ** (1 - g)
        assert toy.variance(g, T, "paper", c) == want


@pytest.mark.parametrize("T", [10.0, math.inf])
def test_least_squares_estimator_shift(T):
    g = 4.0
    for c in (1.0, -1.0):  # R = 1: exactly CFG
        assert toy.mean_factor(g, T, "least_squares", c) == toy.mean_factor(g, T, "cfg", c)
        assert toy.variance(g, T, "least_squares", c) == toy.variance(g, T, "cfg", c)
    cfg = toy.mean_factor(g, T)
    assert toy.mean_factor(g, T, "least_squares", 0.5) > cfg  # R > 1 for |c| < 1: more shift than CFG
    assert 1.0 < toy.mean_factor(g, T, "least_squares", 2.0) < cfg  # R < 1 for |c| > 1: less
    pop = toy.population_summary(g, T, "least_squares")
    assert 1.0 < pop["slope"] < cfg  # on average over c ~ N(0, 1) it removes part of the shift
    assert toy.population_summary(g, T, "cfg")["slope"] == pytest.approx(cfg, rel=1e-12)
    if math.isinf(T):  # the numbers docs/toy.md quotes, from elementary integrals
        assert cfg == pytest.approx(phi_limit_g4(1.0), rel=1e-13)
        assert round(cfg, 4) == 2.2174
        assert toy.mean_factor(g, T, "least_squares", 2.0) == pytest.approx(phi_limit_g4(4.0), rel=1e-13)
        assert round(phi_limit_g4(4.0), 4) == 1.3968
        density = lambda c: math.exp(-c * c / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        slope = quad(lambda c: c * c * density(c) * phi_limit_g4(c * c), -12, 12, epsabs=1e-13, limit=200)[0]
        assert pop["slope"] == pytest.approx(slope, rel=1e-9)
        assert round(slope, 4) == 1.8078


# ---------------------------------------------------------------------------------------- fastguide's Sampler
def test_ve_schedule_is_the_ve_process():
    T, steps = 10.0, 300
    sched = toy.ve_schedule(T, steps)
    sigma2 = 1 / sched.alphas_cumprod.numpy() - 1
    np.testing.assert_allclose(np.sqrt(sigma2), toy.ve_sigmas(T, steps), rtol=1e-10)
    assert sigma2[-1] == pytest.approx(T, rel=1e-12)
    assert np.all(np.diff(sigma2) > 0)


@pytest.mark.parametrize("g", [2.5, 4.0])
@pytest.mark.parametrize("rule", toy.RULES)
def test_ddim_converges_to_the_closed_form_at_first_order(rule, g):
    T, cs = 10.0, (1.0, -2.0)
    runs = {n: toy.sampler_moments(g, T, rule, cs, samples=2, width=2, steps=n) for n in (500, 1000)}
    for j, c in enumerate(cs):
        phi, var = toy.mean_factor(g, T, rule, c), toy.variance(g, T, rule, c)
        coarse, fine = runs[500][j], runs[1000][j]
        for key, exact, tol in (("ddim_phi", phi, 1e-5), ("ddim_var", var, 5e-3)):
            err_coarse, err_fine = coarse[key] - exact, fine[key] - exact
            if rule == "paper" and key == "ddim_phi":  # x_T = c is a fixed point of g * eps_c: exact
                assert abs(err_coarse) < 1e-12 and abs(err_fine) < 1e-12
                continue
            assert 1.85 < err_coarse / err_fine < 2.15, (key, err_coarse, err_fine)
            assert abs(2 * fine[key] - coarse[key] - exact) < tol * abs(exact), key
        assert abs(fine["ddim_phi"] - phi) < 2e-3 * phi  # measured worst 1.05e-3 at 1000 steps


@pytest.mark.parametrize("rule", toy.RULES)
def test_monte_carlo_through_the_sampler(rule):
    g, T, cs = 4.0, 10.0, (1.0, -2.0, 0.5)
    for r in toy.sampler_moments(g, T, rule, cs, samples=16384, steps=500, seed=3):
        assert r["samples"] == 16384
        # pure Monte Carlo error: against the discretised sampler's own exact moments
        assert abs(r["mc_phi"] - r["ddim_phi"]) < 5 * r["mc_phi_se"]
        assert abs(r["mc_var"] - r["ddim_var"]) < 5 * r["mc_var_se"]
        # against the closed form: MC error plus the measured discretisation bias
        phi, var = toy.mean_factor(g, T, rule, r["c"]), toy.variance(g, T, rule, r["c"])
        assert abs(r["mc_phi"] - phi) < 5 * r["mc_phi_se"] + abs(r["ddim_phi"] - phi)
        assert abs(r["mc_var"] - var) < 5 * r["mc_var_se"] + abs(r["ddim_var"] - var)


def test_zero_star_alpha_on_the_data_marginal_is_the_least_squares_ratio():
    """CFG-Zero*'s many-coordinates alpha, evaluated on q_t(x | c) = N(c, 1 + t), is ReCFG's least-squares ratio."""
    c, t = np.array([-2.0, 0.5, 1.0, 3.0])[:, None], np.array([0.0, 0.3, 4.0, 100.0])[None, :]
    np.testing.assert_allclose(toy.zero_star_alpha(c, t, c, 1 + t), toy.ratio("least_squares", c, t), rtol=1e-13)


@pytest.mark.parametrize("rule, c", [("cfg", 1.0), ("least_squares", 2.0), ("paper", -0.5)])
def test_guided_ode_without_schedule_is_the_closed_form(rule, c):
    for g, T in ((2.5, 10.0), (4.0, 100.0)):
        phi, var = toy.guided_ode_moments(g, T, rule, c)
        assert phi == pytest.approx(float(toy.mean_factor(g, T, rule, c)), rel=1e-8)
        assert var == pytest.approx(float(toy.variance(g, T, rule, c)), rel=1e-7)


def test_schedule_position_runs_over_the_sampler_grid():
    sig = toy.ve_sigmas(100.0, 11)
    r = toy.schedule_position(sig[::-1] ** 2, 100.0)  # the plan's steps run from sigma_max down
    np.testing.assert_allclose(r, np.linspace(0, 1, 11), atol=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear-decreasing"])
def test_scheduled_sampler_converges_to_the_scheduled_ode(schedule):
    """fastguide's Sampler with a named schedule (its exact discretised moments) against the ODE with the same
    schedule in continuous time: first order in the steps (the error halves when the steps double)."""
    g, T, c = 4.0, 10.0, 2.0
    phi, var = toy.guided_ode_moments(g, T, "cfg", c, schedule=schedule)
    errs = []
    for n in (400, 800):
        r = toy.sampler_moments(g, T, "cfg", (c,), samples=2, width=2, steps=n, schedule=schedule)[0]
        errs.append((r["ddim_phi"] - phi, r["ddim_var"] - var))
    for k in range(2):
        assert 1.7 < errs[0][k] / errs[1][k] < 2.3, errs
    assert abs(errs[1][0]) < 5e-3 * phi and abs(errs[1][1]) < 2e-2 * var


def test_zero_star_sampler_matches_the_many_coordinates_ode():
    """CFGZeroStar over rows of 256 i.i.d. coordinates (Monte Carlo through the Sampler) against the ODE with alpha
    in the D -> infinity limit: the mean factor within the discretisation and finite-D error (measured 2.5e-3 at
    500 steps), and far from CFG's."""
    g, T, c = 4.0, 100.0, 2.0
    phi, _ = toy.guided_ode_moments(g, T, "zero_star", c)
    r = toy.sampler_moments(g, T, "zero_star", (c,), samples=4096, steps=500, width=256, seed=1)[0]
    assert r["ddim_phi"] is None  # the rule is not affine in x_T
    assert abs(r["mc_phi"] - phi) < 0.01 + 5 * r["mc_phi_se"]
    assert abs(r["mc_phi"] - float(toy.mean_factor(g, T, "cfg", c))) > 0.5


def test_sampler_moments_is_seeded():
    a = toy.sampler_moments(2.0, 5.0, "least_squares", (1.5,), samples=512, width=256, steps=20, seed=11)
    b = toy.sampler_moments(2.0, 5.0, "least_squares", (1.5,), samples=512, width=256, steps=20, seed=11)
    c = toy.sampler_moments(2.0, 5.0, "least_squares", (1.5,), samples=512, width=256, steps=20, seed=12)
    assert a == b and a[0]["mc_phi"] != c[0]["mc_phi"] and a[0]["ddim_phi"] == c[0]["ddim_phi"]


@pytest.mark.parametrize("rule", ["cfg", "least_squares"])
def test_triton_backend_matches_torch(rule):
    pytest.importorskip("triton")
    pytest.importorskip("fastguide.kernels.guided_step")
    # the interpreter (CPU tensors) by default; the GPU when the suite runs with FASTGUIDE_TEST_CUDA=1
    device = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available() else "cpu"
    kw = dict(c_values=(1.0, -2.0), samples=256, width=256, steps=40, seed=5, dtype=torch.float32, device=device)
    got = toy.sampler_moments(4.0, 10.0, rule, backend="triton", **kw)
    ref = toy.sampler_moments(4.0, 10.0, rule, backend="torch", **kw)
    ref64 = toy.sampler_moments(4.0, 10.0, rule, backend="torch", **{**kw, "dtype": torch.float64})
    for a, b, b64 in zip(got, ref, ref64):
        for key in ("ddim_phi", "ddim_var", "mc_phi", "mc_var"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key  # same float32 arithmetic
            assert a[key] == pytest.approx(b64[key], rel=1e-4), key  # float32 rounding over 40 steps


# ---------------------------------------------------------------------------------------- CLI and input errors
def test_cli_json(capsys):
    rc = main(["toy", "--gamma", "4", "--T", "10", "--json", "--steps", "100", "--samples", "2048",
               "--c", "1", "-2"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["gamma"] == 4.0 and res["T"] == 10.0
    rows = {(r["rule"], r["c"]): r for r in res["rows"]}
    assert set(rows) == {(rule, c) for rule in toy.RULES for c in (1.0, -2.0)}
    cfg = rows[("cfg", 1.0)]
    assert cfg["variance"]["closed"] == pytest.approx(reference_cfg_variance(4.0, 10.0), rel=1e-12)
    assert cfg["variance"]["limit"] == pytest.approx(2.0 ** -3, rel=1e-12)
    assert cfg["phi"]["limit"] == pytest.approx(2.217419, abs=1e-6)
    for r in res["rows"]:
        assert r["phi"]["ode"] == pytest.approx(r["phi"]["closed"], rel=1e-8)
        assert abs(r["phi"]["mc"] - r["phi"]["ddim"]) < 5 * r["phi"]["mc_se"]
    assert rows[("paper", -2.0)]["phi"]["closed"] == 1.0
    assert res["population"]["paper"]["limit"]["slope"] == pytest.approx(1.0, abs=1e-12)


def test_cli_text_and_plot(tmp_path, capsys):
    out = tmp_path / "phi.png"
    assert main(["toy", "--gamma", "3", "--samples", "0", "--plot", str(out)]) == 0
    text = capsys.readouterr().out
    assert "CFG" in text and "ReCFG paper" in text and "ReCFG lsq" in text and f"wrote {out}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["--gamma", "-1"], "gamma"),
    (["--gamma", "nan"], "gamma"),
    (["--T", "0"], "T:"),
    (["--T", "-5"], "T:"),
    (["--steps", "1"], "--steps"),
    (["--c", "0"], "--c"),
    (["--plot", "/nonexistent-dir/x.png"], "--plot"),
    (["--device", "no-such-device"], "--device"),
])
def test_cli_bad_input_is_one_line(argv, needle, capsys):
    assert main(["toy", "--samples", "0", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_cli_plot_into_a_directory_is_an_error(tmp_path, capsys):
    assert main(["toy", "--samples", "0", "--plot", str(tmp_path)]) == 2
    assert "--plot" in capsys.readouterr().err


@pytest.mark.parametrize("call,exc,needle", [
    (lambda: toy.mean_factor(-0.5, 10.0), ValueError, "gamma"),
    (lambda: toy.mean_factor(True, 10.0), TypeError, "gamma"),
    (lambda: toy.variance(2.0, 0.0), ValueError, "T"),
    (lambda: toy.variance(2.0, "10"), TypeError, "T"),
    (lambda: toy.mean_factor(2.0, 10.0, "rescaled"), ValueError, "rule"),
    (lambda: toy.ode_moments(2.0, math.inf), ValueError, "T"),
    (lambda: toy.sampler_moments(2.0, 10.0, "cfg", (0.0,)), ValueError, "c_values"),
    (lambda: toy.sampler_moments(2.0, 10.0, "cfg", (1.0,), samples=1), ValueError, "samples"),
    (lambda: toy.ve_sigmas(10.0, 1), ValueError, "steps"),
])
def test_library_bad_input(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()
