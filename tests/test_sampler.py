"""fg.Sampler's public behaviour: per-sample seeds, dtypes, callbacks, progress bar, input handling, sampling
without a rule, and the errors its inputs raise (ValueError/TypeError naming the argument and what was expected).

The model is conftest's toy_model (with its sampler_for factory); the bad-input tests use conftest's tanh_kit.
"""
import math

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.kernels.reference import Coef

SHAPE = (3, 5, 3)  # odd sizes: the latents of conftest's toy_model
NULL = 4  # toy_model's null label (labels 0..3 are conditions)

SCHEDULE = fg.NoiseSchedule.linear()
STOCHASTIC = [
    pytest.param(lambda: fg.DDIM(SCHEDULE, steps=10, eta=1.0), id="ddim-eta1"),
    pytest.param(lambda: fg.DDPM(SCHEDULE, steps=10), id="ddpm-fixed_small"),
    pytest.param(lambda: fg.DDPM(SCHEDULE, steps=10, variance_type="fixed_large"), id="ddpm-fixed_large"),
]


# ------------------------------------------------------------------ per-sample seeds
@pytest.mark.parametrize("make_solver", STOCHASTIC)
def test_seeded_samples_do_not_depend_on_the_batch(sampler_for, make_solver):
    solver = make_solver()
    assert solver.plan.stochastic
    sampler = sampler_for(solver)
    seeds = list(range(8))
    labels = torch.tensor(seeds) % 4
    whole = sampler.sample(fg.seeded_noise(seeds, SHAPE, torch.float64), labels, seeds=seeds)
    halves = [sampler.sample(fg.seeded_noise(seeds[k:k + 4], SHAPE, torch.float64), labels[k:k + 4],
                             seeds=seeds[k:k + 4]) for k in (0, 4)]
    torch.testing.assert_close(whole, torch.cat(halves), rtol=0, atol=1e-12)
    # a permuted batch permutes the samples
    perm = [5, 2, 7, 0]
    picked = sampler.sample(fg.seeded_noise([seeds[p] for p in perm], SHAPE, torch.float64), labels[perm],
                            seeds=[seeds[p] for p in perm])
    torch.testing.assert_close(picked, whole[perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("make_solver", STOCHASTIC)
def test_per_step_noise_comes_from_the_seed(sampler_for, make_solver):
    """Same x_T, different seeds -> different samples; same seeds twice -> the same samples."""
    sampler = sampler_for(make_solver())
    noise = fg.seeded_noise([0, 1], SHAPE, torch.float64)
    labels = torch.tensor([0, 1])
    a = sampler.sample(noise, labels, seeds=[10, 11])
    assert torch.equal(a, sampler.sample(noise, labels, seeds=[10, 11]))
    b = sampler.sample(noise, labels, seeds=[10, 12])
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_unseeded_stochastic_sampling_uses_torch_global_rng(sampler_for):
    sampler = sampler_for(fg.DDPM(SCHEDULE, steps=5))
    noise = fg.seeded_noise([0, 1], SHAPE, torch.float64)
    torch.manual_seed(3)
    a = sampler.sample(noise, torch.tensor([0, 1]))
    torch.manual_seed(3)
    assert torch.equal(a, sampler.sample(noise, torch.tensor([0, 1])))
    assert not torch.equal(a, sampler.sample(noise, torch.tensor([0, 1])))


# ------------------------------------------------------------------ dtypes
SD_SCHEDULE = fg.NoiseSchedule.scaled_linear()


def eager_low_precision_ddim(model, x, labels, steps, g, dtype, clip):
    """The usual eager way, everything in ``dtype``: what the tolerance of a low-precision run is measured by."""
    abar = SD_SCHEDULE.alphas_cumprod
    stride = 1000 // steps
    x = x.to(dtype)
    null = torch.full_like(labels, NULL)
    for t in reversed(range(0, 1000, stride)):
        tt = torch.full((x.shape[0],), float(t), dtype=dtype)
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
        e_c, e_u = out.chunk(2)
        eps = e_u + g * (e_c - e_u)
        a, a_prev = abar[t].item(), (abar[t - stride].item() if t >= stride else 1.0)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("clip", [False, True])
def test_low_precision_is_close_to_float64(toy_model, sampler_for, dtype, clip):
    steps, g = 10, 2.5
    solver = fg.DDIM(SD_SCHEDULE, steps=steps, clip_sample=clip)
    noise = fg.seeded_noise(range(6), SHAPE, torch.float64)
    labels = torch.arange(6) % 4
    ref = sampler_for(solver, fg.CFG(g)).sample(noise, labels)
    got = sampler_for(solver, fg.CFG(g)).sample(noise.to(dtype), labels)
    assert got.dtype == dtype and got.shape == noise.shape
    assert torch.isfinite(got).all()
    err = (got.double() - ref).abs().max().item()
    # FlashAttention-style bound: at most twice the error of the same computation done eagerly in ``dtype``,
    # plus a few units of the dtype's resolution at the sample's scale.
    eager_err = (eager_low_precision_ddim(toy_model, noise, labels, steps, g, dtype, clip).double()
                 - ref).abs().max().item()
    atol = 8 * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)
    assert err <= 2 * eager_err + atol, (err, eager_err, atol)


def test_float64_run_is_float64_end_to_end(sampler_for):
    solver = fg.DDIM(SCHEDULE, steps=10)
    noise = fg.seeded_noise(range(3), SHAPE, torch.float64)
    seen = []
    out = sampler_for(solver).sample(noise, torch.tensor([0, 1, 2]),
                                                      callback=lambda i, t, x: seen.append(x.dtype))
    assert out.dtype == torch.float64 and set(seen) == {torch.float64}


# ------------------------------------------------------------------ callback, progress
def test_callback_once_per_step_with_index_time_and_sample(sampler_for):
    solver = fg.DDIM(fg.NoiseSchedule.from_diffusers(dict(timestep_spacing="trailing")), steps=7)
    calls = []
    noise = fg.seeded_noise(range(2), SHAPE, torch.float64)
    out = sampler_for(solver).sample(noise, torch.tensor([0, 3]),
                                     callback=lambda i, t, x: calls.append((i, t, x.clone())))
    assert [c[0] for c in calls] == list(range(7))
    assert [c[1] for c in calls] == [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]  # diffusers' trailing t
    assert all(c[2].shape == noise.shape for c in calls)
    assert torch.equal(calls[-1][2], out)
    assert not torch.equal(calls[0][2], calls[1][2])


def test_progress_bar_can_be_turned_off(toy_model, capsys):
    solver = fg.DDIM(SCHEDULE, steps=4)
    noise = fg.seeded_noise(range(2), SHAPE)
    sampler = fg.Sampler(toy_model, solver, fg.CFG(2.0), null_cond=NULL, backend="torch")  # progress on by default
    sampler.sample(noise, torch.tensor([0, 1]), progress=False)
    assert "sampling" not in capsys.readouterr().err
    fg.Sampler(toy_model, solver, fg.CFG(2.0), null_cond=NULL, backend="torch", progress=False).sample(
        noise, torch.tensor([0, 1]))
    assert "sampling" not in capsys.readouterr().err
    sampler.sample(noise, torch.tensor([0, 1]))
    assert "sampling" in capsys.readouterr().err


def test_sample_does_not_modify_its_inputs(sampler_for):
    noise = fg.seeded_noise(range(2), SHAPE, torch.float64)
    labels = torch.tensor([0, 1])
    noise_copy, labels_copy = noise.clone(), labels.clone()
    out = sampler_for(fg.DDIM(SCHEDULE, steps=4)).sample(noise, labels)
    assert torch.equal(noise, noise_copy) and torch.equal(labels, labels_copy)
    assert out.data_ptr() != noise.data_ptr()


def test_labels_as_a_list_and_default_guidance(toy_model):
    noise = fg.seeded_noise(range(2), SHAPE, torch.float64)
    sampler = fg.Sampler(toy_model, fg.DDIM(SCHEDULE, steps=4), progress=False, null_cond=NULL)
    assert torch.equal(sampler.sample(noise, [0, 1]), sampler.sample(noise, torch.tensor([0, 1])))


def test_tensor_conditions_and_null_embedding():
    """Conditions may be embeddings [B, D]; null_cond is then one embedding [D]."""
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(4, SHAPE[0], generator=gen, dtype=torch.float64)

    def emb_model(x, t, cond):
        return torch.tanh(x * 0.5 + (cond @ proj).view(-1, SHAPE[0], 1, 1) + (t / 1000).view(-1, 1, 1, 1))

    cond = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    null = torch.zeros(4, dtype=torch.float64)
    noise = fg.seeded_noise(range(3), SHAPE, torch.float64)
    sampler = fg.Sampler(emb_model, fg.DDIM(SCHEDULE, steps=4), fg.CFG(3.0), null_cond=null, progress=False)
    out = sampler.sample(noise, cond)
    one = sampler.sample(noise[1:2], cond[1:2])
    torch.testing.assert_close(out[1:2], one, rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make_solver", [
    pytest.param(lambda: fg.FlowEuler(8, shift=3.0), id="flow"),
    pytest.param(lambda: fg.DDPM(SD_SCHEDULE, steps=8), id="ddpm"),
    pytest.param(lambda: fg.DDIM(SD_SCHEDULE, steps=8, eta=0.5, prediction_type="v_prediction"), id="ddim-v-eta"),
])
def test_every_solver_runs_in_low_precision(sampler_for, make_solver, dtype):
    """Same seeds, so the same per-step noise: the low-precision run tracks the float64 one to within a few
    unit of the dtype's resolution per step at the sample's scale (the model itself runs in ``dtype``)."""
    solver = make_solver()
    seeds = list(range(5))
    noise = fg.seeded_noise(seeds, SHAPE, torch.float64)
    labels = torch.arange(5) % 4
    ref = sampler_for(solver).sample(noise, labels, seeds=seeds)
    got = sampler_for(solver).sample(noise.to(dtype), labels, seeds=seeds)
    assert got.dtype == dtype and torch.isfinite(got).all()
    err = (got.double() - ref).abs().max().item()
    assert err <= solver.steps * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)  # measured <= 0.2 of it


# ------------------------------------------------------------------ no guidance
@pytest.mark.parametrize("make_solver", [lambda: fg.DDIM(SCHEDULE, steps=6), lambda: fg.FlowEuler(5)],
                         ids=["ddim", "flow"])
def test_without_a_rule_the_conditional_model_runs_alone(toy_model, sampler_for, make_solver):
    """Sampler(model, solver): B rows a step, no null half and no null_cond needed; the same sample as a
    written-out conditional loop over the solver's coefficients."""
    solver = make_solver()
    rows = []

    def counting(x, t, cond):
        rows.append(x.shape[0])
        return toy_model(x, t, cond)

    noise = fg.seeded_noise(range(3), SHAPE, torch.float64)
    labels = torch.tensor([0, 3, 1])
    got = fg.Sampler(counting, solver, progress=False).sample(noise, labels)
    assert rows == [3] * solver.plan.steps
    x = noise.clone()
    for i, t in enumerate(solver.plan.timesteps):
        m = toy_model(x, torch.full((3,), float(t), dtype=torch.float64), labels)
        c = solver.plan.coef[i]
        x = c[Coef.A] * x + c[Coef.B] * m
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)
    # the same as CFG at scale 1, which runs (and needs) the null half
    cfg = sampler_for(solver, fg.CFG(1.0)).sample(noise, labels)
    torch.testing.assert_close(got, cfg, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scale: NoGuidance has no scale to override"):
        fg.Sampler(toy_model, solver, progress=False).sample(noise, labels, scale=2.0)


# ------------------------------------------------------------------ bad input: noise, conditions, model output
@pytest.mark.parametrize("shape", [(2, 3, 3), (2, 2, 3, 3, 1), (18,)])
def test_noise_with_the_wrong_number_of_dims(tanh_kit, shape):
    with pytest.raises(ValueError, match=r"noise: expected 4 dims \[B, C, H, W\]"):
        tanh_kit.sampler().sample(torch.randn(shape), tanh_kit.LABELS)


def test_noise_that_is_not_a_float_tensor(tanh_kit):
    with pytest.raises(TypeError, match="noise"):
        tanh_kit.sampler().sample(np.zeros((2, *tanh_kit.SHAPE)), tanh_kit.LABELS)
    with pytest.raises(TypeError, match="noise: expected float64/float32/float16/bfloat16"):
        tanh_kit.sampler().sample(torch.zeros((2, *tanh_kit.SHAPE), dtype=torch.int64), tanh_kit.LABELS)


@pytest.mark.parametrize("check_finite", [True, False])  # checked with the sample, or up front
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_noise_with_nan_or_inf(tanh_kit, check_finite, bad_value):
    x = tanh_kit.noise()
    x[1, 0, 0, 0] = bad_value
    with pytest.raises(ValueError, match="noise: contains NaN or inf"):
        tanh_kit.sampler(check_finite=check_finite).sample(x, tanh_kit.LABELS)


@pytest.mark.parametrize("clip", [False, True])
def test_inf_noise_is_caught_even_when_the_sample_ends_finite(tanh_kit, clip):
    """A model that ignores x and a clipped one-step solver can turn inf noise into a finite sample; the noise
    is still reported."""
    solver = fg.DDIM(fg.NoiseSchedule.linear(clip_sample=clip, set_alpha_to_one=True), steps=1)
    s = fg.Sampler(lambda x, t, c: torch.zeros_like(x), solver, fg.CFG(2.0), null_cond=tanh_kit.NULL, backend="torch",
                   progress=False)
    x = tanh_kit.noise()
    x[0, 0, 0, 0] = math.inf
    with pytest.raises(ValueError, match="noise: contains NaN or inf"):
        s.sample(x, tanh_kit.LABELS)


@pytest.mark.parametrize("cond", [torch.tensor([0, 1, 2]), torch.tensor([0]), [0, 1, 2]])
def test_cond_batch_differs_from_noise_batch(tanh_kit, cond):
    with pytest.raises(ValueError, match=r"cond: expected 2 conditions \(the noise batch\)"):
        tanh_kit.sampler().sample(tanh_kit.noise(2), cond)


def test_cond_as_a_single_int_is_not_broadcast(tanh_kit):
    with pytest.raises(TypeError, match="cond: expected a \\[B\\] tensor"):
        tanh_kit.sampler().sample(tanh_kit.noise(2), 1)


def test_null_cond_embedding_of_the_wrong_shape(tanh_kit):
    cond = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"null_cond: expected shape \(5,\) \(one condition\), got \(4,\)"):
        tanh_kit.sampler(null_cond=torch.zeros(4)).sample(tanh_kit.noise(), cond)
    with pytest.raises(ValueError, match="null_cond: conditions are tensors"):
        tanh_kit.sampler(null_cond=tanh_kit.NULL).sample(tanh_kit.noise(), cond)


def test_empty_batch(tanh_kit):
    with pytest.raises(ValueError, match="noise: expected a non-empty batch"):
        tanh_kit.sampler().sample(torch.zeros(0, *tanh_kit.SHAPE, dtype=torch.float64),
                                  torch.zeros(0, dtype=torch.long))


def test_model_output_with_the_wrong_shape(tanh_kit):
    def bad_model(x, t, cond):
        return x[:, :1]

    s = fg.Sampler(bad_model, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=tanh_kit.NULL, progress=False)
    with pytest.raises(ValueError, match="model: output shape"):
        s.sample(tanh_kit.noise(), tanh_kit.LABELS)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_model_output_names_the_first_step(tanh_kit, bad_value):
    calls = []

    def breaks_at_third_step(x, t, cond):
        calls.append(1)
        out = torch.tanh(x)
        if len(calls) >= 3:
            out = out.clone()
            out[0, 0, 0, 0] = bad_value
        return out

    s = fg.Sampler(breaks_at_third_step, fg.DDIM(SCHEDULE, steps=5), fg.CFG(2.0), null_cond=tanh_kit.NULL,
                   progress=False)
    with pytest.raises(ValueError, match=r"model: output contained NaN/inf, first at step 2 \(t=400\)"):
        s.sample(tanh_kit.noise(), tanh_kit.LABELS)


def test_nan_in_the_unconditional_half_only_is_caught(tanh_kit):
    def nan_for_null(x, t, cond):
        out = torch.tanh(x).clone()
        out[cond == tanh_kit.NULL] = math.nan
        return out

    s = fg.Sampler(nan_for_null, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=tanh_kit.NULL, progress=False)
    with pytest.raises(ValueError, match="model: output contained NaN/inf, first at step 0"):
        s.sample(tanh_kit.noise(), tanh_kit.LABELS)


# ------------------------------------------------------------------ bad input: sampler settings and seeds
def test_unknown_backend(tanh_kit):
    with pytest.raises(ValueError, match="backend: expected one of"):
        fg.Sampler(tanh_kit.model, fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=tanh_kit.NULL, backend="cuda")


def test_not_a_solver_or_guidance_or_model(tanh_kit):
    with pytest.raises(TypeError, match="solver: expected a fastguide solver"):
        fg.Sampler(tanh_kit.model, SCHEDULE, fg.CFG(2.0), null_cond=tanh_kit.NULL)
    with pytest.raises(TypeError, match="guidance: expected a fastguide guidance rule"):
        fg.Sampler(tanh_kit.model, fg.DDIM(SCHEDULE, steps=4), 4.0, null_cond=tanh_kit.NULL)
    with pytest.raises(TypeError, match="model: expected a callable"):
        fg.Sampler("unet", fg.DDIM(SCHEDULE, steps=4), fg.CFG(2.0), null_cond=tanh_kit.NULL)
    with pytest.raises(TypeError, match="schedule: expected a fastguide.NoiseSchedule"):
        fg.DDIM({"beta_schedule": "linear"}, steps=4)


@pytest.mark.parametrize("solver", [fg.DDIM(SCHEDULE, steps=4, eta=1.0), fg.DDIM(SCHEDULE, steps=4)],
                         ids=["stochastic", "deterministic"])
def test_seeds_of_the_wrong_length(tanh_kit, solver):
    with pytest.raises(ValueError, match=r"seeds: expected 2 seeds \(one per sample\), got 3"):
        tanh_kit.sampler(solver=solver).sample(tanh_kit.noise(2), tanh_kit.LABELS, seeds=[1, 2, 3])


def test_seeds_that_are_not_ints(tanh_kit):
    with pytest.raises(TypeError, match="seeds: expected a sequence of ints"):
        tanh_kit.sampler(solver=fg.DDPM(SCHEDULE, steps=4)).sample(tanh_kit.noise(2), tanh_kit.LABELS, seeds=["a", "b"])
    with pytest.raises(ValueError, match="seeds: expected non-negative ints"):
        tanh_kit.sampler(solver=fg.DDPM(SCHEDULE, steps=4)).sample(tanh_kit.noise(2), tanh_kit.LABELS, seeds=[1, -2])
    with pytest.raises(TypeError, match="seeds"):
        fg.seeded_noise(5, tanh_kit.SHAPE)
