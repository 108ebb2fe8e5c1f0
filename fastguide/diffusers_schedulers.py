"""diffusers schedulers in: the fastguide solver that steps like a given diffusers scheduler (an instance, or
its config with ``_class_name``), with diffusers' float32 rounding of the schedule, so samples match the
pipeline's to float32 resolution. Options a solver cannot step exactly are refused by name."""
from __future__ import annotations

from fastguide.edm import EDM
from fastguide.euler import Euler
from fastguide.heun import Heun
from fastguide.lcm import LCM
from fastguide.multistep import DPMSolver, UniPC
from fastguide.pndm import PLMS
from fastguide.schedule import NoiseSchedule, config_items
from fastguide.solvers import DDIM, DDPM, FlowEuler


def _ddim(cfg, steps, **kw):
    return DDIM(NoiseSchedule.from_diffusers(cfg, float32_arithmetic=True), steps=steps, **kw)


def _ddpm(cfg, steps, **kw):
    return DDPM(NoiseSchedule.from_diffusers(cfg, float32_arithmetic=True), steps=steps, **kw)


def _no_options(build, takes=()):
    """``build(cfg, steps)``: options come from the config, except ``takes`` (arguments of ``set_timesteps``)."""
    def make(cfg, steps, **kw):
        if set(kw) - set(takes):
            raise ValueError(f"kw: this solver takes its options from the scheduler config, got {sorted(kw)}")
        return build(cfg, steps, **kw)
    return make


SOLVERS = {
    "DDIMScheduler": _ddim,
    "DDPMScheduler": _ddpm,
    "DPMSolverMultistepScheduler": _no_options(DPMSolver.from_diffusers),
    "UniPCMultistepScheduler": _no_options(UniPC.from_diffusers),
    "FlowMatchEulerDiscreteScheduler": _no_options(FlowEuler.from_diffusers, takes=("mu", "sigmas")),
    "EulerDiscreteScheduler": _no_options(Euler.from_diffusers),
    "EulerAncestralDiscreteScheduler": _no_options(lambda cfg, steps: Euler.from_diffusers(cfg, steps, ancestral=True)),
    "HeunDiscreteScheduler": _no_options(Heun.from_diffusers),
    "EDMEulerScheduler": _no_options(EDM.from_diffusers),
    "PNDMScheduler": _no_options(PLMS.from_diffusers),
    "LCMScheduler": LCM.from_diffusers,
}


# Keys (or sets of keys) that tell a scheduler's config apart when it has no _class_name (a scheduler built in
# code has none).
SIGNATURES = [("shift", "FlowMatchEulerDiscreteScheduler"), ("sigma_data", "EDMEulerScheduler"), ("predict_x0", "UniPCMultistepScheduler"),
              ("algorithm_type", "DPMSolverMultistepScheduler"), ("interpolation_type", "EulerDiscreteScheduler"),
              (("use_karras_sigmas", "clip_sample"), "HeunDiscreteScheduler"), ("skip_prk_steps", "PNDMScheduler"),
              ("original_inference_steps", "LCMScheduler"), ("set_alpha_to_one", "DDIMScheduler"),
              ("variance_type", "DDPMScheduler")]


def scheduler_class(scheduler) -> str:
    """The diffusers class name of a scheduler or of its config (``_class_name``, else told by its keys; a
    config with none of them is DDIM's)."""
    if hasattr(scheduler, "set_timesteps"):
        return type(scheduler).__name__
    cfg = dict(scheduler)
    if cfg.get("_class_name"):
        return str(cfg["_class_name"])
    return next((name for keys, name in SIGNATURES if set((keys,) if isinstance(keys, str) else keys) <= set(cfg)),
                "DDIMScheduler")


def solver_from_diffusers(scheduler, steps: int, **kw):
    """The solver for ``scheduler`` (a diffusers scheduler, or its config / ``scheduler.config``); ``kw`` go to
    DDIM / DDPM (eta, spacing, ...) and FlowEuler (``mu``, ``sigmas``: what ``set_timesteps`` takes)."""
    config = scheduler.config if hasattr(scheduler, "set_timesteps") else scheduler
    cfg = config_items(config)
    name = scheduler_class(scheduler)
    if name not in SOLVERS:
        raise ValueError(f"scheduler: {name} is not supported yet (supported: {', '.join(sorted(SOLVERS))})")
    return SOLVERS[name](_keys_the_class_takes(cfg, name), steps, **kw)


def _keys_the_class_takes(cfg: dict, name: str) -> dict:
    """``cfg`` without the keys that diffusers' ``name`` class does not take: ``Scheduler.from_config(other.config)``
    carries the other scheduler's keys along (a DDIM made from SD's PNDM config keeps ``skip_prk_steps``), and the
    class ignores them, so they say nothing about how it steps. Without diffusers every key is kept (and checked)."""
    import inspect

    try:
        import diffusers
    except ImportError:
        return cfg
    cls = getattr(diffusers, name, None)
    if cls is None:
        return cfg
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cfg
    return {k: v for k, v in cfg.items() if k in params}


def generator_draws(scheduler, plan) -> list[bool] | None:
    """For each step of ``plan`` (made from ``scheduler`` by :func:`solver_from_diffusers`): whether the diffusers
    scheduler's ``step`` draws its noise there (``randn_tensor(shape, generator)``, once per step, in step order), so
    a pipeline's generator can give the plan the same per-step noise; None for a scheduler whose draws are not
    known here (its stochastic plans then take fastguide's seeded noise)."""
    name = scheduler_class(scheduler)
    config = scheduler.config if hasattr(scheduler, "set_timesteps") else scheduler
    if name == "EulerAncestralDiscreteScheduler":
        return [True] * plan.steps
    if name == "DDPMScheduler":
        return [float(t) > 0 for t in plan.timesteps]
    if name == "DPMSolverMultistepScheduler" and str(config.get("algorithm_type", "")).startswith("sde-"):
        return [True] * plan.steps
    if name == "LCMScheduler":  # noise after every consistency step but the last
        return [i < plan.steps - 1 for i in range(plan.steps)]
    return None
