"""`fastguide toy`: the paper's Gaussian toy (docs/toy.md). How far CFG and ReCFG move E[x0 | c] = c * phi.

Closed form, numerical ODE, and fastguide's own Sampler (DDIM, analytic eps-model): the exact moments of
the discretised sampler and a Monte Carlo estimate (+- standard error), for CFG and ReCFG with the
paper's and the least-squares ratio estimator.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager

import numpy as np
import torch

from fastguide.commands import common
from fastguide.demo import toy

RULE_LABELS = {"cfg": "CFG", "paper": "ReCFG paper", "least_squares": "ReCFG lsq"}


def add_parser(sub):
    p = sub.add_parser("toy", help="the Gaussian toy: CFG's expectation shift, and ReCFG's (docs/toy.md)",
                       description=__doc__)
    p.add_argument("--gamma", type=float, default=4.0, help="guidance scale g >= 0 (default 4)")
    p.add_argument("--T", type=float, default=100.0, help="start time T > 0 (sigma_max^2 of the VE process; default 100)")
    p.add_argument("--c", type=float, nargs="+", default=[1.0, 2.0],
                   help="class means c != 0 to evaluate (default 1 2; phi of CFG does not depend on c, ReCFG's does)")
    p.add_argument("--steps", type=int, default=1000, help="DDIM steps for the sampler check (default 1000)")
    p.add_argument("--samples", type=int, default=8192,
                   help="Monte Carlo samples per c and rule (default 8192; 0 skips the sampler)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo noise")
    p.add_argument("--backend", choices=("torch", "triton"), default="torch", help="guided-step backend (default torch)")
    p.add_argument("--device", default="cpu", help="device the sampler runs on (default cpu; the triton backend "
                   "needs cuda, or TRITON_INTERPRET=1 on the CPU)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw phi and the variance against g in [1, 12] to this file")
    p.set_defaults(func=run)


@contextmanager
def _one_thread():
    # The sampler's tensors are tiny element-wise work: extra intra-op threads only add synchronisation
    # (docs/toy.md has the measurement).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_args(args) -> None:
    toy.check_gamma(args.gamma)
    toy.check_T(args.T, allow_inf=False)
    if args.steps < 2:
        raise ValueError(f"--steps: expected >= 2, got {args.steps}")
    if args.samples != 0 and args.samples < 2:
        raise ValueError(f"--samples: expected 0 (skip the sampler) or >= 2, got {args.samples}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected >= 0, got {args.seed}")
    if any(c == 0 or not math.isfinite(c) for c in args.c):
        raise ValueError(f"--c: expected finite values != 0 (phi = E[x0|c] / c), got {args.c}")
    if args.plot:
        common.check_out_file(args.plot, "--plot", suffix=None)
    common.resolve_device(args.device)


def results(args) -> dict:
    """Everything the command prints, as a JSON-ready dict."""
    g, T = float(args.gamma), float(args.T)
    rows = []
    for rule in toy.RULES:
        sampled = {}
        if args.samples:
            for r in toy.sampler_moments(g, T, rule, args.c, samples=args.samples, steps=args.steps,
                                         seed=args.seed, backend=args.backend, device=args.device,
                                         dtype=torch.float32 if args.backend == "triton" else torch.float64):
                sampled[r["c"]] = r
        for c in args.c:
            phi_ode, var_ode = toy.ode_moments(g, T, rule, c)
            s = sampled.get(c, {})
            rows.append({
                "rule": rule,
                "c": c,
                "phi": {"closed": float(toy.mean_factor(g, T, rule, c)), "ode": phi_ode, "ddim": s.get("ddim_phi"),
                        "mc": s.get("mc_phi"), "mc_se": s.get("mc_phi_se"),
                        "limit": float(toy.mean_factor(g, math.inf, rule, c))},
                "variance": {"closed": float(toy.variance(g, T, rule, c)), "ode": var_ode, "ddim": s.get("ddim_var"),
                             "mc": s.get("mc_var"), "mc_se": s.get("mc_var_se"),
                             "limit": float(toy.variance(g, math.inf, rule, c))},
                "samples": s.get("samples", 0),
            })
    population = {rule: {"T": toy.population_summary(g, T, rule), "limit": toy.population_summary(g, math.inf, rule)}
                  for rule in toy.RULES}
    return {"gamma": g, "T": T, "steps": args.steps, "seed": args.seed, "backend": args.backend, "device": args.device,
            "rows": rows, "population": population}


def _fmt(v, digits: int = 5) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _mc(value, se) -> str:
    return "-" if value is None else f"{value:.5g} +- {se:.2g}"


def format_text(res: dict) -> str:
    g, T = res["gamma"], res["T"]
    lines = [f"Gaussian toy: q0(x|c) = N(c, 1), q(c) = N(0, 1), VE sigma_t^2 = t, PF-ODE from q_T(x|c) = N(c, 1 + T)",
             f"g = {g:g}, T = {T:g}; E[x0 | c] = c * phi; sampler: DDIM eta=0, {res['steps']} steps, "
             f"backend {res['backend']} (ddim = its exact moments, mc = Monte Carlo +- 1 s.e.; every rule "
             "sees the same noise)", ""]
    for key, name in (("phi", "phi"), ("variance", "var")):
        head = (f"{'rule':<12} {'c':>5}  {name + ' closed':>10} {name + ' ODE':>10} {name + ' DDIM':>10} "
                f"{name + ' MC':>20} {name + ' T=inf':>9}")
        lines += [head, "-" * len(head)]
        for r in res["rows"]:
            v = r[key]
            lines.append(f"{RULE_LABELS[r['rule']]:<12} {r['c']:>5g}  {_fmt(v['closed']):>10} {_fmt(v['ode']):>10} "
                         f"{_fmt(v['ddim']):>10} {_mc(v['mc'], v['mc_se']):>20} {_fmt(v['limit']):>9}")
        lines.append("")
    lines += ["Averaged over c ~ N(0, 1) (closed form): slope of E[x0|c] on c (1 = no shift), mean Var[x0|c]"]
    for rule, pop in res["population"].items():
        lines.append(f"  {RULE_LABELS[rule]:<12} T={T:g}: slope {pop['T']['slope']:.5f}, variance "
                     f"{pop['T']['mean_variance']:.5g}   T=inf: slope {pop['limit']['slope']:.5f}, "
                     f"variance {pop['limit']['mean_variance']:.5g}")
    lines.append("Ratios with exact expectations: paper R = E[eps_c]/E[eps_u] = 0 for every c != 0 (E[eps_c] = 0), "
                 "least squares R = (2+t)/(1+t+c^2) (= 1, i.e. CFG, at c = +-1).")
    return "\n".join(lines)


def plot(path: str, T: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = np.linspace(1.0, 12.0, 221)
    fig, (ax_phi, ax_var) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [("CFG (any c)", "cfg", 1.0, "-"), ("ReCFG paper (any c != 0)", "paper", 1.0, "-"),
              ("ReCFG lsq, c = 0.5", "least_squares", 0.5, "--"), ("ReCFG lsq, c = 1 (= CFG)", "least_squares", 1.0, ":"),
              ("ReCFG lsq, c = 2", "least_squares", 2.0, "--")]
    for label, rule, c, style in curves:
        ax_phi.plot(gs, [float(toy.mean_factor(g, T, rule, c)) for g in gs], style, label=label)
        ax_var.semilogy(gs, [float(toy.variance(g, T, rule, c)) for g in gs], style, label=label)
    population = [toy.population_summary(g, T, "least_squares") for g in gs]
    ax_phi.plot(gs, [p["slope"] for p in population], "-.", label="ReCFG lsq, over c ~ N(0,1): slope / mean var")
    ax_var.semilogy(gs, [p["mean_variance"] for p in population], "-.")
    ax_phi.plot(gs, [float(toy.mean_factor(g, math.inf)) for g in gs], color="grey", lw=0.8,
                label="CFG, T -> inf")
    ax_phi.set(xlabel="guidance scale g", ylabel="phi  (E[x0 | c] = c phi)", title=f"mean factor, T = {T:g}")
    ax_var.set(xlabel="guidance scale g", ylabel="Var[x0 | c]", title=f"variance (data: 1), T = {T:g}")
    ax_phi.grid(alpha=0.3)
    ax_var.grid(alpha=0.3)
    ax_phi.legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def run(args) -> int:
    _check_args(args)
    with _one_thread():
        res = results(args)
    print(json.dumps(res, indent=2) if args.json else format_text(res))
    if args.plot:
        plot(args.plot, float(args.T))
        if not args.json:
            print(f"wrote {args.plot}")
    return 0
