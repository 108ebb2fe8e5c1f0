"""fastguide.diffusers_schedulers: a diffusers scheduler (an instance, or its config with or without
``_class_name``) maps to the solver that steps like it; an unsupported one is refused by name."""
import pytest
import torch

import fastguide as fg
from fastguide.diffusers_schedulers import scheduler_class, solver_from_diffusers

diffusers = pytest.importorskip("diffusers")

CASES = [
    (lambda: diffusers.DDIMScheduler(), fg.DDIM),
    (lambda: diffusers.DDPMScheduler(), fg.DDPM),
    (lambda: diffusers.DPMSolverMultistepScheduler(solver_order=3), fg.DPMSolver),
    (lambda: diffusers.UniPCMultistepScheduler(solver_order=3), fg.UniPC),
    (lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), fg.FlowEuler),
    (lambda: diffusers.EulerDiscreteScheduler(use_karras_sigmas=True), fg.Euler),
    (lambda: diffusers.HeunDiscreteScheduler(use_karras_sigmas=True), fg.Heun),
    (lambda: diffusers.EDMEulerScheduler(), fg.EDM),
    (lambda: diffusers.PNDMScheduler(skip_prk_steps=True), fg.PLMS),
]


@pytest.mark.parametrize("make,kind", CASES, ids=["ddim", "ddpm", "dpm", "unipc", "flow", "euler", "heun", "edm", "plms"])
def test_instances_and_configs_map_to_their_solver(make, kind):
    scheduler = make()
    name = type(scheduler).__name__
    for given in (scheduler, scheduler.config, dict(scheduler.config), {**scheduler.config, "_class_name": name}):
        assert scheduler_class(given) == name
        solver = solver_from_diffusers(given, 6)
        assert type(solver) is kind and solver.plan.steps == {fg.Heun: 11, fg.PLMS: 7}.get(kind, 6)  # Heun 2 x 6 - 1, PLMS 6 + 1
    scheduler.set_timesteps(6)
    got = solver_from_diffusers(scheduler, 6).plan.timesteps
    want = scheduler.timesteps.double()
    if kind is fg.FlowEuler:  # flow solvers take model time sigma in [0, 1]
        want = want / 1000
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unsupported_schedulers_are_refused_by_name():
    with pytest.raises(ValueError, match=r"^scheduler: LMSDiscreteScheduler is not supported yet \(supported: "):
        solver_from_diffusers(diffusers.LMSDiscreteScheduler(), 4)
    with pytest.raises(TypeError, match=r"^config: expected a diffusers scheduler config"):
        solver_from_diffusers([1, 2], 4)
    with pytest.raises(ValueError, match=r"^kw: this solver takes its options from the scheduler config"):
        solver_from_diffusers(diffusers.DPMSolverMultistepScheduler(), 4, eta=1.0)
    assert type(solver_from_diffusers({}, 4)) is fg.DDIM  # a bare config is DDIM's, as before
