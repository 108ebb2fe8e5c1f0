"""Data-parallel sampling on torchrun: 1 against 2 processes (one thread each), and what sharding and resume cost.

    python benchmarks/shard_scaling.py [--num 2048] [--shard-size 256] [--steps 10] [--repeats 3] [--json out.json]

Interleaved, each repeat in a fresh output directory, on the embedded digits model (UniPC, CFG g = 3):
- ``direct``: one process, one thread, ``sample_digits`` on the same batches as the shards (the floor: no files);
- ``torchrun-1`` / ``torchrun-2``: ``torchrun --nproc_per_node K -m fastguide sample --num-samples N --out DIR``
  with OMP_NUM_THREADS=1 (process start, group join, model load, sampling, atomic shard writes, the manifest);
- ``resume``: the same command again over the finished directory (every shard skipped: the cost of a resume
  that has nothing left to do).
Reports medians (seconds, images/s), the 2-process speedup, and the per-rank overhead of the sharded command
against the direct floor. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def command(ranks: int, out: Path, num: int, shard_size: int, steps: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            "-m", "fastguide", "sample", "--num-samples", str(num), "--out", str(out), "--shard-size",
            str(shard_size), "--steps", str(steps), "--solver", "unipc", "--seed", "0"]


def timed_run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"shard_scaling: {' '.join(cmd[-12:])} failed:\n{done.stderr[-2000:]}")
    return seconds


def direct_seconds(num: int, shard_size: int, steps: int) -> float:
    """The same samples in the same batches in this process, one thread, no files (the model loaded first)."""
    from fastguide.demo.digits import load_digits_model, sample_digits

    torch.set_num_threads(1)
    model = load_digits_model()
    sample_digits(model, torch.zeros(8, dtype=torch.long), range(8), steps=steps, solver="unipc")  # warm-up
    start = time.perf_counter()
    for first in range(0, num, shard_size):
        idx = list(range(first, min(first + shard_size, num)))
        sample_digits(model, torch.tensor(idx) % 10, idx, steps=steps, solver="unipc")
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2048)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    times = {"direct": [], "torchrun-1": [], "torchrun-2": [], "resume": []}
    for _ in range(args.repeats):
        times["direct"].append(direct_seconds(args.num, args.shard_size, args.steps))
        for ranks in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "samples"
                cmd = command(ranks, out, args.num, args.shard_size, args.steps)
                times[f"torchrun-{ranks}"].append(timed_run(cmd))
                if ranks == 1:
                    times["resume"].append(timed_run(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "num": args.num, "shard_size": args.shard_size, "steps": args.steps, "repeats": args.repeats,
        "cpu_threads_per_process": 1, "seconds": times, "median_s": med,
        "images_per_s": {k: args.num / v for k, v in med.items() if k != "resume"},
        "speedup_2_vs_1": med["torchrun-1"] / med["torchrun-2"],
        "sharded_overhead_vs_direct": med["torchrun-1"] / med["direct"] - 1,
        "resume_with_nothing_left_s": med["resume"],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "seconds"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
