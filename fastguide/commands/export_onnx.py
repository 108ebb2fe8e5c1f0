"""`fastguide export-onnx`: the embedded digits model's guided DDIM step (or whole loop) as one ONNX graph.

The graph holds the 2B batching, the model, the guidance rule (CFG, or ReCFG with its ratio table) and the
solver's coefficient plan; run it with `fastguide.onnx.OnnxSampler` (onnxruntime, CPU or CUDA). Unless
--no-verify, the export is checked: a few samples from the graph are compared with the torch Sampler's.
See docs/deployment.md.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fastguide.commands import common

VERIFY_BATCH = 3


def add_parser(sub):
    from fastguide.demo.digits import EXPORTABLE_RULES
    from fastguide.onnx import DEFAULT_OPSET, MODES

    p = sub.add_parser("export-onnx", help="export the digits sampler (step or loop) to ONNX",
                       description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--mode", default="step", choices=MODES,
                   help="step: one guided step (x, step, labels, g1 -> x_next); loop: the whole fixed-NFE loop")
    p.add_argument("--rule", default="cfg", choices=EXPORTABLE_RULES, help="guidance rule (CFG or ReCFG)")
    p.add_argument("--scale", type=float, default=3.0, help="default guidance scale stored with the graph")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps = NFE")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 18)")
    p.add_argument("--assets", default=None, help="directory with the model and tables (default: shipped)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-torch check after export")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastguide import onnx as fgonnx
    from fastguide.demo import digits
    from fastguide.sampler import Sampler
    from fastguide.solvers import DDIM

    scale = common.check_scale(args.scale)
    common.check_steps(args.steps)
    out = Path(args.out)
    if out.suffix.lower() != ".onnx" or out.is_dir() or not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise ValueError(f"--out: expected a .onnx file name in an existing directory, got {args.out!r}")
    if args.opset < fgonnx.MIN_OPSET:
        raise ValueError(f"--opset: expected >= {fgonnx.MIN_OPSET} (the opset torch's exporter writes natively), "
                         f"got {args.opset}")
    model, tables = _load(args.assets, args.rule)
    sampler = Sampler(model, DDIM(digits.digits_schedule(), steps=args.steps),
                      digits.make_guidance(args.rule, scale, tables), null_cond=digits.NULL_LABEL, progress=False)
    fgonnx.export(sampler, out, digits.IMAGE_SHAPE, mode=args.mode, opset=args.opset)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB): {args.mode} graph, {args.rule} g={scale:g} (default), "
          f"DDIM {args.steps} steps, opset {args.opset}, dynamic batch")
    if not args.no_verify:
        _verify(sampler, out)
    return 0


def _load(assets, rule):
    from fastguide.demo import digits

    if assets is None:
        model = digits.load_digits_model()
        tables = digits.load_digits_tables() if digits.RULES[rule] else None
        return model, tables
    d = Path(assets)
    if not d.is_dir():
        raise FileNotFoundError(f"--assets: directory {d} not found")
    model = digits.load_digits_model(d / digits.UNET_FILE)
    if not digits.RULES[rule]:
        return model, None
    return model, digits.load_digits_tables({k: d / v for k, v in digits.TABLE_FILES.items()})


def _verify(sampler, path) -> None:
    from fastguide.demo.digits import IMAGE_SHAPE
    from fastguide.onnx import OnnxSampler
    from fastguide.noise import seeded_noise

    try:
        session = OnnxSampler(path)
    except ImportError as e:
        print(f"verify: skipped ({e})")
        return
    seeds = list(range(VERIFY_BATCH))
    noise = seeded_noise(seeds, IMAGE_SHAPE)
    labels = torch.arange(VERIFY_BATCH, dtype=torch.int64)
    with torch.no_grad():
        want = sampler.sample(noise, labels, seeds=seeds)
    got = session.sample(noise, labels, seeds=seeds)
    err = float((got - want).abs().max())
    print(f"verify: onnxruntime on {session.provider}, batch {VERIFY_BATCH}: max |onnx - torch| = {err:.2e}")
