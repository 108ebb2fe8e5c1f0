"""Tiny pipelines of each family on this machine: fastguide's call (compiled) against ``pipe(...)`` and against
``pipe(...)`` with its denoiser under torch.compile, same scheduler, steps, prompts and generators.

    python benchmarks/pipelines_bench.py [--families sd,sdxl,sd3,dit] [--steps 4,8] [--batch 1,8] [--reps 5]
                                         [--json benchmarks/pipelines-cpu.json]

For every (family, steps, batch), interleaved round-robin over the modes, median of --reps timed calls after one
warm-up call per mode (compiling happens there):
- ``pipe``: ``pipe(...)`` as it ships;
- ``pipe_compiled``: the same with ``pipe.unet`` / ``pipe.transformer`` replaced by ``torch.compile`` of it;
- ``fastguide``: ``fastguide.pipelines.from_pipe(pipe).compile()`` called with the same arguments (eager model
  forward inside the compiled hot step, the pipeline's text encoders and VAE).
Also the seconds of the text encoding and the VAE decode alone (the work both sides share), as shares of the
``pipe`` call. Goals (the pipeline issue): fastguide >= 1.3x ``pipe`` and >= 1.05x ``pipe_compiled``. Run it on
an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fastguide.bench import tiny_pipelines
from fastguide.pipelines import from_pipe

BUILDERS = {"sd": tiny_pipelines.tiny_sd, "sdxl": tiny_pipelines.tiny_sdxl, "sd3": tiny_pipelines.tiny_sd3,
            "dit": tiny_pipelines.tiny_dit}
PROMPTS = ["a cat", "low dog", "a photo of the lower", "blurry"]


def call_args(family: str, batch: int, steps: int):
    gens = [torch.Generator().manual_seed(s) for s in range(batch)]
    if family == "dit":
        return ([(7 * i) % 1000 for i in range(batch)],), dict(num_inference_steps=steps, guidance_scale=4.0,
                                                             generator=gens, output_type="np")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    return (prompts,), dict(num_inference_steps=steps, guidance_scale=5.0, generator=gens, output_type="np")


def denoiser_name(pipe) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"


def shared_work_seconds(family, pipe, batch, steps) -> dict:
    """Seconds of the text encoding and of the VAE decode alone (what both sides run the same way)."""
    args, kw = call_args(family, batch, steps)
    out = {}
    if family != "dit":
        start = time.perf_counter()
        with torch.no_grad():
            if family == "sd3":
                pipe.encode_prompt(prompt=args[0], prompt_2=None, prompt_3=None, device="cpu",
                                   do_classifier_free_guidance=True)
            elif family == "sdxl":
                pipe.encode_prompt(prompt=args[0], device="cpu", do_classifier_free_guidance=True)
            else:
                pipe.encode_prompt(args[0], "cpu", 1, True)
        out["text_s"] = time.perf_counter() - start
    latents = from_pipe(pipe)(*args, **{**kw, "output_type": "latent"})
    start = time.perf_counter()
    with torch.no_grad():
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
    out["vae_s"] = time.perf_counter() - start
    return out


def run(families, steps_list, batches, reps) -> list[dict]:
    rows = []
    for family in families:
        pipe = BUILDERS[family]()
        name = denoiser_name(pipe)
        eager_model, compiled_model = getattr(pipe, name), torch.compile(getattr(pipe, name))
        fast = from_pipe(pipe).compile()
        for steps in steps_list:
            for batch in batches:
                args, kw = call_args(family, batch, steps)

                def pipe_call(model):
                    setattr(pipe, name, model)
                    try:
                        return pipe(*args, **kw).images
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
                row = {"family": family, "steps": steps, "batch": batch, "median_s": med,
                       "images_per_s": {m: batch / v for m, v in med.items()},
                       "fastguide_vs_pipe": med["pipe"] / med["fastguide"],
                       "fastguide_vs_pipe_compiled": med["pipe_compiled"] / med["fastguide"],
                       "shared_work_s": shared,
                       "shared_share_of_pipe": {k: v / med["pipe"] for k, v in shared.items()}}
                rows.append(row)
                print(f"{family:5s} steps {steps} batch {batch}: pipe {med['pipe'] * 1e3:.1f} ms, pipe+compile "
                      f"{med['pipe_compiled'] * 1e3:.1f} ms, fastguide {med['fastguide'] * 1e3:.1f} ms "
                      f"({row['fastguide_vs_pipe']:.2f}x / {row['fastguide_vs_pipe_compiled']:.2f}x); shared "
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
    rows = run(families, [int(v) for v in args.steps.split(",")], [int(v) for v in args.batch.split(",")], args.reps)
    if args.json:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
