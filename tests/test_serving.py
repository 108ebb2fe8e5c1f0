"""The request batcher (fastguide/serving.py): 200 concurrent requests of mixed labels, scales, seeds, step counts
and rules give each request's result alone in its bucket, bit for bit; a NaN-producing request fails alone; a full
queue rejects; cancel withdraws a waiting request; close drains (or fails what waits); asyncio callers; metrics;
bad fields named. The network is the embedded digits model."""
import asyncio
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fastguide.demo import digits
from fastguide.serving import Batcher, BatcherClosed, QueueFull, SampleRequest, digits_batcher


@pytest.fixture(scope="module")
def digits_model():
    return digits.load_digits_model()


class GatedModel(torch.nn.Module):
    """The digits model behind a gate (the worker blocks in its first forward until the test opens it), that
    returns NaN for the rows of label ``nan_label``."""

    def __init__(self, model, nan_label=None):
        super().__init__()
        self.model, self.nan_label = model, nan_label
        self.num_classes = model.num_classes
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def forward(self, x, t, c):
        self.entered.set()
        self.gate.wait(30)
        out = self.model(x, t, c)
        if self.nan_label is not None:
            out = torch.where((c == self.nan_label).view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)
        return out


def _batcher(model, **kw):
    rules = {"cfg": digits.make_guidance("cfg", 3.0), "apg": digits.make_guidance("apg", 2.0)}
    kw = {"buckets": (1, 4), "max_wait_s": 0.005, **kw}
    return Batcher(model, lambda n: digits.make_solver("unipc", n), rules, null_cond=digits.NULL_LABEL,
                   latent_shape=digits.IMAGE_SHAPE, steps_range=(2, 12), **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_200_concurrent_mixed_requests_equal_each_alone_in_its_bucket(workers):
    batcher = digits_batcher(buckets=(1, 4, 8), max_wait_s=0.02, workers=workers).start(warmup=False)
    rng = random.Random(0)
    rules = ["cfg", "apg", "recfg-ls", "cfg-zero-star"]
    asks = [dict(cond=rng.randrange(10), seed=1000 + i, steps=rng.randint(4, 10), scale=round(rng.uniform(1, 5), 3),
                 rule=rng.choice(rules)) for i in range(200)]
    with ThreadPoolExecutor(16) as pool:  # 16 submitting threads
        futures = list(pool.map(lambda a: batcher.submit(**a), asks))
        results = [f.result(timeout=120) for f in futures]
    batcher.close()
    by_batch = {}
    for ask, res in zip(asks, results):
        assert res.request == SampleRequest(**ask)
        by_batch.setdefault((res.worker, res.batch), []).append(res)
    assert any(len(rs) > 1 and len({r.request.steps for r in rs}) > 1 for rs in by_batch.values()), \
        "no batch mixed step counts: the test did not exercise co-batching"
    for rs in by_batch.values():
        assert len({r.request.rule for r in rs}) == 1, "requests of two rules shared a batch"
        assert len({r.bucket for r in rs}) == 1 and len(rs) <= rs[0].bucket
    assert {r.worker for r in results} == set(range(workers)), "a worker ran no batch"
    for res in results:
        alone = batcher.sample_alone(res.request, res.bucket)
        assert torch.equal(res.sample, alone), f"request {res.request} differs from itself alone"
    m = batcher.metrics()
    assert (m.submitted, m.completed, m.failed, m.queue_depth) == (200, 200, 0, 0)
    assert m.batches == len(by_batch) and 0 < m.batch_fill <= 1


def test_a_nan_request_fails_alone(digits_model):
    model = GatedModel(digits_model, nan_label=7)
    batcher = _batcher(model, buckets=(4,), max_wait_s=5.0).start(warmup=False)
    model.gate.clear()
    first = batcher.submit(1, seed=0, steps=3)  # runs alone (the gate holds it) so the next four share a batch
    model.entered.wait(10)
    asks = [dict(cond=c, seed=s, steps=st) for c, s, st in ((3, 1, 4), (7, 2, 6), (5, 3, 4), (0, 4, 5))]
    futures = [batcher.submit(**a) for a in asks]
    model.gate.set()
    first.result(timeout=60)
    with pytest.raises(ValueError, match=r"sample: .*cond 7, seed 2.*NaN"):
        futures[1].result(timeout=60)
    good = [futures[i].result(timeout=60) for i in (0, 2, 3)]
    assert len({r.batch for r in good}) == 1 and good[0].bucket == 4
    batcher.close()
    for r in good:
        assert torch.isfinite(r.sample).all()
        assert torch.equal(r.sample, batcher.sample_alone(r.request, 4))
    m = batcher.metrics()
    assert (m.completed, m.failed) == (4, 1)


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
def test_full_queue_rejects_cancel_withdraws_and_close_drains(digits_model, continuous):
    model = GatedModel(digits_model)
    batcher = _batcher(model, max_queue=3, max_wait_s=0.0, continuous=continuous).start(warmup=False)
    model.gate.clear()
    running = batcher.submit(0, seed=0, steps=3)
    model.entered.wait(10)  # the worker is inside the first batch: the next ones wait in the queue
    waiting = [batcher.submit(c, seed=c, steps=4) for c in (1, 2, 3)]
    with pytest.raises(QueueFull, match="queue: 3 requests are waiting"):
        batcher.submit(4, seed=4, steps=4)
    assert waiting[1].cancel() and waiting[1].cancelled()
    closer = threading.Thread(target=batcher.close)  # drain=True: what waits still runs
    closer.start()
    with pytest.raises(BatcherClosed):
        for _ in range(100):  # close() marks the batcher closing at once; wait until it has
            batcher.submit(5, seed=5, steps=4)
            threading.Event().wait(0.01)
    model.gate.set()
    closer.join(60)
    assert not closer.is_alive()
    assert running.result().request.cond == 0
    assert [waiting[i].result().request.cond for i in (0, 2)] == [1, 3]
    m = batcher.metrics()
    assert (m.completed, m.rejected, m.cancelled, m.queue_depth) == (3, 1, 1, 0)


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
def test_two_workers_close_drains_every_queued_request_and_warm_up_both(digits_model, continuous):
    """Both workers blocked in a forward (the gate), 12 requests queued behind them: close() still runs every
    one; the warm-up ran each worker's own sampler or pool (each holds its own loop buffers)."""
    model = GatedModel(digits_model)
    batcher = _batcher(model, max_wait_s=0.0, continuous=continuous, workers=2).start()
    assert set(batcher.warmup_s) == {"cfg/1", "cfg/4", "apg/1", "apg/4"}
    if not continuous:
        assert all(len(w.sampler.buffers) > 0 for w in batcher._workers)
    model.gate.clear()
    model.entered.clear()
    futures = [batcher.submit(c % 10, seed=c, steps=3 + c % 4, rule=("cfg", "apg")[c % 2]) for c in range(12)]
    model.entered.wait(10)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    model.gate.set()
    closer.join(120)
    assert not closer.is_alive()
    results = [f.result(timeout=1) for f in futures]
    assert [r.request.seed for r in results] == list(range(12))
    m = batcher.metrics()
    assert (m.submitted, m.completed, m.failed, m.queue_depth) == (12, 12, 0, 0)


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
def test_close_without_drain_fails_what_waits(digits_model, continuous):
    model = GatedModel(digits_model)
    batcher = _batcher(model, max_wait_s=0.0, continuous=continuous).start(warmup=False)
    model.gate.clear()
    running = batcher.submit(0, seed=0, steps=3)
    model.entered.wait(10)
    waiting = [batcher.submit(c, seed=c, steps=4) for c in (1, 2)]
    batcher.close(drain=False, timeout=0.1)
    for f in waiting:
        with pytest.raises(BatcherClosed, match="closed before this request ran"):
            f.result(timeout=10)
    model.gate.set()
    batcher.close()
    assert running.result(timeout=60).request.cond == 0


@pytest.mark.parametrize("continuous", [False, True], ids=["batches", "continuous"])
def test_asyncio_callers(digits_model, continuous):
    # continuous: one bucket size, so each sample is bit-identical to sample_alone at it
    batcher = _batcher(digits_model, continuous=continuous, buckets=(4,) if continuous else (1, 4)).start(warmup=False)

    async def main():
        return await asyncio.gather(*(batcher.asubmit(c, seed=50 + c, steps=3 + c % 4, scale=2.0) for c in range(10)))

    results = asyncio.run(main())
    batcher.close()
    assert [r.request.cond for r in results] == list(range(10))
    for r in results:
        assert torch.equal(r.sample, batcher.sample_alone(r.request, r.bucket))


@pytest.mark.parametrize("workers", [1, 2])
def test_continuous_requests_join_running_rows_and_equal_each_alone(workers):
    """continuous=True: requests join the running rows between steps (a request starts while others of other step
    counts and rules are mid-loop) and leave after their own last step; with one bucket size each equals its
    request alone in a batch of that size, bit for bit. With two workers both pools run rows."""
    batcher = digits_batcher(buckets=(8,), max_wait_s=0.02, continuous=True, workers=workers).start(warmup=False)
    rng = random.Random(1)
    rules = ["cfg", "apg", "recfg-ls", "cfg-zero-star"]
    asks = [dict(cond=rng.randrange(10), seed=2000 + i, steps=rng.randint(4, 10), scale=round(rng.uniform(1, 5), 3),
                 rule=rng.choice(rules)) for i in range(80)]
    with ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda a: batcher.submit(**a), asks))
        results = [f.result(timeout=120) for f in futures]
    batcher.close()
    assert {r.worker for r in results} == set(range(workers)), "a worker ran no row"
    # the steps each one ran on its worker's pool (steps are numbered per worker)
    spans = [(r.worker, r.batch, r.batch + r.request.steps, r.request) for r in results]
    joined_mid_loop = sum(any(wa == wb and a0 < b0 < a1 and ra.steps != rb.steps for wa, a0, a1, ra in spans)
                          for wb, b0, _, rb in spans)
    assert joined_mid_loop >= 10, "requests did not join running rows: the test did not exercise continuous batching"
    shared = sum(any(wa == wb and rb.rule != ra.rule for wb, b0, b1, rb in spans if b0 < a1 and a0 < b1)
                 for wa, a0, a1, ra in spans)
    assert shared >= 10, "no rows of two rules ran at the same steps"
    for ask, res in zip(asks, results):
        assert res.request == SampleRequest(**ask) and res.bucket == 8
        assert torch.equal(res.sample, batcher.sample_alone(res.request, 8)), f"{res.request} differs from itself alone"
    m = batcher.metrics()
    assert (m.submitted, m.completed, m.failed, m.queue_depth) == (80, 80, 0, 0)
    assert m.batches >= max(a1 for _, _, a1, _ in spans) and 0 < m.batch_fill <= 1


def test_continuous_a_nan_request_fails_alone(digits_model):
    model = GatedModel(digits_model, nan_label=7)
    batcher = _batcher(model, buckets=(4,), max_wait_s=0.0, continuous=True).start(warmup=False)
    model.gate.clear()
    first = batcher.submit(1, seed=0, steps=6)  # its first step holds the worker: the next ones join it later
    model.entered.wait(10)
    asks = [dict(cond=c, seed=s, steps=st) for c, s, st in ((3, 1, 4), (7, 2, 6), (5, 3, 3))]
    futures = [batcher.submit(**a) for a in asks]
    model.gate.set()
    with pytest.raises(ValueError, match=r"sample: .*cond 7, seed 2.*NaN"):
        futures[1].result(timeout=60)
    good = [first.result(timeout=60)] + [futures[i].result(timeout=60) for i in (0, 2)]
    batcher.close()
    assert good[1].batch == good[2].batch == 1 and good[0].batch == 0  # they joined the first row at its step 1
    for r in good:
        assert torch.isfinite(r.sample).all()
        assert torch.equal(r.sample, batcher.sample_alone(r.request, 4))
    m = batcher.metrics()
    assert (m.completed, m.failed) == (3, 1)


def test_step_buckets_pad_every_batch_to_one_loop_length(digits_model):
    """With step_buckets each batch's loop runs the smallest length >= its most steps (one loop, and on CUDA one
    captured graph, per rule, bucket and length); results are still each request's alone."""
    batcher = _batcher(digits_model, buckets=(4,), step_buckets=(6, 12), max_wait_s=0.05).start()
    assert set(batcher.warmup_s) == {f"{r}/4/{n}" for r in ("cfg", "apg") for n in (6, 12)}
    futures = [batcher.submit(c, seed=c, steps=s, rule="apg") for c, s in ((1, 3), (2, 5), (3, 9), (4, 12))]
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    lengths = {b.plan.t.shape[0] for b in batcher.sampler.buffers.values()}
    assert lengths == {6, 12}, lengths  # the warm-up's; no batch made a loop of another length
    for r in results:
        assert torch.equal(r.sample, batcher.sample_alone(r.request, 4))
    with pytest.raises(ValueError, match="step_buckets: expected increasing loop lengths, the last >= the most"):
        _batcher(digits_model, step_buckets=(6, 10))


def test_warmup_times_every_rule_and_bucket_and_metrics_text(digits_model):
    batcher = _batcher(digits_model, buckets=(1, 2)).start()
    assert set(batcher.warmup_s) == {"cfg/1", "cfg/2", "apg/1", "apg/2"}
    assert all(s > 0 for s in batcher.warmup_s.values())
    for c in range(3):
        batcher.submit(c, seed=c, steps=4).result(timeout=60)
    batcher.close()
    text = batcher.metrics().prometheus_text()
    samples = dict(re.findall(r"^(fastguide_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M))
    assert samples["fastguide_completed_total"] == "3" and samples["fastguide_submitted_total"] == "3"
    assert samples["fastguide_queue_depth"] == "0"
    assert float(samples['fastguide_latency_seconds{quantile="0.5"}']) > 0
    assert 'fastguide_warmup_seconds{rule="apg",bucket="2"}' in samples
    for line in text.splitlines():  # every line a comment or "name{labels} value"
        assert line.startswith("# ") or re.fullmatch(r'fastguide_\w+(\{[a-z]+="[^"]*"(,[a-z]+="[^"]*")*\})? \S+', line)


@pytest.mark.parametrize("field, value, error", [
    ("cond", 10, "cond: expected a label in \\[0, 10\\)"), ("cond", -1, "cond:"), ("cond", "3", "cond:"),
    ("cond", 2.0, "cond:"), ("cond", True, "cond:"), ("seed", -1, "seed:"), ("seed", 1.5, "seed:"),
    ("seed", 2**63, "seed:"), ("steps", 1, "steps: expected an int in \\[2, 12\\]"), ("steps", 13, "steps:"),
    ("steps", 4.0, "steps:"), ("scale", -0.5, "scale:"), ("scale", float("nan"), "scale:"),
    ("scale", float("inf"), "scale:"), ("scale", "2", "scale:"), ("rule", "cfgg", "rule: expected one of"),
    ("rule", 3, "rule:"),
])
def test_bad_request_fields_are_named(digits_model, field, value, error):
    batcher = _batcher(digits_model).start(warmup=False)
    ask = dict(cond=1, seed=1, steps=4, scale=2.0, rule="cfg")
    ask[field] = value
    with pytest.raises((ValueError, TypeError), match=error):
        batcher.submit(ask.pop("cond"), **ask)
    batcher.close()


def test_bad_batcher_arguments_and_lifecycle(digits_model):
    make = lambda n: digits.make_solver("unipc", n)  # noqa: E731
    rules = {"cfg": digits.make_guidance("cfg", 3.0)}
    common = dict(null_cond=digits.NULL_LABEL, latent_shape=digits.IMAGE_SHAPE, steps_range=(2, 8))
    for kw, error in [(dict(buckets=(4, 1)), "buckets: expected increasing"), (dict(buckets=(0,)), "buckets:"),
                      (dict(max_wait_s=-1), "max_wait_s:"), (dict(max_queue=0), "max_queue:"),
                      (dict(steps_range=(5, 3)), "steps_range:"), (dict(workers=0), "workers: expected an int >= 1")]:
        with pytest.raises(ValueError, match=error):
            Batcher(digits_model, make, rules, **{**common, **kw})
    for kw in (dict(cuda_graph=True), dict(step_buckets=(8,))):
        with pytest.raises(ValueError, match="continuous: steps are scheduled one at a time"):
            Batcher(digits_model, make, rules, continuous=True, **common, **kw)
    with pytest.raises(ValueError, match="rules: expected a non-empty mapping"):
        Batcher(digits_model, make, {}, **common)
    with pytest.raises(TypeError, match="solver_for:"):
        Batcher(digits_model, "unipc", rules, **common)
    batcher = Batcher(digits_model, make, rules, **common)
    with pytest.raises(BatcherClosed, match="not running"):
        batcher.submit(1, seed=1, steps=4)
    with pytest.raises(ValueError, match="bucket: expected one of"):
        batcher.sample_alone(SampleRequest(1, 1, 4, 2.0, "cfg"), 3)
    batcher.start(warmup=False)
    with pytest.raises(RuntimeError, match="already started"):
        batcher.start()
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.submit(1, seed=1, steps=4)
