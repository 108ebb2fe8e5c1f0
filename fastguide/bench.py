"""End-to-end sampler benchmarks: fastguide vs a diffusers-style loop on the same network.

Every number is a median over repetitions measured in one run, with the noise rotated between
repetitions. Images/s counts whole fixed-NFE samples. The "floor" is NFE x the network's 2B forward alone
(compiled; on CUDA graph-replayed), the time no sampler can beat without doing less network work.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

import fastguide as fg

MODES = ("diffusers_eager", "diffusers_compiled", "fastguide_eager", "fastguide_compiled_unfused",
         "fastguide_compiled", "fastguide_graph", "fastguide_recfg", "fastguide_interval", "floor")
MODE_HELP = {
    "diffusers_eager": "diffusers-style loop (cat, forward, chunk, CFG combine, DDIMScheduler.step)",
    "diffusers_compiled": "the same loop, network under torch.compile (reduce-overhead on CUDA)",
    "fastguide_eager": "fastguide.Sampler, not compiled",
    "fastguide_compiled_unfused": "Sampler.compile(fuse_step=False): network compiled, eager guided step",
    "fastguide_compiled": "Sampler.compile(): forward + guided step as one compiled function",
    "fastguide_graph": "Sampler.compile(cuda_graph=True): the whole loop replayed as one CUDA graph (CUDA only)",
    "fastguide_recfg": "the best fastguide config (graph on CUDA, compiled on CPU) with ReCFG instead of CFG",
    "fastguide_interval": "the best fastguide config, CFG on the high-noise half of the steps only (B rows elsewhere)",
    "floor": "NFE x the compiled network's 2B forward alone (max-autotune and graph-replayed on CUDA)",
}


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    nfe: int
    seconds: float  # median seconds per sample() call
    images_per_s: float
    vs_floor: float | None = None  # measured images/s / floor images/s
    warmup_s: float | None = None  # the first call (compiles, captures); fastguide modes only


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, reps: int, warmup: int, device="cpu") -> float:
    for _ in range(warmup):
        fn(0)
    _sync(device)
    times = []
    for r in range(reps):
        t0 = time.perf_counter()
        fn(r)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def diffusers_scheduler_for(schedule: fg.NoiseSchedule, steps: int):
    """A diffusers DDIMScheduler with the same betas and settings as a fastguide schedule."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.betas.tolist(),
                        clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
                        set_alpha_to_one=schedule.set_alpha_to_one, steps_offset=schedule.steps_offset,
                        prediction_type=schedule.prediction_type, timestep_spacing=schedule.timestep_spacing)
    sch.set_timesteps(steps)
    return sch


def diffusers_style_loop(net, scheduler, noise, labels, null_label: int, scale: float):
    """What a diffusers pipeline does per step: cat the 2B input, one forward, chunk, combine, scheduler.step."""
    x = noise
    null = torch.full_like(labels, null_label)
    lab2 = torch.cat([null, labels])
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x])
        out = net(x_in, t.to(x.device).float().expand(x_in.shape[0]), lab2)
        e_u, e_c = out.chunk(2)
        eps = e_u + scale * (e_c - e_u)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def half_interval(timesteps) -> tuple[float, float]:
    """(lo, hi) model times covering the high-noise half of a plan's steps (at least one step)."""
    ts = [float(t) for t in timesteps]
    return ts[max(len(ts) // 2, 1) - 1], ts[0]


def bench_ratio_table(schedule, shape, classes: int, dtype, device, grid: int = 20) -> fg.RatioTable:
    """A random ratio table near 1 on a grid of ``grid`` training timesteps (K = classes used + the mean row):
    ReCFG's timing does not depend on the values, only on the gather, the lerp between grid rows and the
    extra reads. On a grid its shape does not depend on the NFE, so one compiled step serves every NFE."""
    gen = torch.Generator().manual_seed(0)
    ratios = 1 + 0.1 * torch.randn(classes + 1, grid, *shape, generator=gen)
    steps = torch.linspace(0, schedule.num_train_timesteps - 1, grid, dtype=torch.float64)
    return fg.RatioTable(ratios.to(device=device, dtype=dtype), steps)


def run_end_to_end(net, schedule, shape, *, model_name: str, batches=(1, 16, 64), nfes=(10,), device="cpu",
                   dtype=torch.float32, null_label: int = 10, num_classes: int = 10, scale: float = 3.0,
                   modes=MODES, reps: int = 5, warmup: int = 2, progress=print) -> list[Row]:
    """Images/s per mode (see MODE_HELP). All modes of one (batch, NFE) point are warmed up first, then timed
    interleaved (rep 1 of every mode, rep 2 of every mode, ...) so drifting machine load hits them alike;
    medians. fastguide modes also report their first call's time (compile / capture warm-up).

    Compiled things are made once per batch and reused for every NFE (a Sampler's solver is swapped, which
    keeps its compiled step; ReCFG and the interval run through the best sampler with ``guidance=``), so a
    GPU sweep of NFE 4/8/16 compiles each network variant once per batch size."""
    rows: list[Row] = []
    cuda = torch.device(device).type == "cuda"
    modes = [m for m in modes if m != "fastguide_graph" or cuda]
    for batch in batches:
        noises = [torch.randn(batch, *shape, device=device, dtype=dtype) for _ in range(4)]
        labels = torch.arange(batch, device=device) % num_classes
        x2 = torch.randn(2 * batch, *shape, device=device, dtype=dtype)
        # t as the sampler passes it (one value per step expanded over the rows): the compiled network measured
        # 2-11% faster with that layout than with a materialized [2B] t on the CPU, so the floor uses it too
        t2 = torch.full((1,), 500.0, device=device).expand(2 * batch)
        l2 = torch.cat([labels, torch.full_like(labels, null_label)])
        cnet = torch.compile(net, mode="max-autotune-no-cudagraphs" if cuda else None, dynamic=False)
        dnet = torch.compile(net, mode="reduce-overhead" if cuda else None, dynamic=False)
        table = bench_ratio_table(schedule, shape, min(num_classes, batch), dtype, device)

        def sampler(**compile_kw):
            s = fg.Sampler(net, fg.DDIM(schedule, steps=nfes[0]), fg.CFG(scale), null_cond=null_label,
                           progress=False)
            return s.compile(**compile_kw) if compile_kw else s

        samplers = {"fastguide_eager": sampler(), "fastguide_compiled_unfused": sampler(fuse_step=False),
                    "fastguide_compiled": sampler(fuse_step=True)}
        if cuda:
            samplers["fastguide_graph"] = sampler(cuda_graph=True)
        best = samplers["fastguide_graph" if cuda else "fastguide_compiled"]  # what a user would pick there
        for nfe in nfes:
            solver = fg.DDIM(schedule, steps=nfe)
            for s in samplers.values():
                s.solver = solver
            sch = diffusers_scheduler_for(schedule, nfe)
            recfg = fg.ReCFG(scale, table=table, unknown_label="mean")
            interval = fg.CFG(scale, interval=half_interval(solver.plan.timesteps))

            def loop_of(s, guidance=None):
                return lambda r: s.sample(noises[r % 4], labels, guidance=guidance)

            def diffusers_loop(network):
                return lambda r: diffusers_style_loop(network, sch, noises[r % 4], labels, null_label, scale)

            makers = {
                "diffusers_eager": lambda: diffusers_loop(net),
                "diffusers_compiled": lambda: diffusers_loop(dnet),
                "fastguide_recfg": lambda: loop_of(best, recfg),
                "fastguide_interval": lambda: loop_of(best, interval),
                "floor": lambda: _floor_fn(cnet, x2, t2, l2, nfe) if cuda else
                (lambda r: [cnet(x2, t2, l2) for _ in range(nfe)]),
                **{m: (lambda s: lambda: loop_of(s))(s) for m, s in samplers.items()},
            }
            fns = {m: makers[m]() for m in modes}
            times = {m: [] for m in fns}
            first = {}
            with torch.inference_mode():
                for m, fn in fns.items():
                    first[m] = median_time(fn, 1, 0, device)
                    for r in range(warmup):
                        fn(r + 1)
                for r in range(reps):
                    for m, fn in fns.items():
                        times[m].append(median_time(fn, 1, 0, device))
            med = {m: statistics.median(v) for m, v in times.items()}
            for m in fns:
                row = Row(model_name, m, batch, nfe, med[m], batch / med[m],
                          vs_floor=med["floor"] / med[m] if "floor" in med else None,
                          warmup_s=first[m] if m.startswith("fastguide") else None)
                rows.append(row)
                progress(f"  {model_name} B={batch} NFE={nfe} {m:26s} {row.images_per_s:10.1f} img/s")
    return rows


def goals(rows: list[Row], device: str) -> list[tuple[str, str, bool | None]]:
    """The speed goals of the sampler issue, checked on the rows: (goal, measured, met?) per line; met is
    None where the rows lack what the goal needs."""
    by = {(r.model, r.mode, r.batch, r.nfe): r for r in rows}
    points = sorted({(r.model, r.batch, r.nfe) for r in rows})
    out = []

    def ratio(a, b, point):
        ra, rb = by.get((point[0], a, *point[1:])), by.get((point[0], b, *point[1:]))
        return None if ra is None or rb is None else ra.images_per_s / rb.images_per_s

    def line(goal, value, bound, point):
        label = f"{point[0]} B={point[1]} NFE={point[2]}"
        if value is None:
            out.append((f"{goal} ({label})", "not measured", None))
        else:
            out.append((f"{goal} ({label})", f"{value:.3f}", value >= bound))

    cuda = torch.device(device).type == "cuda"
    for p in points:
        if not cuda:
            line("fastguide_compiled / diffusers_eager >= 1.5", ratio("fastguide_compiled", "diffusers_eager", p),
                 1.5, p)
            continue
        line("fastguide_graph / floor >= 0.97", ratio("fastguide_graph", "floor", p), 0.97, p)
        if p[1] == 8:
            line("fastguide_graph / diffusers_compiled >= 1.10", ratio("fastguide_graph", "diffusers_compiled", p),
                 1.10, p)
        line("fastguide_recfg / fastguide_graph >= 0.98", ratio("fastguide_recfg", "fastguide_graph", p), 0.98, p)
        if p[1] == 64:
            line("fastguide_interval / floor >= 1.3", ratio("fastguide_interval", "floor", p), 1.3, p)
    return out


def format_goals(checks) -> str:
    mark = {True: "met", False: "NOT met", None: "-"}
    return "\n".join(f"{mark[ok]:8s} {value:>12s}  {goal}" for goal, value, ok in checks)


def _floor_fn(cnet, x2, t2, l2, nfe):
    """NFE x one CUDA-graph-replayed forward of the compiled network."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):
            cnet(x2, t2, l2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        cnet(x2, t2, l2)

    def run(_):
        for _ in range(nfe):
            graph.replay()

    return run


def format_rows(rows: list[Row]) -> str:
    head = (f"{'model':8s} {'mode':26s} {'B':>4s} {'NFE':>4s} {'img/s':>10s} {'ms/call':>9s} {'vs floor':>9s} "
            f"{'warm-up s':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r.vs_floor:9.3f}" if r.vs_floor is not None else " " * 9
        warm = f"{r.warmup_s:9.2f}" if r.warmup_s is not None else ""
        lines.append(f"{r.model:8s} {r.mode:26s} {r.batch:4d} {r.nfe:4d} {r.images_per_s:10.1f} "
                     f"{r.seconds * 1e3:9.2f} {vs} {warm}")
    return "\n".join(lines)


def rows_as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def tiny_dit(device="cpu", dtype=torch.float32, full: bool = False):
    """A DiT-XL/2-shaped diffusers DiTTransformer2DModel with random weights (full=True: 28 blocks, hidden 1152,
    16 heads, patch 2, 4x32x32 latents), else a 2-block miniature for CPU runs. Returns (net, latent shape)."""
    from diffusers import DiTTransformer2DModel

    if full:
        cfg = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                   patch_size=2, sample_size=32, num_embeds_ada_norm=1000)
    else:
        cfg = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                   patch_size=2, sample_size=8, num_embeds_ada_norm=1000)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(**cfg).to(device=device, dtype=dtype).eval()
    channels = cfg["in_channels"]

    def net(x, t, c):  # learned-sigma output: the eps half
        return dit(x, timestep=t, class_labels=c).sample[:, :channels]

    net.null_label = cfg["num_embeds_ada_norm"]
    return net, (channels, cfg["sample_size"], cfg["sample_size"])


OVERHEAD_MODES = ("diffusers_eager", "fastguide_eager", "fastguide_fused")
# The network part of each mode's per-step time: the same stub call alone (compiled for the fused mode, whose
# network runs inside one compiled function with the step; a compiled network pays that call anyway).
NETWORK_OF = {"diffusers_eager": "network_eager", "fastguide_eager": "network_eager",
              "fastguide_fused": "network_compiled"}


class StubNet(torch.nn.Module):
    """Stands in for the network when measuring sampler overhead: returns a fixed [2B] (or [B]) output."""

    def __init__(self, out2: torch.Tensor):
        super().__init__()
        self.register_buffer("out2", out2)

    def forward(self, x, t, c):
        return self.out2[: x.shape[0]]


def run_overhead(schedule, shape, *, batches=(1, 16, 64), nfe: int = 10, device="cpu", dtype=torch.float32,
                 scale: float = 3.0, reps: int = 15, warmup: int = 3, block: int = 20,
                 modes=OVERHEAD_MODES) -> list[dict]:
    """Per-step time of everything but the network (input batching, CFG combine, solver update, copies,
    and each sample() call's setup spread over its NFE steps), with the network replaced by
    :class:`StubNet`. The stub's own calls are timed too and subtracted (``overhead_us_per_step``), and
    ``vs_diffusers`` is that overhead over the diffusers-style loop's. Modes are interleaved per repetition
    so a drifting machine load hits them alike."""
    out = []
    solver = fg.DDIM(schedule, steps=nfe)
    for batch in batches:
        stub = StubNet(torch.randn(2 * batch, *shape, device=device, dtype=dtype)).to(device)
        noises = [torch.randn(batch, *shape, device=device, dtype=dtype) for _ in range(4)]
        labels = torch.arange(batch, device=device) % 10
        x2 = torch.randn(2 * batch, *shape, device=device, dtype=dtype)
        t2 = torch.full((1,), 500.0, device=device).expand(2 * batch)  # the layout the loops pass
        l2 = torch.cat([labels, torch.full_like(labels, 10)])
        cstub = torch.compile(stub, dynamic=False)
        sch = diffusers_scheduler_for(schedule, nfe)
        eager = fg.Sampler(stub, solver, fg.CFG(scale), null_cond=10, progress=False)
        fused = fg.Sampler(stub, solver, fg.CFG(scale), null_cond=10, progress=False).compile(fuse_step=True)
        fns = {
            "diffusers_eager": lambda r: diffusers_style_loop(stub, sch, noises[r % 4], labels, 10, scale),
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
                    _sync(device)
                    t0 = time.perf_counter()
                    for k in range(block):
                        fns[m](k)
                    _sync(device)
                    times[m].append((time.perf_counter() - t0) / block)
        per_step = {m: statistics.median(v) / nfe * 1e6 for m, v in times.items()}
        overhead = {m: per_step[m] - per_step[NETWORK_OF[m]] for m in modes}
        base = overhead.get("diffusers_eager")
        for m in modes:
            out.append({"mode": m, "batch": batch, "nfe": nfe, "us_per_step": per_step[m],
                        "network_us_per_step": per_step[NETWORK_OF[m]], "overhead_us_per_step": overhead[m],
                        "vs_diffusers": overhead[m] / base if base else None})
    return out
