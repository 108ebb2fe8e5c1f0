"""Sigma-space solvers (fastguide.sigma_steps and its users fastguide.euler, fastguide.heun, fastguide.edm)
against diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler / HeunDiscreteScheduler /
EDMEulerScheduler driving the same model from the same noise (float64 tensors), over sigma schedules x spacings
x prediction types x final sigma and 4 / 8 / 25 steps; Euler-ancestral with diffusers' own per-step noise
replaced by fastguide's (so the comparison is exact); ReCFG at fractional model times and at Heun's stages;
classifier guidance; bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.edm import EDM
from fastguide.euler import Euler
from fastguide.heun import Heun
from gaussian_models import MEANS, NULL, SHAPE, gaussian_eps

diffusers = pytest.importorskip("diffusers")

BATCH = 3
TOL = 1e-4
LABELS = torch.tensor([0, 1, 2])


def diffusers_sample(cfg, steps, scheduler="EulerDiscreteScheduler", seeds=None, scale=3.0, monkeypatch=None):
    sch = getattr(diffusers, scheduler)(**cfg)
    sch.set_timesteps(steps)
    model = gaussian_eps(sch.alphas_cumprod.double())
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64) * sch.init_noise_sigma
    if seeds is not None:  # diffusers draws the ancestral noise itself: hand it fastguide's, step by step
        z = iter(fg.step_noise(seeds, steps, SHAPE, torch.float64))
        module = __import__(type(sch).__module__, fromlist=["randn_tensor"])
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: next(z))
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        out = model(torch.cat([xin, xin]), torch.full((2 * BATCH,), float(t), dtype=torch.float64),
                    torch.cat([LABELS, torch.full_like(LABELS, NULL)]))
        m_c, m_u = out.chunk(2)
        x = sch.step(m_u + scale * (m_c - m_u), t, x).prev_sample
    return x, sch, model


def ours(solver, model, rule=None, seeds=None, **kw):
    sampler = fg.Sampler(model, solver, rule or fg.CFG(3.0), null_cond=NULL, backend="torch", progress=False, **kw)
    return sampler.sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS, seeds=seeds)


EULER_CONFIGS = [
    pytest.param(dict(), id="linspace"),
    pytest.param(dict(use_karras_sigmas=True), id="karras"),
    pytest.param(dict(use_exponential_sigmas=True), id="exponential"),
    pytest.param(dict(use_beta_sigmas=True), id="beta"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1), id="leading-offset1"),
    pytest.param(dict(timestep_spacing="trailing"), id="trailing"),
    pytest.param(dict(prediction_type="v_prediction"), id="v"),
    pytest.param(dict(prediction_type="sample", final_sigmas_type="sigma_min"), id="sample-sigma-min"),
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True,
                      sigma_min=0.05, sigma_max=10.0), id="sd-karras-range"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", EULER_CONFIGS)
def test_euler_whole_sample_equals_diffusers(cfg, steps):
    want, sch, model = diffusers_sample(cfg, steps)
    solver = fg.solver_from_diffusers(sch, steps)
    assert isinstance(solver, Euler) and not solver.plan.stochastic
    np.testing.assert_allclose(solver.plan.timesteps.numpy(), sch.timesteps.numpy(), rtol=0, atol=1e-4)
    got = ours(solver, model)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - want).abs().max().item() <= TOL


ANCESTRAL_CONFIGS = [
    pytest.param(dict(), id="linspace"),
    pytest.param(dict(timestep_spacing="trailing", prediction_type="v_prediction"), id="trailing-v"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1), id="leading-offset1"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", ANCESTRAL_CONFIGS)
def test_euler_ancestral_equals_diffusers_with_the_same_noise(cfg, steps, monkeypatch):
    seeds = [21, 22, 23]
    want, sch, model = diffusers_sample(cfg, steps, "EulerAncestralDiscreteScheduler", seeds, monkeypatch=monkeypatch)
    solver = fg.solver_from_diffusers(sch, steps)
    assert isinstance(solver, Euler) and solver.ancestral and solver.plan.stochastic
    got = ours(solver, model, seeds=seeds)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - want).abs().max().item() <= TOL


def test_the_bound_can_fail_without_the_initial_noise_scale():
    want, sch, model = diffusers_sample(dict(beta_end=0.004), 8)  # sigma_max 2.6: init_noise_sigma / r_0 = 0.93
    solver = Euler.from_diffusers(sch.config, 8)
    unscaled = fg.Plan(**{**vars(solver.plan), "init_scale": 1.0})
    solver.plan = unscaled
    assert (ours(solver, model) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("ancestral", [False, True])
def test_euler_compiled_equals_eager(ancestral):
    _, sch, model = diffusers_sample(dict(), 6)
    solver = Euler(fg.NoiseSchedule.linear(), 6, ancestral=ancestral)
    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float32)
    seeds = [1, 2, 3] if ancestral else None
    eager = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, backend="torch", progress=False)
    compiled = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, progress=False).compile()
    torch.testing.assert_close(compiled.sample(noise, LABELS, seeds=seeds), eager.sample(noise, LABELS, seeds=seeds),
                               rtol=1e-5, atol=1e-5)


def test_recfg_reads_the_table_at_each_fractional_model_time(per_step_table):
    """Karras sigmas give fractional model times between the table's grid points: the rows used are the lerp
    at those times."""
    _, sch, model = diffusers_sample(dict(use_karras_sigmas=True), 7)
    solver = Euler.from_diffusers(sch.config, 7)
    assert (solver.plan.timesteps != solver.plan.timesteps.round()).any()
    grid = np.linspace(0, 999, 6)
    table = fg.RatioTable(0.5 + torch.rand(NULL + 1, len(grid), *SHAPE, dtype=torch.float64), grid)
    got = ours(solver, model, fg.ReCFG(3.0, table=table))
    want = ours(solver, model, fg.ReCFG(3.0, table=per_step_table(table, solver.plan.timesteps)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - ours(solver, model)).abs().max() > 1e-3


def test_euler_bad_options_are_named():
    schedule = fg.NoiseSchedule.linear()
    for kw, name in ((dict(sigma_schedule="cosine"), "sigma_schedule"), (dict(spacing="uniform"), "spacing"),
                     (dict(final_sigmas_type="one"), "final_sigmas_type"), (dict(ancestral=1), "ancestral"),
                     (dict(ancestral=True, sigma_schedule="karras"), "sigma_schedule"),
                     (dict(prediction_type="flow"), "prediction_type"), (dict(steps=0), "steps")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            Euler(schedule, **args)
    for cfg, key in ((dict(interpolation_type="log_linear"), "interpolation_type"), (dict(foo=1), "foo"),
                     (dict(timestep_type="continuous"), "timestep_type"),
                     (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            Euler.from_diffusers(cfg, 4)
    with pytest.raises(ValueError, match=r"^config: .*use_karras_sigmas"):
        Euler.from_diffusers(dict(use_karras_sigmas=True), 4, ancestral=True)


def test_classifier_guidance_uses_the_plans_scale_at_fractional_times():
    _, sch, model = diffusers_sample(dict(use_karras_sigmas=True), 5)
    solver = Euler.from_diffusers(sch.config, 5)
    weight = torch.randn(NULL, int(np.prod(SHAPE)), dtype=torch.float64)

    def classifier(x, t):
        return x.flatten(1).to(weight.dtype) @ weight.T * 0.3

    got = fg.Sampler(model, solver, fg.ClassifierGuidance(classifier, 2.0), backend="torch", progress=False).sample(
        fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64) * solver.plan.init_scale
    plan = solver.plan
    for i, t in enumerate(plan.timesteps):
        sigma = float(sch.sigmas[i])
        xg = x.clone().requires_grad_(True)
        logp = torch.log_softmax(classifier(xg, t), -1).gather(1, LABELS.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(logp, xg)
        eps = model(x, torch.full((BATCH,), float(t), dtype=torch.float64), LABELS) - 2.0 * sigma / (
            sigma * sigma + 1) ** 0.5 * grad
        x = plan.coef[i, 0] * x + plan.coef[i, 1] * eps
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


# ====================================================================== Heun
HEUN_CONFIGS = [
    pytest.param(dict(), id="linspace"),
    pytest.param(dict(use_karras_sigmas=True), id="karras"),
    pytest.param(dict(use_exponential_sigmas=True, prediction_type="v_prediction"), id="exponential-v"),
    pytest.param(dict(use_beta_sigmas=True), id="beta"),
    pytest.param(dict(timestep_spacing="trailing", prediction_type="sample"), id="trailing-sample"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1), id="leading-offset1"),
    pytest.param(dict(clip_sample=True, clip_sample_range=1.5), id="clip"),
    pytest.param(dict(beta_schedule="scaled_linear", use_karras_sigmas=True, prediction_type="v_prediction"),
                 id="sd-karras-v"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", HEUN_CONFIGS)
def test_heun_whole_sample_equals_diffusers(cfg, steps):
    want, sch, model = diffusers_sample(cfg, steps, "HeunDiscreteScheduler")
    solver = fg.solver_from_diffusers(sch, steps)
    assert isinstance(solver, Heun) and solver.plan.steps == 2 * steps - 1 == len(sch.timesteps)
    np.testing.assert_allclose(solver.plan.timesteps.numpy(), sch.timesteps.numpy(), rtol=0, atol=1e-4)
    got = ours(solver, model)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - want).abs().max().item() <= TOL


def test_heun_bound_can_fail_without_the_stored_state():
    want, sch, model = diffusers_sample(dict(), 6, "HeunDiscreteScheduler")
    solver = Heun.from_diffusers(sch.config, 6)
    h = solver.plan.history
    solver.plan = fg.Plan(**{**vars(solver.plan), "history": type(h)(h.weights * 0.9, h.write_slots, h.write_coef)})
    assert (ours(solver, model) - want).abs().max().item() > 1e-3


def test_heun_recfg_reads_each_stage_at_its_own_model_time(per_step_table):
    """Stage 2 of an interval evaluates at sigma_next: its table row is the one at that model time."""
    _, sch, model = diffusers_sample(dict(use_karras_sigmas=True), 5, "HeunDiscreteScheduler")
    solver = Heun.from_diffusers(sch.config, 5)
    times = solver.plan.timesteps
    assert torch.equal(times[1::2], times[2::2])  # stage 2 of interval i runs at stage 1 of interval i + 1's time
    grid = np.linspace(0, 999, 7)
    table = fg.RatioTable(0.5 + torch.rand(NULL + 1, len(grid), *SHAPE, dtype=torch.float64), grid)
    got = ours(solver, model, fg.ReCFG(3.0, table=table))
    want = ours(solver, model, fg.ReCFG(3.0, table=per_step_table(table, times)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got - ours(solver, model)).abs().max() > 1e-3


def test_heun_counts_two_evaluations_per_interval_and_runs_compiled_and_with_an_interval():
    _, sch, model = diffusers_sample(dict(), 5, "HeunDiscreteScheduler")
    solver = Heun.from_diffusers(sch.config, 5)
    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)

    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float32)
    eager = fg.Sampler(counted, solver, fg.CFG(3.0), null_cond=NULL, backend="torch", progress=False).sample(
        noise, LABELS)
    assert calls == [2 * BATCH] * 9
    compiled = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, progress=False).compile()
    torch.testing.assert_close(compiled.sample(noise, LABELS), eager, rtol=1e-5, atol=1e-5)
    ts = solver.plan.timesteps
    calls.clear()
    fg.Sampler(counted, solver, fg.CFG(3.0, interval=(float(ts[4]), float(ts[0]))), null_cond=NULL,
               backend="torch", progress=False).sample(noise, LABELS)
    assert calls == [2 * BATCH] * 5 + [BATCH] * 4


def test_heun_bad_options_are_named():
    schedule = fg.NoiseSchedule.linear()
    for kw, name in ((dict(sigma_schedule="cosine"), "sigma_schedule"), (dict(spacing="uniform"), "spacing"),
                     (dict(prediction_type="flow"), "prediction_type"), (dict(clip_sample_range=-1.0),
                     "clip_sample_range"), (dict(steps=0), "steps")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            Heun(schedule, **args)
    for cfg, key in ((dict(foo=1), "foo"), (dict(use_karras_sigmas=True, use_exponential_sigmas=True),
                                             "use_karras_sigmas"), (dict(clip_sample="yes"), "clip_sample")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            Heun.from_diffusers(cfg, 4)


# ====================================================================== EDM
SIGMA_DATA = 0.5


def edm_denoiser(x, sigma, c):
    """D(x; sigma): the exact denoiser of per-element Gaussian data N(mean_c, 0.3^2), plus a small nonlinearity."""
    s2 = sigma.to(x.dtype).view(-1, 1, 1, 1) ** 2
    return (x * 0.09 + MEANS[c].to(x.dtype) * s2) / (s2 + 0.09) + 0.05 * torch.tanh(x.roll(1, 1) / (1 + s2))


def edm_network(prediction_type):
    """The raw network F of diffusers' EDM schedulers for edm_denoiser: reads c_in x and c_noise = log(sigma)/4."""
    sign = 1.0 if prediction_type == "epsilon" else -1.0

    def net(x_in, t, c):
        sigma = torch.exp(4 * t.to(x_in.dtype)).view(-1, 1, 1, 1)
        norm = (sigma**2 + SIGMA_DATA**2).sqrt()
        x = x_in * norm
        c_skip, c_out = SIGMA_DATA**2 / norm**2, sign * sigma * SIGMA_DATA / norm
        return (edm_denoiser(x, sigma.flatten(), c) - c_skip * x) / c_out
    return net


def guided(model, x, t, scale=3.0):
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([LABELS, torch.full_like(LABELS, NULL)]))
    m_c, m_u = out.chunk(2)
    return m_u + scale * (m_c - m_u)


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", [pytest.param(dict(), id="karras-eps"),
                                 pytest.param(dict(prediction_type="v_prediction"), id="karras-v"),
                                 pytest.param(dict(sigma_schedule="exponential", sigma_max=20.0), id="exponential"),
                                 pytest.param(dict(final_sigmas_type="sigma_min", rho=5.0), id="sigma-min-rho5")])
def test_edm_euler_equals_diffusers(cfg, steps):
    sch = diffusers.EDMEulerScheduler(**cfg)
    sch.set_timesteps(steps)
    net = edm_network(sch.config.prediction_type)
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64) * sch.init_noise_sigma
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t)
        x = sch.step(guided(net, xin, torch.full((BATCH,), float(t), dtype=torch.float64)), t, x).prev_sample
    solver = fg.solver_from_diffusers(sch, steps)
    assert isinstance(solver, EDM) and not solver.heun and solver.plan.steps == steps
    np.testing.assert_allclose(solver.plan.timesteps.numpy(), sch.timesteps.numpy(), rtol=0, atol=1e-6)
    got = ours(solver, net)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - x).abs().max().item() <= TOL


def edm_algorithm_2(denoise, latents, steps, noise, sigma_min=0.002, sigma_max=80.0, rho=7.0, s_churn=0.0,
                    s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Karras et al. 2022, Algorithm 2, as the EDM release's edm_sampler writes it (float64); ``noise(i)``: the
    churn noise of interval i."""
    i = torch.arange(steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps.float().double(), torch.zeros(1, dtype=torch.float64)])  # float32 grid, as ours
    x_next = latents.double() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= t_cur <= s_tmax else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * s_noise * (noise(i) if gamma > 0 else 0.0)
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("steps", [4, 8, 18])
@pytest.mark.parametrize("churn", [pytest.param(dict(), id="deterministic"),
                                   pytest.param(dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
                                                id="churn")])
def test_edm_heun_equals_algorithm_2_with_the_same_noise(churn, steps):
    seeds = [31, 32, 33]
    solver = EDM(steps, **churn)
    assert solver.plan.steps == 2 * steps - 1 and solver.plan.stochastic == bool(churn)
    z = fg.step_noise(seeds, solver.plan.steps, SHAPE, torch.float64)
    # interval i's churn noise is added by the evaluation before it: the last one of interval i - 1
    want = edm_algorithm_2(lambda x, s: guided(edm_denoiser, x, s.expand(BATCH)),
                           fg.seeded_noise(range(BATCH), SHAPE, torch.float64), steps, lambda i: z[2 * i - 1], **churn)
    got = ours(solver, edm_denoiser, seeds=seeds)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - want).abs().max().item() <= TOL
    if churn:  # the bound can fail: the same run with other noise differs
        assert (ours(solver, edm_denoiser, seeds=[1, 2, 3]) - want).abs().max().item() > 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_heun_of_a_preconditioned_network_equals_its_denoiser(prediction_type):
    """The network through diffusers' own EDM preconditioning functions is the denoiser run by the sampler."""
    sch = diffusers.EDMEulerScheduler(prediction_type=prediction_type, sigma_data=SIGMA_DATA)
    net = edm_network(prediction_type)

    def denoiser(x, sigma, c):
        s = sigma.view(-1, 1, 1, 1)
        return sch.precondition_outputs(x, net(sch.precondition_inputs(x, s), sch.precondition_noise(sigma), c), s)

    solver, reference = EDM(6, prediction_type=prediction_type), EDM(6)
    got, want = ours(solver, net), ours(reference, denoiser)
    assert (got - want).abs().max().item() <= 1e-6


def test_edm_churn_at_the_first_sigma_widens_the_initial_noise():
    solver = EDM(5, s_churn=10.0)
    sigma0 = float(np.float32(80.0))
    assert solver.plan.init_scale == pytest.approx(sigma0 * (1 + min(10.0 / 5, 2**0.5 - 1)), rel=1e-6)


def test_edm_bad_options_are_named():
    for kw, name in ((dict(sigma_min=0.0), "sigma_min"), (dict(sigma_max=math.inf), "sigma_max"),
                     (dict(sigma_min=90.0), "sigma_min"), (dict(s_churn=-1.0), "s_churn"), (dict(rho="7"), "rho"),
                     (dict(heun=1), "heun"), (dict(prediction_type="sample"), "prediction_type"),
                     (dict(sigma_schedule="beta"), "sigma_schedule"), (dict(final_sigmas_type="sigma_min"),
                     "final_sigmas_type"), (dict(steps=1), "steps"), (dict(steps=0), "steps")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            EDM(**args)
    for cfg, key in ((dict(foo=1), "foo"), (dict(prediction_type="sample"), "prediction_type"),
                     (dict(sigma_max="80"), "sigma_max")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            EDM.from_diffusers(cfg, 4)


def test_classifier_guidance_of_an_edm_denoiser_equals_algorithm_2_with_the_guided_denoiser():
    """Classifier guidance adds grad log p(y | x) to the score, so a denoiser becomes D + sigma^2 grad (Algorithm 2
    written out with that denoiser is the reference)."""
    weight = torch.randn(NULL, int(np.prod(SHAPE)), dtype=torch.float64)

    def classifier(x, t):
        return x.flatten(1).to(weight.dtype) @ weight.T * 0.3

    def guided_denoiser(x, sigma):
        xg = x.clone().requires_grad_(True)
        logp = torch.log_softmax(classifier(xg, sigma), -1).gather(1, LABELS.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(logp, xg)
        return edm_denoiser(x, sigma.expand(BATCH), LABELS) + 2.0 * sigma**2 * grad

    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float64)
    want = edm_algorithm_2(guided_denoiser, noise, 5, None, sigma_max=10.0)
    got = fg.Sampler(edm_denoiser, EDM(5, sigma_max=10.0), fg.ClassifierGuidance(classifier, 2.0), backend="torch",
                     progress=False).sample(noise, LABELS)
    plain = fg.Sampler(edm_denoiser, EDM(5, sigma_max=10.0), fg.NoGuidance(), backend="torch",
                       progress=False).sample(noise, LABELS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the classifier runs in float32
    assert (got - plain).abs().max() > 1e-2
