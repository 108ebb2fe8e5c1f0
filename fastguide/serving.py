"""Co-batched sampling requests: a thread-safe, asyncio-friendly batcher over Samplers.

    batcher = Batcher(model, solver_for, {"cfg": CFG(3.0)}, null_cond=10, latent_shape=(1, 8, 8)).start()
    future = batcher.submit(cond=7, seed=1, steps=6, scale=4.0)        # concurrent.futures.Future
    sample = future.result().sample                                     # [1, 8, 8]
    result = await batcher.asubmit(cond=3, seed=2, steps=10)            # from asyncio code
    batcher.close()                                                     # drains the queue

Requests carry their own condition, scale, seed and step count; a worker thread (``workers`` of them, each with
its own Sampler) takes the oldest request and the requests behind it with the same rule, up to the largest
bucket, waiting at most ``max_wait_s`` after the oldest one arrived for the batch to fill, pads the batch to the
next bucket size, and runs it as one Sampler call with a plan per row (fastguide/row_plans.py): per-row scales,
seeds and step counts in one loop. Each bucket size (per rule) is its own static shape, compiled once and, on CUDA
with ``cuda_graph``, captured once; :meth:`start` warms every one up. A request's sample depends only on the
request and its bucket size, never on its companions or its row (tested): row b of the loop reads only row b's
inputs, and a network's float results can depend on the batch size but not on the other rows' values.

With ``continuous=True`` the batcher schedules steps, not batches (fastguide/step_pool.py): requests of any rule
join the running rows between any two steps and leave after their own last step, so a short request never pays
for a long companion's steps and a new one never waits for a batch to end. Each step's forward is padded to the next
bucket; a request's sample is its plan's alone, bit-identical to :meth:`sample_alone` when there is one bucket
size (every forward then has that size) and equal to it within the network's batch-size rounding otherwise.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

from fastguide.checks import check_int, check_seed, real
from fastguide.loop import BufferCache
from fastguide.noise import seeded_noise
from fastguide.sampler import Sampler
from fastguide.step_pool import StepPool

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # fine steps: a batch is padded by less than 2x
LATENCY_WINDOW = 4096  # completed requests the latency percentiles are taken over


class QueueFull(RuntimeError):
    """The batcher's queue holds ``max_queue`` requests: retry later (an HTTP server answers 503)."""


class BatcherClosed(RuntimeError):
    """The batcher is closed (or closing) and takes no new requests."""


@dataclass(frozen=True)
class SampleRequest:
    """One request: its condition (a label or condition id), seed, step count, guidance scale and rule name."""

    cond: int
    seed: int
    steps: int
    scale: float
    rule: str


@dataclass(frozen=True)
class SampleResult:
    sample: torch.Tensor  # [*latent_shape] on the CPU
    request: SampleRequest
    bucket: int  # the batch size it ran in
    batch: int  # the sequence number on its worker of the batch it ran in (continuous: the step it joined at)
    queued_s: float  # from submit to its batch starting
    run_s: float  # its batch's sampling time
    worker: int = 0  # the worker thread that ran it (0 .. workers - 1)


@dataclass
class _Pending:
    request: SampleRequest
    future: Future
    submitted: float


@dataclass(eq=False)
class _Worker:
    """One worker thread's own state: its Sampler (batches: its own loop buffers and compiled steps) or its step
    pool (continuous) with the rows running there."""

    index: int
    sampler: Sampler
    pool: StepPool | None = None
    running: dict = field(default_factory=dict)  # continuous: id -> (pending, admitted at, step number)
    thread: threading.Thread | None = None


@dataclass(frozen=True)
class BatcherMetrics:
    """A snapshot of the batcher's counters (``prometheus_text`` renders them)."""

    queue_depth: int
    submitted: int
    completed: int
    failed: int  # finished with an error (a NaN sample, a failed batch)
    rejected: int  # refused at submit because the queue was full
    cancelled: int
    batches: int
    batch_fill: float  # mean real rows / bucket size over the batches run
    latency_p50_s: float  # submit -> result, over the last LATENCY_WINDOW completed requests (NaN: none yet)
    latency_p99_s: float
    images_per_s: float  # completed requests / seconds since start
    uptime_s: float
    warmup_s: Mapping[str, float] = field(default_factory=dict)  # "rule/bucket" (+ "/steps") -> seconds (all workers)

    def prometheus_text(self, prefix: str = "fastguide") -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines = []

        def metric(name, kind, value, help_text, labels=""):
            lines.append(f"# HELP {prefix}_{name} {help_text}")
            lines.append(f"# TYPE {prefix}_{name} {kind}")
            lines.append(f"{prefix}_{name}{labels} {_prom_value(value)}")

        metric("queue_depth", "gauge", self.queue_depth, "Requests waiting for a batch.")
        for name in ("submitted", "completed", "failed", "rejected", "cancelled", "batches"):
            metric(f"{name}_total", "counter", getattr(self, name), f"Requests {name}." if name != "batches"
                   else "Batches run.")
        metric("batch_fill_ratio", "gauge", self.batch_fill, "Mean real rows over bucket size.")
        lines.append(f"# HELP {prefix}_latency_seconds Submit-to-result latency over the last {LATENCY_WINDOW} "
                     "requests.")
        lines.append(f"# TYPE {prefix}_latency_seconds summary")
        lines.append(f'{prefix}_latency_seconds{{quantile="0.5"}} {_prom_value(self.latency_p50_s)}')
        lines.append(f'{prefix}_latency_seconds{{quantile="0.99"}} {_prom_value(self.latency_p99_s)}')
        metric("images_per_second", "gauge", self.images_per_s, "Completed requests per second since start.")
        metric("uptime_seconds", "gauge", self.uptime_s, "Seconds since start.")
        if self.warmup_s:
            lines.append(f"# HELP {prefix}_warmup_seconds Warm-up time per rule and bucket.")
            lines.append(f"# TYPE {prefix}_warmup_seconds gauge")
        for key, seconds in self.warmup_s.items():
            rule, bucket, *steps = key.split("/")
            labels = f'rule="{rule}",bucket="{bucket}"' + (f',steps="{steps[0]}"' if steps else "")
            lines.append(f"{prefix}_warmup_seconds{{{labels}}} {_prom_value(seconds)}")
        return "\n".join(lines) + "\n"


def _prom_value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Batcher:
    """Co-batches :meth:`submit`-ted requests into Sampler calls with a plan per row.

    ``model``, ``null_cond``, ``backend``, ``cond_first``: as :class:`fastguide.Sampler`'s. ``solver_for(steps)``: the solver of a
    request's step count (one solver family; each count's solver is made once). ``rules``: rule name -> guidance
    rule (its scale is the default; a request's scale overrides it); requests of different rules never share a
    batch. ``latent_shape``: one sample's shape. ``buckets``: the batch sizes a batch is padded to (increasing);
    ``max_wait_s``: how long the oldest request waits for its batch to fill; ``max_queue``: requests waiting at
    most (more are refused with :class:`QueueFull`). ``steps_range``: the step counts accepted. ``num_classes``: the
    conditions accepted are ints in [0, num_classes) (None: the model's ``num_classes``). ``compile``:
    ``Sampler.compile()`` (with ``cuda_graph`` on CUDA). ``step_buckets``: loop lengths a batch's loop is padded to
    (the smallest >= its most steps; the last >= the most steps accepted): with ``cuda_graph``, one captured
    graph per rule, bucket and length, all captured by :meth:`start`; None (the default, best without graphs)
    runs each batch for its own most steps. Padding rows sample condition ``pad_cond`` at scale 1 with the
    batch's smallest step count; their results are dropped. ``continuous``: schedule steps instead of batches
    (module docstring): up to ``buckets[-1]`` requests run at once, each at its own step; the metrics' batches
    then count steps (forwards) and batch fill is the mean of running rows / bucket per step. It runs the
    reference step eagerly around the model (compiled alone with ``compile``); no CUDA graphs, no
    ``step_buckets``. ``workers``: worker threads, each with its own Sampler (or step pool) taking batches (or
    rows) from the one queue, so one's forward runs while another's host work or the server's event loop holds
    the interpreter (torch ops release the GIL). On a CPU, give each worker ``cores // workers`` intra-op threads
    (``torch.set_num_threads``; ``fastguide serve --workers`` does): two one-thread workers sampled the digits model
    1.2-1.45x faster than one two-thread worker on a 2-core machine (docs/serving.md).
    """

    def __init__(self, model, solver_for: Callable[[int], object], rules: Mapping[str, object], *, null_cond,
                 latent_shape, buckets=DEFAULT_BUCKETS, max_wait_s: float = 0.01, max_queue: int = 1024,
                 steps_range=(1, 50), num_classes=None, device="cpu", dtype=torch.float32, backend: str = "auto",
                 compile: bool = False, cuda_graph: bool = False, pad_cond: int = 0, step_buckets=None,
                 cond_first: bool = True, continuous: bool = False, workers: int = 1):
        if not callable(solver_for):
            raise TypeError("solver_for: expected a callable steps -> fastguide solver")
        if not isinstance(rules, Mapping) or not rules:
            raise ValueError("rules: expected a non-empty mapping of rule name -> guidance rule")
        buckets = tuple(check_int(b, "buckets", low=1) for b in buckets)
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets: expected increasing batch sizes, got {buckets}")
        if not (isinstance(max_wait_s, (int, float)) and math.isfinite(max_wait_s) and max_wait_s >= 0):
            raise ValueError(f"max_wait_s: expected a finite number of seconds >= 0, got {max_wait_s!r}")
        lo, hi = (check_int(v, "steps_range", low=1) for v in steps_range)
        if lo > hi:
            raise ValueError(f"steps_range: expected (lo, hi) with lo <= hi, got {steps_range}")
        if step_buckets is not None:
            step_buckets = tuple(check_int(n, "step_buckets", low=1) for n in step_buckets)
            if not step_buckets or list(step_buckets) != sorted(set(step_buckets)) or step_buckets[-1] < hi:
                raise ValueError(f"step_buckets: expected increasing loop lengths, the last >= the most steps {hi}, "
                                 f"got {step_buckets}")
        if continuous and (cuda_graph or step_buckets is not None):
            raise ValueError("continuous: steps are scheduled one at a time, so there is no whole loop to capture as a "
                             "CUDA graph or pad to step_buckets; leave cuda_graph and step_buckets unset")
        self.step_buckets, self.continuous = step_buckets, bool(continuous)
        self.latent_shape = tuple(check_int(n, "latent_shape", low=1) for n in latent_shape)
        self.buckets, self.max_wait_s, self.steps_range = buckets, float(max_wait_s), (lo, hi)
        self.max_queue = check_int(max_queue, "max_queue", low=1)
        self.device, self.dtype, self.pad_cond = torch.device(device), dtype, pad_cond
        self.rules = dict(rules)
        self._solver_for, self._solvers = solver_for, {}
        workers = check_int(workers, "workers", low=1)
        first_rule = next(iter(self.rules.values()))

        def new_sampler() -> Sampler:
            sampler = Sampler(model, self.solver(lo), first_rule, null_cond=null_cond, backend=backend,
                              cond_first=cond_first, progress=False, check_finite=False, num_classes=num_classes)
            if compile:
                sampler.compile(cuda_graph=cuda_graph and self.device.type == "cuda")
            # one loop per (rule, bucket, loop length): keep them all (the Sampler's default keeps 8)
            lengths = len(step_buckets) if step_buckets is not None else hi - lo + 1
            sampler.buffers = BufferCache(max(8, len(self.rules) * len(buckets) * min(lengths, 4)))
            return sampler

        self.sampler = new_sampler()
        for name, rule in self.rules.items():
            if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"rules: names must be non-empty strings of letters, digits, - and _, got {name!r}")
            self.sampler.guidance = rule  # validated like the Sampler's own
            if getattr(rule, "scale", None) is None:
                raise ValueError(f"rules: {name!r} has no scale (a schedule-only rule cannot take a request's scale)")
        self.sampler.guidance = first_rule
        self._workers = [_Worker(k, self.sampler if k == 0 else new_sampler()) for k in range(workers)]
        if self.continuous:
            forward = model if not compile else torch.compile(model, **self.sampler.compile_options(self.device))
            for worker in self._workers:
                worker.pool = StepPool(forward, null_cond=null_cond, latent_shape=self.latent_shape, buckets=buckets,
                                       device=self.device, dtype=dtype, cond_first=cond_first)
            for name, rule in self.rules.items():
                self._workers[0].pool.check_rule(rule)
                if self._workers[0].pool.own_forward(rule):
                    raise ValueError(f"rules: {name!r} runs a network of its own (a guide network), which cannot share "
                                     "the forwards of continuous batching; use continuous=False")
        self.num_classes = self.sampler.num_classes
        self._queue: deque[_Pending] = deque()
        self._cv = threading.Condition()
        self._closing = self._drain = False
        self._started = None
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._counts = dict(submitted=0, completed=0, failed=0, rejected=0, cancelled=0, batches=0)
        self._fill_sum = 0.0
        self.warmup_s: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle
    @property
    def workers(self) -> int:
        """The number of worker threads."""
        return len(self._workers)

    @property
    def _started_workers(self) -> bool:
        return self._workers[0].thread is not None

    @property
    def running(self) -> bool:
        """Started and not closing: :meth:`submit` takes requests."""
        return self._started_workers and not self._closing

    def solver(self, steps: int):
        """The solver of ``steps`` (made once per count)."""
        s = self._solvers.get(steps)
        if s is None:
            s = self._solvers[steps] = self._solver_for(steps)
            if not hasattr(s, "plan"):
                raise TypeError(f"solver_for: returned a {type(s).__name__} for {steps} steps, not a fastguide solver")
        return s

    def start(self, warmup: bool = True) -> "Batcher":
        """Start the worker; with ``warmup``, first run one batch of every bucket size and rule (and loop length of
        ``step_buckets``: compiled code and captured graphs exist before the first request), timing each."""
        if self._started_workers:
            raise RuntimeError("start: the batcher is already started")
        for worker in self._workers if warmup else ():  # (times summed over the workers)
            if self.continuous:
                self._warm_pool(worker.pool)
                continue
            for name in self.rules:
                for bucket in self.buckets:
                    for steps in self.step_buckets or (self.steps_range[0],):  # compiled code is per step
                        fill = [SampleRequest(self.pad_cond, 0, min(steps, self.steps_range[1]), 2.0, name)]
                        began = time.perf_counter()
                        self._run(fill, bucket, worker.sampler)
                        key = f"{name}/{bucket}" + (f"/{steps}" if self.step_buckets else "")
                        self.warmup_s[key] = self.warmup_s.get(key, 0.0) + time.perf_counter() - began
        self._started = time.perf_counter()
        for worker in self._workers:
            target = self._continuous_worker if self.continuous else self._worker
            worker.thread = threading.Thread(target=target, args=(worker,), daemon=True,
                                             name="fastguide-batcher" + (f"-{worker.index}" if worker.index else ""))
            worker.thread.start()
        return self

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; ``drain``: run every queued request first (else they fail with BatcherClosed).
        Waits for the worker (at most ``timeout`` seconds)."""
        with self._cv:
            self._closing, self._drain = True, drain
            if not drain:
                while self._queue:
                    p = self._queue.popleft()
                    if p.future.set_running_or_notify_cancel():
                        p.future.set_exception(BatcherClosed("the batcher closed before this request ran"))
                        self._counts["failed"] += 1
                    else:
                        self._counts["cancelled"] += 1
            self._cv.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Batcher":
        return self if self._started_workers else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def check_request(self, cond, seed, steps, scale=None, rule=None) -> SampleRequest:
        """The request, validated: a ValueError / TypeError naming the field otherwise."""
        rule = next(iter(self.rules)) if rule is None else rule
        if not isinstance(rule, str) or rule not in self.rules:
            raise ValueError(f"rule: expected one of {sorted(self.rules)}, got {rule!r}")
        if isinstance(cond, bool) or not isinstance(cond, (int, np.integer)):
            raise TypeError(f"cond: expected an int label, got {type(cond).__name__} {cond!r}")
        if self.num_classes is not None and not 0 <= cond < self.num_classes:
            raise ValueError(f"cond: expected a label in [0, {self.num_classes}), got {cond}")
        seed = check_seed(seed, "seed")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__} {steps!r}")
        lo, hi = self.steps_range
        if not lo <= steps <= hi:
            raise ValueError(f"steps: expected an int in [{lo}, {hi}], got {steps}")
        if scale is None:
            scale = float(self.rules[rule].scale)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale: expected a number, got {type(scale).__name__} {scale!r}")
        scale = real(scale, "scale")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale: expected a finite number >= 0, got {scale}")
        return SampleRequest(int(cond), seed, int(steps), float(scale), rule)

    def submit(self, cond, *, seed, steps, scale=None, rule=None) -> Future:
        """Queue one request; returns a Future of its :class:`SampleResult` (``future.cancel()`` withdraws it
        while it waits). Raises ValueError / TypeError for a bad field, :class:`QueueFull`,
        :class:`BatcherClosed`."""
        request = self.check_request(cond, seed, steps, scale, rule)
        self.solver(request.steps)  # made here, in the caller's thread, so a bad solver_for fails the caller
        future: Future = Future()
        with self._cv:
            if self._closing or not self._started_workers:
                raise BatcherClosed("the batcher is not running (call start(), or it is closed)")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected"] += 1
                raise QueueFull(f"queue: {self.max_queue} requests are waiting; retry later")
            self._queue.append(_Pending(request, future, time.perf_counter()))
            self._counts["submitted"] += 1
            self._cv.notify_all()
        return future

    async def asubmit(self, cond, *, seed, steps, scale=None, rule=None) -> SampleResult:
        """:meth:`submit` for asyncio code: awaits the result (cancelling the await cancels a waiting request)."""
        return await asyncio.wrap_future(self.submit(cond, seed=seed, steps=steps, scale=scale, rule=rule))

    def metrics(self) -> BatcherMetrics:
        with self._cv:
            lat = sorted(self._latencies)
            counts = dict(self._counts)
            depth = len(self._queue)
            fill = self._fill_sum / counts["batches"] if counts["batches"] else float("nan")
        up = 0.0 if self._started is None else time.perf_counter() - self._started
        p50, p99 = (_quantile(lat, 0.5), _quantile(lat, 0.99)) if lat else (float("nan"),) * 2
        return BatcherMetrics(depth, **counts, batch_fill=fill, latency_p50_s=p50, latency_p99_s=p99,
                              images_per_s=counts["completed"] / up if up > 0 else 0.0, uptime_s=up,
                              warmup_s=dict(self.warmup_s))

    # ------------------------------------------------------------------ the worker
    def _worker(self, worker: _Worker) -> None:
        next_number = 0
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            requests = [p.request for p in batch]
            bucket = next(b for b in self.buckets if b >= len(batch))
            number, next_number = next_number, next_number + 1
            started = time.perf_counter()
            try:
                samples, finite = self._run(requests, bucket, worker.sampler)
            except Exception as e:  # a failed batch fails its requests, never the worker
                self._finish(batch, [None] * len(batch), error=e)
                continue
            run_s = time.perf_counter() - started
            results = [SampleResult(samples[i], p.request, bucket, number, started - p.submitted, run_s, worker.index)
                       if finite[i] else None for i, p in enumerate(batch)]
            self._finish(batch, results, fill=len(batch) / bucket)

    def _next_batch(self, any_rule: bool = False, most: int | None = None) -> list[_Pending] | None:
        """The oldest request and those behind it with its rule (``any_rule``: of any rule; up to ``most``,
        default the largest bucket), once ``most`` are there, the oldest has waited max_wait_s, or the batcher
        is closing; None when closed and drained."""
        most = self.buckets[-1] if most is None else most
        with self._cv:
            while True:
                while self._queue and self._queue[0].future.cancelled():
                    self._queue.popleft()
                    self._counts["cancelled"] += 1
                if not self._queue:
                    if self._closing:
                        return None
                    self._cv.wait()
                    continue
                oldest = self._queue[0]
                same = list(self._queue) if any_rule else [p for p in self._queue
                                                           if p.request.rule == oldest.request.rule]
                wait = oldest.submitted + self.max_wait_s - time.perf_counter()
                if len(same) < most and wait > 0 and not self._closing:
                    self._cv.wait(wait)
                    continue
                taken = self._take(same[:most])
                if taken:
                    return taken

    def _take(self, pendings: list[_Pending]) -> list[_Pending]:
        """Remove ``pendings`` from the queue (the caller holds the lock); those not cancelled meanwhile, now
        running."""
        taken = []
        for p in pendings:
            self._queue.remove(p)
            if p.future.set_running_or_notify_cancel():
                taken.append(p)
            else:
                self._counts["cancelled"] += 1
        return taken

    # ------------------------------------------------------------------ the continuous worker
    def _warm_pool(self, pool: StepPool) -> None:
        """Full forwards of every bucket size and rule through a worker's step pool (compiled code exists before
        the first request), timed per rule and bucket."""
        lo = self.steps_range[0]
        noise = seeded_noise([0], self.latent_shape, dtype=self.dtype, device=self.device)[0]
        for name, rule in self.rules.items():
            for bucket in self.buckets:
                began = time.perf_counter()
                for b in range(bucket):
                    pool.admit(b, noise, cond=self.pad_cond, plan=self.solver(lo).plan, rule=rule, scale=2.0, seed=0)
                while len(pool):
                    pool.step()
                key = f"{name}/{bucket}"
                self.warmup_s[key] = self.warmup_s.get(key, 0.0) + time.perf_counter() - began

    def _continuous_worker(self, worker: _Worker) -> None:
        pool, running_rows, number = worker.pool, worker.running, 0
        while True:
            taken = self._admissions(pool)
            if taken is None:
                return
            now = time.perf_counter()
            for p in taken:
                r = p.request
                try:
                    noise = seeded_noise([r.seed], self.latent_shape, dtype=self.dtype, device=self.device)[0]
                    pool.admit(id(p), noise, cond=r.cond, plan=self.solver(r.steps).plan, rule=self.rules[r.rule],
                               scale=r.scale, seed=r.seed)
                except Exception as e:  # this request cannot join: it fails alone
                    self._finish([p], [None], error=e)
                    continue
                running_rows[id(p)] = (p, now, number)
            running = len(pool)
            bucket = next(b for b in self.buckets if b >= running)
            try:
                done = pool.step()
            except Exception as e:  # a failed step fails the rows running, never the worker
                failed = [running_rows.pop(k)[0] for k in pool.clear()]
                self._finish(failed, [None] * len(failed), error=e)
                continue
            self._count_batch(running / bucket)
            number += 1
            finished_at = time.perf_counter()
            batch, results = [], []
            for key, sample, largest in done:
                p, admitted, first = running_rows.pop(key)
                sample = sample.cpu()
                batch.append(p)
                finite = bool(torch.isfinite(sample).all())
                results.append(SampleResult(sample, p.request, largest, first, admitted - p.submitted,
                                            finished_at - admitted, worker.index) if finite else None)
            if batch:
                self._finish(batch, results)

    def _admissions(self, pool: StepPool) -> list[_Pending] | None:
        """The requests that join ``pool``'s running rows before its next step, oldest first, any rule: while rows
        run, as many as there are free slots (with several workers, no more than this pool's share of the rows
        running and waiting), at once; with no rows, waiting like :meth:`_next_batch` (up to ``max_wait_s`` for a
        full share). None when closed, drained and no row is left."""
        if not len(pool):
            with self._cv:
                share = self._share_of_rows()
            return self._next_batch(any_rule=True, most=share)
        with self._cv:
            return self._take(list(self._queue)[:max(0, min(pool.free, self._share_of_rows() - len(pool)))])

    def _share_of_rows(self) -> int:
        """The most rows one pool should run (the caller holds the lock): the rows running in every pool and
        waiting, spread evenly over the workers, at least 1 and at most a full bucket."""
        if len(self._workers) == 1:
            return self.buckets[-1]
        rows = len(self._queue) + sum(len(w.pool) for w in self._workers)
        return max(1, min(self.buckets[-1], -(-rows // len(self._workers))))

    def sample_alone(self, request: SampleRequest, bucket: int | None = None) -> torch.Tensor:
        """``request``'s sample as it runs alone in a batch of ``bucket`` rows (default: the smallest bucket), in the
        calling thread: what the batcher returns for it in a batch of that size, whatever its companions."""
        bucket = self.buckets[0] if bucket is None else bucket
        if bucket not in self.buckets:
            raise ValueError(f"bucket: expected one of {self.buckets}, got {bucket!r}")
        request = self.check_request(request.cond, request.seed, request.steps, request.scale, request.rule)
        return self._run([request], bucket, self.sampler)[0][0]

    def _run(self, requests: list[SampleRequest], bucket: int, sampler: Sampler):
        """Samples [bucket, *shape] (the first len(requests) rows are the requests') and a finite flag per row."""
        pad = bucket - len(requests)
        fewest, most = min(r.steps for r in requests), max(r.steps for r in requests)
        loop_steps = None if self.step_buckets is None else next(n for n in self.step_buckets if n >= most)
        rows = requests + [SampleRequest(self.pad_cond, 0, fewest, 1.0, requests[0].rule)] * pad
        seeds = [r.seed for r in rows]
        noise = seeded_noise(seeds, self.latent_shape, dtype=self.dtype, device=self.device)
        cond = torch.tensor([r.cond for r in rows], device=self.device)
        scale = torch.tensor([r.scale for r in rows], dtype=torch.float64)
        with torch.no_grad():
            out = sampler.sample(noise, cond, seeds=seeds, scale=scale, guidance=self.rules[requests[0].rule],
                                      solvers=[self.solver(r.steps) for r in rows], loop_steps=loop_steps)
        finite = torch.isfinite(out.flatten(1)).all(1).tolist()
        return out.cpu(), finite

    def _count_batch(self, fill: float) -> None:
        with self._cv:
            self._counts["batches"] += 1
            self._fill_sum += fill

    def _finish(self, batch: list[_Pending], results: list, *, fill: float | None = None,
                error: Exception | None = None) -> None:
        if fill is not None:
            self._count_batch(fill)
        now = time.perf_counter()
        with self._cv:
            for p, result in zip(batch, results):
                if result is not None:
                    self._latencies.append(now - p.submitted)
                    self._counts["completed"] += 1
                else:
                    self._counts["failed"] += 1
        for p, result in zip(batch, results):
            if result is not None:
                p.future.set_result(result)
            elif error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_exception(ValueError(
                    f"sample: the sample of this request (cond {p.request.cond}, seed {p.request.seed}, steps "
                    f"{p.request.steps}, scale {p.request.scale:g}) contains NaN or inf; its batch companions "
                    "were not affected"))


def _quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between closest ranks (numpy's default)."""
    return float(np.quantile(np.asarray(sorted_values), q))


def digits_batcher(*, buckets=DEFAULT_BUCKETS, max_wait_s: float = 0.01, max_queue: int = 1024, solver: str = "unipc",
                   steps_range=(2, 50), device="cpu", backend: str = "auto", compile: bool = False,
                   cuda_graph: bool = False, step_buckets=None, scale: float = 3.0, tables: bool = True,
                   continuous: bool = False, workers: int = 1) -> Batcher:
    """A batcher over the embedded digits model with ``solver`` (``fastguide.demo.digits.SOLVERS``; UniPC, the
    demo's default, needs 2 steps at least): rules "cfg", "cfg-zero-star", "apg" and, with ``tables``, the ReCFG
    rules "recfg-paper" and "recfg-ls" (the shipped tables), all at ``scale`` by default."""
    from fastguide.demo import digits

    loaded = digits.load_digits_tables() if tables else None
    names = [r for r in digits.RULES if tables or digits.RULES[r] is None]
    rules = {name: digits.make_guidance(name, scale, loaded) for name in names}
    return Batcher(digits.load_digits_model(device=device), lambda n: digits.make_solver(solver, n), rules,
                   null_cond=digits.NULL_LABEL, latent_shape=digits.IMAGE_SHAPE, buckets=buckets,
                   max_wait_s=max_wait_s, max_queue=max_queue, steps_range=steps_range, device=device,
                   backend=backend, compile=compile, cuda_graph=cuda_graph, step_buckets=step_buckets,
                   continuous=continuous, workers=workers)
