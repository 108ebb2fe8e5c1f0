"""Peak CPU tensor memory of each tiny pipeline's own call against fastguide's, same arguments.

    python benchmarks/pipelines_memory.py [--families sd,sdxl,sd3,dit,flux,flux_cfg,pixart,lcm] [--steps 4,8]
                                          [--batch 1,8] [--no-compile] [--json benchmarks/pipelines-memory-cpu.json]

For every (family, steps, batch), the peak of live CPU tensor bytes during one call above what was live before it
(fastguide.bench.memory: the profiler's allocator events), with the same prompts, per-image generators and
output_type="np":
- ``pipe``: ``pipe(...)`` as it ships (after one warm-up call);
- ``fastguide``: ``fastguide.pipelines.from_pipe(pipe)(...)`` (eager), after one warm-up call; that first call is
  measured too (``fastguide_first``: it also allocates the loop buffers the Sampler keeps for the next call of the
  same shape, reported as ``fastguide_kept_mb``: what the first call left allocated beyond the pipeline's call);
- ``fastguide_compiled``: ``from_pipe(pipe).compile()`` after a warm-up call (compiling happens there).
Families: the tiny pipelines of fastguide/bench/tiny_pipelines.py (a family whose builder is not there is skipped
with a note). ``flux`` is the guidance-distilled FluxPipeline (one forward a step); ``flux_cfg`` the plain one with
true CFG over negative prompts (the pipeline runs two B-row forwards a step, fastguide one 2B-row forward).
Memory does not depend on timing, so this can run on a busy machine (one torch thread by default).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastguide.bench import tiny_pipelines
from fastguide.bench.memory import MB, cpu_tensor_memory
from fastguide.commands.common import check_out_file
from fastguide.pipelines import from_pipe

PROMPTS = ["a cat", "low dog", "a photo of the lower", "blurry"]
FLUX_SIZE = dict(height=16, width=16, max_sequence_length=12)  # 8 x 8 latents: 16 packed tokens
# family -> (builder name in tiny_pipelines, its arguments, call keywords for both sides, keywords for pipe only)
FAMILIES = {
    "sd": ("tiny_sd", {}, dict(guidance_scale=5.0), {}),
    "sdxl": ("tiny_sdxl", {}, dict(guidance_scale=5.0), {}),
    "sd3": ("tiny_sd3", {}, dict(guidance_scale=5.0), {}),
    "dit": ("tiny_dit", {}, dict(guidance_scale=4.0), {}),
    "flux": ("tiny_flux", dict(guidance_embeds=True), dict(guidance_scale=3.5, **FLUX_SIZE), {}),
    "flux_cfg": ("tiny_flux", dict(guidance_embeds=False), dict(negative_prompt="blurry", true_cfg_scale=4.0,
                                                                  **FLUX_SIZE), {}),
    "pixart": ("tiny_pixart", {}, dict(guidance_scale=4.5, use_resolution_binning=False), dict(clean_caption=False)),
    "lcm": ("tiny_lcm", {}, dict(guidance_scale=8.5), {}),
}


def build(family: str):
    """The family's tiny pipeline, or None when fastguide/bench/tiny_pipelines.py has no builder for it."""
    name, kw = FAMILIES[family][:2]
    builder = getattr(tiny_pipelines, name, None)
    return None if builder is None else builder(**kw)


def call_args(family: str, batch: int, steps: int):
    """(args, keywords of both calls, keywords of the pipeline's call only); fresh generators each time."""
    gens = [torch.Generator().manual_seed(s) for s in range(batch)]
    both = dict(FAMILIES[family][2], num_inference_steps=steps, generator=gens, output_type="np")
    if family == "dit":
        return ([(7 * i) % 1000 for i in range(batch)],), both, {}
    return ([PROMPTS[i % len(PROMPTS)] for i in range(batch)],), both, FAMILIES[family][3]


def pipe_call(family, pipe, batch, steps):
    args, kw, own = call_args(family, batch, steps)
    return pipe(*args, **kw, **own).images


def fast_call(family, fast, batch, steps):
    args, kw, _ = call_args(family, batch, steps)
    return fast(*args, **kw)


def measure(family: str, pipe, fast, compiled, batch: int, steps: int) -> dict:
    """One row: peaks (MB) of the pipeline's call, fastguide's first and repeated eager calls, and the compiled one."""
    pipe_call(family, pipe, batch, steps)  # warm-up
    theirs = cpu_tensor_memory(lambda: pipe_call(family, pipe, batch, steps))
    first = cpu_tensor_memory(lambda: fast_call(family, fast, batch, steps))
    ours = cpu_tensor_memory(lambda: fast_call(family, fast, batch, steps))
    row = {"family": family, "steps": steps, "batch": batch, "pipe_mb": theirs.peak / MB,
           "fastguide_mb": ours.peak / MB, "fastguide_first_mb": first.peak / MB,
           "fastguide_kept_mb": (first.retained - theirs.retained) / MB,
           "retained_mb": {"pipe": theirs.retained / MB, "fastguide": ours.retained / MB},
           "allocations": {"pipe": theirs.allocations, "fastguide": ours.allocations},
           "ratio": ours.peak / theirs.peak}
    if compiled is not None:
        fast_call(family, compiled, batch, steps)  # warm-up: compiles for this shape
        comp = cpu_tensor_memory(lambda: fast_call(family, compiled, batch, steps))
        row.update(fastguide_compiled_mb=comp.peak / MB, ratio_compiled=comp.peak / theirs.peak)
        row["retained_mb"]["fastguide_compiled"] = comp.retained / MB
        row["allocations"]["fastguide_compiled"] = comp.allocations
    return row


def run(families, steps_list, batches, compile_: bool = True) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for family in families:
        pipe = build(family)
        if pipe is None:
            skipped.append(family)
            print(f"{family}: skipped (fastguide/bench/tiny_pipelines.py has no {FAMILIES[family][0]})", flush=True)
            continue
        fast = from_pipe(pipe)
        compiled = from_pipe(pipe).compile() if compile_ else None
        for steps in steps_list:
            for batch in batches:
                row = measure(family, pipe, fast, compiled, batch, steps)
                rows.append(row)
                print(table_line(row), flush=True)
    return rows, skipped


def table_header(compiled: bool) -> str:
    head = "| family | steps | batch | pipe MB | fastguide MB | ratio |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if compiled:
        head += " compiled MB | ratio |"
        rule += "---:|---:|"
    return head + " fastguide first call MB | kept MB |\n" + rule + "---:|---:|"


def table_line(row: dict) -> str:
    line = (f"| {row['family']} | {row['steps']} | {row['batch']} | {row['pipe_mb']:.3f} | {row['fastguide_mb']:.3f} "
            f"| {row['ratio']:.2f} |")
    if "fastguide_compiled_mb" in row:
        line += f" {row['fastguide_compiled_mb']:.3f} | {row['ratio_compiled']:.2f} |"
    return line + f" {row['fastguide_first_mb']:.3f} | {row['fastguide_kept_mb']:.3f} |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--steps", default="4,8")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--no-compile", action="store_true", help="skip from_pipe(pipe).compile() (its compiling is slow)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (memory does not depend on them)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    families = args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"--families: unknown {unknown}; expected some of {sorted(FAMILIES)}")
    try:
        steps = [int(v) for v in args.steps.split(",")]
        batches = [int(v) for v in args.batch.split(",")]
    except ValueError:
        p.error("--steps, --batch: expected comma-separated ints")
    try:
        out = check_out_file(args.json, "--json", suffix=".json") if args.json else None  # before any measuring
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(args.threads)
    print(table_header(not args.no_compile), flush=True)
    rows, skipped = run(families, steps, batches, compile_=not args.no_compile)
    if out is not None:
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
                "method": "fastguide.bench.memory.cpu_tensor_memory (profiler allocator events)",
                "skipped": skipped}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
