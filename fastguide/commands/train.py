"""`fastguide train`: reproduce the embedded digits models from scratch (CPU is enough).

Trains the class-conditional UNet (eps objective, condition dropout to the null label 10), the evaluation
classifier (train split only; held-out accuracy reported) and builds both ReCFG ratio tables from the train
split. With the defaults, --out then holds the same files fastguide ships in fastguide/demo/assets/ (up to
floating-point differences between machines and thread counts); use them with `fastguide demo --assets DIR`.
The UNet run checkpoints every 500 steps and on Ctrl-C; --resume continues it exactly.
"""
from __future__ import annotations

import json
import platform
import sys
import time

import torch

from fastguide.commands import common



def add_parser(sub):
    from fastguide.demo.train import DiffusionConfig

    d = DiffusionConfig()
    p = sub.add_parser("train", help="train the digits model, classifier and ratio tables from scratch",
                       description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--out", default="fastguide-train", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start again even though --out holds a training run (its checkpoint is replaced)")
    p.add_argument("--steps", type=int, default=d.steps, help="UNet optimisation steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="UNet batch size")
    p.add_argument("--channels", type=int, default=d.channels,
                   help="UNet width (a smaller, shorter-trained one makes an AutoGuidance guide network)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights, batches and noise")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop this run (with a checkpoint) after this many UNet steps; continue with --resume")
    p.add_argument("--classifier-epochs", type=int, default=40, help="classifier epochs")
    p.add_argument("--table-samples-per-class", type=int, default=None,
                   help="train images per class for the ratio tables, each noised once per table timestep "
                        "(default: all of the smallest class, 139)")
    p.add_argument("--skip-tables", action="store_true", help="do not build the ratio tables")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_tables(model, out, samples_per_class: int | None, progress: bool) -> dict:
    from fastguide.demo.data import NULL_LABEL, NUM_CLASSES, load_digits_split
    from fastguide.demo import digits
    from fastguide.table_build import accumulate_ratio_sums

    split = load_digits_split()
    if samples_per_class is None:
        samples_per_class = int(split.train_labels.bincount(minlength=NUM_CLASSES).min())
    t0 = time.perf_counter()
    sums = accumulate_ratio_sums(model, digits.digits_schedule(), split.train_images, split.train_labels,
                                 timesteps=digits.TABLE_TIMESTEPS, num_classes=NUM_CLASSES,
                                 samples_per_class=samples_per_class, null_cond=NULL_LABEL, batch_size=256, seed=0,
                                 progress=progress)
    write_tables(sums, out)
    return {"seconds": time.perf_counter() - t0, "samples_per_class": samples_per_class,
            "timesteps": len(digits.TABLE_TIMESTEPS)}


def write_tables(sums, out) -> None:
    """The raw sums (re-finalize with other options: fastguide build-table --sums) and both shipped tables."""
    from fastguide.demo import digits

    sums.save(out / digits.SUMS_FILE)
    for estimator, name in digits.TABLE_FILES.items():
        sums.finalize(estimator, **digits.TABLE_FINALIZE[estimator]).save(out / name, metadata={
            "model": digits.UNET_FILE, "data": "sklearn load_digits, train split (20% held out, seed 0)"})


def run(args) -> int:
    from fastguide.demo import digits
    from fastguide.demo.train import CHECKPOINT_FILE, ClassifierConfig, DiffusionConfig, train_classifier, train_diffusion
    from fastguide.interrupts import Interrupted

    for option, value, low in (("--threads", args.threads, 1), ("--stop-after", args.stop_after, 1),
                               ("--classifier-epochs", args.classifier_epochs, 1), ("--steps", args.steps, 1),
                               ("--table-samples-per-class", args.table_samples_per_class, 1),
                               ("--batch-size", args.batch_size, 1), ("--seed", args.seed, 0),
                               ("--channels", args.channels, 1)):
        common.at_least(value, option, low)
    if args.resume and args.overwrite:
        raise ValueError("--overwrite: contradicts --resume (continue the run, or start it again: not both)")
    cfg = DiffusionConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, channels=args.channels).check()
    out = common.prepare_out_dir(args.out)
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"--out: {out} already holds a training run ({checkpoint.name}); continue it with --resume "
                         "or start again with --overwrite")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    facts = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
             "unet_config": cfg.__dict__}
    t0 = time.perf_counter()
    try:
        unet = train_diffusion(cfg, out, resume=args.resume, stop_after=args.stop_after, progress=progress,
                               overwrite=args.overwrite)
    except Interrupted as stop:
        print(f"interrupted after step {stop.done}/{cfg.steps}; saved {stop.checkpoint}; continue with: "
              f"fastguide train --out {out} --resume", file=sys.stderr)
        return 130
    facts["unet"] = unet
    if not unet["finished"]:
        print(f"stopped at step {unet['step']}/{cfg.steps}; continue with: fastguide train --out {out} --resume")
        return 0
    clf = train_classifier(ClassifierConfig(epochs=args.classifier_epochs, seed=args.seed), out, progress=progress)
    facts["classifier"] = clf
    print(f"classifier held-out accuracy: {clf['heldout_accuracy']:.4f}")
    if not args.skip_tables:
        model = digits.load_digits_model(out / digits.UNET_FILE)
        facts["tables"] = build_tables(model, out, args.table_samples_per_class, progress)
    facts["total_seconds"] = time.perf_counter() - t0
    (out / digits.TRAINING_FACTS_FILE).write_text(json.dumps(facts, indent=2) + "\n")
    print(f"done in {facts['total_seconds']:.0f} s (this run); wrote {out}/")
    return 0
