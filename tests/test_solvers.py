"""Solver plans against diffusers 0.42.1: DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler; and the
errors a solver's arguments raise (steps, eta, spacing, prediction type, a zero-SNR schedule, flow shift).

Whole samples run through fg.Sampler (torch backend, fp64) and through a loop of diffusers' step() with the
same toy model and noise. diffusers rounds its schedule to float32 (about 1e-7 from a float64 one); a wrong
timestep moves a sample by ~1e-2..1e-1, so a 1e-4 max-abs bound separates the two.
"""
import dataclasses
import math
import types

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers import scheduling_ddpm

import fastguide as fg
from fastguide.kernels.reference import guided_step

TOL = 1e-4
# diffusers computes 1 - abar_t / abar_prev in float32, which cancels at small t (relative error up to ~1e-3 in
# the variance): the noise std agrees to 1e-5 absolute, i.e. within TOL once multiplied by z.
STD_TOL = 1e-5
SHAPE = (3, 5, 4)  # odd C, H, W
BATCH = 3
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE = fg.NoiseSchedule.linear()  # for the bad-input tests


def toy_model(x, t, cond):
    """A deterministic nonlinear model: tanh of a fixed channel mix, a time term and a label term."""
    gen = torch.Generator().manual_seed(7)
    mix = (torch.randn(SHAPE[0], SHAPE[0], generator=gen, dtype=torch.float64) / 2).to(x.dtype)
    bias = torch.randn(SHAPE, generator=gen, dtype=torch.float64).to(x.dtype)
    h = (mix[None, :, :, None, None] * x[:, None]).sum(2) + 0.3 * bias  # channel mix (einsum is slow at N=6 on CPU)
    h = h + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1) + 0.2 * cond.to(x.dtype).view(-1, 1, 1, 1)
    return torch.tanh(h)


def fixed_noise(seed=0, batch=BATCH):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


LABELS = torch.tensor([1, 2, 0])


def sample_ours(solver, noise=None):
    noise = fixed_noise() if noise is None else noise
    sampler = fg.Sampler(toy_model, solver, fg.CFG(1.0), null_cond=3, backend="torch", progress=False)
    return sampler.sample(noise, LABELS)


def sample_diffusers_ddim(cfg, steps, noise=None):
    scheduler = DDIMScheduler(**cfg)
    scheduler.set_timesteps(steps)
    x = fixed_noise() if noise is None else noise
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t.double().expand(BATCH), LABELS), t, x).prev_sample
    assert x.dtype == torch.float64  # diffusers' float32 scalars times our fp64 tensors stay fp64
    return x, scheduler.timesteps.numpy()


DDIM_CONFIGS = [
    pytest.param(dict(), id="leading-clip"),
    pytest.param(dict(clip_sample=False), id="leading"),
    pytest.param(dict(timestep_spacing="trailing", clip_sample=False), id="trailing"),
    pytest.param(dict(timestep_spacing="linspace", clip_sample=False), id="linspace"),
    pytest.param(dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False), id="offset1-no_alpha_one"),
    pytest.param(dict(SD_BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False), id="sd-scaled_linear"),
    pytest.param(dict(prediction_type="v_prediction", clip_sample=True), id="v-leading-clip"),
    pytest.param(dict(SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                      timestep_spacing="trailing", clip_sample=False), id="v-zero_snr-trailing"),
    pytest.param(dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.5), id="sample-clip0.5"),
    pytest.param(dict(prediction_type="sample", clip_sample=False, timestep_spacing="trailing"), id="sample-trailing"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", clip_sample=False), id="cosine-leading"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"), id="cosine-trailing-clip"),
    pytest.param(dict(num_train_timesteps=200, beta_start=0.001, beta_end=0.05, timestep_spacing="linspace",
                      clip_sample=False), id="linear-200"),
]


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("cfg", DDIM_CONFIGS)
def test_ddim_whole_sample_equals_diffusers(cfg, steps):
    expected, diffusers_ts = sample_diffusers_ddim(cfg, steps)
    solver = fg.DDIM(fg.NoiseSchedule.from_diffusers(cfg), steps=steps)
    assert np.array_equal(solver.plan.timesteps.numpy().astype(np.int64), diffusers_ts)
    got = sample_ours(solver)
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= TOL

    # float32_arithmetic reproduces diffusers' rounding, so it agrees far more closely still.
    solver32 = fg.DDIM(fg.NoiseSchedule.from_diffusers(cfg, float32_arithmetic=True), steps=steps)
    assert (sample_ours(solver32) - expected).abs().max().item() <= 1e-8


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_ddim_cosine_trailing_needs_float32_arithmetic(steps):
    """Cosine + trailing starts at abar ~ 2e-9: 1/sqrt(abar) ~ 2e4 amplifies diffusers' float32 rounding."""
    cfg = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False)
    expected, diffusers_ts = sample_diffusers_ddim(cfg, steps)
    schedule32 = fg.NoiseSchedule.from_diffusers(cfg, float32_arithmetic=True)
    assert schedule32.alphas_cumprod[diffusers_ts[0]].item() < 1e-8
    solver = fg.DDIM(schedule32, steps=steps)
    assert np.array_equal(solver.plan.timesteps.numpy().astype(np.int64), diffusers_ts)
    assert (sample_ours(solver) - expected).abs().max().item() <= TOL
    # ...and the float64 schedule is not within the bound here, which is why the option exists.
    float64_err = (sample_ours(fg.DDIM(fg.NoiseSchedule.from_diffusers(cfg), steps=steps)) - expected).abs().max()
    assert float64_err.item() > TOL


def test_ddim_eps_parity_bound_can_fail_for_an_off_by_one_timestep_plan():
    cfg = dict(clip_sample=False)
    expected, _ = sample_diffusers_ddim(cfg, 10)
    off_by_one = fg.DDIM(fg.NoiseSchedule.from_diffusers(cfg), steps=10, steps_offset=1)
    err = (sample_ours(off_by_one) - expected).abs().max().item()
    assert err > 10 * TOL
    wrong_spacing = fg.DDIM(fg.NoiseSchedule.from_diffusers(cfg), steps=10, spacing="trailing")
    assert (sample_ours(wrong_spacing) - expected).abs().max().item() > 10 * TOL


def _per_step_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, *SHAPE, generator=gen, dtype=torch.float64)
    m = torch.randn(BATCH, *SHAPE, generator=gen, dtype=torch.float64)
    z = torch.randn(BATCH, *SHAPE, generator=gen, dtype=torch.float64)
    return x, m, z


def _our_step(plan, i, x, m, z):
    return guided_step(x, m, None, torch.ones(BATCH, dtype=torch.float64), plan.coef[i], clip_range=plan.clip_range,
                       z=z)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("cfg", [
    pytest.param(dict(clip_sample=False), id="leading"),
    pytest.param(dict(clip_sample=True, timestep_spacing="trailing"), id="trailing-clip"),
    pytest.param(dict(SD_BETAS, prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False,
                      clip_sample=False), id="v-offset1"),
])
@pytest.mark.parametrize("float32_arithmetic", [False, True], ids=["f64", "f32"])
def test_ddim_eta_per_step_mean_and_std_equal_diffusers(cfg, eta, float32_arithmetic):
    steps = 10
    scheduler = DDIMScheduler(**cfg)
    scheduler.set_timesteps(steps)
    schedule = fg.NoiseSchedule.from_diffusers(cfg, float32_arithmetic=float32_arithmetic)
    plan = fg.DDIM(schedule, steps=steps, eta=eta).plan
    stride = scheduler.config.num_train_timesteps // steps
    for i, t in enumerate(scheduler.timesteps):
        x, m, z = _per_step_inputs(100 + i)
        mean = scheduler.step(m, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        full = scheduler.step(m, t, x, eta=eta, variance_noise=z).prev_sample
        assert (_our_step(plan, i, x, m, None) - mean).abs().max().item() <= TOL
        assert (_our_step(plan, i, x, m, z) - full).abs().max().item() <= TOL
        std = (eta * scheduler._get_variance(int(t), int(t) - stride) ** 0.5).item()  # float32, as in step()
        assert abs(plan.coef[i, 2].item() - std) <= (1e-9 if float32_arithmetic else STD_TOL)


# ------------------------------------------------------------------ DDPM
@pytest.fixture
def ddpm_noise(monkeypatch):
    """Make DDPMScheduler.step draw a noise tensor the test chooses (it has no variance_noise argument)."""
    box = {"z": None}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: box["z"])
    return box


DDPM_CONFIGS = {
    "leading": dict(clip_sample=False),
    "leading-clip": dict(clip_sample=True),
    "sd-trailing": dict(SD_BETAS, timestep_spacing="trailing", clip_sample=False),
    "v-offset1-clip": dict(prediction_type="v_prediction", steps_offset=1, clip_sample=True),
}


def _ddpm_cases():
    """Strided steps in float64 and with float32_arithmetic; unstrided (1000) steps only with float32_arithmetic:
    there diffusers' own float32 1 - abar_t / abar_prev is off by ~3e-4 at t < 5 (the float64 plan is checked
    against the exact posterior in test_ddpm_unstrided_float64_plan_is_the_exact_posterior)."""
    for name, cfg in DDPM_CONFIGS.items():
        for steps, f32 in ((4, False), (25, False), (4, True), (25, True), (1000, True)):
            if steps == 1000 and cfg.get("steps_offset"):
                continue  # 999 + 1 is outside the schedule
            yield pytest.param(cfg, steps, f32, id=f"{name}-{steps}-{'f32' if f32 else 'f64'}")


def _ddpm_steps_to_check(steps):
    return range(steps) if steps <= 25 else [0, 1, 2, 500, 996, 997, 998, 999]


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("cfg, steps, float32_arithmetic", list(_ddpm_cases()))
def test_ddpm_per_step_mean_and_variance_equal_diffusers(cfg, steps, float32_arithmetic, variance_type, ddpm_noise):
    cfg = dict(cfg, variance_type=variance_type)
    scheduler = DDPMScheduler(**cfg)
    scheduler.set_timesteps(steps)
    plan = fg.DDPM(fg.NoiseSchedule.from_diffusers(cfg, float32_arithmetic=float32_arithmetic), steps=steps).plan
    assert np.array_equal(plan.timesteps.numpy().astype(np.int64), scheduler.timesteps.numpy())
    for i in _ddpm_steps_to_check(steps):
        t = scheduler.timesteps[i]
        x, m, z = _per_step_inputs(200 + i)
        ddpm_noise["z"] = torch.zeros_like(x)
        mean = scheduler.step(m, t, x).prev_sample
        ddpm_noise["z"] = z
        full = scheduler.step(m, t, x).prev_sample
        assert (_our_step(plan, i, x, m, None) - mean).abs().max().item() <= TOL
        assert (_our_step(plan, i, x, m, z) - full).abs().max().item() <= TOL
        if int(t) > 0:
            std = (scheduler._get_variance(int(t)) ** 0.5).item()  # float32, as in step()
            assert abs(plan.coef[i, 2].item() - std) <= (1e-9 if float32_arithmetic else STD_TOL)
        else:
            assert plan.coef[i, 2].item() == 0.0


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_unstrided_float64_plan_is_the_exact_posterior(variance_type):
    """Ho et al. 2020 eq. 6-7 in float64, written out here: mean = c0 x0 + cx x_t, var = beta~ or beta."""
    sched = fg.NoiseSchedule.linear()
    plan = fg.DDPM(sched, variance_type=variance_type).plan
    abar = sched.alphas_cumprod.numpy()
    for i in _ddpm_steps_to_check(1000):
        t = int(plan.timesteps[i])
        x, eps, z = _per_step_inputs(300 + i)
        a_t, a_p = abar[t], (abar[t - 1] if t > 0 else 1.0)
        beta = 1 - a_t / a_p
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        mean = np.sqrt(a_p) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_p) / (1 - a_t) * x
        var = (1 - a_p) / (1 - a_t) * beta if variance_type == "fixed_small" else beta
        expected = mean + (np.sqrt(var) * z if t > 0 else 0.0)
        torch.testing.assert_close(_our_step(plan, i, x, eps, z), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("steps", [4, 25])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_whole_sample_mean_path_equals_diffusers(variance_type, steps, ddpm_noise):
    """With the noise term switched off on both sides, whole DDPM trajectories agree (strided steps)."""
    cfg = dict(variance_type=variance_type, clip_sample=True, timestep_spacing="trailing")
    plan = fg.DDPM(fg.NoiseSchedule.from_diffusers(cfg), steps=steps).plan
    assert plan.stochastic
    noiseless = types.SimpleNamespace(plan=dataclasses.replace(plan, coef=plan.coef.clone().index_fill_(
        1, torch.tensor([2]), 0.0)))
    got = sample_ours(noiseless)

    scheduler = DDPMScheduler(**cfg)
    scheduler.set_timesteps(steps)
    x = fixed_noise()
    ddpm_noise["z"] = torch.zeros_like(x)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t.double().expand(BATCH), LABELS), t, x).prev_sample
    assert (got - x).abs().max().item() <= TOL


# ------------------------------------------------------------------ FlowEuler
def _flow_toy(x, sigma, cond):
    """The same network as diffusers sees it: diffusers feeds timestep = sigma * 1000, our models get sigma."""
    return toy_model(x, sigma * 1000, cond)


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_whole_sample_equals_diffusers(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    x = fixed_noise()
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t.double().expand(BATCH), LABELS), t, x).prev_sample
    diffusers_ts = scheduler.timesteps.double().numpy()

    for solver in (fg.FlowEuler(steps, shift=shift), fg.FlowEuler.from_diffusers(scheduler.config, steps)):
        assert np.abs(solver.plan.timesteps.numpy() * 1000 - diffusers_ts).max() <= 1e-3  # float32 sigmas
        sampler = fg.Sampler(_flow_toy, solver, fg.CFG(1.0), null_cond=3, backend="torch", progress=False)
        got = sampler.sample(fixed_noise(), LABELS)
        assert (got - x.double()).abs().max().item() <= TOL


def test_flow_euler_bound_can_fail_for_a_wrong_shift():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    x = fixed_noise()
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t.double().expand(BATCH), LABELS), t, x).prev_sample
    sampler = fg.Sampler(_flow_toy, fg.FlowEuler(10, shift=2.9), fg.CFG(1.0), null_cond=3, progress=False)
    assert (sampler.sample(fixed_noise(), LABELS) - x).abs().max().item() > 10 * TOL


def test_flow_euler_from_diffusers_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="config"):
        fg.FlowEuler.from_diffusers(dict(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config), 10)
    with pytest.raises(ValueError, match="config"):
        fg.FlowEuler.from_diffusers(dict(shift=3.0, use_karras_sigmas=True), 10)
    with pytest.raises(ValueError, match="config"):
        fg.FlowEuler.from_diffusers(dict(shift=3.0, not_a_flow_key=1), 10)


# ------------------------------------------------------------------ bad input: steps, eta, spacing, predictions, shift
@pytest.mark.parametrize("steps", [1001, 5000])
def test_steps_above_num_train_timesteps(steps):
    with pytest.raises(ValueError, match=r"steps: expected <= num_train_timesteps \(1000\)"):
        fg.DDIM(SCHEDULE, steps=steps)
    with pytest.raises(ValueError, match="steps: expected <= num_train_timesteps"):
        fg.DDPM(SCHEDULE, steps=steps)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_below_one(steps):
    for make in (lambda: fg.DDIM(SCHEDULE, steps=steps), lambda: fg.DDPM(SCHEDULE, steps=steps),
                 lambda: fg.FlowEuler(steps)):
        with pytest.raises(ValueError, match="steps: expected >= 1"):
            make()


@pytest.mark.parametrize("steps", [10.0, 2.5, "10", True, None])
def test_steps_not_an_int(steps):
    with pytest.raises(TypeError, match="steps: expected an int"):
        fg.DDIM(SCHEDULE, steps=steps)
    with pytest.raises(TypeError, match="steps: expected an int"):
        fg.FlowEuler(steps)


@pytest.mark.parametrize("eta", [-0.1, -1, math.nan, math.inf])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta: expected a finite float >= 0"):
        fg.DDIM(SCHEDULE, steps=10, eta=eta)


def test_bad_spacing():
    with pytest.raises(ValueError, match="spacing: expected one of"):
        fg.DDIM(SCHEDULE, steps=10, spacing="uniform")
    with pytest.raises(ValueError, match="timestep_spacing: expected one of"):
        fg.NoiseSchedule.from_diffusers(dict(timestep_spacing="uniform"))


def test_bad_prediction_type():
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        fg.NoiseSchedule.from_diffusers(dict(prediction_type="x0"))
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        fg.DDIM(SCHEDULE, steps=10, prediction_type="x0")
    with pytest.raises(ValueError, match="prediction_type: expected one of"):
        fg.DDPM(SCHEDULE, steps=10, prediction_type="x0")


def test_epsilon_prediction_on_a_zero_snr_schedule_is_refused():
    zero_snr = fg.NoiseSchedule.from_diffusers(dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    with pytest.raises(ValueError, match="DDIM: the plan has non-finite coefficients"):
        fg.DDIM(zero_snr, steps=10)
    fg.DDIM(zero_snr, steps=10, prediction_type="v_prediction")  # the supported combination


def test_bad_shift_for_flow():
    with pytest.raises(ValueError, match="shift: expected a finite float > 0"):
        fg.FlowEuler(10, shift=0.0)
