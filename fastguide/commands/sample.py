"""`fastguide sample`: a PNG grid of the embedded digits model's samples for given labels, rule, scale, steps and seed.

Rows are the requested labels, columns are --per-label samples (seeds seed, seed+1, ...; the same seeds in
every row), so changing only --rule or --scale shows what that change does to the same starting noise.

With --num N, --out is a directory instead: N samples (sample i: seed --seed + i, label --labels[i mod len]) in
shards of --shard-size (safetensors, written atomically) with a manifest.json. Under torchrun the shards are
shared over the ranks (gloo on CPU, NCCL on CUDA) and every sample depends only on its seed and shard, never on
the number of ranks; rerunning a killed or interrupted command finishes it, skipping the shards on disk.
"""
from __future__ import annotations

import torch

from fastguide.commands import common


def add_parser(sub):
    from fastguide.demo.digits import RULE_HELP, RULES, SOLVER_HELP, SOLVERS

    p = sub.add_parser("sample", help="sample digits from the embedded model into a PNG grid",
                       description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits 0..9 (one row each)")
    p.add_argument("--rule", default="cfg", choices=sorted(RULES), help=RULE_HELP)
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale g (1 = conditional model only)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps = NFE")
    p.add_argument("--solver", default="unipc", choices=sorted(SOLVERS),
                   help=SOLVER_HELP)
    p.add_argument("--interval", default=None, metavar="LO,HI",
                   help="guide only at model times t in [LO, HI] (0..999), e.g. 500,999 for the high-noise half; "
                        "other steps run the conditional rows alone (less work)")
    common.add_rule_args(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample in each row")
    p.add_argument("--per-label", type=int, default=8, help="samples per label (columns)")
    p.add_argument("--out", default=None, help="output PNG file (default grid.png); with --num, the output directory")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=None,
                   help="sample this many into --out DIR as shards (see above); under torchrun spell it "
                        "--num-samples (torchrun's own parser reads --num as its --numa-binding)")
    p.add_argument("--shard-size", type=int, default=256, help="with --num: samples per shard (one batch each)")
    p.add_argument("--metrics", action="store_true",
                   help="with --num: also score the whole set as the demo does (each rank's statistics, reduced "
                        "over the ranks) into DIR/metrics.json")
    p.add_argument("--assets", default=None, help="directory with the model and tables (default: shipped)")
    common.add_device_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from matplotlib.image import imsave

    from fastguide.demo import digits

    labels = common.parse_labels(args.labels)
    scale = common.check_scale(args.scale)
    common.check_steps(args.steps)
    if args.num is not None:
        return _run_shards(args, labels, scale)
    if not 1 <= args.per_label <= 64:
        raise ValueError(f"--per-label: expected 1..64, got {args.per_label}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected >= 0, got {args.seed}")
    interval = _parse_interval(args.interval)
    options = common.rule_options(args, [args.rule])
    out = common.check_out_file(args.out or "grid.png")
    device = common.resolve_device(args.device)
    model, _, tables = common.load_assets(args.assets, device)
    n = args.per_label
    label_t = torch.tensor(labels).repeat_interleave(n)
    seeds = [args.seed + j for _ in labels for j in range(n)]
    x = digits.sample_digits(model, label_t, seeds, rule=args.rule, scale=scale, steps=args.steps, tables=tables,
                             device=device, backend=args.backend, interval=interval, solver=args.solver,
                             options=options)
    canvas = common.mosaic(x, len(labels), n).repeat(8, 0).repeat(8, 1)  # 8x nearest upscale: visible pixels
    try:
        imsave(out, canvas, cmap="gray_r", vmin=-1, vmax=1)
    except OSError as e:
        raise ValueError(f"--out: cannot write {out} ({e.strerror or e})") from None
    guided = "" if interval is None else f" guided at t in [{interval[0]:g}, {interval[1]:g}]"
    extra = "".join(f", {k}={v:g}" if isinstance(v, float) else f", {k}={v}" for k, v in vars(options).items()
                    if v is not None and not (k == "rescale" and v == 0))
    print(f"wrote {out}: labels {labels} (rows) x {n} seeds from {args.seed}, {args.rule} g={scale:g}{extra}{guided}, "
          f"{args.steps} steps of {args.solver}")
    return 0


def _parse_interval(text):
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--interval: expected LO,HI model times (e.g. 500,999), got {text!r}") from None
    if not 0 <= lo <= hi <= 999:
        raise ValueError(f"--interval: expected 0 <= LO <= HI <= 999, got {text!r}")
    return lo, hi


def _run_shards(args, labels: list[int], scale: float) -> int:
    import sys

    from fastguide.demo import digits
    from fastguide.interrupts import Interrupted
    from fastguide.shards import sample_shards
    from fastguide.table_build import dist_rank_world

    common.at_least(args.num, "--num", 1)
    common.at_least(args.shard_size, "--shard-size", 1)
    if args.seed < 0:
        raise ValueError(f"--seed: expected >= 0, got {args.seed}")
    if args.out is None:
        raise ValueError("--out: --num writes a directory of shards; name it (--out DIR)")
    interval = _parse_interval(args.interval)
    options = common.rule_options(args, [args.rule])
    out = common.prepare_out_dir(args.out)
    device = common.resolve_device(args.device)
    if device.type == "cuda":  # one GPU per torchrun rank
        import os

        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    model, classifier, tables = common.load_assets(args.assets, device)
    sampler = digits.make_sampler(model, rule=args.rule, scale=scale, steps=args.steps, tables=tables,
                                  backend=args.backend, interval=interval, solver=args.solver, options=options)
    request = {"model": "digits", "assets": args.assets or "shipped", "rule": args.rule, "scale": scale,
               "steps": args.steps, "solver": args.solver, "interval": interval, "options": vars(options),
               "labels": labels, "backend": args.backend, "device": device.type}
    label_t = torch.tensor(labels)
    initialized_here = common.join_process_group(device)
    try:
        rank, world = dist_rank_world()
        with torch.no_grad():
            manifest = sample_shards(sampler, lambda idx: label_t[idx % len(labels)], out, num=args.num,
                                     latent_shape=digits.IMAGE_SHAPE, request=request, shard_size=args.shard_size,
                                     seed=args.seed, device=device, progress=rank == 0)
        count = len(manifest["shards"])
        metrics = _reduced_metrics(out, classifier, device, rank, world, count) if args.metrics else None
    except Interrupted as stop:
        print(f"fastguide sample: interrupted after {stop.done} shards; run the same command again to finish "
              f"{out}", file=sys.stderr)
        return 130
    finally:
        if initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        print(f"wrote {args.num} samples in {len(manifest['shards'])} shards of {args.shard_size} to {out}/ "
              f"({'%d ranks' % world if world > 1 else '1 process'}; manifest.json)")
        if metrics is not None:
            print("metrics over the whole set: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def _reduced_metrics(out, classifier, device, rank: int, world: int, count: int):
    """The demo's metrics of every sample in ``out``: each rank takes the statistics of its own shards (one
    classifier batch per shard), they are reduced over the ranks and added in shard order (so the result is the
    same bits for any number of ranks), and rank 0 writes metrics.json."""
    import json

    from fastguide.demo.evaluate import DigitsEvaluator, reduce_in_order
    from fastguide.shards import iter_shards
    from fastguide.storage import atomic_write_text

    evaluator = DigitsEvaluator(classifier, device=device)
    parts = {k: evaluator.sums(samples, labels) for k, samples, labels, _ in iter_shards(out, rank, world)}
    metrics = evaluator.from_sums(reduce_in_order(parts, count, evaluator.empty_sums()))
    if rank == 0:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True) + "\n", arg="--out")
    return metrics

