"""The guidance rules beyond CFG (fastguide/guidance.py: CFG with rescale, CFGZeroStar, APG, schedules, a guide
network) against diffusers' own guider classes, per step on random outputs and over whole samples with the same
diffusers scheduler (float64, <= 1e-5 relative); the network work they save; bad input."""
import math

import pytest
import torch

import fastguide as fg
from fastguide.guidance import SCHEDULES, PairedNetworks, schedule_shape
from fastguide.kernels import reference
from fastguide.kernels.torch_step import guided_step_into_host

diffusers = pytest.importorskip("diffusers")
from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,  # noqa: E402
                               ClassifierFreeZeroStarGuidance)
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402

from gaussian_models import MEANS, NULL, SHAPE, gaussian_eps  # noqa: E402

RTOL = 1e-5  # the issue's bound, float64 (diffusers computes CFG-Zero*'s alpha in float32)


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max())


def diffusers_guider(rule):
    """The diffusers guider that computes ``rule`` (a fastguide rule with a float scale)."""
    if isinstance(rule, fg.APG):
        g = AdaptiveProjectedGuidance(rule.scale, adaptive_projected_guidance_momentum=rule.momentum or None,
                                      adaptive_projected_guidance_rescale=rule.norm_threshold, eta=rule.eta,
                                      guidance_rescale=rule.rescale)
        g.momentum_buffer = MomentumBuffer(rule.momentum) if rule.momentum else None
        return g
    if isinstance(rule, fg.CFGZeroStar):
        return ClassifierFreeZeroStarGuidance(rule.scale, zero_init_steps=rule.zero_init_steps,
                                              guidance_rescale=rule.rescale)
    return ClassifierFreeGuidance(rule.scale, guidance_rescale=rule.rescale)


RULES = {
    "cfg-rescale": lambda: fg.CFG(5.0, rescale=0.7),
    "cfg-rescale-1": lambda: fg.CFG(3.0, rescale=1.0),
    "zero-star": lambda: fg.CFGZeroStar(4.0, zero_init_steps=0),
    "zero-star-rescale": lambda: fg.CFGZeroStar(4.0, zero_init_steps=0, rescale=0.5),
    "apg": lambda: fg.APG(5.0, eta=0.0, norm_threshold=2.0),
    "apg-momentum": lambda: fg.APG(4.0, eta=0.3, norm_threshold=3.0, momentum=-0.5),
    "apg-cap-above-the-norm": lambda: fg.APG(3.0, eta=0.0, norm_threshold=50.0),  # |D| ~ 14 here: s = 1
    "apg-momentum-rescale": lambda: fg.APG(4.0, eta=0.5, norm_threshold=0.0, momentum=0.4, rescale=0.7),
    "apg-eta1-nocap": lambda: fg.APG(2.5, eta=1.0, norm_threshold=0.0),
}


@pytest.mark.parametrize("name", list(RULES))
def test_each_step_equals_diffusers_guider(name):
    """Five steps of random (non-zero mean) outputs: reference.guided_output with the rule's parameters equals the
    diffusers guider's forward, and so does the eager host-scalar step; the momentum state carries across steps."""
    rule, batch, shape = RULES[name](), 3, (2, 7, 5)
    guider = diffusers_guider(rule)
    params = rule.rule_params()
    state = torch.zeros(batch, *shape, dtype=torch.float64) if rule.__dict__.get("momentum") else None
    host_state = None if state is None else state.clone()
    g1 = torch.full((batch,), rule.scale, dtype=torch.float64)
    for step in range(5):
        c = torch.randn(batch, *shape, dtype=torch.float64) + 0.3
        u = 1.2 * torch.randn(batch, *shape, dtype=torch.float64) - 0.2
        guider.set_state(step, 5, torch.tensor(999 - step))
        want = guider.forward(c, u).pred
        got = reference.guided_output(c, u, g1, rule_params=params, rule_state=state, dt=torch.float64)
        assert rel_err(got, want) <= RTOL, step
        # the eager step (host scalars) is the same rule: one DDIM-like update x_next = 0.9 x + 0.1 m
        x = torch.randn(batch, *shape, dtype=torch.float64)
        out = torch.full((batch, *shape), float("nan"), dtype=torch.float64)
        coef = [0.9, 0.1] + [0.0] * (reference.NUM_COEF - 2)
        for unit_rows in (False, True):  # no row is at g1 = 1 here, so the masking the loop may skip changes nothing
            step_state = None if host_state is None else host_state.clone()
            guided_step_into_host(out, x, torch.cat([c, u]), g1, coef, rule_params=params.tolist(),
                                  rule_state=step_state, unit_rows=unit_rows)
            torch.testing.assert_close(out, 0.9 * x + 0.1 * got, rtol=1e-12, atol=1e-12)
        host_state = step_state
    if state is not None:
        assert rel_err(state, guider.momentum_buffer.running_average) <= 1e-12
        torch.testing.assert_close(host_state, state, rtol=1e-12, atol=1e-12)


def flow_velocity(x, t, c):
    """A smooth stand-in for a flow-matching model (v = noise - x0 reads t = sigma in [0, 1])."""
    s = t.view(-1, 1, 1, 1).to(x.dtype)
    return (x - (1 - s) * MEANS[c].to(x.dtype)) / (s + 0.3) + 0.05 * torch.tanh(x.roll(1, 1))


def diffusers_sample(scheduler, guider, model, noise, labels, steps, time_scale=1.0):
    """A diffusers-style loop: both halves every step, guider, scheduler (the model reads t * time_scale)."""
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    null = torch.full_like(labels, NULL)
    for i, t in enumerate(scheduler.timesteps):
        guider.set_state(i, steps, t)
        tt = t.double().expand(len(labels)) * time_scale
        c, u = model(x, tt, labels), model(x, tt, null)
        pred = guider.forward(c, u).pred
        x = scheduler.step(pred, t, x).prev_sample
    return x


SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                             beta_end=0.012),
}


@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS) + ["flow"])
@pytest.mark.parametrize("name", ["cfg-rescale", "zero-star", "apg-momentum", "apg-momentum-rescale"])
def test_whole_samples_equal_diffusers_guider_and_scheduler(scheduler_name, name):
    """Epsilon models under DDIM and DPM-Solver++(2M), a flow model under FlowMatchEuler (CFG-Zero* with 2
    zero-init steps there, as the paper runs it)."""
    flow = scheduler_name == "flow"
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else SCHEDULERS[scheduler_name]()
    rule = RULES[name]()
    if isinstance(rule, fg.CFGZeroStar) and flow:
        rule = fg.CFGZeroStar(rule.scale, zero_init_steps=2)
    steps, batch = 8, 4
    model = flow_velocity if flow else gaussian_eps(torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64))
    noise = torch.randn(batch, *SHAPE, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 4])
    want = diffusers_sample(scheduler, diffusers_guider(rule), model, noise, labels, steps,
                            time_scale=1 / 1000 if flow else 1.0)
    sampler = fg.Sampler(model, fg.solver_from_diffusers(scheduler, steps), rule, null_cond=NULL, backend="torch",
                         progress=False)
    got = sampler.sample(noise, labels)
    assert rel_err(got, want) <= RTOL


def count_forwards(model):
    calls = []

    def counted(x, t, c):
        calls.append(x.shape[0])
        return model(x, t, c)
    return counted, calls


def test_zero_init_steps_run_no_network_and_save_their_forwards():
    model, calls = count_forwards(flow_velocity)
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([1, 2])
    for k in (0, 1, 3):
        calls.clear()
        fg.Sampler(model, fg.FlowEuler(10, shift=3.0), fg.CFGZeroStar(3.0, zero_init_steps=k), null_cond=NULL,
                   progress=False).sample(noise, labels)
        assert calls == [4] * (10 - k)  # k fewer forwards, every remaining one batched cond + null


def test_zero_init_defaults_by_prediction_type_and_refuses_epsilon():
    """The default is 1 zero-init step for flow (and v / sample) plans, none for epsilon plans; asking for zero-init
    with an epsilon plan is refused (m = 0 is x0 = x / sqrt(abar_t) there)."""
    schedule = fg.NoiseSchedule.linear()
    rule = fg.CFGZeroStar(3.0)
    assert rule.zero_init_for(fg.FlowEuler(6).plan) == 1
    assert rule.zero_init_for(fg.DDIM(schedule, 6, prediction_type="v_prediction").plan) == 1
    assert rule.zero_init_for(fg.DDIM(schedule, 6).plan) == 0
    with pytest.raises(ValueError, match="zero_init_steps: 1 zero-init steps with an epsilon-prediction plan"):
        fg.CFGZeroStar(3.0, zero_init_steps=1).zero_init_for(fg.DDIM(schedule, 6).plan)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_zero_init_is_the_update_with_zero_output(backend):
    """A zero-init step is x_next = A x (m = 0); afterwards the rule runs as usual: equal to flow Euler by hand."""
    model = flow_velocity
    solver = fg.FlowEuler(6, shift=2.0)
    noise, labels = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 2])
    sampler = fg.Sampler(model, solver, fg.CFGZeroStar(2.5, zero_init_steps=2), null_cond=NULL, progress=False)
    if backend == "compiled":
        sampler.compile()
    got = sampler.sample(noise, labels)
    x = noise.clone()
    A = reference.Coef.A
    for i in range(2):
        x = solver.plan.coef[i, A] * x  # the update with m = 0 (A = 1 for flow Euler: x stays)
    null = torch.full_like(labels, NULL)
    g = torch.full((3,), 2.5, dtype=torch.float64)
    for i in range(2, 6):
        t = solver.plan.timesteps[i].expand(3)
        m = reference.guided_output(model(x, t, labels), model(x, t, null), g,
                                    rule_params=sampler.guidance.rule_params(), dt=torch.float64)
        x = reference.solver_update(x, m, solver.plan.coef[i])
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_zero_star_on_one_element_samples_is_the_conditional_model():
    """With one coordinate per sample alpha m_u = m_c (up to alpha's 1e-8), so CFG-Zero* is the conditional model
    at any scale (docs/toy.md: the many-coordinates limit is what makes it guide)."""
    c = torch.randn(16, 1, dtype=torch.float64)
    u = torch.randn(16, 1, dtype=torch.float64).sign() * (0.5 + torch.rand(16, 1, dtype=torch.float64))  # |u| >= 0.5
    # m - c = (g - 1) c eps / (u^2 + eps) with eps = 1e-8: below 6 * 4e-8 |c| here
    params = fg.CFGZeroStar(7.0).rule_params()
    m = reference.guided_output(c, u, torch.full((16,), 7.0, dtype=torch.float64), rule_params=params,
                                dt=torch.float64)
    torch.testing.assert_close(m, c, rtol=1e-6, atol=1e-6)


def test_named_schedules_have_mean_one_and_the_stated_ends():
    for steps in (1, 2, 7, 10):
        for name in SCHEDULES:
            s = schedule_shape(name, steps)
            assert s.shape == (steps,) and math.isclose(float(s.mean()), 1.0, abs_tol=1e-12), (name, steps)
    r = torch.linspace(0, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(schedule_shape("linear", 9), 2 * r)
    torch.testing.assert_close(schedule_shape("cosine", 9), 1 - torch.cos(math.pi * r))
    assert schedule_shape("linear", 9)[0] == 0 and schedule_shape("cosine", 9)[0] == 0
    assert schedule_shape("linear-decreasing", 9)[-1] == 0 and schedule_shape("cosine-decreasing", 9)[-1] == 0


def test_schedules_give_each_step_its_scale_and_unit_steps_skip_the_null_half():
    """A linear schedule over 6 steps equals the same scales given as a tensor and as a callable, and equals a
    hand-written loop with each step's CFG scale; its first step (g = 1) runs only the conditional rows."""
    schedule = fg.NoiseSchedule.linear()
    base = gaussian_eps(schedule.alphas_cumprod)
    model, calls = count_forwards(base)
    solver = fg.DDIM(schedule, 6)
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([3, 0])
    scales = 1 + 3.0 * 2 * torch.linspace(0, 1, 6, dtype=torch.float64)  # scale 4: strength 3, shaped 2 r
    results = []
    for rule in (fg.CFG(4.0, schedule="linear"), fg.CFG(schedule=scales),
                 fg.CFG(schedule=lambda i, t: float(scales[i]))):
        calls.clear()
        results.append(fg.Sampler(model, solver, rule, null_cond=NULL, progress=False).sample(noise, labels))
        assert calls == [2] + [4] * 5
    x = noise.clone()
    null = torch.full_like(labels, NULL)
    for i in range(6):
        t = solver.plan.timesteps[i].expand(2)
        c, u = base(x, t, labels), base(x, t, null)
        x = reference.solver_update(x, u + scales[i] * (c - u), solver.plan.coef[i])
    for got in results:
        torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_per_sample_schedule_and_rows_at_scale_one_are_unguided():
    """A [S, B] schedule: each row equals its sample alone; an APG row at scale 1 equals the conditional model."""
    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    solver = fg.DDIM(schedule, 5)
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([1, 4])
    table = torch.stack([torch.ones(5, dtype=torch.float64), torch.linspace(2, 5, 5, dtype=torch.float64)], 1)
    apg = dict(eta=0.2, norm_threshold=1.0, momentum=-0.5)
    both = fg.Sampler(model, solver, fg.APG(schedule=table, **apg), null_cond=NULL, progress=False).sample(noise, labels)
    alone = fg.Sampler(model, solver, fg.APG(schedule=table[:, 1], **apg), null_cond=NULL,
                       progress=False).sample(noise[1:], labels[1:])
    plain = fg.Sampler(model, solver, progress=False).sample(noise[:1], labels[:1])
    torch.testing.assert_close(both[1:], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both[:1], plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conditional", [True, False])
def test_guide_network_gives_the_unconditional_half(conditional):
    """AutoGuidance: m = m_guide + g (m_model - m_guide), the guide reading the conditions (or the null one); equal
    to a hand-written loop; a conditional guide needs no null condition. With ReCFG too (a table of ratios)."""
    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    weak_base = gaussian_eps(schedule.alphas_cumprod * 0.97)
    seen = []

    def weak(x, t, c):
        seen.append(c.clone())
        return weak_base(x, t, c)
    solver = fg.DPMSolver(schedule, 5)
    noise, labels = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0, 2, 4])
    guide = fg.GuideNetwork(weak, conditional=conditional)
    null = None if conditional else NULL
    got = fg.Sampler(model, solver, fg.CFG(2.0, guide=guide), null_cond=null, progress=False).sample(noise, labels)
    assert all(torch.equal(c, labels if conditional else torch.full_like(labels, NULL)) for c in seen)
    ratios = 1 + 0.1 * torch.rand(NULL + 2, 5, *SHAPE, dtype=torch.float64)
    got_re = fg.Sampler(model, solver, fg.ReCFG(2.0, ratios, guide=guide), null_cond=null,
                        progress=False).sample(noise, labels)
    for table in (None, ratios):
        x = noise.clone()
        history = torch.zeros(solver.plan.history_slots, *x.shape, dtype=torch.float64)
        for i in range(5):
            t = solver.plan.timesteps[i].expand(3)
            c = model(x, t, labels)
            u = weak_base(x, t, labels if conditional else torch.full_like(labels, NULL))
            if table is not None:
                u = table[labels, i] * u
            m = u + 2.0 * (c - u)
            out = torch.empty_like(x)
            h = solver.plan.history
            reference.guided_step_into(out, x, m, torch.ones(3, dtype=torch.float64), solver.plan.coef[i],
                                       history=history, hist_coef=h.weights[i], write_slots=h.write_slots[i],
                                       write_coef=h.write_coef[i])
            x = out
        torch.testing.assert_close(got if table is None else got_re, x, rtol=1e-10, atol=1e-10)


def test_compiled_sampler_switching_rules_and_scales_adds_no_compiles():
    from torch._dynamo.utils import counters

    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    sampler = fg.Sampler(model, fg.DDIM(schedule, 4), fg.CFG(3.0, rescale=0.7), null_cond=NULL, backend="torch",
                         progress=False).compile()
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 1])
    rules = [fg.CFG(3.0, rescale=0.7), fg.CFGZeroStar(3.0), fg.APG(3.0, eta=0.0),
             fg.APG(3.0, eta=0.5, momentum=-0.5)]
    for rule in rules:  # warm-up: one call per rule kind
        sampler.sample(noise, labels, guidance=rule)
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    breaks = sum(counters["graph_break"].values())
    for rule in rules + [fg.CFG(7.0, rescale=0.2), fg.CFGZeroStar(1.5, zero_init_steps=0),
                         fg.APG(6.0, eta=0.3, norm_threshold=1.0), fg.APG(2.0, eta=1.0, momentum=0.3)]:
        got = sampler.sample(noise, labels, guidance=rule)
        eager = fg.Sampler(model, fg.DDIM(schedule, 4), rule, null_cond=NULL, backend="torch", progress=False)
        torch.testing.assert_close(got, eager.sample(noise, labels), rtol=1e-9, atol=1e-9)
    assert counters["stats"]["unique_graphs"] == graphs, "a new rule or scale compiled a new graph"
    assert sum(counters["recompiles"].values()) == recompiles
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


def test_bad_rule_arguments_are_refused_by_name():
    cases = [
        (lambda: fg.CFG(3.0, rescale=-0.1), ValueError, "rescale: expected a finite value in \\[0, 1\\]"),
        (lambda: fg.CFG(3.0, rescale=1.5), ValueError, "rescale: "),
        (lambda: fg.CFG(3.0, rescale="0.5"), TypeError, "rescale: expected a real number"),
        (lambda: fg.APG(3.0, eta=-1.0), ValueError, "eta: expected a finite value >= 0"),
        (lambda: fg.APG(3.0, norm_threshold=-2.0), ValueError, "norm_threshold: "),
        (lambda: fg.APG(3.0, momentum=1.0), ValueError, "momentum: expected a finite value in \\(-1, 1\\)"),
        (lambda: fg.APG(3.0, momentum=-1.0), ValueError, "momentum: "),
        (lambda: fg.APG(3.0, momentum=float("nan")), ValueError, "momentum: "),
        (lambda: fg.CFGZeroStar(3.0, zero_init_steps=-1), ValueError, "zero_init_steps: expected an int >= 0"),
        (lambda: fg.CFG(3.0, schedule="exponential"), ValueError, "schedule: expected one of"),
        (lambda: fg.CFG(3.0, schedule=torch.ones(4)), ValueError, "scale: this rule's schedule gives the scale"),
        (lambda: fg.CFG(schedule=torch.ones(2, 2, 2)), ValueError, "schedule: expected a \\[S\\] or \\[S, B\\]"),
        (lambda: fg.CFG(schedule=-torch.ones(4)), ValueError, "schedule: expected finite scales >= 0"),
        (lambda: fg.CFG(schedule=3.0), TypeError, "schedule: expected a name in"),
        (lambda: fg.CFG(3.0, guide=4), TypeError, "guide: expected a GuideNetwork or a callable"),
        (lambda: fg.GuideNetwork("net"), TypeError, "guide: expected a callable guide network"),
    ]
    for make, kind, match in cases:
        with pytest.raises(kind, match=match):
            make()


def test_bad_rule_inputs_at_sampling_are_refused_by_name():
    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 1])

    def run(rule, null=NULL, steps=4):
        return fg.Sampler(model, fg.DDIM(schedule, steps), rule, null_cond=null, progress=False).sample(noise, labels)
    with pytest.raises(ValueError, match=r"schedule: expected \[4\] or \[4, 2\] scales"):
        run(fg.CFG(schedule=torch.ones(5)))
    with pytest.raises(ValueError, match=r"schedule: expected \[4\] or \[4, 2\] scales"):
        run(fg.CFG(schedule=torch.ones(4, 3)))
    with pytest.raises(ValueError, match=r"schedule\(0, "):
        run(fg.CFG(schedule=lambda i, t: -1.0))
    with pytest.raises(ValueError, match="zero_init_steps: 4 zero-init steps leave none"):
        fg.Sampler(flow_velocity, fg.FlowEuler(4), fg.CFGZeroStar(3.0, zero_init_steps=4), null_cond=NULL,
                   progress=False).sample(noise, labels)
    with pytest.raises(ValueError, match="zero_init_steps: 2 zero-init steps with an epsilon-prediction plan"):
        run(fg.CFGZeroStar(3.0, zero_init_steps=2))
    with pytest.raises(ValueError, match="null_cond: APG needs the unconditional"):
        run(fg.APG(3.0), null=None)
    with pytest.raises(ValueError, match="null_cond: CFG needs the unconditional"):
        run(fg.CFG(3.0, guide=fg.GuideNetwork(model, conditional=False)), null=None)
    with pytest.raises(ValueError, match=r"guide: the guide network's output is \(2, 2, 3, 2\); expected the model's"):
        run(fg.CFG(3.0, guide=lambda x, t, c: model(x, t, c)[..., :2]))
    with pytest.raises(ValueError, match="scale: this CFG's schedule gives the scale at every step"):
        fg.Sampler(model, fg.DDIM(schedule, 4), fg.CFG(schedule=torch.ones(4)), null_cond=NULL,
                   progress=False).sample(noise, labels, scale=2.0)


def test_paired_networks_split_by_the_call_batch():
    net = PairedNetworks(lambda x, t, c: x + 1, lambda x, t, c: x - 1, True, cond_first=False, batch=2)
    x = torch.zeros(4, 1)
    assert net(x, torch.zeros(4), torch.zeros(4)).flatten().tolist() == [-1, -1, 1, 1]
    assert net(x[:2], torch.zeros(2), torch.zeros(2)).flatten().tolist() == [1, 1]


def test_onnx_export_refuses_rules_it_cannot_express(tmp_path):
    from fastguide.onnx.export import export

    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    for rule, match in ((fg.APG(3.0), "only CFG and ReCFG"), (fg.CFG(3.0, rescale=0.5), "with rescale"),
                        (fg.CFG(3.0, schedule="cosine"), "with schedule"), (fg.CFG(3.0, guide=model), "with guide")):
        sampler = fg.Sampler(model, fg.DDIM(schedule, 4), rule, null_cond=NULL)
        with pytest.raises(ValueError, match=match):
            export(sampler, tmp_path / "x.onnx", latent_shape=SHAPE)


@pytest.mark.parametrize("compiled", [False, True])
def test_triton_backend_runs_every_rule_like_the_reference(compiled):
    """The fused kernels (under the interpreter on CPU) through the Sampler: float32 samples against the float64
    sampler with the reference step, for each reduction rule (APG with momentum, ReCFG with rescale included)."""
    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    solver = fg.DPMSolver(schedule, 4)
    noise, labels = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0, 2, 4])
    ratios = 1 + 0.1 * torch.rand(NULL + 2, 4, *SHAPE)  # float32: what the kernel reads
    rules = [fg.CFG(3.0, rescale=0.7), fg.CFGZeroStar(torch.tensor([3.0, 1.0, 5.0])),
             fg.APG(4.0, eta=0.2, norm_threshold=1.0, momentum=-0.5, rescale=0.3),
             fg.ReCFG(3.0, ratios, rescale=0.5)]
    fast = fg.Sampler(model, solver, rules[0], null_cond=NULL, backend="triton", progress=False)
    if compiled:
        fast.compile()
    for rule in rules:
        want = fg.Sampler(model, solver, rule, null_cond=NULL, backend="torch", progress=False).sample(noise, labels)
        got = fast.sample(noise.float(), labels, guidance=rule)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_ratio_tables_for_a_guide_network_come_from_the_paired_forward():
    """accumulate_ratio_sums over PairedNetworks: with the guide equal to the model reading the conditions, the
    unconditional half is the conditional one, so every least-squares ratio is exactly 1; with the model as an
    unconditional guide it is the plain table bit for bit; a weaker guide gives another table."""
    schedule = fg.NoiseSchedule.linear()
    model = gaussian_eps(schedule.alphas_cumprod)
    weak = gaussian_eps(schedule.alphas_cumprod * 0.9)
    images = torch.randn(12, *SHAPE, dtype=torch.float64)
    labels = torch.arange(12) % 3

    def table(net):
        sums = fg.accumulate_ratio_sums(net, schedule, images, labels, timesteps=[100, 500, 900], num_classes=3,
                                        samples_per_class=4, null_cond=NULL, batch_size=5, progress=False)
        return sums.finalize("least_squares", dtype=torch.float64).ratios
    same = table(PairedNetworks(model, model, conditional=True))
    torch.testing.assert_close(same[:3], torch.ones_like(same[:3]), rtol=1e-12, atol=1e-12)
    assert torch.equal(table(PairedNetworks(model, model, conditional=False)), table(model))
    assert not torch.allclose(table(PairedNetworks(model, weak, conditional=True)), same)
    with pytest.raises(ValueError, match="x: a paired forward without a batch needs both halves"):
        PairedNetworks(model, weak, True)(torch.zeros(3, *SHAPE), torch.zeros(3), torch.zeros(3, dtype=torch.long))
