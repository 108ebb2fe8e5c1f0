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
def wrapped_method(obj, name: str, wrap):
    """Within the block, ``obj.<name>`` is ``wrap(obj.<name>)`` as an instance attribute (a torch.compile'd
    module keeps its compiled forward there, so its calls are wrapped too); restored after."""
    own = obj.__dict__.get(name)  # an instance attribute already there (else the class's method)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield obj
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


def wrapped_forward(module: torch.nn.Module, wrap):
    """:func:`wrapped_method` of ``module.forward``: every call of the module goes through ``wrap(forward)``."""
    return wrapped_method(module, "forward", wrap)


@contextmanager
def seconds_inside(obj, name: str = "forward"):
    """Within the block, each call of ``obj.<name>`` (default: a module's calls) adds its wall seconds (CPU; no
    device sync) to the yielded list."""
    spent = []

    def wrap(method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent.append(time.perf_counter() - start)
        return timed

    with wrapped_method(obj, name, wrap):
        yield spent
