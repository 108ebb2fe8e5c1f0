"""Timing helpers shared by the benchmarks: synchronize, median wall time over repetitions."""
from __future__ import annotations

import statistics
import time

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
