"""fastguide.multistep: DPM-Solver / DPM-Solver++ and UniPC plans against diffusers' DPMSolverMultistepScheduler /
UniPCMultistepScheduler driving the same model from the same noise (float64 tensors, so what differs is only how
the step is computed), over grids of algorithm x order x solver type x sigma schedule x spacing x
lower_order_final x prediction type (x corrector) and 4 / 8 / 25 steps; the SDE variants with the same per-step
noise; compiled == eager; ReCFG, intervals; bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.multistep import DPMSolver, UniPC

diffusers = pytest.importorskip("diffusers")

SHAPE, BATCH, NULL = (2, 3, 5), 3, 5
TOL = 1e-4
_gen = torch.Generator().manual_seed(0)
MIX = torch.randn(SHAPE[0], SHAPE[0], generator=_gen, dtype=torch.float64) * 0.3
MEANS = torch.randn(NULL + 1, *SHAPE, generator=_gen, dtype=torch.float64) * 0.5
LABELS = torch.tensor([0, 1, 2])


def gaussian_eps(abar):
    """The exact eps of per-element Gaussian data N(mean_c, 0.3^2), perturbed by a small nonlinear channel mix:
    samples stay O(1), as a trained model's do."""
    def model(x, t, c):
        a = abar[t.long()].sqrt().view(-1, 1, 1, 1).to(x.dtype)
        s = (1 - a * a).sqrt()
        eps = s * (x - a * MEANS[c].to(x.dtype)) / (a * a * 0.09 + s * s)
        return eps + 0.05 * torch.tanh((MIX.to(x.dtype)[None, :, :, None, None] * x[:, None]).sum(2))
    return model


def diffusers_sample(cfg, steps, scale=3.0, seeds=None, scheduler="DPMSolverMultistepScheduler"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dpmsolver / sde-dpmsolver are deprecated upstream
        sch = getattr(diffusers, scheduler)(**cfg)
    sch.set_timesteps(steps)
    model = gaussian_eps(sch.alphas_cumprod.double())
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64)
    z = None if seeds is None else fg.step_noise(seeds, steps, SHAPE, torch.float64)
    for i, t in enumerate(sch.timesteps):
        out = model(torch.cat([x, x]), torch.full((2 * BATCH,), float(t), dtype=torch.float64),
                    torch.cat([LABELS, torch.full_like(LABELS, NULL)]))
        m_c, m_u = out.chunk(2)
        kw = {} if z is None else {"variance_noise": z[i]}
        x = sch.step(m_u + scale * (m_c - m_u), t, x, **kw).prev_sample
    return x, sch, model


def ours(solver, model, scale=3.0, seeds=None, **kw):
    sampler = fg.Sampler(model, solver, fg.CFG(scale), null_cond=NULL, backend="torch", progress=False, **kw)
    return sampler


CONFIGS = [
    pytest.param(dict(), id="dpm++2m"),
    pytest.param(dict(solver_order=3), id="dpm++3m"),
    pytest.param(dict(solver_order=1), id="dpm++1"),
    pytest.param(dict(solver_type="heun"), id="dpm++2m-heun"),
    pytest.param(dict(use_karras_sigmas=True), id="dpm++2m-karras"),
    pytest.param(dict(use_karras_sigmas=True, solver_order=3, lower_order_final=False), id="dpm++3m-karras-nolof"),
    pytest.param(dict(use_exponential_sigmas=True), id="dpm++2m-exponential"),
    pytest.param(dict(use_beta_sigmas=True, solver_order=3), id="dpm++3m-beta"),
    pytest.param(dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), id="dpm2m"),
    pytest.param(dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3), id="dpm3m"),
    pytest.param(dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_type="heun"), id="dpm2m-heun"),
    pytest.param(dict(prediction_type="v_prediction"), id="v"),
    pytest.param(dict(prediction_type="sample"), id="sample"),
    pytest.param(dict(prediction_type="v_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
                 id="dpm-v"),
    pytest.param(dict(timestep_spacing="trailing"), id="trailing"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1), id="leading-offset1"),
    pytest.param(dict(euler_at_final=True, lower_order_final=False, final_sigmas_type="sigma_min"), id="euler-final"),
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True),
                 id="sd-karras"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"), id="cosine-v"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_whole_sample_equals_diffusers(cfg, steps):
    want, sch, model = diffusers_sample(cfg, steps)
    solver = DPMSolver.from_diffusers(sch.config, steps)
    np.testing.assert_array_equal(solver.plan.timesteps.numpy(), sch.timesteps.numpy())
    got = ours(solver, model).sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5  # O(1) samples, not a degenerate run
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("cfg", [pytest.param(dict(algorithm_type="sde-dpmsolver++"), id="sde-dpm++2m"),
                                 pytest.param(dict(algorithm_type="sde-dpmsolver++", solver_order=3), id="sde-dpm++3m"),
                                 pytest.param(dict(algorithm_type="sde-dpmsolver++", solver_type="heun",
                                                   use_karras_sigmas=True), id="sde-dpm++2m-heun-karras"),
                                 pytest.param(dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
                                              id="sde-dpm2m")])
@pytest.mark.parametrize("steps", [4, 8, 25])
def test_sde_variants_equal_diffusers_with_the_same_noise(cfg, steps):
    seeds = [11, 12, 13]
    want, sch, model = diffusers_sample(cfg, steps, seeds=seeds)
    solver = DPMSolver.from_diffusers(sch.config, steps)
    assert solver.plan.stochastic
    got = ours(solver, model).sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS, seeds=seeds)
    # noise-prediction SDE-DPM blows up at 4 steps (|x| ~ 400, in diffusers too): there the bound is relative
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item() / 10)


def test_the_parity_bound_can_fail_for_a_wrong_order():
    want, sch, model = diffusers_sample(dict(solver_order=3), 8)
    wrong = DPMSolver(fg.NoiseSchedule.from_diffusers(dict(timestep_spacing="linspace"), float32_arithmetic=True), 8,
                      order=2)
    got = ours(wrong, model).sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)
    assert (got - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("order", [2, 3])
def test_compiled_and_eager_and_reference_steps_agree(order):
    """The history states run through the host-scalar step, the reference (compiled hot step) and back."""
    _, sch, model = diffusers_sample(dict(solver_order=order), 6)
    solver = DPMSolver.from_diffusers(sch.config, 6)
    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float32)
    eager = ours(solver, model).sample(noise, LABELS)
    compiled = ours(solver, model).compile()
    for _ in range(2):  # a second call refills (and re-zeroes) the same history buffers
        torch.testing.assert_close(compiled.sample(noise, LABELS), eager, rtol=1e-5, atol=1e-5)


def test_recfg_and_an_interval_run_with_a_multistep_plan():
    _, sch, model = diffusers_sample(dict(), 8)
    solver = DPMSolver.from_diffusers(sch.config, 8)
    ts = solver.plan.timesteps
    unit = fg.RatioTable(torch.ones(NULL + 1, 8, *SHAPE, dtype=torch.float64))  # R = 1: exactly CFG
    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float64)
    cfg = ours(solver, model).sample(noise, LABELS)
    recfg = fg.Sampler(model, solver, fg.ReCFG(3.0, table=unit), null_cond=NULL, backend="torch",
                       progress=False).sample(noise, LABELS)
    assert torch.equal(recfg, cfg)
    half = fg.Sampler(model, solver, fg.CFG(3.0, interval=(float(ts[3]), float(ts[0]))), null_cond=NULL,
                      backend="torch", progress=False).sample(noise, LABELS)
    assert torch.isfinite(half).all() and (half - cfg).abs().max() > 1e-3


def test_bad_options_are_named():
    schedule = fg.NoiseSchedule.linear()
    for kw, name in ((dict(order=4), "order"), (dict(order=3, steps=2), "order"), (dict(algorithm_type="ddim"),
                     "algorithm_type"), (dict(solver_type="rk4"), "solver_type"),
                     (dict(final_sigmas_type="one"), "final_sigmas_type"), (dict(sigma_schedule="cosine"),
                     "sigma_schedule"), (dict(spacing="uniform"), "spacing"), (dict(lower_order_final=1),
                     "lower_order_final"), (dict(algorithm_type="dpmsolver"), "final_sigmas_type"),
                     (dict(algorithm_type="sde-dpmsolver", order=3, final_sigmas_type="sigma_min"), "order"),
                     (dict(prediction_type="flow"), "prediction_type")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            DPMSolver(schedule, **args)
    for cfg, key in ((dict(thresholding=True), "thresholding"), (dict(use_lu_lambdas=True), "use_lu_lambdas"),
                     (dict(variance_type="learned_range"), "variance_type"), (dict(foo=1), "foo"),
                     (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas"),
                     (dict(solver_order="2"), "solver_order")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            DPMSolver.from_diffusers(cfg, 4)


@pytest.mark.parametrize("scheduler,cfg", [("DPMSolverMultistepScheduler", dict(solver_order=3)),
                                           ("UniPCMultistepScheduler", dict(solver_order=3))],
                         ids=["dpm++3m", "unipc-3"])
def test_the_triton_kernel_runs_multistep_plans(scheduler, cfg):
    """backend="triton" (the fused kernel; the Triton interpreter on the CPU) steps the history like the torch step;
    "auto" runs them too (the torch step on the CPU)."""
    _, sch, model = diffusers_sample(cfg, 6, scheduler=scheduler)
    solver = (DPMSolver if scheduler.startswith("DPM") else UniPC).from_diffusers(sch.config, 6)
    noise = fg.seeded_noise(range(BATCH), SHAPE)
    runs = {backend: fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, backend=backend, progress=False).sample(
        noise, LABELS) for backend in ("triton", "torch", "auto")}
    assert torch.equal(runs["auto"], runs["torch"])
    rel = ((runs["triton"] - runs["torch"]).abs().max() / runs["torch"].abs().max()).item()
    assert rel <= 1e-5, f"triton vs torch: relative error {rel:.3g}"


# ====================================================================== UniPC
UNIPC_CONFIGS = [
    pytest.param(dict(), id="bh2-2"),
    pytest.param(dict(solver_order=3), id="bh2-3"),
    pytest.param(dict(solver_order=1), id="bh2-1"),
    pytest.param(dict(solver_type="bh1", final_sigmas_type="sigma_min"), id="bh1-2"),
    pytest.param(dict(solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"), id="bh1-3"),
    pytest.param(dict(use_karras_sigmas=True), id="karras"),
    pytest.param(dict(use_exponential_sigmas=True), id="exponential"),
    pytest.param(dict(use_beta_sigmas=True, solver_order=3), id="beta-3"),
    pytest.param(dict(predict_x0=False, final_sigmas_type="sigma_min"), id="noise-prediction"),
    pytest.param(dict(prediction_type="v_prediction"), id="v"),
    pytest.param(dict(prediction_type="sample", solver_order=3), id="sample-3"),
    pytest.param(dict(timestep_spacing="trailing"), id="trailing"),
    pytest.param(dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), id="3-nolof"),
    pytest.param(dict(disable_corrector=[0, 2]), id="corrector-off-after-0-and-2"),
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True,
                      solver_order=3), id="sd-karras-3"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", UNIPC_CONFIGS)
def test_unipc_whole_sample_equals_diffusers(cfg, steps):
    want, sch, model = diffusers_sample(cfg, steps, scheduler="UniPCMultistepScheduler")
    solver = UniPC.from_diffusers(sch.config, steps)
    np.testing.assert_array_equal(solver.plan.timesteps.numpy(), sch.timesteps.numpy())
    got = ours(solver, model).sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    # noise-prediction UniPC at 4 steps ends far out (|x| ~ 36, in diffusers too): there the bound is relative
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item() / 10)


def test_unipc_bound_can_fail_without_the_corrector():
    want, sch, model = diffusers_sample(dict(), 8, scheduler="UniPCMultistepScheduler")
    no_corrector = UniPC(fg.NoiseSchedule.from_diffusers(dict(timestep_spacing="linspace"), float32_arithmetic=True),
                         8, disable_corrector=range(8))
    got = ours(no_corrector, model).sample(fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)
    assert (got - want).abs().max().item() > 1e-3


def test_unipc_compiled_equals_eager():
    _, sch, model = diffusers_sample(dict(solver_order=3), 6, scheduler="UniPCMultistepScheduler")
    solver = UniPC.from_diffusers(sch.config, 6)
    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float32)
    eager = ours(solver, model).sample(noise, LABELS)
    compiled = ours(solver, model).compile()
    for _ in range(2):
        torch.testing.assert_close(compiled.sample(noise, LABELS), eager, rtol=1e-5, atol=1e-5)


def test_unipc_bad_options_are_named():
    schedule = fg.NoiseSchedule.linear()
    for kw, name in ((dict(order=0), "order"), (dict(order=3, steps=2), "order"), (dict(solver_type="bh3"),
                     "solver_type"), (dict(predict_x0="yes"), "predict_x0"), (dict(predict_x0=False),
                     "final_sigmas_type"), (dict(disable_corrector=[-1]), "disable_corrector"),
                     (dict(disable_corrector=5), "disable_corrector"), (dict(sigma_schedule="linear"),
                     "sigma_schedule"), (dict(final_sigmas_type="sigma_min", sigma_schedule="exponential"),
                     "final_sigmas_type")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            UniPC(schedule, **args)
    for cfg, key in ((dict(thresholding=True), "thresholding"), (dict(use_flow_sigmas=True), "use_flow_sigmas"),
                     (dict(bar=1), "bar")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            UniPC.from_diffusers(cfg, 4)
