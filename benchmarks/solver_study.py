"""Quality against NFE for the demo's solvers on the embedded digits model (the solver issue's study).

    python benchmarks/solver_study.py [--per-class 100] [--nfe 4,6,8,10,20] [--json out.json] [--plot out.png]

For each solver (fastguide.demo.digits.SOLVERS), NFE budget and rule (CFG and least-squares ReCFG, g = 3): the
demo's metrics (Frechet distance in the evaluation classifier's features against held-out digits, accuracy,
expectation shift) over the same seeds, and the seconds the sampling took (eager, one process, CPU). Heun
spends its budget as 2k - 1 <= NFE evaluations; the table reports the evaluations each cell actually ran. Run it
on an otherwise idle machine: the seconds feed the quality-per-second table.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import fastguide as fg
from fastguide.demo.digits import (IMAGE_SHAPE, NULL_LABEL, load_digits_model, load_digits_tables, make_guidance,
                                   make_solver)
from fastguide.demo.evaluate import evaluate_samples

SOLVERS = ("ddim", "dpm++2m", "dpm++3m", "unipc", "euler-a", "heun")
RULES = ("cfg", "recfg-ls")


@torch.no_grad()
def run(per_class: int, nfes, scale: float = 3.0, solvers=SOLVERS, rules=RULES) -> list[dict]:
    model, tables = load_digits_model(), load_digits_tables()
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = list(range(labels.numel()))
    noise = fg.seeded_noise(seeds, IMAGE_SHAPE)
    fg.Sampler(model, make_solver("ddim", 4), fg.CFG(scale), null_cond=NULL_LABEL, backend="torch",
               progress=False).sample(noise, labels)  # warm-up: the first call's one-time costs are not a solver's
    rows = []
    for nfe in nfes:
        for name in solvers:
            solver = make_solver(name, nfe)
            for rule in rules:
                sampler = fg.Sampler(model, solver, make_guidance(rule, scale, tables), null_cond=NULL_LABEL,
                                     backend="torch", progress=False)
                start = time.perf_counter()
                x = sampler.sample(noise, labels, seeds=seeds if solver.plan.stochastic else None)
                seconds = time.perf_counter() - start
                rows.append({"solver": name, "rule": rule, "nfe_budget": nfe, "nfe": solver.plan.steps,
                             "seconds": seconds, **evaluate_samples(x, labels)})
                print(f"{name:9s} {rule:9s} NFE {solver.plan.steps:3d}  FD {rows[-1]['frechet_distance']:7.2f}  "
                      f"acc {rows[-1]['accuracy']:.3f}  {seconds:6.1f} s", flush=True)
    return rows


def best_within(rows: list[dict], rule: str, budget_s: float) -> dict:
    """solver -> the lowest FD any of its cells reached within ``budget_s`` seconds (None: none fits)."""
    best = {}
    for r in rows:
        if r["rule"] == rule and r["seconds"] <= budget_s:
            if r["solver"] not in best or r["frechet_distance"] < best[r["solver"]]["frechet_distance"]:
                best[r["solver"]] = r
    return best


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(RULES), figsize=(11, 4), sharey=True)
    for ax, rule in zip(axes, RULES):
        for name in dict.fromkeys(r["solver"] for r in rows):
            cells = sorted((r["nfe"], r["frechet_distance"]) for r in rows if r["solver"] == name and r["rule"] == rule)
            ax.plot(*zip(*cells), marker="o", label=name)
        ax.set_title(f"{rule}, g = 3")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_xscale("log")
        ax.set_yscale("log")  # Heun's divergence at NFE 3-5 is 1e7; the others differ by tens
        ax.set_xticks([3, 4, 6, 8, 10, 20], ["3", "4", "6", "8", "10", "20"])
        ax.set_ylim(20, 2000)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("Frechet distance (lower is better; clipped at 2000)")
    axes[-1].legend()
    fig.suptitle("digits model: quality against NFE per solver (1000 samples per point)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--nfe", default="4,6,8,10,20")
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a --json file")
    a = p.parse_args()
    if a.replot:
        with open(a.replot) as f:
            plot(json.load(f), a.plot or "solver_study.png")
        return
    rows = run(a.per_class, [int(n) for n in a.nfe.split(",")], a.scale)
    print(f"\n{'solver':9s} {'rule':9s} {'NFE':>4s} {'FD':>7s} {'acc':>6s} {'E-shift':>8s} {'s':>6s}")
    for r in rows:
        print(f"{r['solver']:9s} {r['rule']:9s} {r['nfe']:4d} {r['frechet_distance']:7.2f} {r['accuracy']:6.3f} "
              f"{r['expectation_shift']:8.3f} {r['seconds']:6.1f}")
    for budget in sorted({round(r["seconds"], 1) for r in rows if r["solver"] == "ddim" and r["rule"] == "cfg"}):
        best = best_within(rows, "cfg", budget * 1.05)
        print(f"best CFG FD within {budget:.1f} s: " +
              ", ".join(f"{k} {v['frechet_distance']:.1f} (NFE {v['nfe']})" for k, v in best.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.plot:
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
