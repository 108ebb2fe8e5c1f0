"""fastguide.loop: loop buffers reused across calls (and refilled, never served stale), the bounded LRU buffer
cache, re-entrant and concurrent claims, the static-buffer loop a CUDA graph replays, the B-row phase outside a
guidance interval, and the per-step sums a captured loop leaves in its buffer.

Models come from conftest.py: toy_model / sampler_for (the sampler tests' ToyEps), tiny_net / eager_sample (the
conv net of the compiled-sampler tests) and tanh_kit.
"""
import math
import types
import warnings

import pytest
import torch

import fastguide as fg
from fastguide.loop import BufferCache, LRUCache

SHAPE = (3, 5, 3)  # the latents of conftest's toy_model
NULL = 4  # toy_model's null label
SCHEDULE = fg.NoiseSchedule.linear()


# ------------------------------------------------------------------ buffers reused across calls
def _unit_ratio_table(solver, scale=0.9):
    gen = torch.Generator().manual_seed(5)
    ratios = 1 + scale * (torch.rand(NULL + 1, solver.plan.steps, *SHAPE, generator=gen, dtype=torch.float64) - 0.5)
    return fg.RatioTable(ratios)


def test_reused_buffers_give_the_same_samples_as_a_fresh_sampler(toy_model, sampler_for):
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


def test_loop_buffer_cache_is_bounded(sampler_for):
    from fastguide.sampler import MAX_CACHED_LOOPS

    sampler = sampler_for(fg.DDIM(SCHEDULE, steps=2))
    for batch in range(1, MAX_CACHED_LOOPS + 4):
        out = sampler.sample(fg.seeded_noise(range(batch), SHAPE, torch.float64), torch.arange(batch) % NULL)
        assert out.shape[0] == batch
    assert len(sampler.buffers) == MAX_CACHED_LOOPS


def test_loop_buffer_cache_keeps_the_most_recently_used_keys(sampler_for):
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


def test_a_sample_call_from_inside_a_callback_does_not_disturb_the_outer_loop(sampler_for):
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


def test_concurrent_calls_on_one_sampler_from_threads_do_not_share_buffers(sampler_for):
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


# ------------------------------------------------------------------ the caches themselves
def test_lru_cache_drops_the_least_recently_used_entry():
    cache = LRUCache(2)
    a, b, c = object(), object(), object()
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # "a" is now the most recently used
    cache.put("c", c)
    assert len(cache) == 2 and cache.get("b") is None
    assert cache.get("a") is a and cache.get("c") is c
    cache.clear()
    assert len(cache) == 0 and cache.values() == []


def test_buffer_cache_hands_a_claimed_key_fresh_buffers_that_are_not_cached():
    cache = BufferCache(4)
    made = []

    def allocate():
        made.append(object())
        return made[-1]

    with cache.claim("k", allocate) as outer:
        with cache.claim("k", allocate) as inner:  # the same key while claimed: fresh buffers
            assert inner is not outer
        assert cache.values() == [outer]  # the fresh ones were not cached
    with cache.claim("k", allocate) as again:  # released: the cached buffers again
        assert again is outer
    assert len(made) == 2


# ------------------------------------------------------------------ the static-buffer loop (what a CUDA graph replays)
@torch.no_grad()
def test_static_buffer_loop_equals_eager_for_new_inputs(tiny_net, eager_sample):
    """cuda_graph=True on the CPU: warns, then runs the same static-buffer loop a CUDA graph would replay."""
    net, solver, table, B, SHAPE = tiny_net
    sampler = fg.Sampler(net, solver, fg.ReCFG(2.0, table=table), null_cond=10, progress=False)
    sampler.compile(cuda_graph=True)
    buffers = None
    for call, (seed0, g) in enumerate([(0, 2.0), (100, 4.5), (200, torch.tensor([1.0, 3.0, 6.0, 0.5]))]):
        noise = fg.seeded_noise(range(seed0, seed0 + B), SHAPE)
        labels = torch.randint(0, 10, (B,))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = sampler.sample(noise, labels, scale=g)
        assert any("cuda_graph" in str(m.message) for m in w)
        want = eager_sample(net, solver, fg.ReCFG(g, table=table), noise, labels)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        (entry,) = sampler.buffers.values()  # one static key: the buffers were reused, not reallocated
        buffers = entry.x2.data_ptr() if buffers is None else buffers
        assert entry.x2.data_ptr() == buffers


@torch.no_grad()
def test_static_buffer_loop_with_stochastic_solver_and_seeds(tiny_net, eager_sample):
    net, _, table, B, SHAPE = tiny_net
    solver = fg.DDIM(fg.NoiseSchedule.linear(), steps=5, eta=1.0)
    sampler = fg.Sampler(net, solver, fg.CFG(3.0), null_cond=10, progress=False).compile(cuda_graph=True)
    for seed0 in (0, 50):
        seeds = list(range(seed0, seed0 + B))
        noise = fg.seeded_noise(seeds, SHAPE)
        labels = torch.tensor([4, 4, 0, 2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = sampler.sample(noise, labels, seeds=seeds)
        want = eager_sample(net, solver, fg.CFG(3.0), noise, labels, seeds=seeds)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_guidance_interval_runs_half_batch_outside_and_saves_work(tiny_net):
    net, solver, _, B, SHAPE = tiny_net
    rows_seen = []

    def counting(x, t, c):
        rows_seen.append(x.shape[0])
        return net(x, t, c)

    ts = solver.plan.timesteps
    lo, hi = float(ts[3]), float(ts[0])  # guide the first 4 of 6 steps
    sampler = fg.Sampler(counting, solver, fg.CFG(3.0, interval=(lo, hi)), null_cond=10, progress=False)
    sampler.sample(fg.seeded_noise(range(B), SHAPE), torch.arange(B))
    assert rows_seen == [2 * B] * 4 + [B] * 2
    full = 2 * B * solver.plan.steps
    assert sum(rows_seen) / full == pytest.approx((4 * 2 + 2) / 12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_replay_equals_eager_on_gpu(tiny_net, eager_sample):
    net, solver, table, B, SHAPE = tiny_net
    net = net.cuda()
    sampler = fg.Sampler(net, solver, fg.ReCFG(2.0, table=table), null_cond=10, progress=False)
    sampler.compile(cuda_graph=True)
    for seed0, g in ((0, 2.0), (7, 5.0), (99, 1.5)):
        noise = fg.seeded_noise(range(seed0, seed0 + B), SHAPE, device="cuda")
        labels = torch.randint(0, 10, (B,), device="cuda")
        got = sampler.sample(noise, labels, scale=g)
        want = eager_sample(net, solver, fg.ReCFG(g, table=table), noise, labels)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (entry,) = sampler.buffers.values()
    assert entry.graph is not None


# ------------------------------------------------------------------ per-step sums of a captured loop
@pytest.mark.parametrize("impl", ["eager", "unfused", "fused"])
def test_the_loop_a_cuda_graph_captures_leaves_every_step_sum_in_its_buffer(tanh_kit, impl):
    """Replays of a captured loop report NaN steps from b.out_sums, so the loop captured with
    sums_into_buffer=True must write every step's output sum there, whichever step implementation runs."""
    from fastguide import loop
    from fastguide.backends import step_impl

    def nan_from_t_400(x, t, cond):
        return torch.tanh(x) + torch.where(t <= 400, math.nan, 0.0).view(-1, 1, 1, 1).to(x.dtype)

    x, plan, rule = tanh_kit.noise(), fg.DDIM(SCHEDULE, steps=5).plan, fg.CFG(2.0)
    sg = rule.prepare(plan, tanh_kit.LABELS, x.shape[1:])
    pt = loop.PlanTensors.build(plan, sg, x.device, x.dtype)
    b = loop.allocate(x, tanh_kit.LABELS, sg, plan.steps, plan.stochastic, tanh_kit.NULL, True)
    loop.refill(b, x, tanh_kit.LABELS, pt, sg, None, tanh_kit.NULL)
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


@pytest.mark.parametrize("slots, message", [([[0], [1]], r"step 1 .* \[1\]"), ([[0], [-1]], r"step 1 .* \[-1\]"),
                                            ([[0, 0], [0, 1]], r"step 0 .* \[0, 0\]")])
def test_a_plan_writing_bad_history_slots_is_refused_once_on_the_host(tanh_kit, slots, message):
    """The steps read write slots from device tensors without a sync (the fused kernel clamps them), so a plan's
    slots are checked once on the host when its tensors are built: distinct, in [0, K)."""
    import dataclasses

    from fastguide.solvers import History

    base = fg.DPMSolver(fg.NoiseSchedule.linear(), steps=2, order=2).plan  # K = 1 slot, W = 1 write a step
    w = len(slots[0])
    history = History(base.history.weights, torch.tensor(slots), torch.zeros(2, w, 3, dtype=torch.float64))
    bad = types.SimpleNamespace(plan=dataclasses.replace(base, history=history))
    with pytest.raises(ValueError, match=rf"^solver: {message}; expected distinct slots in \[0, 1\)$"):
        tanh_kit.sampler(solver=bad).sample(tanh_kit.noise(), tanh_kit.LABELS)
