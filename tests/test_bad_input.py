"""Bad input raises ValueError/TypeError whose message names the argument and what was expected."""
import math

import numpy as np
import pytest
import torch

import fastguide as fg

SHAPE = (2, 3, 3)
NULL = 3
SCHEDULE = fg.NoiseSchedule.linear()


def model(x, t, cond):
    return torch.tanh(x + (t / 1000).view(-1, 1, 1, 1).to(x.dtype))


def sampler(guidance=None, solver=None, **kw):
    kw.setdefault("null_cond", NULL)
    return fg.Sampler(model, solver or fg.DDIM(SCHEDULE, steps=4), guidance or fg.CFG(2.0), backend="torch",
                      progress=False, **kw)


def noise(batch=2):
    return torch.randn(batch, *SHAPE, dtype=torch.float64)


LABELS = torch.tensor([0, 1])


# ------------------------------------------------------------------ shapes and batches
@pytest.mark.parametrize("shape", [(2, 3, 3), (2, 2, 3, 3, 1), (18,)])
def test_noise_with_the_wrong_number_of_dims(shape):
    with pytest.raises(ValueError, match=r"noise: expected 4 dims \[B, C, H, W\]"):
        sampler().sample(torch.randn(shape), LABELS)


def test_noise_that_is_not_a_float_tensor():
    with pytest.raises(TypeError, match="noise"):
        sampler().sample(np.zeros((2, *SHAPE)), LABELS)
    with pytest.raises(TypeError, match="noise: expected float64/float32/float16/bfloat16"):
        sampler().sample(torch.zeros((2, *SHAPE), dtype=torch.int64), LABELS)


@pytest.mark.parametrize("check_finite", [True, False])  # checked with the sample, or up front
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_noise_with_nan_or_inf(check_finite, bad_value):
    x = noise()
    x[1, 0, 0, 0] = bad_value
    with pytest.raises(ValueError, match="noise: contains NaN or inf"):
        sampler(check_finite=check_finite).sample(x, LABELS)


@pytest.mark.parametrize("clip", [False, True])
def test_inf_noise_is_caught_even_when_the_sample_ends_finite(clip):
    """A model that ignores x and a clipped one-step solver can turn inf noise into a finite sample; the noise
    is still reported."""
    solver = fg.DDIM(fg.NoiseSchedule.linear(clip_sample=clip, set_alpha_to_one=True), steps=1)
    s = fg.Sampler(lambda x, t, c: torch.zeros_like(x), solver, fg.CFG(2.0), null_cond=NULL, backend="torch",
                   progress=False)
    x = noise()
    x[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="noise: contains NaN or inf"):
        s.sample(x, LABELS)


@pytest.mark.parametrize("cond", [torch.tensor([0, 1, 2]), torch.tensor([0]), [0, 1, 2]])
def test_cond_batch_differs_from_noise_batch(cond):
    with pytest.raises(ValueError, match=r"cond: expected 2 conditions \(the noise batch\)"):
        sampler().sample(noise(2), cond)


def test_cond_as_a_single_int_is_not_broadcast():
    with pytest.raises(TypeError, match="cond: expected a \\[B\\] tensor"):
        sampler().sample(noise(2), 1)


def test_model_output_with_the_wrong_shape():
    def bad_model(x, t, cond):
        return x[:, :1]

    s = fg.Sampler(bad_model, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=NULL, progress=False)
    with pytest.raises(ValueError, match="model: output shape"):
        s.sample(noise(), LABELS)


# ------------------------------------------------------------------ steps, eta, spacing, prediction type
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
    with pytest.raises(ValueError, match="shift: expected a float > 0"):
        fg.FlowEuler(10, shift=0.0)


# ------------------------------------------------------------------ diffusers configs
def test_unsupported_diffusers_settings():
    with pytest.raises(ValueError, match="config: thresholding=True"):
        fg.NoiseSchedule.from_diffusers(dict(thresholding=True))
    with pytest.raises(ValueError, match=r"config: unsupported scheduler keys \['karras_sigmas'\]"):
        fg.NoiseSchedule.from_diffusers(dict(karras_sigmas=True))
    with pytest.raises(ValueError, match="config: beta_schedule 'sigmoid' is not supported"):
        fg.NoiseSchedule.from_diffusers(dict(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="config: variance_type 'learned_range' is not supported"):
        fg.NoiseSchedule.from_diffusers(dict(variance_type="learned_range"))
    with pytest.raises(ValueError, match=r"config: trained_betas has shape \(5,\), expected \(1000,\)"):
        fg.NoiseSchedule.from_diffusers(dict(trained_betas=[0.1] * 5))


def test_bad_betas():
    with pytest.raises(ValueError, match="betas: expected finite values in"):
        fg.NoiseSchedule.from_betas([0.1, 1.5, 0.2])
    with pytest.raises(ValueError, match="betas: expected a 1-D sequence"):
        fg.NoiseSchedule.from_betas([[0.1, 0.2]])
    with pytest.raises(ValueError, match="num_train_timesteps: expected an int >= 2"):
        fg.NoiseSchedule.linear(num_train_timesteps=1)


# ------------------------------------------------------------------ guidance
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


def test_per_sample_scale_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"scale: expected 2 per-sample values \(the batch\), got 3"):
        sampler(fg.CFG(torch.tensor([1.0, 2.0, 3.0]))).sample(noise(2), LABELS)
    with pytest.raises(ValueError, match="scale: expected a float or a 1-D"):
        fg.CFG(torch.ones(2, 1))


def test_bad_guidance_interval():
    with pytest.raises(ValueError, match="interval: expected lo <= hi"):
        fg.CFG(2.0, interval=(700, 300))
    with pytest.raises(TypeError, match="interval: expected a \\(lo, hi\\) pair"):
        fg.CFG(2.0, interval=5)


def test_missing_null_cond_for_cfg():
    for guidance in (fg.CFG(2.0), fg.ReCFG(2.0, table=torch.ones(4, 4, *SHAPE))):
        with pytest.raises(ValueError, match="null_cond: .* needs the unconditional"):
            fg.Sampler(model, fg.DDIM(SCHEDULE, steps=4), guidance)


def test_classifier_guidance_needs_an_epsilon_discrete_solver():
    clf = fg.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :3], scale=1.0)
    s = fg.Sampler(model, fg.FlowEuler(4), clf, progress=False)
    with pytest.raises(ValueError, match="guidance: ClassifierGuidance needs an epsilon-prediction"):
        s.sample(noise(), LABELS)
    with pytest.raises(TypeError, match="classifier: expected a callable"):
        fg.ClassifierGuidance("not callable")


# ------------------------------------------------------------------ ReCFG tables
def test_label_outside_the_ratio_table():
    table = torch.ones(3, 4, *SHAPE)  # 2 classes + the mean row
    with pytest.raises(ValueError, match=r"cond: labels \[2\] are outside the ratio table's classes \[0, 2\)"):
        sampler(fg.ReCFG(2.0, table=table)).sample(noise(), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"cond: labels \[-1\] are outside"):
        sampler(fg.ReCFG(2.0, table=table)).sample(noise(), torch.tensor([-1, 1]))


def test_ratio_table_for_other_latents():
    table = torch.ones(4, 4, 2, 3, 4)
    with pytest.raises(ValueError, match=r"table: ratio table is for latents of shape \(2, 3, 4\)"):
        sampler(fg.ReCFG(2.0, table=table)).sample(noise(), LABELS)


def test_ratio_table_with_the_wrong_number_of_steps():
    table = torch.ones(4, 5, *SHAPE)
    with pytest.raises(ValueError, match="table: has 5 timestep rows but the solver has 4 steps"):
        sampler(fg.ReCFG(2.0, table=table)).sample(noise(), LABELS)


def test_ratio_table_that_is_not_a_table():
    with pytest.raises(ValueError, match="table: ReCFG needs a ratio table"):
        fg.ReCFG(2.0)
    with pytest.raises(TypeError, match="table: expected a fastguide.RatioTable or a tensor"):
        fg.ReCFG(2.0, table=np.ones((4, 4, *SHAPE)))
    with pytest.raises(ValueError, match="ratios: expected"):
        fg.ReCFG(2.0, table=torch.ones(4, 4))


def test_recfg_needs_integer_labels():
    with pytest.raises(TypeError, match="cond: ReCFG needs integer condition ids"):
        sampler(fg.ReCFG(2.0, table=torch.ones(4, 4, *SHAPE)),
                null_cond=torch.zeros(5)).sample(noise(), torch.zeros(2, 5))


# ------------------------------------------------------------------ model output
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_model_output_names_the_first_step(bad_value):
    calls = []

    def breaks_at_third_step(x, t, cond):
        calls.append(1)
        out = torch.tanh(x)
        if len(calls) >= 3:
            out = out.clone()
            out[0, 0, 0, 0] = bad_value
        return out

    s = fg.Sampler(breaks_at_third_step, fg.DDIM(SCHEDULE, steps=5), fg.CFG(2.0), null_cond=NULL, progress=False)
    with pytest.raises(ValueError, match=r"model: output contained NaN/inf, first at step 2 \(t=400\)"):
        s.sample(noise(), LABELS)


def test_nan_in_the_unconditional_half_only_is_caught():
    def nan_for_null(x, t, cond):
        out = torch.tanh(x).clone()
        out[cond == NULL] = math.nan
        return out

    s = fg.Sampler(nan_for_null, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=NULL, progress=False)
    with pytest.raises(ValueError, match="model: output contained NaN/inf, first at step 0"):
        s.sample(noise(), LABELS)


# ------------------------------------------------------------------ sampler settings
def test_unknown_backend():
    with pytest.raises(ValueError, match="backend: expected one of"):
        fg.Sampler(model, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=NULL, backend="cuda")


def test_not_a_solver_or_guidance_or_model():
    with pytest.raises(TypeError, match="solver: expected a fastguide solver"):
        fg.Sampler(model, SCHEDULE, fg.CFG(2.0), null_cond=NULL)
    with pytest.raises(TypeError, match="guidance: expected CFG, ReCFG or ClassifierGuidance"):
        fg.Sampler(model, fg.DDIM(SCHEDULE, steps=4), 4.0, null_cond=NULL)
    with pytest.raises(TypeError, match="model: expected a callable"):
        fg.Sampler("unet", fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=NULL)
    with pytest.raises(TypeError, match="schedule: expected a fastguide.NoiseSchedule"):
        fg.DDIM({"beta_schedule": "linear"}, steps=4)


@pytest.mark.parametrize("solver", [fg.DDIM(SCHEDULE, steps=4, eta=1.0), fg.DDIM(SCHEDULE, steps=4)],
                         ids=["stochastic", "deterministic"])
def test_seeds_of_the_wrong_length(solver):
    with pytest.raises(ValueError, match=r"seeds: expected 2 seeds \(one per sample\), got 3"):
        sampler(solver=solver).sample(noise(2), LABELS, seeds=[1, 2, 3])


def test_seeds_that_are_not_ints():
    with pytest.raises(TypeError, match="seeds: expected a sequence of ints"):
        sampler(solver=fg.DDPM(SCHEDULE, steps=4)).sample(noise(2), LABELS, seeds=["a", "b"])
    with pytest.raises(ValueError, match="seeds: expected non-negative ints"):
        sampler(solver=fg.DDPM(SCHEDULE, steps=4)).sample(noise(2), LABELS, seeds=[1, -2])
    with pytest.raises(TypeError, match="seeds"):
        fg.seeded_noise(5, SHAPE)


def test_null_cond_embedding_of_the_wrong_shape():
    cond = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"null_cond: expected shape \(5,\) \(one condition\), got \(4,\)"):
        sampler(null_cond=torch.zeros(4)).sample(noise(), cond)
    with pytest.raises(ValueError, match="null_cond: conditions are tensors"):
        sampler(null_cond=NULL).sample(noise(), cond)


def test_empty_batch():
    with pytest.raises(ValueError, match="noise: expected a non-empty batch"):
        sampler().sample(torch.zeros(0, *SHAPE, dtype=torch.float64), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("impl", ["eager", "unfused", "fused"])
def test_the_loop_a_cuda_graph_captures_leaves_every_step_sum_in_its_buffer(impl):
    """Replays of a captured loop report NaN steps from b.out_sums, so the loop captured with
    sums_into_buffer=True must write every step's output sum there, whichever step implementation runs."""
    from fastguide import loop
    from fastguide.backends import step_impl

    def nan_from_t_400(x, t, cond):
        return torch.tanh(x) + torch.where(t <= 400, math.nan, 0.0).view(-1, 1, 1, 1).to(x.dtype)

    x, plan, rule = noise(), fg.DDIM(SCHEDULE, steps=5).plan, fg.CFG(2.0)
    sg = rule.prepare(plan, LABELS, x.shape[1:])
    pt = loop.PlanTensors.build(plan, sg, x.device, x.dtype)
    b = loop.allocate(x, LABELS, sg, plan.steps, plan.stochastic, NULL, True)
    loop.refill(b, x, LABELS, pt, sg, None, NULL)
    step = step_impl("torch", x.device, fused=impl == "fused")
    model = torch.compile(nan_from_t_400) if impl == "unfused" else nan_from_t_400
    hot = loop.compile_hot_step(b) if impl == "fused" else None
    b.out_sums.fill_(7.0)
    got = loop.run_loop(b, loop.LoopConfig(model, step, hot, plan.clip_range, True), sums_into_buffer=True)
    assert got is b.out_sums
    assert torch.isfinite(b.out_sums).tolist() == [True, True, False, False, False]
    assert (b.out_sums[:2] != 7.0).all()
    with pytest.raises(ValueError, match=r"model: output contained NaN/inf, first at step 2 \(t=400\)"):
        loop.raise_if_not_finite(b, got, x)
