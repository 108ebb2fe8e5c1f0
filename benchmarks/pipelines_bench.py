"""Tiny pipelines of each family on this machine: fastguide's call (compiled) against ``pipe(...)`` and against
``pipe(...)`` with its denoiser under torch.compile, same scheduler, steps, prompts and generators.

    python benchmarks/pipelines_bench.py [--families sd,sdxl,sd3,dit,flux,...] [--steps 4,8] [--batch 1,8]
                                         [--reps 5] [--json benchmarks/pipelines-cpu.json]

Families (fastguide/bench/tiny_pipelines.py, each with its shipped scheduler): sd (PNDM), sdxl (Euler), sd3
(FlowMatch Euler), dit (DDIM), flux (FLUX.1-dev-like: the distilled guidance embedding, guidance_scale 3.5, one
forward a step; dynamic-shift FlowMatch Euler), flux-true-cfg (no guidance embedding, true_cfg_scale 4 over a
negative prompt: two forwards a step; static-shift FlowMatch Euler), pixart-alpha / pixart-sigma (DPM-Solver++
2M, CFG 4.5), lcm (LCMScheduler, the guidance embedding at guidance_scale 8.5, one forward a step; 4 / 8 steps
are its usual counts).

For every (family, steps, batch), interleaved round-robin over the modes, median of --reps timed calls after one
warm-up call per mode (compiling happens there):
- ``pipe``: ``pipe(...)`` as it ships;
- ``pipe_compiled``: the same with ``pipe.unet`` / ``pipe.transformer`` replaced by ``torch.compile`` of it;
- ``fastguide``: ``fastguide.pipelines.from_pipe(pipe).compile()`` called with the same arguments (the model
  forward and the guided update compiled as one hot step, one graph without breaks; the pipeline's text encoders
  and VAE as they are).
Also the seconds of the text encoding and the VAE decode alone (the work both sides share), as shares of the
``pipe`` call, and a ceiling: in --reps further ``pipe_compiled`` calls, the seconds inside its compiled
denoiser's calls, its ``encode_prompt`` and its ``vae.decode`` (timed around each, in the same calls);
``ceiling_vs_pipe_compiled`` = the call / (denoiser + text + VAE), the median over those calls, is the most any
sampler running the same forwards could gain on ``pipe_compiled`` (everything else, the scheduler, the combine
and the pipeline's own bookkeeping, taken as removable: an upper bound). Goals (the pipeline issue): fastguide
>= 1.3x ``pipe`` and >= 1.05x ``pipe_compiled``. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from fastguide.bench import tiny_pipelines
from fastguide.bench.timing import seconds_inside
from fastguide.commands.common import check_out_file
from fastguide.pipelines import from_pipe

BUILDERS = {"sd": tiny_pipelines.tiny_sd, "sdxl": tiny_pipelines.tiny_sdxl, "sd3": tiny_pipelines.tiny_sd3,
            "dit": tiny_pipelines.tiny_dit, "flux": tiny_pipelines.tiny_flux,
            "flux-true-cfg": functools.partial(tiny_pipelines.tiny_flux, guidance_embeds=False),
            "pixart-alpha": functools.partial(tiny_pipelines.tiny_pixart, "alpha"),
            "pixart-sigma": functools.partial(tiny_pipelines.tiny_pixart, "sigma"), "lcm": tiny_pipelines.tiny_lcm}
PROMPTS = ["a cat", "low dog", "a photo of the lower", "blurry"]
NEGATIVE = "blurry"  # flux-true-cfg's negative prompt (the other text families: their default negative)
FLUX_SIZE = dict(height=16, width=16, max_sequence_length=16)  # 8 x 8 latents: 16 packed tokens
PIPE_ONLY = {"pixart-alpha": dict(clean_caption=False), "pixart-sigma": dict(clean_caption=False)}  # (fastguide's
# call never cleans captions; the pipeline's needs bs4 and ftfy to)


def call_args(family: str, batch: int, steps: int):
    """(args, kwargs) of one call, the same for ``pipe(...)`` (plus PIPE_ONLY) and for fastguide's."""
    gens = [torch.Generator().manual_seed(s) for s in range(batch)]
    common = dict(num_inference_steps=steps, generator=gens, output_type="np")
    if family == "dit":
        return ([(7 * i) % 1000 for i in range(batch)],), dict(guidance_scale=4.0, **common)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    if family == "flux":
        return (prompts,), dict(guidance_scale=3.5, **FLUX_SIZE, **common)
    if family == "flux-true-cfg":
        return (prompts,), dict(negative_prompt=[NEGATIVE] * batch, true_cfg_scale=4.0, **FLUX_SIZE, **common)
    if family.startswith("pixart"):
        return (prompts,), dict(guidance_scale=4.5, use_resolution_binning=False, **common)
    if family == "lcm":
        return (prompts,), dict(guidance_scale=8.5, **common)
    return (prompts,), dict(guidance_scale=5.0, **common)


@torch.no_grad()
def ceiling_of(pipe, call, denoiser, reps: int) -> tuple[dict, float]:
    """(median seconds of each part of ``call()``: the whole call and, inside it, the denoiser's calls, the text
    encoding and the VAE decode; the median over the calls of whole / (denoiser + text + VAE)), timed in the same
    calls. The ceiling is the most a sampler running the same forwards could gain on ``call`` by removing all
    the rest (scheduler, combine, bookkeeping)."""
    with ExitStack() as stack:
        spent = {"denoiser_s": stack.enter_context(seconds_inside(denoiser)),
                 "vae_s": stack.enter_context(seconds_inside(pipe.vae, "decode"))}
        if hasattr(pipe, "encode_prompt"):  # (DiT has no text encoder)
            spent["text_s"] = stack.enter_context(seconds_inside(pipe, "encode_prompt"))
        rows = []
        for _ in range(reps):
            for times in spent.values():
                times.clear()
            start = time.perf_counter()
            call()
            rows.append({"call_s": time.perf_counter() - start, **{k: sum(v) for k, v in spent.items()}})
    parts = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ceiling = statistics.median(r["call_s"] / sum(v for k, v in r.items() if k != "call_s") for r in rows)
    return parts, ceiling


def denoiser_name(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def shared_work_seconds(family, pipe, batch, steps) -> dict:
    """Seconds of the text encoding and of the VAE decode alone (what both sides run the same way)."""
    args, kw = call_args(family, batch, steps)
    out = {}
    if family != "dit":
        start = time.perf_counter()
        with torch.no_grad():
            encode_prompts(family, pipe, args[0], kw)
        out["text_s"] = time.perf_counter() - start
    latents = from_pipe(pipe)(*args, **{**kw, "output_type": "latent"})
    if family.startswith("flux"):  # packed [B, (H/2)(W/2), 4C] as the pipeline returns them
        latents = pipe._unpack_latents(latents, kw["height"], kw["width"], pipe.vae_scale_factor)
    start = time.perf_counter()
    with torch.no_grad():
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    out["vae_s"] = time.perf_counter() - start
    return out


def encode_prompts(family, pipe, prompts, kw) -> None:
    """The text encoding of one call, as the pipeline runs it (with its negative prompts where it runs CFG)."""
    if family == "sd3":
        pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=True)
    elif family == "sdxl":
        pipe.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=True)
    elif family.startswith("flux"):
        pipe.encode_prompt(prompt=prompts, prompt_2=None, device="cpu", max_sequence_length=kw["max_sequence_length"])
        if family == "flux-true-cfg":  # FluxPipeline encodes its negative prompts in a second call
            pipe.encode_prompt(prompt=kw["negative_prompt"], prompt_2=None, device="cpu",
                               max_sequence_length=kw["max_sequence_length"])
    elif family.startswith("pixart"):
        pipe.encode_prompt(prompts, True, device="cpu", clean_caption=False)
    elif family == "lcm":
        pipe.encode_prompt(prompts, "cpu", 1, False)
    else:
        pipe.encode_prompt(prompts, "cpu", 1, True)


def run(families, steps_list, batches, reps) -> list[dict]:
    rows = []
    for family in families:
        # Each family compiles from scratch, as one pipeline in a process would: the families share code objects
        # (diffusers' peft wrapper around every transformer's forward), so without a reset their shapes add up to
        # dynamo's recompile limit, after which the compiled denoiser silently runs eagerly.
        torch._dynamo.reset()
        pipe = BUILDERS[family]()
        name = denoiser_name(pipe)
        eager_model, compiled_model = getattr(pipe, name), torch.compile(getattr(pipe, name))
        fast = from_pipe(pipe).compile()
        for steps in steps_list:
            for batch in batches:
                args, kw = call_args(family, batch, steps)
                pipe_kw = {**kw, **PIPE_ONLY.get(family, {})}

                def pipe_call(model):
                    setattr(pipe, name, model)
                    try:
                        return pipe(*args, **pipe_kw).images
                    finally:
                        setattr(pipe, name, eager_model)

                modes = {"pipe": lambda: pipe_call(eager_model), "pipe_compiled": lambda: pipe_call(compiled_model),
                         "fastguide": lambda: fast(*args, **kw)}
                times = {m: [] for m in modes}
                for fn in modes.values():  # warm-up (compiles)
                    fn()
                for _ in range(reps):
                    for m, fn in modes.items():
                        start = time.perf_counter()
                        with torch.no_grad():
                            fn()
                        times[m].append(time.perf_counter() - start)
                med = {m: statistics.median(v) for m, v in times.items()}
                shared = shared_work_seconds(family, pipe, batch, steps)
                parts, ceiling = ceiling_of(pipe, lambda: pipe_call(compiled_model), compiled_model, reps)
                row = {"family": family, "steps": steps, "batch": batch, "median_s": med,
                       "images_per_s": {m: batch / v for m, v in med.items()},
                       "fastguide_vs_pipe": med["pipe"] / med["fastguide"],
                       "fastguide_vs_pipe_compiled": med["pipe_compiled"] / med["fastguide"],
                       "shared_work_s": shared, "pipe_compiled_parts_s": parts, "ceiling_vs_pipe_compiled": ceiling,
                       "shared_share_of_pipe": {k: v / med["pipe"] for k, v in shared.items()}}
                rows.append(row)
                print(f"{family:13s} steps {steps} batch {batch}: pipe {med['pipe'] * 1e3:.1f} ms, pipe+compile "
                      f"{med['pipe_compiled'] * 1e3:.1f} ms, fastguide {med['fastguide'] * 1e3:.1f} ms "
                      f"({row['fastguide_vs_pipe']:.2f}x / {row['fastguide_vs_pipe_compiled']:.2f}x, ceiling "
                      f"{row['ceiling_vs_pipe_compiled']:.2f}x); shared "
                      + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in shared.items()), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(BUILDERS))
    p.add_argument("--steps", default="4,8")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    families = args.families.split(",")
    unknown = [f for f in families if f not in BUILDERS]
    if unknown:
        p.error(f"--families: unknown {unknown}; expected some of {sorted(BUILDERS)}")
    if args.json:
        try:
            check_out_file(args.json, "--json", suffix=".json")  # before the long run, not after it
        except ValueError as e:
            p.error(str(e))
    rows = run(families, [int(v) for v in args.steps.split(",")], [int(v) for v in args.batch.split(",")], args.reps)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
