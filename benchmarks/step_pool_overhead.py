"""Host time of continuous batching per step, the network replaced by a stub (fastguide/step_pool.py).

    python benchmarks/step_pool_overhead.py [--steps 200] [--capacity 64] [--json benchmarks/step-pool-overhead-cpu.json]

A StepPool of --capacity rows is kept full (every step, rows that left are replaced at once) with the serving load
test's mix: UniPC plans of 4..10 steps, rules cfg / apg / recfg-ls on the digits model's shapes and tables, random
labels and scales. The network is a stub that returns a fixed tensor, so what is timed is the pool's own work:
admitting rows (preparing each row's rule and plan operands) and a step (gathering rows, the batched forward's
inputs, the per-row reference update, scattering state back). Reports ms per step (medians of --blocks blocks) to
compare with the digits UNet's forward of 2 x capacity rows, timed the same way.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from load_test import LOAD_RULES, NFE_RANGE  # the serving load test's mix (benchmarks/ is this script's path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="timed steps (after 20 warm-up steps)")
    p.add_argument("--blocks", type=int, default=5, help="the timed steps in this many blocks; medians reported")
    p.add_argument("--capacity", type=int, default=64, help="rows in the pool (its largest bucket)")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def run(steps: int, blocks: int, capacity: int) -> dict:
    from fastguide.demo import digits
    from fastguide.step_pool import StepPool

    torch.manual_seed(0)
    tables = digits.load_digits_tables()
    rules = {name: digits.make_guidance(name, 3.0, tables) for name in LOAD_RULES}
    plans = {n: digits.make_solver("unipc", n).plan for n in range(NFE_RANGE[0], NFE_RANGE[1] + 1)}
    shape = digits.IMAGE_SHAPE
    out = torch.randn(2 * capacity, *shape)
    buckets = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < capacity) + (capacity,)
    pool = StepPool(lambda x, t, c: out[:x.shape[0]], null_cond=digits.NULL_LABEL, latent_shape=shape,
                    buckets=buckets)
    rng = random.Random(0)
    admitted = 0

    def fill():
        nonlocal admitted
        while pool.free:
            pool.admit(admitted, torch.randn(shape), cond=rng.randrange(10),
                       plan=plans[rng.randint(*NFE_RANGE)], rule=rules[rng.choice(LOAD_RULES)],
                       scale=round(rng.uniform(1.0, 5.0), 2), seed=admitted)
            admitted += 1

    for _ in range(20):
        fill()
        pool.step()
    admit_ms, step_ms, per_block = [], [], max(1, steps // blocks)
    first = admitted
    for _ in range(blocks):
        a_s = s_s = 0.0
        for _ in range(per_block):
            began = time.perf_counter()
            fill()
            mid = time.perf_counter()
            pool.step()
            a_s, s_s = a_s + mid - began, s_s + time.perf_counter() - mid
        admit_ms.append(a_s / per_block * 1e3)
        step_ms.append(s_s / per_block * 1e3)

    model = digits.load_digits_model()
    x, t = torch.randn(2 * capacity, *shape), torch.full((2 * capacity,), 500.0)
    labels = torch.randint(0, 11, (2 * capacity,))
    forward_ms = []
    with torch.no_grad():
        model(x, t, labels)
        for _ in range(blocks):
            began = time.perf_counter()
            for _ in range(5):
                model(x, t, labels)
            forward_ms.append((time.perf_counter() - began) / 5 * 1e3)
    admit, step, forward = (statistics.median(v) for v in (admit_ms, step_ms, forward_ms))
    return {"capacity": capacity, "timed_steps": per_block * blocks,
            "admitted_per_step": (admitted - first) / (per_block * blocks),
            "admit_ms_per_step": admit, "step_ms_stub_network": step, "pool_ms_per_step": admit + step,
            "digits_forward_ms": forward, "pool_share_of_forward": (admit + step) / forward}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("steps", "blocks", "capacity"):
        if getattr(args, name) < 1:
            print(f"step_pool_overhead: error: --{name}: expected an int >= 1, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.json is not None:
        from fastguide.commands.common import check_out_file
        try:
            check_out_file(args.json, "--json", ".json")
        except ValueError as e:
            print(f"step_pool_overhead: error: {e}", file=sys.stderr)
            return 2
    report = run(args.steps, args.blocks, args.capacity)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}, **report}
    print(f"capacity {report['capacity']}: {report['admitted_per_step']:.1f} rows admitted a step; "
          f"admit {report['admit_ms_per_step']:.2f} ms + step {report['step_ms_stub_network']:.2f} ms a step "
          f"(stub network) = {report['pool_ms_per_step']:.2f} ms, against the digits UNet's "
          f"{2 * report['capacity']}-row forward {report['digits_forward_ms']:.1f} ms "
          f"({report['pool_share_of_forward']:.2f})")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
