"""Guidance rules side by side on the embedded digits model (the guidance issue's study).

    python benchmarks/guidance_study.py --guide DIR [--per-class 100] [--solvers ddim,unipc] [--scales 1,2,3,5,7.5]
                                        [--json out.json] [--plot out.png]

For each solver (NFE 10), rule and guidance scale g: the demo's metrics (accuracy, Frechet distance in the
evaluation classifier's features, expectation shift, pixel-variance ratio against held-out digits) over the same
seeds. Rules: CFG, CFG + rescale 0.7, CFG-Zero* (no zero-init: the digits model predicts epsilon), APG (eta 0,
momentum -0.5, no norm cap: the digits' guidance directions are far below diffusers' default cap of 15), ReCFG
with both table estimators, CFG with the linear and cosine schedules (mean strength g - 1), and AutoGuidance with
the smaller digits network in ``--guide`` (made by ``fastguide train --channels 16 --steps 1000 --skip-tables
--out DIR``; the study trains it there when DIR has none and records its size and training time). At g = 1 every
rule but AutoGuidance is the conditional model; AutoGuidance at g = 1 is too (m = m_guide + 1 (m - m_guide)).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import fastguide as fg
from fastguide.demo.digits import (IMAGE_SHAPE, NULL_LABEL, UNET_FILE, TRAINING_FACTS_FILE, load_digits_model,
                                   load_digits_tables, make_solver)
from fastguide.demo.evaluate import evaluate_samples
from fastguide.demo.train import CHECKPOINT_FILE

RULES = ("cfg", "cfg-rescale", "cfg-zero-star", "apg", "recfg-paper", "recfg-ls", "cfg-linear", "cfg-cosine",
         "autoguidance")
GUIDE_TRAIN_ARGS = ["--channels", "16", "--steps", "1000", "--skip-tables"]


def rule_for(name: str, g: float, tables: dict, guide):
    return {
        "cfg": lambda: fg.CFG(g),
        "cfg-rescale": lambda: fg.CFG(g, rescale=0.7),
        "cfg-zero-star": lambda: fg.CFGZeroStar(g, zero_init_steps=0),
        "apg": lambda: fg.APG(g, eta=0.0, norm_threshold=0.0, momentum=-0.5),
        "recfg-paper": lambda: fg.ReCFG(g, tables["paper"]),
        "recfg-ls": lambda: fg.ReCFG(g, tables["least_squares"]),
        "cfg-linear": lambda: fg.CFG(g, schedule="linear"),
        "cfg-cosine": lambda: fg.CFG(g, schedule="cosine"),
        "autoguidance": lambda: fg.CFG(g, guide=fg.GuideNetwork(guide, conditional=True)),
    }[name]()


def guide_network(directory: Path) -> tuple[torch.nn.Module, dict]:
    """The smaller digits UNet in ``directory`` (trained there first when missing) and what training it took."""
    from fastguide import cli

    if not (directory / UNET_FILE).is_file():
        args = ["train", "--out", str(directory), *GUIDE_TRAIN_ARGS, "--quiet"]
        if (directory / CHECKPOINT_FILE).exists():
            args.append("--resume")
        if cli.main(args) != 0:
            raise SystemExit(f"training the guide network in {directory} failed")
    facts = json.loads((directory / TRAINING_FACTS_FILE).read_text())
    net = load_digits_model(directory / UNET_FILE)
    size = sum(p.numel() for p in net.parameters())
    return net, {"parameters": size, "channels": facts["unet_config"]["channels"], "steps": facts["unet"]["step"],
                 "train_seconds": facts["unet"]["seconds_all_runs"], "threads": facts["threads"],
                 "main_model_parameters": sum(p.numel() for p in load_digits_model().parameters())}


@torch.no_grad()
def run(per_class: int, solvers, scales, guide, rules=RULES, nfe: int = 10) -> list[dict]:
    model, tables = load_digits_model(), load_digits_tables()
    labels = torch.arange(10).repeat_interleave(per_class)
    seeds = list(range(labels.numel()))
    noise = fg.seeded_noise(seeds, IMAGE_SHAPE)
    rows = []
    for solver_name in solvers:
        solver = make_solver(solver_name, nfe)
        sampler = fg.Sampler(model, solver, fg.CFG(1.0), null_cond=NULL_LABEL, backend="torch", progress=False)
        for rule in rules:
            for g in scales:
                start = time.perf_counter()
                x = sampler.sample(noise, labels, guidance=rule_for(rule, g, tables, guide))
                seconds = time.perf_counter() - start
                rows.append({"solver": solver_name, "rule": rule, "g": g, "nfe": solver.plan.steps,
                             "seconds": seconds, **evaluate_samples(x, labels)})
                r = rows[-1]
                print(f"{solver_name:6s} {rule:13s} g {g:4g}  FD {r['frechet_distance']:8.2f}  acc {r['accuracy']:.3f}"
                      f"  shift {r['expectation_shift']:.3f}  var {r['variance_ratio']:.3f}  {seconds:5.1f} s",
                      flush=True)
    return rows


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    metrics = (("frechet_distance", "Frechet distance (log)"), ("accuracy", "classifier accuracy"),
               ("expectation_shift", "expectation shift (L2, pixels)"),
               ("variance_ratio", "pixel-variance ratio (log; 1 = real)"))
    fig, axes = plt.subplots(len(solvers), len(metrics), figsize=(18, 4 * len(solvers)), squeeze=False)
    for i, solver in enumerate(solvers):
        for j, (metric, title) in enumerate(metrics):
            ax = axes[i, j]
            for rule in dict.fromkeys(r["rule"] for r in rows):
                cells = [(r["g"], r[metric]) for r in rows if r["solver"] == solver and r["rule"] == rule]
                ax.plot(*zip(*cells), marker="o", ms=3, label=rule, ls="--" if rule.startswith("recfg") else "-")
            ax.set_title(f"{solver}, NFE {rows[0]['nfe']}: {title}", fontsize=10)
            ax.set_xlabel("guidance scale g")
            if metric in ("frechet_distance", "variance_ratio"):
                ax.set_yscale("log")  # ReCFG-paper's divergence is orders of magnitude above the rest
            if metric == "variance_ratio":
                ax.axhline(1.0, color="gray", lw=1)
            ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"digits model: guidance rules at NFE 10, {report['per_class'] * 10} samples per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--guide", default="fastguide-guide-net", help="directory of the AutoGuidance guide network")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--solvers", default="ddim,unipc")
    p.add_argument("--scales", default="1,2,3,5,7.5")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --plot from a --json file")
    a = p.parse_args()
    if a.replot:
        with open(a.replot) as f:
            plot(json.load(f), a.plot or "guidance_study.png")
        return
    guide, guide_facts = guide_network(Path(a.guide))
    print(f"guide network: {guide_facts}")
    start = time.perf_counter()
    rows = run(a.per_class, a.solvers.split(","), [float(g) for g in a.scales.split(",")], guide)
    report = {"per_class": a.per_class, "guide_network": guide_facts, "rows": rows,
              "seconds": time.perf_counter() - start, "torch": torch.__version__, "threads": torch.get_num_threads()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot:
        plot(report, a.plot)


if __name__ == "__main__":
    main()
