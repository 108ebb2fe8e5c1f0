"""Peak CPU tensor memory of a call, from the profiler's allocator events.

    peak = peak_cpu_tensor_bytes(lambda: pipe(prompts, output_type="np"))
    with mark_calls(pipe.unet, "denoiser"):          # where each step's forward begins and ends
        m = cpu_tensor_memory(lambda: pipe(prompts, output_type="np"), mark="denoiser")
    m.marked   # (live bytes when each forward began, peak during it): flat over the steps iff nothing is kept

torch (2.13) has no CPU counterpart of ``torch.cuda.max_memory_allocated``: ``torch.cpu`` has no memory stats and
the default CPU allocator keeps no counters. What it does have is the profiler's memory hook: with
``profile_memory=True`` every allocation and free through the CPU allocator (every tensor storage, including
those made inside torch.compile'd code) is recorded as a "[memory]" event with its address, signed size and a
nanosecond timestamp. :func:`cpu_tensor_memory` adds those sizes up in timestamp order: the running sum is the bytes
of the tensors the call allocated that are still live, its maximum the peak. A free counts only when this profile
saw the allocation: what was live at the start counts as live throughout (the peak is the call's own, never lowered
by what it frees of its caller's). That has to be matched here by address: the allocator remembers the size of
every block allocated under any earlier profile, and reports its free in a later one (a cache entry made during
one measured call and evicted during the next would otherwise show as negative live bytes).
Allocations are recorded on the threads the profiler watches (the calling thread; torch's intra-op workers
compute into storage allocated before they start). Not counted: memory outside torch's allocator
(NumPy arrays that do not share a tensor's storage, oneDNN scratch space, Python objects). The events are read
from the profiler's event tree (the raw results' events carry no addresses), not from ``prof.events()``, which
folds allocations into the ops that made them.
"""
from __future__ import annotations

import bisect
import dataclasses
import gc
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from fastguide.bench.timing import wrapped_forward

MB = 2 ** 20
_ALLOCATION = torch._C._profiler._EventType.Allocation


@dataclass(frozen=True)
class CpuMemory:
    """What one call did to the CPU allocator (bytes; relative to what was live when the call began)."""

    peak: int  # the most bytes live at once above the start (>= 0)
    retained: int  # live at the end above the start (what the call left allocated, e.g. caches and its result)
    allocations: int  # how many allocations it made
    marked: tuple = ()  # per ``mark`` range, in order: (live bytes when it began, the peak during it)
    result: object = dataclasses.field(default=None, repr=False, compare=False)  # what the call returned


def _events(prof, mark: str | None):
    """The profile's CPU allocator events as (timestamp ns, order, signed bytes) in the order they happened, frees
    of blocks allocated before the profile began left out, and the (start ns, end ns) of every ``mark`` range."""
    allocations, ranges = [], []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _ALLOCATION:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                allocations.append((node.start_time_ns, node.id, fields.ptr, int(fields.alloc_size)))
        elif mark is not None and node.name == mark:
            ranges.append((node.start_time_ns, node.end_time_ns))
    allocations.sort()
    ranges.sort()
    memory, live_blocks = [], set()
    for t, order, ptr, nbytes in allocations:
        if nbytes > 0:
            live_blocks.add(ptr)
        elif ptr in live_blocks:
            live_blocks.discard(ptr)
        else:
            continue
        memory.append((t, order, nbytes))
    return memory, ranges


def cpu_tensor_memory(fn: Callable[[], object], mark: str | None = None) -> CpuMemory:
    """Run ``fn()`` under the profiler and return its peak / retained CPU tensor bytes (see the module doc), and
    with ``mark`` the live bytes at the start of, and the peak during, each ``record_function(mark)`` range (e.g.
    each denoiser forward under :func:`mark_calls`). Garbage is collected first, so cycles left by earlier calls
    are not freed during ``fn``."""
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False,
                 with_stack=False) as prof:
        result = fn()
    memory, ranges = _events(prof, mark)
    times, live_after = [], []  # live bytes after each event
    live = peak = count = 0
    for t, _, nbytes in memory:
        live += nbytes
        count += nbytes > 0
        peak = max(peak, live)
        times.append(t)
        live_after.append(live)
    marked = []
    for start, end in ranges:
        i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        before = live_after[i - 1] if i else 0
        marked.append((before, max([before, *live_after[i:j]])))
    return CpuMemory(peak=peak, retained=live, allocations=count, marked=tuple(marked), result=result)


def peak_cpu_tensor_bytes(fn: Callable[[], object]) -> int:
    """The peak of live CPU tensor bytes during ``fn()`` above what was live at its start."""
    return cpu_tensor_memory(fn).peak


def mark_calls(module: torch.nn.Module, name: str):
    """Within the block, every call of ``module`` runs inside ``record_function(name)`` (for
    :func:`cpu_tensor_memory`'s ``mark``); eager code only (torch.compile would trace the marker)."""
    def wrap(forward):
        def marked(*args, **kwargs):
            with record_function(name):
                return forward(*args, **kwargs)
        return marked

    return wrapped_forward(module, wrap)
