"""What a guidance interval does on the embedded digits model: network work saved and the demo's metrics.

    python benchmarks/interval_study.py [--per-class 100] [--steps 10] [--scale 3] [--json out.json]

Outside the interval the sampler runs only the B conditional rows, so guiding k of S steps costs
(S + k) / (2 S) of the full 2B-per-step network work. Same seeds for every row of the table.
"""
from __future__ import annotations

import argparse
import json

import torch

import fastguide as fg
from fastguide.demo.evaluate import evaluate_samples
from fastguide.demo.digits import IMAGE_SHAPE, NULL_LABEL, digits_schedule, load_digits_model, load_digits_tables


def intervals_for(timesteps) -> dict:
    ts = [float(t) for t in timesteps]  # descending
    s, half = len(ts), len(ts) // 2
    return {
        "all steps": None,
        "high-noise half": (ts[half - 1], ts[0]),
        "low-noise half": (ts[-1], ts[half]),
        "middle half": (ts[s // 4 + half - 1], ts[s // 4]),
    }


@torch.no_grad()
def run(per_class: int = 100, steps: int = 10, scale: float = 3.0, rules=("cfg", "recfg-ls")) -> list[dict]:
    model = load_digits_model()
    tables = load_digits_tables()
    solver = fg.DDIM(digits_schedule(), steps=steps)
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = fg.seeded_noise(range(labels.numel()), IMAGE_SHAPE)
    rows = []
    for rule in rules:
        for name, interval in intervals_for(solver.plan.timesteps).items():
            guide = fg.CFG(scale, interval=interval) if rule == "cfg" else \
                fg.ReCFG(scale, table=tables["least_squares"], interval=interval)
            seen = []

            def counting(x, t, c):
                seen.append(x.shape[0])
                return model(x, t, c)

            x = fg.Sampler(counting, solver, guide, null_cond=NULL_LABEL, progress=False).sample(noise, labels)
            work = sum(seen) / (2 * labels.numel() * steps)
            rows.append({"rule": rule, "interval": name, "interval_t": interval, "network_work": work,
                         **evaluate_samples(x, labels)})
    cond = fg.Sampler(model, solver, fg.CFG(1.0), null_cond=NULL_LABEL, progress=False).sample(noise, labels)
    rows.append({"rule": "conditional (g=1)", "interval": "-", "interval_t": None, "network_work": 0.5,
                 **evaluate_samples(cond, labels)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = run(a.per_class, a.steps, a.scale)
    print(f"{'rule':18s} {'interval':16s} {'net work':>8s} {'acc':>6s} {'E-shift':>8s} {'FD':>8s} {'var ratio':>9s}")
    for r in rows:
        print(f"{r['rule']:18s} {r['interval']:16s} {r['network_work']:8.2f} {r['accuracy']:6.3f} "
              f"{r['expectation_shift']:8.3f} {r['frechet_distance']:8.3f} {r['variance_ratio']:9.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
