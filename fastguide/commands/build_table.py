"""`fastguide build-table`: build a ReCFG ratio table from a model and a labelled dataset.

--model digits           the shipped digits model and its data (fastguide.demo.digits:table_source)
--model module:function  any importable function returning the build inputs: a dict with keys model, schedule,
                         images, labels, null_cond (optional: num_classes, cond_first, model_fingerprint), or
                         the tuple (model, schedule, images, labels, null_cond). If it takes a `device`
                         argument it is called with the build device.
--sums PATH              finalize saved sums (from --save-sums or a finished --checkpoint) instead of building.

Scale-out: torchrun --nproc_per_node K -m fastguide build-table ... shards the image batches over the ranks
(gloo on CPU, NCCL on GPU) and all-reduces the float64 sums; rank 0 writes the table.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import time

from pathlib import Path

import numpy as np
import torch

from fastguide.commands import common
from fastguide.interrupts import Interrupted
from fastguide.schedule import FlowSchedule
from fastguide.table import STORAGE_DTYPES
from fastguide.table_build import ESTIMATORS, RatioSums, accumulate_ratio_sums, dist_rank_world

MODEL_ALIASES = {"digits": "fastguide.demo.digits:table_source"}
# Options that only apply to a build from --model (None: not given), with their defaults.
BUILD_DEFAULTS = {"timesteps": "32", "samples_per_class": 100, "num_classes": None, "batch_size": 256, "seed": 0,
                  "device": None, "checkpoint": None, "checkpoint_every": 20, "save_sums": None,
                  "deterministic": False}


def add_parser(sub):
    p = sub.add_parser("build-table", help="build a ReCFG ratio table (safetensors)", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model", help="'digits' or module:function returning the build inputs")
    p.add_argument("--sums", help="finalize these saved sums instead of building (no --model needed)")
    p.add_argument("--out", required=True, help="output table path (.safetensors)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="least_squares",
                   help="least_squares: E[m_c m_u]/E[m_u^2] (authors' code); paper: E[m_c]/E[m_u] "
                        "(default %(default)s)")
    p.add_argument("--timesteps",
                   help="table grid: a count N (N evenly spaced training indices from 0 to the last, inclusive) "
                        f"or a comma list of indices (default {BUILD_DEFAULTS['timesteps']})")
    p.add_argument("--samples-per-class", type=int,
                   help=f"images per class (default {BUILD_DEFAULTS['samples_per_class']})")
    p.add_argument("--num-classes", type=int,
                   help="conditions in the table (default: the source's, else max label + 1)")
    p.add_argument("--batch-size", type=int,
                   help=f"images per forward (2x rows) (default {BUILD_DEFAULTS['batch_size']})")
    p.add_argument("--seed", type=int, help=f"noise seed (default {BUILD_DEFAULTS['seed']})")
    p.add_argument("--delta", type=float, default=1e-6, help="|denominator| < delta -> R = 1 (default %(default)s)")
    p.add_argument("--clamp", type=float, nargs=2, metavar=("LO", "HI"), help="clip R to [LO, HI]")
    p.add_argument("--dtype", choices=sorted(STORAGE_DTYPES), default="float32",
                   help="storage dtype (default %(default)s)")
    p.add_argument("--device", help="build device (default: cuda[:LOCAL_RANK] if available, else cpu)")
    p.add_argument("--checkpoint", help="partial-sums checkpoint path; an existing one is resumed")
    p.add_argument("--checkpoint-every", type=int,
                   help=f"image batches between checkpoints (default {BUILD_DEFAULTS['checkpoint_every']})")
    p.add_argument("--save-sums", help="also write the final sums (to finalize the other estimator later)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (bit-exact GPU resume; CPU builds are deterministic "
                        "anyway)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="extra metadata (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    metadata = parse_metadata(args.metadata)
    _check_args(args)
    if args.sums is not None:
        return _finalize_and_write(RatioSums.load(args.sums), args, metadata, build_note=f"finalized from {args.sums}")
    for key, default in BUILD_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    initialized_here = common.join_process_group(torch.device(args.device or _default_device()))
    try:
        return _build(args, metadata)
    except Interrupted as stop:
        saved = (f"saved {stop.checkpoint}; run the same command again to resume" if stop.checkpoint else
                 "nothing saved (pass --checkpoint PATH to make a build resumable)")
        print(f"fastguide build-table: interrupted after {stop.done} image batches; {saved}", file=sys.stderr)
        return 130
    finally:
        if initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_args(args) -> None:
    """Everything that can be checked before any work: the mode, options that would be ignored, numbers,
    and every output path (writable, no two the same, not the input sums)."""
    if (args.model is None) == (args.sums is None):
        raise ValueError("--model / --sums: give exactly one (build from a model, or finalize saved sums)")
    if args.sums is not None:
        given = [k for k in BUILD_DEFAULTS if getattr(args, k) not in (None, False)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')}: applies only to a build from --model, not to "
                             "finalizing --sums")
    for key, low in (("samples_per_class", 1), ("num_classes", 1), ("batch_size", 1), ("checkpoint_every", 1),
                     ("seed", 0)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise ValueError(f"--{key.replace('_', '-')}: expected an int >= {low}, got {value}")
    if args.timesteps is not None:
        parse_timesteps(args.timesteps, None)  # the syntax now; the range once the schedule is known
    if args.device is not None:
        common.resolve_device(args.device)
    outs = common.check_out_files({"--out": args.out, "--save-sums": args.save_sums, "--checkpoint": args.checkpoint})
    if args.sums is not None and Path(args.sums).resolve() == outs["--out"].resolve():
        raise ValueError(f"--out: is the input --sums file ({args.sums}); write the table to another path")


def _build(args, metadata) -> int:
    rank, world = dist_rank_world()
    device = common.resolve_device(args.device or _default_device())
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    src = load_source(args.model, device)
    model = src["model"]
    if isinstance(model, torch.nn.Module):
        model = model.to(device).eval()
    schedule = src["schedule"]
    labels = torch.as_tensor(src["labels"])
    num_classes = args.num_classes or src.get("num_classes") or int(labels.max()) + 1
    flow = isinstance(schedule, FlowSchedule)
    grid = parse_timesteps(args.timesteps, None if flow else schedule.num_train_timesteps, flow=flow)
    start = time.perf_counter()
    sums = accumulate_ratio_sums(
        model, schedule, src["images"], labels, timesteps=grid, num_classes=num_classes,
        samples_per_class=args.samples_per_class, null_cond=src["null_cond"], batch_size=args.batch_size,
        seed=args.seed, device=device, progress=not args.no_progress, checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every, cond_first=src.get("cond_first", True),
        model_fingerprint=src.get("model_fingerprint"))
    seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    if args.save_sums:
        sums.save(args.save_sums)
    images = num_classes * args.samples_per_class * len(grid)
    note = (f"built from {args.samples_per_class} images/class x {len(grid)} timesteps = {images} noised images "
            f"({2 * images} model rows) in {seconds:.2f} s ({images / max(seconds, 1e-9):.0f} img/s) "
            f"on {world} rank{'s' if world > 1 else ''}, device {device.type}")
    return _finalize_and_write(sums, args, metadata, build_note=note)


def _finalize_and_write(sums: RatioSums, args, metadata: dict, build_note: str) -> int:
    table = sums.finalize(args.estimator, delta=args.delta, clamp=args.clamp, dtype=args.dtype)
    table.save(args.out, metadata=metadata)
    m = table.metadata
    print(f"ratio table: {table.num_classes} classes + mean row x {len(table.timesteps)} timesteps x "
          f"{table.latent_shape}, estimator {args.estimator}, {args.dtype}, {format_bytes(table.nbytes)}")
    print(build_note)
    print(f"near-zero denominators (|den| < {args.delta:g} -> R = 1): {m['near_zero_count']} of {m['elements']} "
          f"elements; clamped{'' if args.clamp else ' (no clamp)'}: {m['clamped_count']}")
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------- helpers
def load_source(spec: str, device) -> dict:
    """Import ``module:function`` (or an alias) and call it; return its build inputs as a dict."""
    target = MODEL_ALIASES.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"--model: expected 'digits' or module:function, got {spec!r}")
    module_name, func_name = target.split(":", 1)
    with _import_path(shipped=spec in MODEL_ALIASES):
        try:
            factory = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as e:
            hint = " (the shipped digits model is not available in this install)" if spec in MODEL_ALIASES else ""
            raise ValueError(f"--model: cannot load {target}{hint}: {e}") from None
        takes_device = "device" in inspect.signature(factory).parameters
        out = factory(device=device) if takes_device else factory()
    if isinstance(out, (tuple, list)):
        if len(out) != 5:
            raise ValueError(f"--model: {target} returned {len(out)} values; expected (model, schedule, images, "
                             "labels, null_cond) or a dict")
        out = dict(zip(("model", "schedule", "images", "labels", "null_cond"), out))
    if not isinstance(out, dict):
        raise TypeError(f"--model: {target} returned {type(out).__name__}; expected a dict or a 5-tuple")
    missing = [k for k in ("model", "schedule", "images", "labels", "null_cond") if k not in out]
    if missing:
        raise ValueError(f"--model: {target} returned no {missing}")
    return out


@contextlib.contextmanager
def _import_path(shipped: bool):
    """Where the model source's code may come from. A user's module:function may live in the current directory,
    which is appended to the path (after the installed packages, so a file there never shadows one: a planted
    sklearn.py); the shipped model imports nothing from it, so there the current directory (which `python -m`
    puts first) is taken off the path while it loads."""
    cwd, saved = os.getcwd(), list(sys.path)
    if shipped:
        sys.path[:] = [p for p in sys.path if p not in ("", cwd)]
    elif cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if shipped:
            sys.path[:] = saved


def parse_timesteps(spec: str, num_train: int | None, flow: bool = False) -> np.ndarray | int:
    """'N' -> N evenly spaced training indices over [0, num_train - 1]; 'a,b,c' -> those indices. For a flow
    model's table (``flow``): 'N' -> the sigmas 1/N, 2/N, ..., 1; 'a,b,c' -> those sigmas. With ``num_train`` None
    (and not ``flow``) only the syntax is checked (a count comes back as an int)."""
    text = str(spec).strip()
    try:
        if "," in text:
            values = [float(v) for v in text.split(",") if v.strip()]
            if flow or num_train is None:
                return np.array(values, dtype=np.float64)
            if any(v != int(v) for v in values):
                raise ValueError
            return np.array([int(v) for v in values], dtype=np.int64)
        count = int(text)
    except (ValueError, OverflowError):
        kind = "sigmas" if flow else "integers"
        raise ValueError(f"--timesteps: expected a count or a comma list of {kind}, got {spec!r}") from None
    if count < 1 or (num_train is not None and not flow and count > num_train):
        raise ValueError(f"--timesteps: a count must be in [1, {num_train or 'num_train_timesteps'}], got {count}")
    if flow:
        return np.arange(1, count + 1, dtype=np.float64) / count
    if num_train is None:
        return count
    return np.unique(np.linspace(0, num_train - 1, count).round().astype(np.int64))


def parse_metadata(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def _default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"



