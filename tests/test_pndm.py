"""fastguide.pndm: PLMS against diffusers' PNDMScheduler(skip_prk_steps=True) driving the same model from the same
noise (float64 tensors) over spacings x prediction types x set_alpha_to_one x 4 / 8 / 25 steps; its history
(the first state and up to 3 stored outputs in 3 slots); compiled; ReCFG; bad input."""
from __future__ import annotations

import pytest
import torch

import fastguide as fg
from fastguide.pndm import PLMS
from gaussian_models import NULL, SHAPE, gaussian_eps

diffusers = pytest.importorskip("diffusers")

BATCH, TOL = 3, 1e-4
LABELS = torch.tensor([0, 1, 2])


def diffusers_sample(cfg, steps, scale=3.0):
    sch = diffusers.PNDMScheduler(skip_prk_steps=True, **cfg)
    sch.set_timesteps(steps)
    model = gaussian_eps(sch.alphas_cumprod.double())
    x = fg.seeded_noise(range(BATCH), SHAPE, torch.float64)
    for t in sch.timesteps:
        out = model(torch.cat([x, x]), torch.full((2 * BATCH,), float(t), dtype=torch.float64),
                    torch.cat([LABELS, torch.full_like(LABELS, NULL)]))
        m_c, m_u = out.chunk(2)
        x = sch.step(m_u + scale * (m_c - m_u), t, x).prev_sample
    return x, sch, model


def ours(solver, model, rule=None, backend="torch"):
    return fg.Sampler(model, solver, rule or fg.CFG(3.0), null_cond=NULL, backend=backend, progress=False).sample(
        fg.seeded_noise(range(BATCH), SHAPE, torch.float64), LABELS)


CONFIGS = [
    pytest.param(dict(), id="leading"),
    pytest.param(dict(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                 id="stable-diffusion"),
    pytest.param(dict(prediction_type="v_prediction"), id="v"),
    pytest.param(dict(timestep_spacing="linspace"), id="linspace"),
    pytest.param(dict(timestep_spacing="trailing", set_alpha_to_one=True), id="trailing-alpha-one"),
]


@pytest.mark.parametrize("steps", [4, 8, 25])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_plms_whole_sample_equals_diffusers(cfg, steps):
    want, sch, model = diffusers_sample(cfg, steps)
    solver = fg.solver_from_diffusers(sch, steps)
    assert isinstance(solver, PLMS) and solver.plan.steps == steps + 1 == len(sch.timesteps)
    assert solver.plan.timesteps.tolist() == sch.timesteps.double().tolist()
    assert solver.plan.history_slots == 3
    got = ours(solver, model)
    assert torch.isfinite(got).all() and got.abs().max() > 0.5
    assert (got - want).abs().max().item() <= TOL


def test_plms_bound_can_fail_with_the_warm_up_skipped():
    """Running the second evaluation as an ordinary Adams-Bashforth step (no re-run from the first state)."""
    want, sch, model = diffusers_sample(dict(), 8)
    solver = PLMS.from_diffusers(sch.config, 8)
    h = solver.plan.history
    weights = h.weights.clone()
    weights[1] = 0.0
    solver.plan = fg.Plan(**{**vars(solver.plan), "history": type(h)(weights, h.write_slots, h.write_coef)})
    assert (ours(solver, model) - want).abs().max().item() > 1e-2


def test_plms_compiled_equals_eager_and_recfg_with_a_per_step_table_runs():
    _, sch, model = diffusers_sample(dict(), 6)
    solver = PLMS.from_diffusers(sch.config, 6)
    noise = fg.seeded_noise(range(BATCH), SHAPE, torch.float32)
    eager = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, backend="torch", progress=False)
    compiled = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=NULL, progress=False).compile()
    torch.testing.assert_close(compiled.sample(noise, LABELS), eager.sample(noise, LABELS), rtol=1e-5, atol=1e-5)
    unit = fg.RatioTable(torch.ones(NULL + 1, solver.plan.steps, *SHAPE, dtype=torch.float64))
    assert torch.equal(ours(solver, model, fg.ReCFG(3.0, table=unit)), ours(solver, model))


def test_plms_bad_options_are_named():
    schedule = fg.NoiseSchedule.linear()
    for kw, name in ((dict(steps=1), "steps"), (dict(spacing="uniform"), "spacing"),
                     (dict(prediction_type="sample"), "prediction_type"), (dict(set_alpha_to_one=1),
                                                                           "set_alpha_to_one")):
        args = dict(steps=kw.pop("steps", 4), **kw)
        with pytest.raises((TypeError, ValueError), match=rf"^{name}:"):
            PLMS(schedule, **args)
    for cfg, key in ((dict(skip_prk_steps=False), "skip_prk_steps"), (dict(foo=1), "foo"),
                     (dict(skip_prk_steps=True, set_alpha_to_one="no"), "set_alpha_to_one")):
        with pytest.raises(ValueError, match=rf"^config: .*{key}"):
            PLMS.from_diffusers(cfg, 4)
    with pytest.raises(ValueError, match=r"^config: skip_prk_steps=False"):
        fg.solver_from_diffusers(diffusers.PNDMScheduler(), 4)
