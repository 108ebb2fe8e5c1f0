"""End-to-end sampler benchmarks: fastguide vs a diffusers-style loop on the same network.

Every number is a median over repetitions measured in one run, with the noise rotated between
repetitions. Images/s counts whole fixed-NFE samples. The "floor" is NFE x the network's 2B forward alone
(compiled; on CUDA graph-replayed), the time no sampler can beat without doing less network work.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

import fastguide as fg
from fastguide.bench.timing import median_time
from fastguide.loop import capture_cuda_graph

MODES = ("diffusers_eager", "diffusers_compiled", "fastguide_eager", "fastguide_compiled_unfused",
         "fastguide_compiled", "fastguide_graph", "fastguide_recfg", "fastguide_interval", "floor")
MODE_HELP = {
    "diffusers_eager": "diffusers-style loop (set_timesteps; per step cat, forward, chunk, CFG combine, the "
                       "solver's diffusers scheduler.step: DDIM, DPMSolverMultistep or UniPCMultistep)",
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
    solver: str = "ddim"  # BENCH_SOLVERS: the same solver on both sides


BENCH_SOLVERS = ("ddim", "dpm++2m", "unipc")  # each timed with the diffusers scheduler that steps like it


def diffusers_scheduler_for(schedule: fg.NoiseSchedule, steps: int, solver: str = "ddim"):
    """The diffusers scheduler of ``solver`` (DDIM, DPM-Solver++ 2M or UniPC bh2 order 2) with the same betas and
    settings as a fastguide schedule, its timesteps set."""
    import diffusers

    common = dict(num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.betas.tolist(),
                  steps_offset=schedule.steps_offset, prediction_type=schedule.prediction_type,
                  timestep_spacing=schedule.timestep_spacing)
    if solver == "ddim":
        sch = diffusers.DDIMScheduler(clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
                                      set_alpha_to_one=schedule.set_alpha_to_one, **common)
    elif solver == "dpm++2m":
        sch = diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", **common)
    elif solver == "unipc":
        sch = diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", **common)
    else:
        raise ValueError(f"solver: expected one of {BENCH_SOLVERS}, got {solver!r}")
    sch.set_timesteps(steps)
    return sch


def bench_solver(schedule: fg.NoiseSchedule, steps: int, solver: str = "ddim"):
    """The fastguide solver for ``solver``: DDIM on the schedule as it is; the multistep ones imported from the
    diffusers scheduler the comparison runs (so both sides take the same steps)."""
    if solver == "ddim":
        return fg.DDIM(schedule, steps=steps)
    return fg.solver_from_diffusers(diffusers_scheduler_for(schedule, steps, solver), steps)


def diffusers_style_loop(net, scheduler, noise, labels, null_label: int, scale: float, guider=None):
    """What a diffusers pipeline does per call: set_timesteps (which also resets a multistep scheduler's state),
    then per step: cat the 2B input, one forward, chunk, combine (by hand, or with ``guider``: a diffusers guider
    component, its step state set as a modular pipeline sets it, APG's momentum restarted at step 0 as its
    prepare_inputs does), scheduler.step."""
    scheduler.set_timesteps(scheduler.num_inference_steps)
    x = noise
    null = torch.full_like(labels, null_label)
    lab2 = torch.cat([null, labels])
    steps = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x])
        out = net(x_in, t.to(x.device).float().expand(x_in.shape[0]), lab2)
        e_u, e_c = out.chunk(2)
        if guider is None:
            eps = e_u + scale * (e_c - e_u)
        else:
            guider.set_state(i, steps, t)
            momentum = getattr(guider, "adaptive_projected_guidance_momentum", None)
            if i == 0 and momentum is not None:
                guider.momentum_buffer = type(guider.momentum_buffer)(momentum)
            eps = guider.forward(e_c, e_u).pred
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
                   modes=MODES, reps: int = 5, warmup: int = 2, progress=print, solver: str = "ddim") -> list[Row]:
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
        # t as the sampler passes it, one value expanded over the rows (a faster layout: docs/design.md)
        t2 = torch.full((1,), 500.0, device=device).expand(2 * batch)
        l2 = torch.cat([labels, torch.full_like(labels, null_label)])
        cnet = torch.compile(net, mode="max-autotune-no-cudagraphs" if cuda else None, dynamic=False)
        dnet = torch.compile(net, mode="reduce-overhead" if cuda else None, dynamic=False)
        table = bench_ratio_table(schedule, shape, min(num_classes, batch), dtype, device)

        samplers = fastguide_samplers(net, bench_solver(schedule, nfes[0], solver), fg.CFG(scale), null_label, cuda)
        best = samplers["fastguide_graph" if cuda else "fastguide_compiled"]  # what a user would pick there
        for nfe in nfes:
            plan_solver = bench_solver(schedule, nfe, solver)
            for s in samplers.values():
                s.solver = plan_solver
            sch = diffusers_scheduler_for(schedule, nfe, solver)
            recfg = fg.ReCFG(scale, table=table, unknown_label="mean")
            interval = fg.CFG(scale, interval=half_interval(plan_solver.plan.timesteps))

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
            first, med = time_interleaved(fns, reps, warmup, device)
            for m in fns:
                row = Row(model_name, m, batch, nfe, med[m], batch / med[m], solver=solver,
                          vs_floor=med["floor"] / med[m] if "floor" in med else None,
                          warmup_s=first[m] if m.startswith("fastguide") else None)
                rows.append(row)
                progress(f"  {model_name} {solver} B={batch} NFE={nfe} {m:26s} {row.images_per_s:10.1f} img/s")
    return rows


def fastguide_samplers(net, solver, guidance, null_label: int, cuda: bool) -> dict:
    """mode -> the Sampler it times (each compiled its own way)."""
    def sampler(**compile_kw):
        s = fg.Sampler(net, solver, guidance, null_cond=null_label, progress=False)
        return s.compile(**compile_kw) if compile_kw else s

    samplers = {"fastguide_eager": sampler(), "fastguide_compiled_unfused": sampler(fuse_step=False),
                "fastguide_compiled": sampler(fuse_step=True)}
    if cuda:
        samplers["fastguide_graph"] = sampler(cuda_graph=True)
    return samplers


def time_interleaved(fns: dict, reps: int, warmup: int, device) -> tuple[dict, dict]:
    """({mode: first call's seconds}, {mode: median seconds}): every mode's first call and warm-up runs, then
    ``reps`` rounds of one timed call per mode, interleaved so drifting machine load hits them alike."""
    times = {m: [] for m in fns}
    first = {}
    with torch.inference_mode():
        for m, fn in fns.items():
            first[m] = median_time(fn, 1, 0, device)
            for r in range(warmup):
                fn(r + 1)
        for _ in range(reps):
            for m, fn in fns.items():
                times[m].append(median_time(fn, 1, 0, device))
    return first, {m: statistics.median(v) for m, v in times.items()}


def _floor_fn(cnet, x2, t2, l2, nfe):
    """NFE x one CUDA-graph-replayed forward of the compiled network."""
    with torch.inference_mode():
        graph = capture_cuda_graph(lambda: cnet(x2, t2, l2), warmup=3)

    def run(_):
        for _ in range(nfe):
            graph.replay()

    return run


def format_rows(rows: list[Row]) -> str:
    head = (f"{'model':8s} {'solver':8s} {'mode':26s} {'B':>4s} {'NFE':>4s} {'img/s':>10s} {'ms/call':>9s} {'vs floor':>9s} "
            f"{'warm-up s':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r.vs_floor:9.3f}" if r.vs_floor is not None else " " * 9
        warm = f"{r.warmup_s:9.2f}" if r.warmup_s is not None else ""
        lines.append(f"{r.model:8s} {r.solver:8s} {r.mode:26s} {r.batch:4d} {r.nfe:4d} {r.images_per_s:10.1f} "
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
