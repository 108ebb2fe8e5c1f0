"""Real-size SDXL and SD3-medium denoisers with random weights (fp16 on CUDA): the denoising loop alone, a
diffusers-style loop against fastguide's Sampler through its adapters.

    python benchmarks/pipelines_gpu.py [--models sdxl,sd3] [--schedulers ...] [--batch 1,4] [--reps 3] [--budget-s S]
                                       [--json pipelines-gpu.json]
    python benchmarks/pipelines_gpu.py --tiny --device cpu --reps 1 --json /tmp/pipelines-tiny.json  # CI smoke

No text encoders, no VAE: random prompt and negative embeddings of the shapes the pipelines pass to their denoiser
(SDXL: 77 tokens x 2048, pooled 1280, 6 time ids for 1024 x 1024; SD3: 77 CLIP + 256 T5 tokens x 4096, pooled
2048), CFG at the pipelines' default scales (SDXL 5.0, SD3 7.0). Points: SDXL 25 steps with its shipped Euler
scheduler and with DPM-Solver++ 2M (``DPMSolverMultistepScheduler.from_config`` of it), SD3 28 steps with
FlowMatch Euler (shift 3.0), at each --batch. Per point, one warm-up call per mode (compiling and capturing happen
there; its seconds are ``first_call_s``), then --reps rounds of one timed call per mode, interleaved; medians.

- ``diffusers_eager``: the loop of StableDiffusionXLPipeline / StableDiffusion3Pipeline: set_timesteps, then per
  step cat [negative | prompt] (and scale_model_input), one forward, chunk, CFG combine, ``scheduler.step``;
- ``diffusers_compiled``: the same loop with the denoiser under ``torch.compile`` (--compile-mode);
- ``fastguide_eager``: ``fastguide.Sampler`` over ``SDXLAdapter`` / ``SD3Adapter`` (packed conditions, as
  fastguide/pipelines/stable_diffusion.py drives them), the solver of the same scheduler
  (``solver_from_diffusers``);
- ``fastguide_compiled``: ``Sampler.compile(mode=--compile-mode)``: forward + guided step one compiled function;
- ``fastguide_graph``: ``Sampler.compile(cuda_graph=True, mode=--compile-mode)``: the whole loop replayed as one
  CUDA graph (CUDA only; absent on a CPU).

fastguide's samplers run with ``check_finite=False`` (the diffusers loop checks nothing either; random fp16 weights
need not give finite outputs, and each row records whether they did). Peak memory: the largest
``torch.cuda.max_memory_allocated`` over a mode's timed calls (reset before each), and the same less what was
allocated before the call (weights, inputs, other modes' buffers): what the call itself adds at its peak. Each
row also has every mode's max |latents - diffusers_eager's| for the same noise (the warm-up call): the tiny
float32 run (--tiny: tiny configs, float32, 2 steps, batch 2) should give < 1e-4. The JSON is rewritten after
every point, so a run cut short keeps the points it finished; --budget-s starts no point after that many seconds
(those are listed under "skipped"). Run order, per batch: SDXL Euler, SD3, SDXL DPM-Solver++ 2M; each point builds
its model (seeded: the same weights each time) and compiles afresh (each is another shape or timestep dtype).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import fastguide as fg
from fastguide.bench import tiny_pipelines
from fastguide.bench.timing import sync

MODES = ("diffusers_eager", "diffusers_compiled", "fastguide_eager", "fastguide_compiled", "fastguide_graph")

# SDXL base 1.0's UNet: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json on the Hugging Face Hub (the
# entries that differ from UNet2DConditionModel's defaults, and the main ones that do not); 2.6 B parameters.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
                 flip_sin_to_cos=True, freq_shift=0)
# its scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                      interpolation_type="linear", use_karras_sigmas=False)
# SD3 medium's MMDiT: stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json; 2.0 B parameters
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
# its scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
# what the pipelines feed the denoiser: SDXL 77 CLIP tokens (CLIP-L 768 + CLIP-bigG 1280 features), the bigG
# pooled projection (1280; 2816 = 1280 + 6 time ids x 256) and the time ids of a 1024 x 1024 image; SD3 77 CLIP
# tokens + 256 T5 tokens (its default max_sequence_length), pooled CLIP-L + CLIP-G (2048)
SDXL_TOKENS, SD3_TOKENS, TIME_IDS = 77, 77 + 256, 6
STEPS = {"sdxl": 25, "sd3": 28}
SCALES = {"sdxl": 5.0, "sd3": 7.0}


# ---------------------------------------------------------------------- the denoisers and their inputs
def build_model(name: str, tiny: bool, device, dtype):
    """The denoiser with random weights (seeded), initialised on ``device`` then cast to ``dtype``, eval mode."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        if name == "sdxl":
            model = UNet2DConditionModel(**(tiny_pipelines.SDXL_UNET if tiny else SDXL_UNET))
        else:
            model = SD3Transformer2DModel(**(tiny_pipelines.SD3_TRANSFORMER if tiny else SD3_TRANSFORMER))
    return model.to(dtype=dtype).eval().requires_grad_(False)


def schedulers_for(name: str) -> dict:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    if name == "sdxl":
        euler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
        return {"euler": euler, "dpm++2m": DPMSolverMultistepScheduler.from_config(
            euler.config, algorithm_type="dpmsolver++", solver_order=2)}
    return {"flow-euler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)}


class Inputs:
    """One point's random conditions: per-prompt embeddings (and pooled vectors, time ids), one negative shared
    by the batch, the noises the calls rotate through; the diffusers loop's [negative | prompt] batches and the
    adapter's packed conditions of the same values."""

    def __init__(self, name: str, model, batch: int, device, dtype, noises: int = 3):
        gen = torch.Generator().manual_seed(1)
        cfg = model.config

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        if name == "sdxl":
            dim, tokens = int(cfg.cross_attention_dim), SDXL_TOKENS
            pooled_dim = int(cfg.projection_class_embeddings_input_dim) - TIME_IDS * int(cfg.addition_time_embed_dim)
            channels, size = int(cfg.in_channels), int(cfg.sample_size)
        else:
            dim, tokens, pooled_dim = int(cfg.joint_attention_dim), SD3_TOKENS, int(cfg.pooled_projection_dim)
            channels, size = int(cfg.in_channels), int(cfg.sample_size)
        self.pooled_dim = pooled_dim
        self.embeds, self.pooled = randn(batch, tokens, dim), randn(batch, pooled_dim)
        neg, neg_pooled = randn(1, tokens, dim), randn(1, pooled_dim)
        self.embeds2 = torch.cat([neg.expand(batch, -1, -1), self.embeds])
        self.pooled2 = torch.cat([neg_pooled.expand(batch, -1), self.pooled])
        px = 8 * size  # the image size (the VAE's 8x) for SDXL's time ids: original, crop (0, 0), target
        self.time_ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=dtype, device=device)
        self.time_ids2 = torch.cat([self.time_ids, self.time_ids])
        self.noises = [randn(batch, channels, size, size) for _ in range(noises)]
        self.neg, self.neg_pooled = neg, neg_pooled

    def adapter(self, name: str, model, scheduler):
        """The fastguide adapter, its packed prompt conditions [B, L + k, D] and packed negative [L + k, D]."""
        from fastguide.adapters import SD3Adapter, SDXLAdapter, pack_tokens_and_pooled

        if name == "sdxl":
            def pack(e, p, t):  # SDXLAdapter.pack (needed before the adapter, which takes the packed null)
                vector = torch.cat([p, t], dim=1)
                return pack_tokens_and_pooled(e, vector, e.shape[2], vector.shape[1])

            null = pack(self.neg, self.neg_pooled, self.time_ids[:1])[0]
            adapter = SDXLAdapter(model, null, self.pooled_dim, scheduler)
            return adapter, adapter.pack(self.embeds, self.pooled, self.time_ids)
        null = SD3Adapter.pack_for(model, self.neg, self.neg_pooled)[0]
        adapter = SD3Adapter(model, null, scheduler)
        return adapter, adapter.pack(self.embeds, self.pooled)


# ---------------------------------------------------------------------- the diffusers-style loops
def sdxl_loop(unet, scheduler, steps: int, noise, inp: Inputs, scale: float):
    """StableDiffusionXLPipeline's denoising loop (no guidance rescale, no timestep_cond, no IP adapter)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    added = {"text_embeds": inp.pooled2, "time_ids": inp.time_ids2}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(x_in, t, encoder_hidden_states=inp.embeds2, added_cond_kwargs=added, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x, return_dict=False)[0]
    return x


def sd3_loop(transformer, scheduler, steps: int, noise, inp: Inputs, scale: float):
    """StableDiffusion3Pipeline's denoising loop (no skip-layer guidance)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x])
        out = transformer(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=inp.embeds2,
                          pooled_projections=inp.pooled2, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x, return_dict=False)[0]
    return x


LOOPS = {"sdxl": sdxl_loop, "sd3": sd3_loop}


# ---------------------------------------------------------------------- timing one point
def time_point(fns: dict, reps: int, device) -> dict:
    """Every mode's warm-up call (its output kept for the comparison), then ``reps`` interleaved rounds of one
    timed call per mode, with each call's peak memory on CUDA. A mode whose warm-up raises is reported in
    ``errors`` and not timed."""
    cuda = torch.device(device).type == "cuda"
    first, outputs, errors = {}, {}, {}
    with torch.inference_mode():
        for m, fn in fns.items():
            try:
                sync(device)
                start = time.perf_counter()
                outputs[m] = fn(0)
                sync(device)
                first[m] = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 (one failing mode must not cost the others' numbers)
                errors[m] = f"{type(e).__name__}: {e}"[:800]
        live = [m for m in fns if m not in errors]
        times = {m: [] for m in live}
        peak, over = {m: 0 for m in live}, {m: 0 for m in live}
        for r in range(reps):
            for m in live:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                sync(device)
                start = time.perf_counter()
                fns[m](r + 1)
                sync(device)
                times[m].append(time.perf_counter() - start)
                if cuda:
                    top = torch.cuda.max_memory_allocated()
                    peak[m], over[m] = max(peak[m], top), max(over[m], top - before)
    ref = outputs.get("diffusers_eager")
    diffs = {m: float((out.float() - ref.float()).abs().max()) for m, out in outputs.items()} if ref is not None else {}
    med = {m: statistics.median(v) for m, v in times.items()}
    return dict(median_s=med, first_call_s=first, peak_bytes=peak if cuda else None,
                peak_over_resident_bytes=over if cuda else None, max_abs_diff_vs_diffusers_eager=diffs,
                finite={m: bool(torch.isfinite(out).all()) for m, out in outputs.items()}, errors=errors)


def ratios(med: dict) -> dict:
    pairs = [("fastguide_compiled", "diffusers_compiled"), ("fastguide_graph", "diffusers_compiled"),
             ("fastguide_eager", "diffusers_eager"), ("fastguide_compiled", "diffusers_eager"),
             ("fastguide_graph", "diffusers_eager")]
    return {f"{a}_vs_{b}": med[b] / med[a] for a, b in pairs if a in med and b in med}


# ---------------------------------------------------------------------- the run
POINT_ORDER = (("sdxl", "euler"), ("sd3", "flow-euler"), ("sdxl", "dpm++2m"))  # per batch; the shipped schedulers
# first, so a run cut short by --budget-s or a time limit has those


def points(args) -> list[tuple[int, str, str]]:
    """(batch, model, scheduler) in run order: every batch's points before the next batch's."""
    return [(batch, name, sched) for batch in args.batch for name, sched in POINT_ORDER
            if name in args.models and sched in args.schedulers]


def run(args, write) -> tuple[list, list]:
    """Each point on its own: the model built (seeded: the same weights every point), compiled and sampled, then
    dropped with its compiled code (dynamo reset) before the next; the JSON rewritten after each."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float32 if args.tiny or not cuda else torch.float16
    modes = [m for m in args.modes if m != "fastguide_graph" or cuda]
    compile_mode = args.compile_mode  # passed as given: Sampler.compile's None would pick max-autotune with graphs
    rows, skipped = [], []
    start = time.perf_counter()
    for batch, name, sched_name in points(args):
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            skipped.append(dict(model=name, batch=batch, scheduler=sched_name, why=f"--budget-s {args.budget_s}"))
            write(rows, skipped)
            continue
        row = run_point(name, sched_name, batch, args, modes, device, dtype, compile_mode)
        rows.append(row)
        write(rows, skipped)
        print(summary(row), flush=True)
        gc.collect()
        torch._dynamo.reset()  # the next point is another shape, model or scheduler: drop compiled code
        if cuda:
            torch.cuda.empty_cache()
    return rows, skipped


def run_point(name, sched_name, batch, args, modes, device, dtype, compile_mode) -> dict:
    model = build_model(name, args.tiny, device, dtype)
    inp = Inputs(name, model, batch, device, dtype)
    steps, scale = (2 if args.tiny else STEPS[name]), SCALES[name]
    scheduler = schedulers_for(name)[sched_name]
    adapter, cond = inp.adapter(name, model, scheduler)
    solver = fg.solver_from_diffusers(scheduler, steps)
    loop = LOOPS[name]

    def sampler(compiled: bool, cuda_graph: bool = False):
        s = adapter.sampler(solver, fg.CFG(scale), progress=False, check_finite=False)
        return s.compile(mode=compile_mode, cuda_graph=cuda_graph) if compiled else s

    def diffusers(net):
        return lambda r: loop(net, scheduler, steps, inp.noises[r % len(inp.noises)], inp, scale)

    def fastguide(s):
        return lambda r: s.sample(inp.noises[r % len(inp.noises)], cond)

    makers = {"diffusers_eager": lambda: diffusers(model),
              "diffusers_compiled": lambda: diffusers(torch.compile(model, mode=compile_mode, dynamic=False)),
              "fastguide_eager": lambda: fastguide(sampler(False)),
              "fastguide_compiled": lambda: fastguide(sampler(True)),
              "fastguide_graph": lambda: fastguide(sampler(True, cuda_graph=True))}
    point = time_point({m: makers[m]() for m in modes}, args.reps, device)
    return dict(model=name, scheduler=sched_name, steps=steps, batch=batch, guidance_scale=scale, **point,
                images_per_s={m: batch / v for m, v in point["median_s"].items()}, speedup=ratios(point["median_s"]))


def summary(row) -> str:
    med, peak = row["median_s"], row["peak_over_resident_bytes"] or {}
    parts = [f"{m} {v * 1e3:.1f} ms" + (f" (+{peak[m] / 2 ** 30:.2f} GiB)" if m in peak else "")
             for m, v in med.items()]
    worst = max(row["max_abs_diff_vs_diffusers_eager"].values(), default=math.nan)
    errors = f"; errors: {sorted(row['errors'])}" if row["errors"] else ""
    return (f"{row['model']} {row['scheduler']} steps {row['steps']} batch {row['batch']}: " + ", ".join(parts)
            + f"; max |diff| {worst:.3g}{errors}")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sdxl,sd3")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 1,4; --tiny: 2)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny configs, float32, 2 steps (a CPU smoke run)")
    p.add_argument("--schedulers", default="euler,dpm++2m,flow-euler",
                   help="SDXL's euler and dpm++2m, SD3's flow-euler (default: all)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of every compiled mode (default: inductor's default mode)")
    p.add_argument("--budget-s", type=float, default=None, help="start no point after this many seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    if any(m not in STEPS for m in args.models):
        p.error(f"--models: expected some of {sorted(STEPS)}, got {args.models}")
    args.schedulers = args.schedulers.split(",")
    known = {sched for _, sched in POINT_ORDER}
    if any(sc not in known for sc in args.schedulers):
        p.error(f"--schedulers: expected some of {sorted(known)}, got {args.schedulers}")
    args.modes = args.modes.split(",")
    if any(m not in MODES for m in args.modes) or "diffusers_eager" not in args.modes:
        p.error(f"--modes: expected some of {MODES}, diffusers_eager among them (the reference), got {args.modes}")
    args.batch = [int(b) for b in (args.batch or ("2" if args.tiny else "1,4")).split(",")]
    if args.reps < 1 or any(b < 1 for b in args.batch):
        p.error("--reps and --batch: expected positive ints")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --tiny --device cpu for a CPU smoke run)")
    return p, args


def main(argv=None):
    p, args = parse(argv)
    path = Path(args.json) if args.json else None
    import diffusers

    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
            "dtype": "float32" if args.tiny or torch.device(args.device).type != "cuda" else "float16",
            "tiny": args.tiny, "reps": args.reps, "batches": args.batch, "models": args.models,
            "schedulers": args.schedulers, "compile_mode": args.compile_mode,
            "threads": torch.get_num_threads(),
            "modes": [m for m in args.modes if m != "fastguide_graph" or torch.device(args.device).type == "cuda"]}

    def write(rows, skipped):
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=2) + "\n")
        os.replace(tmp, path)  # whole files only: a run killed mid-write keeps the previous points

    if path is not None:  # before any model is built: fail now, not after the run
        try:
            write([], [])
        except OSError as e:
            p.error(f"--json: cannot write {path}: {e}")
    rows, skipped = run(args, write)
    write(rows, skipped)
    return {"meta": meta, "rows": rows, "skipped": skipped}


if __name__ == "__main__":
    main()
