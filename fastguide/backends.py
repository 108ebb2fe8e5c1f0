"""Which implementation of the guided step a loop runs: the eager host-scalar torch step, the reference with
device tensors (inside compiled code), or the fused Triton kernel."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class StepImpl:
    """``fn`` has the reference's contract (``guided_step_into``); ``host``: it takes the per-step scalars as
    Python numbers (not capturable inside compiled code); ``fused``: the loop runs the forward and the update
    as one compiled function."""

    fn: Callable
    host: bool
    fused: bool


def triton_available() -> bool:
    try:
        from fastguide.kernels import guided_step  # noqa: F401
    except Exception:
        return False
    return True


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def step_impl(backend: str, device: torch.device, fused: bool, per_row: bool = False) -> StepImpl:
    """``backend``: "torch" (plain torch ops, any device), "triton" (the fused kernel), or "auto" (triton for
    CUDA tensors when available, torch otherwise). Every implementation runs every plan, multistep ones (history
    states) included. ``per_row``: the rows have plans of their own (per-row coefficient tensors), which the eager
    host-scalar step cannot take: eager torch steps then run the reference."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"  # only "triton" asks
    impl = _step_impl(backend, device.type, fused, interpreted)
    if per_row and impl.host:
        from fastguide.kernels.reference import guided_step_into

        return StepImpl(guided_step_into, host=False, fused=False)
    return impl


@functools.lru_cache(maxsize=None)
def _step_impl(backend: str, device_type: str, fused: bool, interpreted: bool) -> StepImpl:
    if backend == "auto":
        backend = "triton" if device_type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        if fused:
            from fastguide.kernels.reference import guided_step_into

            return StepImpl(guided_step_into, host=False, fused=True)
        from fastguide.kernels.torch_step import guided_step_into_host

        return StepImpl(guided_step_into_host, host=True, fused=False)
    if device_type != "cuda" and not interpreted:
        raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    try:
        from fastguide.kernels.guided_step import guided_step_into
    except ImportError as e:
        raise ValueError(f"backend: 'triton' is not available here ({e})") from None
    # Table rows and steps were validated on the host (RatioTable.rows_for / step_rows), a plan's history write
    # slots by PlanTensors.build: no per-step sync.
    return StepImpl(functools.partial(guided_step_into, check=False), host=False, fused=fused)
