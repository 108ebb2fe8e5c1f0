"""Timing helpers shared by the benchmarks: synchronize, median wall time over repetitions, the time spent inside a
module's calls."""
from __future__ import annotations

import functools
import statistics
import time
from contextlib import contextmanager

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, reps: int, warmup: int, device="cpu") -> float:
    for _ in range(warmup):
        fn(0)
    sync(device)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def wrapped_forward(module: torch.nn.Module, wrap):
    """Within the block, ``module.forward`` is ``wrap(forward)`` (an instance attribute; a torch.compile'd module
    keeps its compiled forward there, so its calls are wrapped too); restored after."""
    own = module.__dict__.get("forward")  # an instance attribute already there (else the class's forward)
    module.forward = wrap(module.forward)
    try:
        yield module
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


@contextmanager
def seconds_inside(module: torch.nn.Module):
    """Within the block, each call of ``module`` adds its wall seconds (CPU; no device sync) to the yielded list."""
    spent = []

    def wrap(forward):
        @functools.wraps(forward)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return timed

    with wrapped_forward(module, wrap):
        yield spent
