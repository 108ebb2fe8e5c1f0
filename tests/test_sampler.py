"""fg.Sampler: per-sample seeds, dtypes, callbacks, progress bar, input handling."""
import math

import pytest
import torch

import fastguide as fg
from fastguide.kernels.reference import Coef

SHAPE = (3, 5, 3)  # odd sizes
NULL = 4


def toy_model(x, t, cond):
    gen = torch.Generator().manual_seed(21)
    mix = (torch.randn(SHAPE[0], SHAPE[0], generator=gen, dtype=torch.float64) / 2).to(x.dtype)
    emb = torch.randn(NULL + 1, *SHAPE, generator=gen, dtype=torch.float64).to(x.dtype) / 2
    h = (mix[None, :, :, None, None] * x[:, None]).sum(2) + emb[cond] + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
    return torch.tanh(h)


def sampler_for(solver, guidance=None, **kw):
    kw.setdefault("progress", False)
    return fg.Sampler(toy_model, solver, guidance or fg.CFG(2.5), null_cond=NULL, backend="torch", **kw)


SCHEDULE = fg.NoiseSchedule.linear()
STOCHASTIC = [
    pytest.param(lambda: fg.DDIM(SCHEDULE, steps=10, eta=1.0), id="ddim-eta1"),
    pytest.param(lambda: fg.DDPM(SCHEDULE, steps=10), id="ddpm-fixed_small"),
    pytest.param(lambda: fg.DDPM(SCHEDULE, steps=10, variance_type="fixed_large"), id="ddpm-fixed_large"),
]


# ------------------------------------------------------------------ per-sample seeds
@pytest.mark.parametrize("make_solver", STOCHASTIC)
def test_seeded_samples_do_not_depend_on_the_batch(make_solver):
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
def test_per_step_noise_comes_from_the_seed(make_solver):
    """Same x_T, different seeds -> different samples; same seeds twice -> the same samples."""
    sampler = sampler_for(make_solver())
    noise = fg.seeded_noise([0, 1], SHAPE, torch.float64)
    labels = torch.tensor([0, 1])
    a = sampler.sample(noise, labels, seeds=[10, 11])
    assert torch.equal(a, sampler.sample(noise, labels, seeds=[10, 11]))
    b = sampler.sample(noise, labels, seeds=[10, 12])
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_seeded_noise_rows_depend_only_on_their_seed():
    a = fg.seeded_noise([3, 9, 4], SHAPE, torch.float64)
    b = fg.seeded_noise([9], SHAPE, torch.float64)
    assert a.shape == (3, *SHAPE) and a.dtype == torch.float64
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[2])
    assert torch.equal(fg.seeded_noise([9], SHAPE, torch.float32)[0], b[0].float())
    assert abs(fg.seeded_noise(list(range(64)), SHAPE).std().item() - 1) < 0.1


def test_unseeded_stochastic_sampling_uses_torch_global_rng():
    sampler = sampler_for(fg.DDPM(SCHEDULE, steps=5))
    noise = fg.seeded_noise([0, 1], SHAPE, torch.float64)
    torch.manual_seed(3)
    a = sampler.sample(noise, torch.tensor([0, 1]))
    torch.manual_seed(3)
    assert torch.equal(a, sampler.sample(noise, torch.tensor([0, 1])))
    assert not torch.equal(a, sampler.sample(noise, torch.tensor([0, 1])))


# ------------------------------------------------------------------ dtypes
SD_SCHEDULE = fg.NoiseSchedule.scaled_linear()


def eager_low_precision_ddim(x, labels, steps, g, dtype, clip):
    """The usual eager way, everything in ``dtype``: what the tolerance of a low-precision run is measured by."""
    abar = SD_SCHEDULE.alphas_cumprod
    stride = 1000 // steps
    x = x.to(dtype)
    null = torch.full_like(labels, NULL)
    for t in reversed(range(0, 1000, stride)):
        tt = torch.full((x.shape[0],), float(t), dtype=dtype)
        out = toy_model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
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
def test_low_precision_is_close_to_float64(dtype, clip):
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
    eager_err = (eager_low_precision_ddim(noise, labels, steps, g, dtype, clip).double() - ref).abs().max().item()
    atol = 8 * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)
    assert err <= 2 * eager_err + atol, (err, eager_err, atol)


def test_float64_run_is_float64_end_to_end():
    solver = fg.DDIM(SCHEDULE, steps=10)
    noise = fg.seeded_noise(range(3), SHAPE, torch.float64)
    seen = []
    out = sampler_for(solver).sample(noise, torch.tensor([0, 1, 2]),
                                                      callback=lambda i, t, x: seen.append(x.dtype))
    assert out.dtype == torch.float64 and set(seen) == {torch.float64}


# ------------------------------------------------------------------ callback, progress
def test_callback_once_per_step_with_index_time_and_sample():
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


def test_progress_bar_can_be_turned_off(capsys):
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


def test_sample_does_not_modify_its_inputs():
    noise = fg.seeded_noise(range(2), SHAPE, torch.float64)
    labels = torch.tensor([0, 1])
    noise_copy, labels_copy = noise.clone(), labels.clone()
    out = sampler_for(fg.DDIM(SCHEDULE, steps=4)).sample(noise, labels)
    assert torch.equal(noise, noise_copy) and torch.equal(labels, labels_copy)
    assert out.data_ptr() != noise.data_ptr()


def test_labels_as_a_list_and_default_guidance():
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
def test_every_solver_runs_in_low_precision(make_solver, dtype):
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


# ------------------------------------------------------------------ buffers reused across calls
def _unit_ratio_table(solver, scale=0.9):
    gen = torch.Generator().manual_seed(5)
    ratios = 1 + scale * (torch.rand(NULL + 1, solver.plan.steps, *SHAPE, generator=gen, dtype=torch.float64) - 0.5)
    return fg.RatioTable(ratios)


def test_reused_buffers_give_the_same_samples_as_a_fresh_sampler():
    """One sampler driven through calls that change everything a cached buffer could hold stale (noise,
    labels, scale, rule, batch, null label, per-step noise) equals a new sampler for every call."""
    solver = fg.DDIM(SCHEDULE, steps=5, eta=0.7)
    table = _unit_ratio_table(solver)
    ts = solver.plan.timesteps
    calls = [
        dict(batch=4, guidance=fg.CFG(2.0)),
        dict(batch=4, guidance=fg.CFG(2.0)),  # same key, new noise / labels / seeds
        dict(batch=4, guidance=fg.CFG(2.0), scale=4.5),
        dict(batch=4, guidance=fg.CFG(2.0), scale=torch.tensor([1.0, 3.0, 6.0, 0.5])),
        dict(batch=4, guidance=fg.ReCFG(3.0, table=table)),
        dict(batch=3, guidance=fg.ReCFG(3.0, table=table)),
        dict(batch=4, guidance=fg.CFG(2.0, interval=(float(ts[3]), float(ts[0])))),
        dict(batch=4, guidance=fg.CFG(2.0), null=1),
        dict(batch=4, guidance=fg.CFG(2.0)),  # back to the first key
    ]
    reused = sampler_for(solver)
    for k, call in enumerate(calls):
        gen = torch.Generator().manual_seed(100 + k)
        seeds = list(range(10 * k, 10 * k + call["batch"]))
        noise = fg.seeded_noise(seeds, SHAPE, torch.float64)
        labels = torch.randint(0, NULL, (call["batch"],), generator=gen)
        reused.null_cond = call.get("null", NULL)
        fresh = fg.Sampler(toy_model, solver, call["guidance"], null_cond=call.get("null", NULL), backend="torch",
                           progress=False)
        kw = {"scale": call["scale"]} if "scale" in call else {}
        got = reused.sample(noise, labels, seeds=seeds, guidance=call["guidance"], **kw)
        want = fresh.sample(noise, labels, seeds=seeds, **kw)
        assert torch.equal(got, want), f"call {k}: max diff {(got - want).abs().max().item():.3g}"
    assert len(reused.buffers) == 4  # cfg B4, recfg B4, recfg B3, cfg-interval B4: the other calls reused a key


def test_loop_buffer_cache_is_bounded():
    from fastguide.sampler import MAX_CACHED_LOOPS

    sampler = sampler_for(fg.DDIM(SCHEDULE, steps=2))
    for batch in range(1, MAX_CACHED_LOOPS + 4):
        out = sampler.sample(fg.seeded_noise(range(batch), SHAPE, torch.float64), torch.arange(batch) % NULL)
        assert out.shape[0] == batch
    assert len(sampler.buffers) == MAX_CACHED_LOOPS


def test_a_sample_call_from_inside_a_callback_does_not_disturb_the_outer_loop():
    solver = fg.DDIM(SCHEDULE, steps=4)
    noise, labels = fg.seeded_noise(range(3), SHAPE, torch.float64), torch.tensor([0, 1, 2])
    want = sampler_for(solver).sample(noise, labels)
    sampler = sampler_for(solver)
    inner = []

    def nested(step, t, x):  # same sampler, same static key, other inputs
        inner.append(sampler.sample(fg.seeded_noise(range(50 + step, 53 + step), SHAPE, torch.float64), labels))

    got = sampler.sample(noise, labels, callback=nested)
    assert torch.equal(got, want)
    assert len(inner) == 4 and not torch.equal(inner[0], inner[1])


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


def test_loop_buffer_cache_keeps_the_most_recently_used_keys():
    from fastguide.sampler import MAX_CACHED_LOOPS

    sampler = sampler_for(fg.DDIM(SCHEDULE, steps=2))

    def run(batch):
        sampler.sample(fg.seeded_noise(range(batch), SHAPE, torch.float64), torch.arange(batch) % NULL)

    run(1)
    first = next(iter(sampler.buffers.values()))
    for batch in range(2, MAX_CACHED_LOOPS + 1):
        run(batch)
        run(1)  # keeps batch 1 in use
    run(MAX_CACHED_LOOPS + 1)  # evicts batch 2, the least recently used
    assert any(b is first for b in sampler.buffers.values())
    assert sorted(b.batch for b in sampler.buffers.values()) == [1, *range(3, MAX_CACHED_LOOPS + 2)]


def test_a_null_embedding_changed_in_place_is_used():
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(4, SHAPE[0], generator=gen, dtype=torch.float64)

    def emb_model(x, t, cond):
        return torch.tanh(x * 0.5 + (cond @ proj).view(-1, SHAPE[0], 1, 1))

    null = torch.zeros(4, dtype=torch.float64)
    cond = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    noise = fg.seeded_noise(range(2), SHAPE, torch.float64)
    sampler = fg.Sampler(emb_model, fg.DDIM(SCHEDULE, steps=3), fg.CFG(3.0), null_cond=null, progress=False)
    sampler.sample(noise, cond)
    null.add_(1.0)
    want = fg.Sampler(emb_model, fg.DDIM(SCHEDULE, steps=3), fg.CFG(3.0), null_cond=null.clone(),
                      progress=False).sample(noise, cond)
    assert torch.equal(sampler.sample(noise, cond), want)


def test_concurrent_calls_on_one_sampler_from_threads_do_not_share_buffers():
    """A server may call one Sampler from several threads: each call must get buffers no other running call
    uses (torch ops release the GIL, so the calls really overlap; without the claim lock this failed about
    every other run)."""
    import threading

    solver = fg.DDIM(SCHEDULE, steps=6)
    sampler = sampler_for(solver)
    inputs = [(fg.seeded_noise(range(10 * k, 10 * k + 3), SHAPE, torch.float64), torch.tensor([k % 4, 1, 2]))
              for k in range(8)]
    want = [sampler_for(solver).sample(noise, labels) for noise, labels in inputs]
    got = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def work(k):
        start.wait()
        for _ in range(5):
            got[k] = sampler.sample(*inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(inputs)):
        assert torch.equal(got[k], want[k]), f"thread {k}"


# ------------------------------------------------------------------ no guidance
@pytest.mark.parametrize("make_solver", [lambda: fg.DDIM(SCHEDULE, steps=6), lambda: fg.FlowEuler(5)],
                         ids=["ddim", "flow"])
def test_without_a_rule_the_conditional_model_runs_alone(make_solver):
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
