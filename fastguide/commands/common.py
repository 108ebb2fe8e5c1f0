"""Helpers shared by the commands: argument checks, device choice, output paths checked before any work,
asset loading for the digits commands, and the PNG / table outputs."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch

RULE_LABELS = {"cfg": "CFG", "recfg-paper": "ReCFG (paper: E[eps_c]/E[eps_u])",
               "recfg-ls": "ReCFG (least squares: E[eps_c eps_u]/E[eps_u^2])",
               "cfg-zero-star": "CFG-Zero* (per-sample alpha)", "apg": "APG (adaptive projected guidance)"}
METRIC_LABELS = {"accuracy": "classifier accuracy", "expectation_shift": "expectation shift (L2, pixels)",
                 "frechet_distance": "Frechet distance (classifier features)",
                 "variance_ratio": "pixel-variance ratio (gen / real)"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


# ---------------------------------------------------------------------- arguments
def add_device_args(p) -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to sample")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                   help="guided-step implementation (auto: the fused Triton kernel on CUDA, torch otherwise)")


def add_rule_args(p) -> None:
    """The guidance rules' parameters beyond --rule / --scale (fastguide.demo.digits.RuleOptions)."""
    from fastguide.guidance import SCHEDULES

    p.add_argument("--rescale", type=float, default=0.0, metavar="PHI",
                   help="guidance_rescale phi in [0, 1] (Lin et al. 2023), any rule; 0 = off")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="shape the guidance strength g - 1 over the steps (mean kept; linear / cosine increase "
                        "from g = 1, the -decreasing ones end there)")
    p.add_argument("--zero-init-steps", type=int, default=None, metavar="K",
                   help="cfg-zero-star: the first K steps output zero and run no network (default: 1 for flow / v / "
                        "sample models, 0 for epsilon models such as the digits one, where zero eps blows up)")
    p.add_argument("--eta", type=float, default=None, help="apg: weight of the parallel part (default 1)")
    p.add_argument("--norm-threshold", type=float, default=None,
                   help="apg: cap on the guidance direction's norm, 0 = none (default 15)")
    p.add_argument("--momentum", type=float, default=None, help="apg: momentum in (-1, 1) (default 0)")


def rule_options(args, rules):
    """The RuleOptions of the parsed --rescale ... --momentum (each one taken by some rule in ``rules``), with errors
    that name the flag."""
    from fastguide.checks import check_in_range
    from fastguide.demo.digits import RuleOptions

    options = RuleOptions(rescale=check_in_range(args.rescale, "--rescale", 0.0, 1.0), schedule=args.schedule,
                          zero_init_steps=at_least(args.zero_init_steps, "--zero-init-steps", 0),
                          eta=None if args.eta is None else check_in_range(args.eta, "--eta", 0.0),
                          norm_threshold=None if args.norm_threshold is None else check_in_range(
                              args.norm_threshold, "--norm-threshold", 0.0),
                          momentum=None if args.momentum is None else check_in_range(
                              args.momentum, "--momentum", -1.0, 1.0, open_low=True, open_high=True))
    options.check_for(rules, lambda field: "--" + field.replace("_", "-"))
    return options


def join_process_group(device: torch.device) -> bool:
    """Join the torchrun process group when there is one (WORLD_SIZE > 1): NCCL for CUDA, gloo otherwise. True
    when this call initialized it (the caller then destroys it)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def check_scale(g: float, name: str = "--scale") -> float:
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"{name}: expected a finite guidance scale >= 0, got {g}")
    return float(g)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--scales: expected comma-separated numbers, got {text!r}") from None
    if not scales:
        raise ValueError("--scales: expected at least one guidance scale")
    return [check_scale(g, "--scales") for g in scales]


def parse_labels(text: str) -> list[int]:
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels: expected comma-separated digits 0..9, got {text!r}") from None
    bad = [v for v in labels if not 0 <= v <= 9]
    if not labels or bad:
        raise ValueError(f"--labels: expected digits 0..9, got {bad or text!r}")
    return labels


def at_least(value, option: str, low: int):
    """An int option's value, checked to be >= low (None passes: the option was not given)."""
    if value is not None and value < low:
        raise ValueError(f"{option}: expected an int >= {low}, got {value}")
    return value


def check_steps(steps: int) -> int:
    if not 1 <= steps <= 1000:
        raise ValueError(f"--steps: expected 1..1000 sampling steps, got {steps}")
    return steps


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads(workers: int) -> int:
    """The intra-op threads each of ``workers`` batcher workers gets on a CPU (``fastguide serve --workers``)."""
    return max(1, available_cores() // workers)


def resolve_device(name: str, arg: str = "--device") -> torch.device:
    """A device torch can use here: cpu, cuda or cuda:N (N < the number of CUDA devices)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{arg}: unknown device {name!r} (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{arg}: expected cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg}: {name} was requested but no CUDA device is available (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{arg}: {name} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def prepare_out_dir(path, arg: str = "--out") -> Path:
    """Create the output directory and prove it is writable before any work is done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fastguide-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{arg}: cannot write to directory {out} ({e.strerror or e})") from None
    return out


def check_out_file(path, arg: str = "--out", suffix: str | None = ".png") -> Path:
    """An output file that can be written (its directory exists and is writable; it is not a directory)."""
    out = Path(path)
    if suffix is not None and out.suffix.lower() != suffix:
        raise ValueError(f"{arg}: expected a {suffix} file name, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"{arg}: {out} is a directory, expected a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{arg}: cannot write {out} (directory {parent} missing or not writable)")
    return out


def check_out_files(paths: dict, suffix: str | None = None) -> dict:
    """{option: path} of the files a command will write (None: not written): each writable, no two the same."""
    checked = {arg: check_out_file(p, arg, suffix) for arg, p in paths.items() if p is not None}
    seen = {}
    for arg, p in checked.items():
        key = p.resolve()
        if key in seen:
            raise ValueError(f"{arg}: is the same file as {seen[key]} ({p}); give each output its own path")
        seen[key] = arg
    return checked


def load_assets(assets_dir, device):
    """(model, classifier, tables) from ``assets_dir`` (None: the package's own assets)."""
    from fastguide.demo import digits

    if assets_dir is None:
        return (digits.load_digits_model(device=device), digits.load_digits_classifier(device=device),
                digits.load_digits_tables())
    d = Path(assets_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--assets: directory {d} not found")
    return (digits.load_digits_model(d / digits.UNET_FILE, device),
            digits.load_digits_classifier(d / digits.CLASSIFIER_FILE, device),
            digits.load_digits_tables({k: d / v for k, v in digits.TABLE_FILES.items()}))


# ---------------------------------------------------------------------- pictures
def mosaic(images: torch.Tensor, rows: int, cols: int, pad: int = 1) -> np.ndarray:
    """[rows*cols, 1, H, W] in [-1, 1] (row-major) -> one [rows*(H+pad)+pad, ...] array, padding = background."""
    x = images.detach().float().clamp(-1, 1).cpu().numpy()[:, 0]
    n, h, w = x.shape
    if n != rows * cols:
        raise ValueError(f"images: expected {rows * cols} images for a {rows}x{cols} mosaic, got {n}")
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), -1.0, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    return canvas


def _show(ax, canvas: np.ndarray) -> None:
    ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def per_digit_block(x: torch.Tensor, labels: torch.Tensor, per_digit: int) -> np.ndarray:
    """A per_digit x 10 mosaic: column c holds the first per_digit samples of digit c."""
    cols = [x[labels == c][:per_digit] for c in range(10)]
    ordered = torch.stack([cols[c][r] for r in range(per_digit) for c in range(10)])
    return mosaic(ordered, per_digit, 10)


def save_rule_grid(path, rule: str, by_scale: dict, labels, per_digit: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 0.8 + (6.5 * (per_digit * 9 + 1) / 91 + 0.3) * len(by_scale)), layout="constrained")
    axes = fig.subplots(len(by_scale), 1, squeeze=False)[:, 0]
    for ax, (g, x) in zip(axes, by_scale.items()):
        _show(ax, per_digit_block(x, labels, per_digit))
        ax.set_ylabel(f"g = {g:g}")
    fig.suptitle(f"{RULE_LABELS[rule]}\ndigits 0-9 (columns), the same seeds in every row", fontsize=9)
    fig.savefig(path, dpi=110)


def save_comparison(path, samples: dict, labels, per_digit: int = 2) -> None:
    from matplotlib.figure import Figure

    rules = list(samples)
    scales = list(samples[rules[0]])
    row_height = 4.2 * (per_digit * 9 + 1) / 91 + 0.3  # a mosaic's aspect (10 digits wide) + its label
    fig = Figure(figsize=(4.2 * len(rules), 0.8 + row_height * len(scales)), layout="constrained")
    axes = fig.subplots(len(scales), len(rules), squeeze=False)
    for j, rule in enumerate(rules):
        axes[0, j].set_title(RULE_LABELS[rule], fontsize=9)
        for i, g in enumerate(scales):
            _show(axes[i, j], per_digit_block(samples[rule][g], labels, per_digit))
            if j == 0:
                axes[i, j].set_ylabel(f"g = {g:g}")
    fig.suptitle("Same noise, same model: guidance rule (columns) x guidance scale (rows)")
    fig.savefig(path, dpi=110)


def save_metrics_plot(path, results: dict, reference: dict | None = None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    for ax, metric in zip(axes, METRIC_LABELS):
        for rule, by_scale in results.items():
            scales = list(by_scale)
            ax.plot(scales, [by_scale[g][metric] for g in scales], marker="o", label=RULE_LABELS[rule])
        if metric == "variance_ratio":
            ax.axhline(1.0, color="gray", ls="--", lw=1, label="real data")
        if metric == "accuracy" and reference:
            ax.axhline(reference["accuracy"], color="gray", ls="--", lw=1, label="classifier on held-out real")
        if metric == "frechet_distance":
            ax.set_yscale("log")
        ax.set_xlabel("guidance scale g")
        ax.set_title(METRIC_LABELS[metric], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Digits: CFG vs ReCFG against held-out data")
    fig.savefig(path, dpi=110)


def write_demo_outputs(out: Path, samples: dict, results: dict, labels, per_class: int, reference=None) -> None:
    per_digit = min(4, per_class)
    for rule, by_scale in samples.items():
        save_rule_grid(out / f"samples_{rule}.png", rule, by_scale, labels, per_digit)
    save_comparison(out / "comparison.png", samples, labels, min(2, per_class))
    save_metrics_plot(out / "metrics.png", results, reference)


def format_table(results: dict) -> str:
    head = f"{'rule':<12} {'g':>5} {'accuracy':>9} {'E-shift':>8} {'FD':>8} {'var-ratio':>9}"
    lines = [head, "-" * len(head)]
    for rule, by_scale in results.items():
        for g, m in by_scale.items():
            lines.append(f"{rule:<12} {g:>5g} {m['accuracy']:>9.3f} {m['expectation_shift']:>8.3f} "
                         f"{m['frechet_distance']:>8.3f} {m['variance_ratio']:>9.3f}")
    return "\n".join(lines)
