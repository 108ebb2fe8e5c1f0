"""`fastguide table-info PATH`: what a ratio table holds (shape, timesteps, estimator, build facts, memory)
and per-timestep ratio statistics (mean, std, quantiles, extremes) over its class rows."""
from __future__ import annotations

import json

from fastguide.commands.build_table import format_bytes
from fastguide.table import RatioTable, dtype_name, plain_numbers

FACT_KEYS = ("estimator", "schedule_fingerprint", "num_train_timesteps", "samples_per_class", "seed", "delta", "clamp",
             "near_zero_count", "clamped_count", "model_fingerprint", "data_fingerprint")


def add_parser(sub):
    p = sub.add_parser("table-info", help="describe a ratio table", description=__doc__)
    p.add_argument("path", help="a table written by fastguide build-table / RatioTable.save")
    p.add_argument("--mean-row", action="store_true", help="include the mean row in the statistics")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args) -> int:
    table = RatioTable.load(args.path)
    stats = table.timestep_stats(include_mean_row=args.mean_row)
    info = {
        "path": args.path, "num_classes": table.num_classes, "has_mean_row": table.has_mean_row,
        "timesteps": None if table.timesteps is None else len(table.timesteps),
        "latent_shape": list(table.latent_shape),
        "shape": list(table.ratios.shape), "dtype": dtype_name(table.ratios.dtype),
        "nbytes": table.nbytes, "metadata": dict(table.metadata), "timestep_stats": stats,
    }
    if args.json:
        print(json.dumps(info, indent=1, allow_nan=False))
        return 0
    mean = " + mean row" if table.has_mean_row else ""
    print(f"{args.path}: ratio table, {table.num_classes} classes{mean} x {info['timesteps'] or table.ratios.shape[1]} "
          f"timesteps x {table.latent_shape}")
    print(f"  shape {tuple(table.ratios.shape)}, {info['dtype']}, memory {format_bytes(table.nbytes)}")
    if table.timesteps is not None:
        ts = plain_numbers(table.timesteps)
        print(f"  timesteps {ts}")
    else:
        print("  timesteps: none (rows are sampler steps)")
    for key in FACT_KEYS:
        if key in table.metadata:
            print(f"  {key}: {table.metadata[key]}")
    extra = sorted(set(table.metadata) - set(FACT_KEYS) - {"format", "format_version", "timesteps", "num_classes",
                                                            "latent_shape", "dtype", "has_mean_row", "elements",
                                                            "cond_first"})
    for key in extra:
        print(f"  {key}: {table.metadata[key]}")
    rows = "class rows + mean row" if args.mean_row else "class rows"
    print(f"  per-timestep ratio statistics over {rows} and elements:")
    cols = ["mean", "std", "min", "q01", "q25", "q50", "q75", "q99", "max"]
    print("    " + f"{'t':>8} " + " ".join(f"{c:>9}" for c in cols))
    for k, s in enumerate(stats):
        t = f"{s['t']:g}" if s["t"] is not None else f"step {k}"
        print("    " + f"{t:>8} " + " ".join(f"{s[c]:9.4f}" for c in cols))
    return 0
