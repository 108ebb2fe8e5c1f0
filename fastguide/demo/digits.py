"""The embedded default: the digits diffusion model, its evaluation classifier and its ReCFG ratio tables.

Everything is read from ``fastguide/demo/assets/`` (safetensors + JSON metadata, no pickle); ``fastguide train``
writes the same files from scratch. The model was trained on the linear DDPM schedule below (1000 steps,
betas 1e-4..0.02) and is sampled with trailing timestep spacing so that a low-NFE DDIM run starts at t = 999.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastguide.demo.data import IMAGE_SHAPE, NULL_LABEL, NUM_CLASSES
from fastguide.demo.classifier import DigitsClassifier
from fastguide.demo.unet import DigitsUNet
from fastguide.euler import Euler
from fastguide.heun import Heun
from fastguide.multistep import DPMSolver, UniPC
from fastguide.pndm import PLMS
from fastguide.schedule import NoiseSchedule
from fastguide.solvers import DDIM
from fastguide.storage import metadata_field, read_safetensors

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
UNET_FILE = "digits_unet.safetensors"
CLASSIFIER_FILE = "digits_classifier.safetensors"
TABLE_FILES = {"paper": "digits_recfg_paper.safetensors", "least_squares": "digits_recfg_least_squares.safetensors"}
TRAINING_FACTS_FILE = "digits_training.json"
SUMS_FILE = "digits_ratio_sums.safetensors"  # the raw sums both tables were finalized from
# finalize() options per estimator. With 139 images per class, E[eps_u] per element is mostly within one
# standard error (sd(eps_u) / sqrt(139) ~ 0.085) of zero, so the unguarded "paper" ratio is noise over noise
# and sampling with it diverges for every g > 1 (docs/demo.md). delta = 0.2 (~2.4 standard errors) falls back
# to R = 1 (CFG) where the denominator is not distinguishable from zero. Least squares needs no guard.
TABLE_FINALIZE = {"paper": {"delta": 0.2}, "least_squares": {}}
UNET_FORMAT = "fastguide.digits_unet/1"
CLASSIFIER_FORMAT = "fastguide.digits_classifier/1"
CREATE_HINT = " (run `fastguide train --out DIR` to create it)"  # for a missing model or checkpoint file

# Ratio tables are estimated on this grid of training timesteps and serve any DDIM step count by
# interpolation; it contains every trailing-spaced timestep of 4, 8, 10, 20 and 40 steps exactly.
TABLE_TIMESTEPS = np.array([0] + list(range(24, 1000, 25)), dtype=np.int64)


def digits_schedule() -> NoiseSchedule:
    """The schedule the digits model was trained with: linear betas 1e-4..0.02 over 1000 steps, trailing spacing."""
    return NoiseSchedule.linear(1000, 1e-4, 0.02, timestep_spacing="trailing")


def asset_path(name: str) -> Path:
    return ASSETS_DIR / name


def _load_module(path, what: str, fmt: str, build, device, check_meta=None) -> torch.nn.Module:
    tensors, meta = read_safetensors(path, what, f"digits {what}", fmt, hint=CREATE_HINT)
    if check_meta is not None:
        check_meta(meta)
    config = metadata_field(meta, "config", json.loads, path, what)
    try:
        module = build(**config)
        module.load_state_dict(tensors)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: {path} does not match the model it describes ({str(e).splitlines()[0]})") from None
    return module.to(device).eval().requires_grad_(False)


def load_digits_model(path=None, device="cpu") -> DigitsUNet:
    """The shipped class-conditional digits UNet: ``model(x [N,1,8,8], t [N] float, cond [N] long) -> eps``.

    Labels 0..9 are digits; label 10 is the null (unconditional) condition.
    """
    path = asset_path(UNET_FILE) if path is None else path

    def same_schedule(meta):
        if meta.get("schedule_fingerprint") not in (None, digits_schedule().fingerprint()):
            raise ValueError(f"model: {path} was trained on a different noise schedule than digits_schedule()")

    return _load_module(path, "model", UNET_FORMAT, DigitsUNet, device, check_meta=same_schedule)


def load_digits_classifier(path=None, device="cpu") -> DigitsClassifier:
    """The shipped evaluation classifier (trained on the train split only); ``.features(x)`` is its penultimate layer."""
    path = asset_path(CLASSIFIER_FILE) if path is None else path
    return _load_module(path, "classifier", CLASSIFIER_FORMAT, DigitsClassifier, device)


def load_digits_tables(paths: dict | None = None) -> dict:
    """{"paper": RatioTable, "least_squares": RatioTable}: the shipped ReCFG tables for the digits model."""
    from fastguide.table import RatioTable

    paths = {k: asset_path(v) for k, v in TABLE_FILES.items()} if paths is None else paths
    tables = {}
    for estimator, path in paths.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"table: ratio table {path} not found (run `fastguide train --out DIR` to build it)")
        tables[estimator] = RatioTable.load(path, schedule=digits_schedule(), latent_shape=IMAGE_SHAPE)
    return tables


def load_training_facts(path=None) -> dict:
    """What `fastguide train` recorded about the shipped models (held-out accuracy, steps, timings)."""
    path = asset_path(TRAINING_FACTS_FILE) if path is None else Path(path)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def table_source(device="cpu") -> dict:
    """Build inputs for `fastguide build-table --model digits`: the shipped model and the train split."""
    from fastguide.demo.data import load_digits_split

    split = load_digits_split()
    return {"model": load_digits_model(device=device), "schedule": digits_schedule(), "images": split.train_images,
            "labels": split.train_labels, "null_cond": NULL_LABEL, "num_classes": NUM_CLASSES}


# ---------------------------------------------------------------------- sampling the embedded model
# rule -> the ratio-table estimator it needs (None: no table)
RULES = {"cfg": None, "recfg-paper": "paper", "recfg-ls": "least_squares", "cfg-zero-star": None, "apg": None}
DEMO_RULES = ("cfg", "recfg-paper", "recfg-ls")  # what `fastguide demo` compares unless told otherwise
EXPORTABLE_RULES = ("cfg", "recfg-paper", "recfg-ls")  # the rules an ONNX graph can hold
RULE_HELP = ("cfg, recfg-paper / recfg-ls (ReCFG with the shipped ratio tables), cfg-zero-star (CFG-Zero*: "
             "per-sample alpha, --zero-init-steps), apg (adaptive projected guidance: --eta, --norm-threshold, "
             "--momentum); --rescale and --schedule apply to every rule")


@dataclass(frozen=True)
class RuleOptions:
    """The guidance rules' parameters beyond the scale (fastguide.guidance): ``rescale`` (every rule),
    ``schedule`` (a name in fastguide.guidance.SCHEDULES, every rule), ``zero_init_steps`` (cfg-zero-star),
    ``eta``, ``norm_threshold``, ``momentum`` (apg). None: the rule's default."""

    rescale: float = 0.0
    schedule: str | None = None
    zero_init_steps: int | None = None
    eta: float | None = None
    norm_threshold: float | None = None
    momentum: float | None = None

    OWNERS = {"zero_init_steps": ("cfg-zero-star",), "eta": ("apg",), "norm_threshold": ("apg",), "momentum": ("apg",)}

    def check_for(self, rules, name_of=lambda field: field) -> None:
        """Raise if an option is set that none of ``rules`` takes (``name_of`` spells it, e.g. as a CLI flag)."""
        for field, owners in self.OWNERS.items():
            if getattr(self, field) is not None and not set(owners) & set(rules):
                raise ValueError(f"{name_of(field)}: applies to rule {' / '.join(owners)} only, not "
                                 f"{' / '.join(map(repr, rules))}")

    def only_for(self, rule: str) -> "RuleOptions":
        """These options without the ones ``rule`` does not take (a study's options shared by several rules)."""
        return replace(self, **{f: None for f, owners in self.OWNERS.items() if rule not in owners})


def check_labels(labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected a non-empty list of integer digits, got {labels.tolist()!r}")
    bad = labels[(labels < 0) | (labels >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(f"labels: expected digits 0..{NUM_CLASSES - 1}, got {bad.tolist()}")
    return labels.long()


def make_guidance(rule: str, scale, tables: dict | None = None, interval=None, options: RuleOptions | None = None):
    """The guidance object for a rule name (``RULES``; ReCFG's tables from load_digits_tables()); ``interval``
    (lo, hi): guide only at model times in [lo, hi]; ``options``: the rule's other parameters."""
    from fastguide.guidance import APG, CFG, CFGZeroStar, ReCFG

    if rule not in RULES:
        raise ValueError(f"rule: expected one of {sorted(RULES)}, got {rule!r}")
    options = RuleOptions() if options is None else options
    options.check_for([rule])
    common = dict(rescale=options.rescale, schedule=options.schedule)
    given = {k: v for k, v in vars(options).items() if v is not None and k not in common}
    if rule == "cfg":
        return CFG(scale, interval=interval, **common)
    if rule == "cfg-zero-star":
        return CFGZeroStar(scale, interval=interval, **common, **given)
    if rule == "apg":
        return APG(scale, interval=interval, **common, **given)
    if tables is None or RULES[rule] not in tables:
        raise ValueError(f"rule: {rule!r} needs the {RULES[rule]!r} ratio table")
    return ReCFG(scale, table=tables[RULES[rule]], interval=interval, **common)


# solver name -> its construction for the digits schedule (``steps`` model evaluations each)
SOLVERS = {
    "ddim": lambda steps: DDIM(digits_schedule(), steps=steps),
    "dpm++2m": lambda steps: DPMSolver(digits_schedule(), steps, order=2),
    "dpm++3m": lambda steps: DPMSolver(digits_schedule(), steps, order=3),
    "dpm++2m-karras": lambda steps: DPMSolver(digits_schedule(), steps, order=2, sigma_schedule="karras"),
    "unipc": lambda steps: UniPC(digits_schedule(), steps, order=2),
    "unipc-3": lambda steps: UniPC(digits_schedule(), steps, order=3),
    "euler": lambda steps: Euler(digits_schedule(), steps, spacing="trailing"),
    "euler-a": lambda steps: Euler(digits_schedule(), steps, ancestral=True, spacing="trailing"),
    # Heun's steps are evaluations: N intervals cost 2N - 1, so the largest N within the budget
    "heun": lambda steps: Heun(digits_schedule(), max((steps + 1) // 2, 2), spacing="trailing"),
    "plms": lambda steps: PLMS(digits_schedule(), max(steps - 1, 2), spacing="trailing"),  # N intervals: N + 1 NFE
}

SOLVER_HELP = ("ddim (eta 0, trailing spacing), DPM-Solver++ multistep (2M, 3M, 2M on Karras sigmas), UniPC (bh2, "
               "order 2 or 3), euler / euler-a (Euler, Euler-ancestral in sigma space) heun (2 evaluations per "
               "interval: the largest 2k - 1 <= --steps) or plms (PNDM's linear multistep: --steps - 1 intervals)")


def make_solver(name: str, steps: int):
    """The named solver (``SOLVERS``) on the digits schedule."""
    if name not in SOLVERS:
        raise ValueError(f"solver: expected one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name](steps)


def make_sampler(model, *, rule: str = "cfg", scale=3.0, steps: int = 10, tables: dict | None = None,
                 backend: str = "auto", progress: bool = False, interval=None, solver: str = "ddim",
                 options: RuleOptions | None = None):
    """The fastguide.Sampler that :func:`sample_digits` samples with (the same arguments)."""
    from fastguide.sampler import Sampler

    return Sampler(model, make_solver(solver, steps), make_guidance(rule, scale, tables, interval, options),
                   null_cond=NULL_LABEL, backend=backend, progress=progress)


@torch.no_grad()
def sample_digits(model, labels, seeds, *, rule: str = "cfg", scale=3.0, steps: int = 10, tables: dict | None = None,
                  device="cpu", backend: str = "auto", progress: bool = False, interval=None,
                  solver: str = "ddim", options: RuleOptions | None = None) -> torch.Tensor:
    """[N, 1, 8, 8] samples of the digits model for ``labels`` [N]; sample i starts from noise seeded by seeds[i].

    ``solver`` (``SOLVERS``: DDIM with eta 0 and trailing spacing, DPM-Solver++ 2M / 3M, UniPC, Euler,
    Euler-ancestral, Heun, PLMS) with ``steps`` model evaluations of the 2N batch (Heun: 2k - 1 <= steps); ``scale`` is a float or a per-sample [N] tensor; ``interval`` (lo, hi) guides
    only the steps at model times in [lo, hi] (the others run the N conditional rows alone); ``options``: the
    rule's other parameters (:class:`RuleOptions`).
    """
    from fastguide.noise import seeded_noise

    labels = check_labels(labels)
    sampler = make_sampler(model, rule=rule, scale=scale, steps=steps, tables=tables, backend=backend,
                           progress=progress, interval=interval, solver=solver, options=options)
    solver = sampler.solver
    seeds = list(seeds)
    noise = seeded_noise(seeds, IMAGE_SHAPE, device=device)
    return sampler.sample(noise, labels.to(device), seeds=seeds if solver.plan.stochastic else None).cpu()


__all__ = ["digits_schedule", "load_digits_model", "load_digits_classifier", "load_digits_tables",
           "load_training_facts", "sample_digits", "make_guidance", "make_sampler", "make_solver", "RULES", "DEMO_RULES", "EXPORTABLE_RULES",
           "RULE_HELP", "RuleOptions", "SOLVERS", "SOLVER_HELP", "TABLE_TIMESTEPS", "NULL_LABEL", "NUM_CLASSES", "IMAGE_SHAPE"]
