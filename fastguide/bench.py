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

MODES = ("diffusers_eager", "diffusers_compiled", "fastguide_eager", "fastguide_compiled", "fastguide_graph", "floor")


@dataclass
class Row:
    model: str
    mode: str
    batch: int
    nfe: int
    seconds: float  # median seconds per sample() call
    images_per_s: float
    vs_floor: float | None = None  # measured images/s / floor images/s


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


def run_end_to_end(net, schedule, shape, *, model_name: str, batches=(1, 16, 64), nfes=(10,), device="cpu",
                   dtype=torch.float32, null_label: int = 10, num_classes: int = 10, scale: float = 3.0,
                   modes=MODES, reps: int = 5, warmup: int = 2, progress=print) -> list[Row]:
    """Images/s per mode. All modes of one (batch, NFE) point are warmed up first, then timed interleaved
    (rep 1 of every mode, rep 2 of every mode, ...) so drifting machine load hits them alike; medians."""
    rows: list[Row] = []
    cuda = torch.device(device).type == "cuda"
    for nfe in nfes:
        solver = fg.DDIM(schedule, steps=nfe)
        for batch in batches:
            noises = [torch.randn(batch, *shape, device=device, dtype=dtype) for _ in range(4)]
            labels = torch.arange(batch, device=device) % num_classes
            x2 = torch.randn(2 * batch, *shape, device=device, dtype=dtype)
            t2 = torch.full((2 * batch,), 500.0, device=device)
            l2 = torch.cat([labels, torch.full_like(labels, null_label)])
            sch = diffusers_scheduler_for(schedule, nfe)
            cnet = torch.compile(net, mode="max-autotune-no-cudagraphs" if cuda else None, dynamic=False)

            def sampler(**compile_kw):
                s = fg.Sampler(net, solver, fg.CFG(scale), null_cond=null_label, progress=False)
                return s.compile(**compile_kw) if compile_kw else s

            def loop_of(s):
                return lambda r: s.sample(noises[r % 4], labels)

            fns = {"network_compiled": lambda r: [cnet(x2, t2, l2) for _ in range(nfe)]}
            if "diffusers_eager" in modes:
                fns["diffusers_eager"] = lambda r: diffusers_style_loop(net, sch, noises[r % 4], labels, null_label,
                                                                        scale)
            if "diffusers_compiled" in modes:
                dnet = torch.compile(net, mode="reduce-overhead" if cuda else None, dynamic=False)
                fns["diffusers_compiled"] = lambda r: diffusers_style_loop(dnet, sch, noises[r % 4], labels,
                                                                           null_label, scale)
            if "fastguide_eager" in modes:
                fns["fastguide_eager"] = loop_of(sampler())
            if "fastguide_compiled" in modes:
                fns["fastguide_compiled"] = loop_of(sampler(fuse_step=False))
                fns["fastguide_compiled_fused"] = loop_of(sampler(fuse_step=True))
            if "fastguide_graph" in modes and cuda:
                fns["fastguide_graph"] = loop_of(sampler(cuda_graph=True))
            if "floor" in modes:
                fns["floor"] = _floor_fn(cnet, x2, t2, l2, nfe) if cuda else fns["network_compiled"]
            times = {m: [] for m in fns}
            with torch.inference_mode():
                for m, fn in fns.items():
                    for r in range(warmup + 1):
                        fn(r)
                for r in range(reps):
                    for m, fn in fns.items():
                        times[m].append(median_time(fn, 1, 0, device))
            med = {m: statistics.median(v) for m, v in times.items()}
            for m in fns:
                if m.startswith("network"):
                    continue
                row = Row(model_name, m, batch, nfe, med[m], batch / med[m],
                          vs_floor=med["floor"] / med[m] if "floor" in med else None)
                rows.append(row)
                progress(f"  {model_name} B={batch} NFE={nfe} {m:24s} {row.images_per_s:10.1f} img/s")
    return rows


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
    head = f"{'model':8s} {'mode':24s} {'B':>4s} {'NFE':>4s} {'img/s':>10s} {'ms/call':>9s} {'vs floor':>9s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        vs = f"{r.vs_floor:9.3f}" if r.vs_floor is not None else ""
        lines.append(f"{r.model:8s} {r.mode:24s} {r.batch:4d} {r.nfe:4d} {r.images_per_s:10.1f} "
                     f"{r.seconds * 1e3:9.2f} {vs}")
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
    """Per-step time of everything but the network (input batching, CFG combine, solver update, copies),
    measured with the network replaced by :class:`StubNet`. Modes are interleaved per repetition so a
    drifting machine load hits them alike."""
    out = []
    solver = fg.DDIM(schedule, steps=nfe)
    for batch in batches:
        stub = StubNet(torch.randn(2 * batch, *shape, device=device, dtype=dtype)).to(device)
        noises = [torch.randn(batch, *shape, device=device, dtype=dtype) for _ in range(4)]
        labels = torch.arange(batch, device=device) % 10
        sch = diffusers_scheduler_for(schedule, nfe)
        eager = fg.Sampler(stub, solver, fg.CFG(scale), null_cond=10, progress=False)
        fused = fg.Sampler(stub, solver, fg.CFG(scale), null_cond=10, progress=False).compile(fuse_step=True)
        fns = {
            "diffusers_eager": lambda r: diffusers_style_loop(stub, sch, noises[r % 4], labels, 10, scale),
            "fastguide_eager": lambda r: eager.sample(noises[r % 4], labels),  # = compiled's overhead on the CPU
            "fastguide_fused": lambda r: fused.sample(noises[r % 4], labels),
        }
        times = {m: [] for m in modes}
        with torch.inference_mode():
            for m in modes:
                for r in range(warmup):
                    fns[m](r)
            for r in range(reps):  # blocks of `block` calls per mode, interleaved
                for m in modes:
                    _sync(device)
                    t0 = time.perf_counter()
                    for k in range(block):
                        fns[m](k)
                    _sync(device)
                    times[m].append((time.perf_counter() - t0) / block)
        for m in modes:
            out.append({"mode": m, "batch": batch, "nfe": nfe,
                        "us_per_step": statistics.median(times[m]) / nfe * 1e6})
    return out
