"""Guidance rules (CFG, ReCFG, classifier guidance, guidance interval, per-sample scales) through fg.Sampler, the
rule's memo of a float scale, and the errors a rule's arguments raise (scale, interval, null_cond, classifier
guidance, ReCFG tables that do not fit the labels / latents / steps).

The expected samples come from a DDIM loop written out in this file from the textbook formulas (REFERENCE
sections 1-2), evaluated in float64; fastguide's plans and reference step are what is under test. The eps model
is conftest's ToyEps on this file's latents; the bad-input tests use conftest's tanh_kit.
"""
import math

import numpy as np
import pytest
import torch

import fastguide as fg

SHAPE = (2, 3, 5)  # odd sizes
NUM_CLASSES, NULL = 3, 3
STEPS = 8
EXACT = dict(rtol=0, atol=1e-12)  # fp64: same math, possibly different association


@pytest.fixture
def make_eps(toy_eps):
    """make_eps(): a fresh deterministic nonlinear eps model (conftest's ToyEps: labels 0..9, seed 11) whose
    conditional and null outputs differ; it records its batch sizes."""
    return lambda: toy_eps(SHAPE, 10, seed=11)


def noise_and_labels(batch=4, seed=0):
    x = torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    labels = torch.arange(batch) % NUM_CLASSES
    return x, labels


SCHEDULE = fg.NoiseSchedule.linear()


def ddim_solver(steps=STEPS, **kw):
    return fg.DDIM(SCHEDULE, steps=steps, **kw)


def reference_ddim(model, x, labels, combine, steps=STEPS, guided=lambda t: True, eps_fn=None):
    """DDIM (eta=0, leading spacing, no clipping) written out: x0 = (x - sqrt(1-a) eps)/sqrt(a),
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.  ``combine(i, eps_c, eps_u)`` is the guidance rule."""
    abar = SCHEDULE.alphas_cumprod.numpy()
    stride = 1000 // steps
    timesteps = [stride * k for k in reversed(range(steps))]
    null = torch.full_like(labels, NULL)
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
        eps = model(x, tt, labels)
        if eps_fn is not None:
            eps = eps_fn(i, t, x, eps)
        if guided(t):
            eps = combine(i, eps, model(x, tt, null))
        a, a_prev = abar[t], (abar[t - stride] if t - stride >= 0 else 1.0)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def cfg_combine(g):
    def combine(i, eps_c, eps_u):
        gb = g.view(-1, 1, 1, 1) if isinstance(g, torch.Tensor) else g
        return eps_u + gb * (eps_c - eps_u)
    return combine


def conditional_only(i, eps_c, eps_u):
    return eps_c


@pytest.fixture
def run(make_eps):
    """run(guidance, x, labels, solver=DDIM(8 steps), model=make_eps(), **kw): a torch-backend sample."""

    def run_(guidance, x, labels, solver=None, model=None, **kw):
        model = make_eps() if model is None else model
        sampler = fg.Sampler(model, solver or ddim_solver(), guidance, null_cond=NULL, backend="torch",
                             progress=False)
        return sampler.sample(x, labels, **kw)

    return run_


# ------------------------------------------------------------------ CFG
def test_cfg_formula_matches_written_out_ddim(run, make_eps):
    x, labels = noise_and_labels()
    got = run(fg.CFG(3.0), x, labels)
    torch.testing.assert_close(got, reference_ddim(make_eps(), x, labels, cfg_combine(3.0)), **EXACT)
    # and guidance does something: the conditional sample is far from the guided one
    assert (got - reference_ddim(make_eps(), x, labels, conditional_only)).abs().max() > 1e-2


def test_cfg_scale_one_equals_purely_conditional_sampler(run, make_eps):
    x, labels = noise_and_labels()
    expected = reference_ddim(make_eps(), x, labels, conditional_only, guided=lambda t: False)
    torch.testing.assert_close(run(fg.CFG(1.0), x, labels), expected, **EXACT)
    # the same through fastguide's own B-row conditional path (no rule: the conditional model alone)
    model = make_eps()
    unguided = fg.Sampler(model, ddim_solver(), backend="torch", progress=False).sample(x, labels)
    assert model.batch_sizes == [x.shape[0]] * STEPS
    assert torch.equal(unguided, run(fg.CFG(1.0), x, labels))


def test_cfg_from_w_equals_cfg_one_plus_w(run):
    x, labels = noise_and_labels()
    assert torch.equal(run(fg.CFG.from_w(2.5), x, labels), run(fg.CFG(3.5), x, labels))
    w = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert torch.equal(run(fg.CFG.from_w(w), x, labels), run(fg.CFG(w + 1), x, labels))
    assert fg.CFG.from_w(2.5).scale == 3.5


def test_cfg_batched_forward_is_one_call_of_2b_rows_per_step(run, make_eps):
    x, labels = noise_and_labels(batch=3)
    model = make_eps()
    run(fg.CFG(2.0), x, labels, model=model)
    assert model.batch_sizes == [6] * STEPS


def test_cond_first_false_gives_the_same_sample(run, make_eps):
    x, labels = noise_and_labels()
    a = run(fg.CFG(2.0), x, labels)
    sampler = fg.Sampler(make_eps(), ddim_solver(), fg.CFG(2.0), null_cond=NULL, backend="torch", progress=False,
                         cond_first=False)
    torch.testing.assert_close(sampler.sample(x, labels), a, **EXACT)


def test_per_sample_scale_equals_each_sample_alone(run, make_eps):
    x, labels = noise_and_labels(batch=4)
    scales = torch.tensor([1.0, 2.0, 4.5, 7.0], dtype=torch.float64)
    batched = run(fg.CFG(scales), x, labels)
    for b in range(4):
        alone = run(fg.CFG(float(scales[b])), x[b:b + 1], labels[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], alone, **EXACT)
    torch.testing.assert_close(batched, reference_ddim(make_eps(), x, labels, cfg_combine(scales)), **EXACT)


def test_guidance_interval_runs_b_rows_outside_and_is_conditional_there(run, make_eps):
    steps = 10  # leading spacing: t = 900, 800, ..., 0
    lo, hi = 300, 700
    x, labels = noise_and_labels(batch=3)
    model = make_eps()
    got = run(fg.CFG(4.0, interval=(lo, hi)), x, labels, solver=ddim_solver(steps), model=model)
    timesteps = [900 - 100 * k for k in range(steps)]
    assert model.batch_sizes == [6 if lo <= t <= hi else 3 for t in timesteps]
    expected = reference_ddim(make_eps(), x, labels, cfg_combine(4.0), steps=steps, guided=lambda t: lo <= t <= hi)
    torch.testing.assert_close(got, expected, **EXACT)
    everywhere = reference_ddim(make_eps(), x, labels, cfg_combine(4.0), steps=steps)
    assert (got - everywhere).abs().max() > 1e-3  # the interval matters


def test_a_changed_scale_attribute_is_not_served_from_the_memo():
    solver = fg.DDIM(SCHEDULE, steps=3)
    guide = fg.CFG(2.0)
    labels = torch.tensor([0, 1])
    first = guide.prepare(solver.plan, labels, SHAPE)
    assert guide.prepare(solver.plan, labels, SHAPE).g1 is first.g1  # memo hit: same scale and batch
    guide.scale = 5.0
    assert torch.equal(guide.prepare(solver.plan, labels, SHAPE).g1, torch.full((3, 2), 5.0, dtype=torch.float64))
    assert torch.equal(guide.prepare(solver.plan, torch.tensor([0, 1, 2]), SHAPE).g1,
                       torch.full((3, 3), 5.0, dtype=torch.float64))


# ------------------------------------------------------------------ ReCFG
def test_recfg_with_unit_ratios_equals_cfg_exactly(run):
    x, labels = noise_and_labels()
    ones = torch.ones(NUM_CLASSES + 1, STEPS, *SHAPE, dtype=torch.float64)
    scales = torch.tensor([1.5, 3.0, 3.0, 6.0], dtype=torch.float64)
    for scale in (3.0, scales):
        cfg = run(fg.CFG(scale), x, labels)
        assert torch.equal(run(fg.ReCFG(scale, table=ones), x, labels), cfg)
        assert torch.equal(run(fg.ReCFG(scale, table=fg.RatioTable(ones)), x, labels), cfg)


def test_recfg_uses_the_ratio_row_of_each_label_and_step(run, make_eps):
    x, labels = noise_and_labels()
    gen = torch.Generator().manual_seed(5)
    table = 0.5 + torch.rand(NUM_CLASSES + 1, STEPS, *SHAPE, generator=gen, dtype=torch.float64)
    g = 3.0

    def recfg(i, eps_c, eps_u):
        return g * eps_c + (1 - g) * table[labels, i] * eps_u

    got = run(fg.ReCFG(g, table=table), x, labels)
    torch.testing.assert_close(got, reference_ddim(make_eps(), x, labels, recfg), **EXACT)
    assert (got - run(fg.CFG(g), x, labels)).abs().max() > 1e-3


def test_recfg_unknown_label_can_use_the_mean_row(run, make_eps):
    x, _ = noise_and_labels(batch=2)
    table = 0.5 + torch.rand(NUM_CLASSES + 1, STEPS, *SHAPE, dtype=torch.float64)
    outside = torch.tensor([NUM_CLASSES + 5, 1])
    got = run(fg.ReCFG(2.0, table=table, unknown_label="mean"), x, outside)
    rows = torch.tensor([NUM_CLASSES, 1])  # the mean row is the last one

    def recfg(i, eps_c, eps_u):
        return 2.0 * eps_c + (1 - 2.0) * table[rows, i] * eps_u

    torch.testing.assert_close(got, reference_ddim(make_eps(), x, outside, recfg), **EXACT)


# ------------------------------------------------------------------ classifier guidance
class LinearClassifier:
    """logits = W flatten(x) + b: grad_x log softmax(logits)[y] = W[y] - sum_k p_k W[k] in closed form."""

    def __init__(self, seed=3):
        gen = torch.Generator().manual_seed(seed)
        n = int(np.prod(SHAPE))
        self.weight = torch.randn(NUM_CLASSES, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        self.bias = torch.randn(NUM_CLASSES, generator=gen, dtype=torch.float64)

    def __call__(self, x, t):
        return x.flatten(1) @ self.weight.to(x.dtype).T + self.bias.to(x.dtype)

    def log_prob(self, x, labels):
        return torch.log_softmax(self(x, None), -1).gather(1, labels.view(-1, 1)).squeeze(1)

    def grad_log_prob(self, x, labels):
        p = torch.softmax(self(x, None), -1)
        return (self.weight[labels] - p @ self.weight).view_as(x)


def test_classifier_guidance_scale_zero_equals_conditional_sampler(run, make_eps):
    x, labels = noise_and_labels()
    model = make_eps()
    got = run(fg.ClassifierGuidance(LinearClassifier(), scale=0.0), x, labels, model=model)
    assert model.batch_sizes == [x.shape[0]] * STEPS  # B rows: no unconditional half
    expected = reference_ddim(make_eps(), x, labels, conditional_only, guided=lambda t: False)
    torch.testing.assert_close(got, expected, **EXACT)


def test_classifier_guidance_single_step_matches_closed_form_gradient(run, make_eps):
    """eps' = eps - s sqrt(1 - abar_t) grad log p(y | x_t), then one DDIM step (classifier runs in float32)."""
    clf, scale = LinearClassifier(), 2.5
    x, labels = noise_and_labels()
    seen = []
    run(fg.ClassifierGuidance(clf, scale=scale), x, labels, callback=lambda i, t, xi: seen.append(xi.clone()))

    def guided(i, t, xt, eps):
        return eps - scale * math.sqrt(1 - SCHEDULE.alphas_cumprod[t].item()) * clf.grad_log_prob(xt, labels)

    # the first step by hand from the same x_T
    t, stride = (STEPS - 1) * (1000 // STEPS), 1000 // STEPS
    a, a_prev = SCHEDULE.alphas_cumprod[t].item(), SCHEDULE.alphas_cumprod[t - stride].item()
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float64)
    eps = guided(0, t, x, make_eps()(x, tt, labels))
    x_prev = math.sqrt(a_prev) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(seen[0], x_prev, rtol=0, atol=1e-5)
    # the gradient term is not negligible at this step, so the check above can fail
    no_guidance = math.sqrt(a_prev) * (x - math.sqrt(1 - a) * make_eps()(x, tt, labels)) / math.sqrt(a) \
        + math.sqrt(1 - a_prev) * make_eps()(x, tt, labels)
    assert (seen[0] - no_guidance).abs().max() > 1e-2


def test_classifier_guidance_whole_run_matches_written_out_loop(run, make_eps):
    clf, scale = LinearClassifier(), 2.5
    x, labels = noise_and_labels()

    def guided(i, t, xt, eps):
        return eps - scale * math.sqrt(1 - SCHEDULE.alphas_cumprod[t].item()) * clf.grad_log_prob(xt, labels)

    expected = reference_ddim(make_eps(), x, labels, conditional_only, guided=lambda t: False, eps_fn=guided)
    got = run(fg.ClassifierGuidance(clf, scale=scale), x, labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # float32 gradients, amplified over 8 steps


def test_classifier_guidance_raises_the_classifier_log_prob(run):
    clf = LinearClassifier()
    x, labels = noise_and_labels(batch=16, seed=4)
    plain = run(fg.ClassifierGuidance(clf, scale=0.0), x, labels)
    guided = run(fg.ClassifierGuidance(clf, scale=8.0), x, labels)
    lp_plain, lp_guided = clf.log_prob(plain, labels), clf.log_prob(guided, labels)
    assert lp_guided.mean() > lp_plain.mean() + 0.1
    assert (lp_guided > lp_plain).float().mean() >= 0.75


def test_classifier_guidance_per_sample_scale(run):
    clf = LinearClassifier()
    x, labels = noise_and_labels()
    scales = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64)
    batched = run(fg.ClassifierGuidance(clf, scale=scales), x, labels)
    for b in range(4):
        alone = run(fg.ClassifierGuidance(clf, scale=float(scales[b])), x[b:b + 1], labels[b:b + 1])
        # the float32 classifier's matmul may round differently at another batch size
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ bad input: scale, interval, null_cond, classifier
@pytest.mark.parametrize("make", [
    lambda s: fg.CFG(s), lambda s: fg.ReCFG(s, table=torch.ones(4, 4, *SHAPE)),
    lambda s: fg.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :3], scale=s),
])
def test_negative_or_nonfinite_scale(make):
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale: expected a finite value >= 0"):
            make(bad)
    with pytest.raises(ValueError, match="scale: expected finite values >= 0"):
        make(torch.tensor([1.0, -2.0]))
    with pytest.raises(TypeError, match="scale: expected a float or a \\[B\\] tensor"):
        make("4")


def test_per_sample_scale_of_the_wrong_length(tanh_kit):
    with pytest.raises(ValueError, match=r"scale: expected 2 per-sample values \(the batch\), got 3"):
        tanh_kit.sampler(fg.CFG(torch.tensor([1.0, 2.0, 3.0]))).sample(tanh_kit.noise(2), tanh_kit.LABELS)
    with pytest.raises(ValueError, match="scale: expected a float or a 1-D"):
        fg.CFG(torch.ones(2, 1))


def test_bad_guidance_interval():
    with pytest.raises(ValueError, match="interval: expected lo <= hi"):
        fg.CFG(2.0, interval=(700, 300))
    with pytest.raises(TypeError, match="interval: expected a \\(lo, hi\\) pair"):
        fg.CFG(2.0, interval=5)


def test_missing_null_cond_for_cfg(tanh_kit):
    for guidance in (fg.CFG(2.0), fg.ReCFG(2.0, table=torch.ones(4, 4, *tanh_kit.SHAPE))):
        with pytest.raises(ValueError, match="null_cond: .* needs the unconditional"):
            fg.Sampler(tanh_kit.model, fg.DDIM(SCHEDULE, steps=4), guidance)


def test_classifier_guidance_needs_a_diffusion_solver(tanh_kit):
    clf = fg.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :3], scale=1.0)
    s = fg.Sampler(tanh_kit.model, fg.FlowEuler(4), clf, progress=False)
    with pytest.raises(ValueError, match="guidance: ClassifierGuidance needs a diffusion solver's plan"):
        s.sample(tanh_kit.noise(), tanh_kit.LABELS)
    with pytest.raises(TypeError, match="classifier: expected a callable"):
        fg.ClassifierGuidance("not callable")


# ------------------------------------------------------------------ bad input: ReCFG tables
def test_label_outside_the_ratio_table(tanh_kit):
    table = torch.ones(3, 4, *tanh_kit.SHAPE)  # 2 classes + the mean row
    with pytest.raises(ValueError, match=r"cond: labels \[2\] are outside the ratio table's classes \[0, 2\)"):
        tanh_kit.sampler(fg.ReCFG(2.0, table=table)).sample(tanh_kit.noise(), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cond: labels \[-1\] are outside"):
        tanh_kit.sampler(fg.ReCFG(2.0, table=table)).sample(tanh_kit.noise(), torch.tensor([-1, 1]))


def test_ratio_table_for_other_latents(tanh_kit):
    table = torch.ones(4, 4, 2, 3, 4)
    with pytest.raises(ValueError, match=r"table: ratio table is for latents of shape \(2, 3, 4\)"):
        tanh_kit.sampler(fg.ReCFG(2.0, table=table)).sample(tanh_kit.noise(), tanh_kit.LABELS)


def test_ratio_table_with_the_wrong_number_of_steps(tanh_kit):
    table = torch.ones(4, 5, *tanh_kit.SHAPE)
    with pytest.raises(ValueError, match="table: has 5 timestep rows but the solver has 4 steps"):
        tanh_kit.sampler(fg.ReCFG(2.0, table=table)).sample(tanh_kit.noise(), tanh_kit.LABELS)


def test_ratio_table_that_is_not_a_table(tanh_kit):
    with pytest.raises(ValueError, match="table: ReCFG needs a ratio table"):
        fg.ReCFG(2.0)
    with pytest.raises(TypeError, match="table: expected a fastguide.RatioTable or a tensor"):
        fg.ReCFG(2.0, table=np.ones((4, 4, *tanh_kit.SHAPE)))
    with pytest.raises(ValueError, match="ratios: expected"):
        fg.ReCFG(2.0, table=torch.ones(4, 4))


def test_recfg_needs_integer_labels(tanh_kit):
    with pytest.raises(TypeError, match="cond: ReCFG needs integer condition ids"):
        tanh_kit.sampler(fg.ReCFG(2.0, table=torch.ones(4, 4, *tanh_kit.SHAPE)),
                         null_cond=torch.zeros(5)).sample(tanh_kit.noise(), torch.zeros(2, 5))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("solver", ["ddim", "dpm++2m", "heun"])
def test_classifier_guidance_of_a_v_or_x0_model_is_that_of_its_eps_model(prediction_type, solver, tanh_kit):
    """The same network written as eps, v and x0 prediction (exact conversions) samples the same under
    classifier guidance: the added score is the same whatever the model predicts (Dhariwal & Nichol's eps rule
    is the reference)."""
    schedule = fg.NoiseSchedule.linear()
    abar = schedule.alphas_cumprod

    def eps_model(x, t, c):
        return torch.tanh(x * 0.7 + (t / 1000).view(-1, 1, 1, 1).to(x.dtype))

    def other(x, t, c):  # t may be fractional (Heun): abar interpolated, as a continuous-time model would
        lo = t.floor().long().clamp(max=len(abar) - 2)
        w = (t - lo).view(-1, 1, 1, 1)
        a = (abar[lo].view(-1, 1, 1, 1) * (1 - w) + abar[lo + 1].view(-1, 1, 1, 1) * w).to(x.dtype)
        eps = eps_model(x, t, c)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else x0

    def make(pred):
        if solver == "ddim":
            return fg.DDIM(schedule, steps=6, prediction_type=pred)
        if solver == "dpm++2m":
            return fg.DPMSolver(schedule, 6, prediction_type=pred)
        return fg.Heun(schedule, 4, prediction_type=pred, spacing="leading")

    weight = torch.randn(3, int(np.prod(tanh_kit.SHAPE)), dtype=torch.float64)
    clf = fg.ClassifierGuidance(lambda x, t: x.flatten(1).double() @ weight.T, scale=3.0)
    noise = tanh_kit.noise()
    want = fg.Sampler(eps_model, make("epsilon"), clf, backend="torch", progress=False).sample(noise, tanh_kit.LABELS)
    got = fg.Sampler(other, make(prediction_type), clf, backend="torch", progress=False).sample(noise, tanh_kit.LABELS)
    plain = fg.Sampler(other, make(prediction_type), fg.NoGuidance(), backend="torch", progress=False).sample(
        noise, tanh_kit.LABELS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the classifier runs in float32
    assert (got - plain).abs().max() > 1e-2  # the guidance really acts
