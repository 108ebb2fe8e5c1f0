"""`fastguide demo`: CFG vs ReCFG on the embedded digits model (and, with --rules, CFG-Zero* and APG).

Samples every digit with CFG and with ReCFG (both ratio-table estimators; --rules picks others) at several
guidance scales and a
low NFE, from the same per-sample seeds for every rule and scale, and scores the samples against the
held-out digits with the evaluation classifier (accuracy, expectation shift, Frechet distance on
penultimate features, per-class pixel-variance ratio). Writes sample grids (PNG), metrics.png,
metrics.json, and prints the table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastguide.commands import common

DEFAULT_SCALES = "1,2,3,5,7.5"


def digits_solvers():
    from fastguide.demo.digits import SOLVER_HELP, SOLVERS

    return SOLVERS, SOLVER_HELP


def add_parser(sub):
    from fastguide.demo.digits import DEMO_RULES, RULES

    solvers, solver_help = digits_solvers()
    p = sub.add_parser("demo", help="CFG vs ReCFG on the embedded digits model (grids, metrics, plot)",
                       description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--out", default="fastguide-demo", help="output directory")
    common.add_device_args(p)
    p.add_argument("--steps", type=int, default=10, help="sampling steps = NFE (each runs the 2B cond+null batch)")
    p.add_argument("--solver", default="unipc", choices=sorted(solvers),
                   help=solver_help)
    p.add_argument("--scales", default=DEFAULT_SCALES, help="comma-separated guidance scales g")
    p.add_argument("--rules", "--rule", default=",".join(DEMO_RULES),
                   help=f"comma-separated guidance rules to compare, of {', '.join(sorted(RULES))}")
    common.add_rule_args(p)
    p.add_argument("--per-class", type=int, default=30,
                   help="samples per digit per rule and scale (the held-out reference has 35-37 per digit)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample j of digit c uses seed base*10^6 + c*10^3 + j")
    p.add_argument("--assets", default=None, help="directory with the model, classifier and tables "
                                                  "(default: the ones shipped in the package)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_rules(text: str) -> list[str]:
    from fastguide.demo.digits import RULES

    rules = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rules if r not in RULES]
    if not rules or bad:
        raise ValueError(f"--rules: expected comma-separated rules of {sorted(RULES)}, got {bad or text!r}")
    if len(set(rules)) != len(rules):
        raise ValueError(f"--rules: a rule is listed twice in {text!r}")
    return rules


def demo_seeds(base: int, per_class: int, num_classes: int) -> tuple[torch.Tensor, list[int]]:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    seeds = [base * 10**6 + c * 10**3 + j for c in range(num_classes) for j in range(per_class)]
    return labels, seeds


def run(args) -> int:
    from fastguide.demo.data import NUM_CLASSES
    from fastguide.demo.evaluate import DigitsEvaluator
    from fastguide.demo import digits

    scales = common.parse_scales(args.scales)
    rules = parse_rules(args.rules)
    options = common.rule_options(args, rules)
    common.check_steps(args.steps)
    if not 2 <= args.per_class <= 999:
        raise ValueError(f"--per-class: expected 2..999 samples per digit, got {args.per_class}")
    out = common.prepare_out_dir(args.out)
    device = common.resolve_device(args.device)
    t_start = time.perf_counter()
    model, classifier, tables = common.load_assets(args.assets, device)
    evaluator = DigitsEvaluator(classifier, device=device)
    labels, seeds = demo_seeds(args.seed, args.per_class, NUM_CLASSES)
    results, samples = {rule: {} for rule in rules}, {rule: {} for rule in rules}
    cells = [(rule, g) for rule in rules for g in scales]
    zero_init = options.zero_init_steps or 0  # the digits model predicts epsilon: no zero-init by default
    bar = tqdm(cells, desc="demo", unit="cell", disable=args.quiet)
    for rule, g in bar:
        bar.set_postfix_str(f"{rule} g={g:g}")
        # at g = 1 every rule is the conditional model (except CFG-Zero*'s zero-init steps): sampled once
        shared = next((r for r in rules if g in samples[r] and r != "cfg-zero-star"), None)
        if g == 1.0 and shared is not None and not (rule == "cfg-zero-star" and zero_init):
            samples[rule][g], results[rule][g] = samples[shared][g], results[shared][g]
            continue
        x = digits.sample_digits(model, labels, seeds, rule=rule, scale=g, steps=args.steps, tables=tables,
                                 solver=args.solver, device=device, backend=args.backend, progress=False,
                                 options=options.only_for(rule))
        samples[rule][g] = x
        results[rule][g] = evaluator(x, labels)
    seconds = time.perf_counter() - t_start
    real = evaluator(evaluator.real_images, evaluator.real_labels)
    common.write_demo_outputs(out, samples, results, labels, args.per_class, real)
    report = {
        "config": {"steps": args.steps, "scales": scales, "per_class": args.per_class, "seed": args.seed,
                   "solver": repr(digits.make_solver(args.solver, args.steps)), "device": str(device),
                   "backend": args.backend, "rules": rules, "rule_options": vars(options),
                   "note": "at g = 1 all rules reduce to the conditional model (but CFG-Zero*'s zero-init steps), so "
                           "their samples are shared"},
        "classifier_heldout_accuracy": real["accuracy"],
        "heldout_self_metrics": real,
        "results": {rule: {repr(g): m for g, m in by_scale.items()} for rule, by_scale in results.items()},
        "sampling_and_scoring_seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    print(common.format_table(results))
    print(f"\nclassifier accuracy on held-out real digits: {real['accuracy']:.3f}")
    print(f"sampled and scored {len(rules) * len(scales) * len(labels)} digits in {seconds:.1f} s on {device}; "
          f"wrote {out}/ (samples_*.png, comparison.png, metrics.png, metrics.json)")
    return 0
