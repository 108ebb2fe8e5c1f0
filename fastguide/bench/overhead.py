"""Per-step sampler overhead: everything but the network, with the network replaced by a stub."""
from __future__ import annotations

import statistics
import time

import torch

import fastguide as fg
from fastguide.bench.end_to_end import bench_solver, diffusers_scheduler_for, diffusers_style_loop
from fastguide.bench.timing import sync


OVERHEAD_MODES = ("diffusers_eager", "fastguide_eager", "fastguide_fused")
# The network part of each mode's per-step time: the same stub call alone (compiled for the fused mode, whose
# network runs inside one compiled function with the step; a compiled network pays that call anyway).
NETWORK_OF = {"diffusers_eager": "network_eager", "fastguide_eager": "network_eager",
              "fastguide_fused": "network_compiled"}
BENCH_RULES = ("cfg", "cfg-rescale", "cfg-zero-star", "apg")  # the rule both loops run (diffusers: its guider)


def bench_rule(name: str, scale: float):
    """(the fastguide rule, a factory of the diffusers guider (one per benchmark, as a pipeline holds one), or
    None: CFG combined by hand)."""
    from diffusers.guiders import (AdaptiveProjectedGuidance, ClassifierFreeGuidance,
                                   ClassifierFreeZeroStarGuidance)
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    def apg_guider():
        guider = AdaptiveProjectedGuidance(scale, adaptive_projected_guidance_momentum=-0.5,
                                           adaptive_projected_guidance_rescale=15.0, eta=0.0)
        guider.momentum_buffer = MomentumBuffer(-0.5)  # diffusers_style_loop restarts it at every call's step 0
        return guider
    rules = {
        "cfg": (fg.CFG(scale), None),
        "cfg-rescale": (fg.CFG(scale, rescale=0.7), lambda: ClassifierFreeGuidance(scale, guidance_rescale=0.7)),
        "cfg-zero-star": (fg.CFGZeroStar(scale, zero_init_steps=0),
                          lambda: ClassifierFreeZeroStarGuidance(scale, zero_init_steps=0)),
        "apg": (fg.APG(scale, eta=0.0, norm_threshold=15.0, momentum=-0.5), apg_guider),
    }
    if name not in rules:
        raise ValueError(f"rule: expected one of {BENCH_RULES}, got {name!r}")
    return rules[name]


class StubNet(torch.nn.Module):
    """Stands in for the network when measuring sampler overhead: returns a fixed [2B] (or [B]) output."""

    def __init__(self, out2: torch.Tensor):
        super().__init__()
        self.register_buffer("out2", out2)

    def forward(self, x, t, c):
        return self.out2[: x.shape[0]]


def run_overhead(schedule, shape, *, batches=(1, 16, 64), nfe: int = 10, device="cpu", dtype=torch.float32,
                 scale: float = 3.0, reps: int = 15, warmup: int = 3, block: int = 20,
                 modes=OVERHEAD_MODES, solver_name: str = "ddim", rule_name: str = "cfg") -> list[dict]:
    """Per-step time of everything but the network (input batching, CFG combine, solver update, copies,
    and each sample() call's setup spread over its NFE steps), with the network replaced by
    :class:`StubNet`. The stub's own calls are timed too and subtracted (``overhead_us_per_step``), and
    ``vs_diffusers`` is that overhead over the diffusers-style loop's. Modes are interleaved per repetition
    so a drifting machine load hits them alike. ``solver_name``: one of BENCH_SOLVERS, the same solver in both
    loops (diffusers' scheduler and the fastguide plan imported from it); ``rule_name``: one of BENCH_RULES (the
    diffusers loop then runs that rule's guider, made fresh per call)."""
    out = []
    solver = bench_solver(schedule, nfe, solver_name)
    rule, make_guider = bench_rule(rule_name, scale)
    for batch in batches:
        stub = StubNet(torch.randn(2 * batch, *shape, device=device, dtype=dtype)).to(device)
        noises = [torch.randn(batch, *shape, device=device, dtype=dtype) for _ in range(4)]
        labels = torch.arange(batch, device=device) % 10
        x2 = torch.randn(2 * batch, *shape, device=device, dtype=dtype)
        t2 = torch.full((1,), 500.0, device=device).expand(2 * batch)  # the layout the loops pass
        l2 = torch.cat([labels, torch.full_like(labels, 10)])
        cstub = torch.compile(stub, dynamic=False)
        sch = diffusers_scheduler_for(schedule, nfe, solver_name)
        guider = None if make_guider is None else make_guider()
        eager = fg.Sampler(stub, solver, rule, null_cond=10, progress=False)
        fused = fg.Sampler(stub, solver, rule, null_cond=10, progress=False).compile(fuse_step=True)
        fns = {
            "diffusers_eager": lambda r: diffusers_style_loop(stub, sch, noises[r % 4], labels, 10, scale, guider),
            "fastguide_eager": lambda r: eager.sample(noises[r % 4], labels),  # = compiled's overhead on the CPU
            "fastguide_fused": lambda r: fused.sample(noises[r % 4], labels),
            "network_eager": lambda r: [stub(x2, t2, l2) for _ in range(nfe)],
            "network_compiled": lambda r: [cstub(x2, t2, l2) for _ in range(nfe)],
        }
        timed = [*modes, *sorted({NETWORK_OF[m] for m in modes})]
        times = {m: [] for m in timed}
        with torch.inference_mode():
            for m in timed:
                for r in range(warmup):
                    fns[m](r)
            for r in range(reps):  # blocks of `block` calls per mode, interleaved
                for m in timed:
                    sync(device)
                    t0 = time.perf_counter()
                    for k in range(block):
                        fns[m](k)
                    sync(device)
                    times[m].append((time.perf_counter() - t0) / block)
        per_step = {m: statistics.median(v) / nfe * 1e6 for m, v in times.items()}
        overhead = {m: per_step[m] - per_step[NETWORK_OF[m]] for m in modes}
        base = overhead.get("diffusers_eager")
        for m in modes:
            out.append({"mode": m, "solver": solver_name, "rule": rule_name, "batch": batch, "nfe": nfe, "us_per_step": per_step[m],
                        "network_us_per_step": per_step[NETWORK_OF[m]], "overhead_us_per_step": overhead[m],
                        "vs_diffusers": overhead[m] / base if base else None})
    return out
