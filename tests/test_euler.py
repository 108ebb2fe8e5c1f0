"""fastguide.euler: Euler and Euler-ancestral in sigma space against diffusers' EulerDiscreteScheduler /
EulerAncestralDiscreteScheduler driving the same model from the same noise (float64 tensors), over sigma
schedules x spacings x prediction types x final sigma and 4 / 8 / 25 steps; Euler-ancestral with diffusers' own
per-step noise replaced by fastguide's (so the comparison is exact); ReCFG; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.euler import Euler

diffusers = pytest.importorskip("diffusers")

SHAPE, BATCH, NULL = (2, 3, 5), 3, 5
TOL = 1e-4
_gen = torch.Generator().manual_seed(1)
MEANS = torch.randn(NULL + 1, *SHAPE, generator=_gen, dtype=torch.float64) * 0.5
LABELS = torch.tensor([0, 1, 2])


def gaussian_eps(abar):
    """The exact eps of per-element Gaussian data N(mean_c, 0.3^2) at a fractional training index (abar
    interpolated linearly), plus a small nonlinearity: samples stay O(1)."""
    def model(x, t, c):
        lo = t.floor().long().clamp(max=len(abar) - 2)
        w = (t - lo).view(-1, 1, 1, 1).to(x.dtype)
        a2 = (abar[lo].view(-1, 1, 1, 1) * (1 - w) + abar[lo + 1].view(-1, 1, 1, 1) * w).to(x.dtype)
        a, s = a2.sqrt(), (1 - a2).sqrt()
        return s * (x - a * MEANS[c].to(x.dtype)) / (a2 * 0.09 + s * s) + 0.05 * torch.tanh(x.roll(1, 1))
    return model


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
