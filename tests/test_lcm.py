"""fastguide.lcm: LCM (consistency sampling) against diffusers' LCMScheduler driving the same model from the same noise:
whole samples in float64 (and float32) over prediction types, clipping, beta schedules, timestep scalings, zero
terminal SNR x 1 / 2 / 4 / 8 steps x original_inference_steps, with the per-step noise the scheduler draws from its
generator given to fastguide (``Sampler.sample(step_noise=...)``) at the steps ``generator_draws`` names, which are
checked against the steps where LCMScheduler.step draws; CFG on top; the bound can fail; bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastguide as fg
from fastguide.diffusers_schedulers import generator_draws
from fastguide.kernels.reference import Coef
from fastguide.lcm import LCM
from gaussian_models import NULL, SHAPE, gaussian_eps

diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

BATCH, TOL, SEED = 3, 1e-5, 7
LABELS = torch.tensor([0, 1, 2])


def relative_error(got, want) -> float:
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def diffusers_sample(cfg, steps, original=None, dtype=torch.float64, scale=None, monkeypatch=None):
    """LCMScheduler's loop with ``generator=torch.Generator().manual_seed(SEED)``: (the last step's denoised, the
    scheduler, the model, the step indices where step() drew noise)."""
    sch = diffusers.LCMScheduler(**cfg)
    sch.set_timesteps(steps, original_inference_steps=original)
    model = gaussian_eps(sch.alphas_cumprod.double())
    drawn = []
    if monkeypatch is not None:
        module = __import__(type(sch).__module__, fromlist=["randn_tensor"])

        def recording_randn(*a, **k):
            drawn.append(sch.step_index)
            return randn_tensor(*a, **k)
        monkeypatch.setattr(module, "randn_tensor", recording_randn)
    x = fg.seeded_noise(range(BATCH), SHAPE, dtype)
    gen = torch.Generator().manual_seed(SEED)
    for t in sch.timesteps:
        tt = torch.full((BATCH,), float(t), dtype=dtype)
        if scale is None:
            m = model(x, tt, LABELS)
        else:
            m_c, m_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([LABELS, torch.full_like(LABELS, NULL)])
                             ).chunk(2)
            m = m_u + scale * (m_c - m_u)
        x, denoised = sch.step(m, t, x, generator=gen, return_dict=False)
    assert torch.equal(x, denoised)  # the last step returns denoised itself
    return denoised, sch, model, drawn


def generator_step_noise(sch, plan, dtype=torch.float64):
    """The scheduler's generator draws, made again at the steps generator_draws names (zeros elsewhere)."""
    gen = torch.Generator().manual_seed(SEED)
    z = torch.zeros(plan.steps, BATCH, *SHAPE, dtype=dtype)
    for i, draw in enumerate(generator_draws(sch, plan)):
        if draw:
            z[i] = randn_tensor((BATCH, *SHAPE), generator=gen, dtype=dtype)
    return z


def ours(solver, model, z, dtype=torch.float64, rule=None):
    sampler = fg.Sampler(model, solver, rule, null_cond=None if rule is None else NULL, backend="torch",
                         progress=False)
    return sampler.sample(fg.seeded_noise(range(BATCH), SHAPE, dtype), LABELS,
                          step_noise=z if solver.plan.stochastic else None)


CONFIGS = [
    pytest.param(dict(), id="lcm-sd"),  # LCMScheduler's defaults: scaled_linear, epsilon, timestep_scaling 10
    pytest.param(dict(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                      set_alpha_to_one=False), id="v-unread-keys"),
    pytest.param(dict(prediction_type="sample", clip_sample=True, clip_sample_range=0.8), id="sample-clip"),
    pytest.param(dict(clip_sample=True), id="epsilon-clip"),
    pytest.param(dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_scaling=0.01),
                 id="linear-scaling-0.01"),  # c_skip is far from 0 at small t
    pytest.param(dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", num_train_timesteps=500),
                 id="zero-snr-v-500"),
]
STEPS = [(1, None), (2, None), (4, None), (8, 20), (4, 25)]


@pytest.mark.parametrize("steps, original", STEPS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_lcm_whole_sample_equals_the_lcm_scheduler(cfg, steps, original, monkeypatch):
    want, sch, model, drawn = diffusers_sample(cfg, steps, original, monkeypatch=monkeypatch)
    solver = fg.solver_from_diffusers(sch, steps, original_inference_steps=original)
    assert isinstance(solver, LCM)
    assert solver.plan.timesteps.tolist() == sch.timesteps.double().tolist()
    draws = generator_draws(sch, solver.plan)
    assert [i for i, d in enumerate(draws) if d] == drawn  # the steps where LCMScheduler.step drew
    assert solver.plan.stochastic == (steps > 1)
    got = ours(solver, model, generator_step_noise(sch, solver.plan))
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert relative_error(got, want) <= TOL


@pytest.mark.parametrize("cfg", CONFIGS[:3])
def test_lcm_float32_equals_the_lcm_scheduler(cfg):
    """diffusers steps float32 tensors in float32 with float32 scalars; the plan rounds its scalars the same way."""
    want, sch, model, _ = diffusers_sample(cfg, 4, dtype=torch.float32)
    solver = fg.solver_from_diffusers(sch, 4)
    got = ours(solver, model, generator_step_noise(sch, solver.plan, torch.float32), torch.float32)
    assert got.dtype == torch.float32
    assert relative_error(got, want) <= TOL


def test_lcm_with_cfg_on_top_equals_the_scheduler_on_the_guided_output():
    want, sch, model, _ = diffusers_sample(dict(), 4, scale=3.0)
    solver = LCM.from_diffusers(sch.config, 4)
    got = ours(solver, model, generator_step_noise(sch, solver.plan), rule=fg.CFG(3.0))
    assert relative_error(got, want) <= TOL


def test_lcm_rows_with_their_own_step_counts_equal_each_alone():
    """1, 2 and 4 consistency steps in one loop (fastguide.row_plans: finished rows padded with identity steps)."""
    schedule = LCM.from_diffusers(diffusers.LCMScheduler().config, 1).schedule
    model = gaussian_eps(schedule.alphas_cumprod)
    solvers = [LCM(schedule, 2), LCM(schedule, 4), LCM(schedule, 1)]
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64)
    sampler = fg.Sampler(model, solvers[0], backend="torch", progress=False)
    together = sampler.sample(x, LABELS, solvers=solvers, seeds=[1, 2, 3])
    for i, solver in enumerate(solvers):
        sampler.solver = solver
        assert relative_error(together[i:i + 1], sampler.sample(x[i:i + 1], LABELS[i:i + 1], seeds=[i + 1])) <= 1e-12


def test_the_bound_can_fail():
    """Noise one step late, a plan without c_skip, or the next state noised from x0 instead of denoised: each
    moves the sample far past the bound."""
    cfg = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, timestep_scaling=0.01)
    want, sch, model, _ = diffusers_sample(cfg, 4)
    solver = LCM.from_diffusers(sch.config, 4)
    z = generator_step_noise(sch, solver.plan)
    assert relative_error(ours(solver, model, z), want) <= TOL
    late = torch.cat([torch.zeros_like(z[:1]), z[:-1]])
    assert relative_error(ours(solver, model, late), want) > 1e-2
    coef = solver.plan.coef.clone()
    coef[:, Coef.A] -= coef[:, Coef.CX]  # drop c_skip x
    no_skip = LCM.from_diffusers(sch.config, 4)
    no_skip.plan = dataclasses.replace(solver.plan, coef=coef)
    assert relative_error(ours(no_skip, model, z), want) > 1e-2
    ddim_like = LCM.from_diffusers({**sch.config, "timestep_scaling": 1e4}, 4)  # c_skip -> 0, c_out -> 1
    assert relative_error(ours(ddim_like, model, z), want) > 1e-2


def test_lcm_options_override_the_config_and_steps_follow_set_timesteps():
    sch = diffusers.LCMScheduler()
    for steps, original in ((1, 1), (3, 7), (6, 50), (50, 50), (13, 1000)):
        sch.set_timesteps(steps, original_inference_steps=original)
        solver = LCM.from_diffusers(sch.config, steps, original_inference_steps=original)
        assert solver.plan.timesteps.tolist() == sch.timesteps.double().tolist()
    assert LCM.from_diffusers(sch.config, 4, original_inference_steps=None).original_inference_steps == 50
    assert LCM.from_diffusers(sch.config, 4, clip_sample=True).plan.clip_range == 1.0
    assert LCM.from_diffusers(sch.config, 4).plan.clip_range is None  # LCMScheduler's default: no clipping
    assert LCM(fg.NoiseSchedule.scaled_linear(), 4).plan.steps == 4


def test_lcm_bad_input():
    cfg = dict(diffusers.LCMScheduler().config)
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        LCM.from_diffusers({**cfg, "thresholding": True}, 4)
    with pytest.raises(ValueError, match=r"unsupported LCMScheduler keys \['colour'\]"):
        LCM.from_diffusers({**cfg, "colour": 1}, 4)
    with pytest.raises(ValueError, match="kw: LCM.from_diffusers takes"):
        LCM.from_diffusers(cfg, 4, eta=1.0)
    with pytest.raises(ValueError, match="kw: LCM.from_diffusers takes"):
        fg.solver_from_diffusers(diffusers.LCMScheduler(), 4, spacing="trailing")
    with pytest.raises(ValueError, match=r"steps: expected <= original_inference_steps \(50"):
        LCM.from_diffusers(cfg, 51)
    with pytest.raises(ValueError, match="original_inference_steps: expected <= num_train_timesteps"):
        LCM.from_diffusers(cfg, 4, original_inference_steps=1001)
    with pytest.raises(ValueError, match="original_inference_steps: expected an int >= 1"):
        LCM.from_diffusers(cfg, 4, original_inference_steps=0)
    with pytest.raises(ValueError, match="config: original_inference_steps: expected an int"):
        LCM.from_diffusers({**cfg, "original_inference_steps": 2.5}, 4)
    with pytest.raises(ValueError, match="timestep_scaling: expected a finite float > 0"):
        LCM.from_diffusers(cfg, 4, timestep_scaling=0.0)
    with pytest.raises(ValueError, match="non-finite coefficients"):
        LCM.from_diffusers({**cfg, "rescale_betas_zero_snr": True}, 4)  # epsilon at abar = 0
    with pytest.raises(ValueError, match="prediction_type: expected epsilon, sample or v_prediction"):
        LCM.from_diffusers(cfg, 4, prediction_type="flow")
    with pytest.raises(TypeError, match="clip_sample: expected True or False"):
        LCM(fg.NoiseSchedule.scaled_linear(), 4, clip_sample="yes")
    with pytest.raises(ValueError, match="clip_sample_range: expected a finite float > 0"):
        LCM(fg.NoiseSchedule.scaled_linear(), 4, clip_sample=True, clip_sample_range=-1.0)
    with pytest.raises(TypeError, match="steps: expected an int"):
        LCM(fg.NoiseSchedule.scaled_linear(), 2.0)
    with pytest.raises(TypeError, match="schedule: expected a fastguide.NoiseSchedule"):
        LCM(cfg, 4)
