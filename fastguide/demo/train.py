"""Training of the embedded digits models, reproducible from scratch on a CPU.

* The diffusion UNet: eps objective on the linear 1000-step schedule, condition dropout to the null label
  with probability ``p_uncond``, AdamW with warmup + cosine decay, an EMA of the weights (what ships).
  Every step's randomness (batch, timesteps, noise, dropped labels) comes from a generator seeded with
  (seed, step), so a run resumed from a checkpoint reproduces an uninterrupted run bit for bit.
  Checkpoints are safetensors: weights, EMA weights and AdamW moments, with the step and config as metadata.
* The evaluation classifier: a small CNN trained on the train split only (1-pixel shift augmentation).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from fastguide.demo.data import NULL_LABEL, NUM_CLASSES, load_digits_split
from fastguide.demo import digits
from fastguide.demo.classifier import DigitsClassifier
from fastguide.demo.unet import DigitsUNet
from fastguide.interrupts import Interrupted, deferred_sigint
from fastguide.storage import atomic_save, metadata_field, read_safetensors

CHECKPOINT_FILE = "digits_unet_checkpoint.safetensors"
CHECKPOINT_FORMAT = "fastguide.digits_unet_checkpoint/1"


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int = 3000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.05
    p_uncond: float = 0.15
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    channels: int = 32
    seed: int = 0
    checkpoint_every: int = 500

    def check(self) -> "DiffusionConfig":
        for name in ("steps", "batch_size", "channels", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond: expected a value in [0, 1), got {self.p_uncond}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        return self


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    channels: int = 32
    feature_dim: int = 32
    seed: int = 0


def learning_rate(cfg: DiffusionConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def diffusion_batch(images, labels, alphas_cumprod, cfg: DiffusionConfig, step: int):
    """(x_t, t, cond, eps) for one step; a pure function of (seed, step)."""
    gen = step_generator(cfg.seed, step)
    idx = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=gen)
    x0, cond = images[idx], labels[idx].clone()
    t = torch.randint(0, alphas_cumprod.numel(), (cfg.batch_size,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond
    cond[drop] = NULL_LABEL
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    return x_t, t.float(), cond, eps


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, step: int, cfg: DiffusionConfig, model, ema, opt, seconds: float = 0.0) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = v.reshape(-1) if k == "step" else v
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "config": json.dumps(asdict(cfg), sort_keys=True),
            "train_seconds": f"{seconds:.3f}"}
    atomic_save(tensors, path, meta)  # a crash mid-write never leaves a truncated checkpoint


def load_checkpoint(path: Path, cfg: DiffusionConfig, model, ema, opt) -> tuple[int, float]:
    """Restore model, EMA and optimizer; returns (next step, training seconds so far)."""
    tensors, meta = read_safetensors(path, "resume", "training checkpoint", CHECKPOINT_FORMAT, hint=digits.CREATE_HINT)
    saved = metadata_field(meta, "config", json.loads, path, "resume")
    if saved != asdict(cfg):
        diff = {k: (saved.get(k) if isinstance(saved, dict) else None, v) for k, v in asdict(cfg).items()
                if not isinstance(saved, dict) or saved.get(k) != v}
        raise ValueError(f"resume: checkpoint {path} was written with a different config (saved, now): {diff}")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    sd["state"] = state
    opt.load_state_dict(sd)
    step = metadata_field(meta, "step", int, path, "resume")
    return step, metadata_field(meta, "train_seconds", float, path, "resume") if "train_seconds" in meta else 0.0


def save_model(path: Path, model: torch.nn.Module, fmt: str, extra: dict) -> None:
    meta = {"format": fmt, "config": json.dumps(model.config, sort_keys=True)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    atomic_save(model.state_dict(), path, meta)


# ---------------------------------------------------------------------- the two trainings
@dataclass
class TrainState:
    """The UNet run's state after ``step`` completed steps: what a checkpoint holds."""

    model: DigitsUNet
    ema: DigitsUNet
    opt: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0  # training time over all runs before this one


def initial_state(cfg: DiffusionConfig, ckpt: Path, resume: bool, overwrite: bool = False) -> TrainState:
    """Fresh weights (seeded), or the checkpoint's state when resuming. An existing checkpoint is never replaced
    by a fresh run unless ``overwrite``."""
    if not resume and ckpt.exists() and not overwrite:
        raise FileExistsError(f"out: {ckpt.parent} already holds a training run ({ckpt.name}); continue it with "
                              "resume=True (--resume) or start again with overwrite=True (--overwrite)")
    torch.manual_seed(cfg.seed)  # initial weights
    model = DigitsUNet(cfg.channels, NUM_CLASSES)
    ema = DigitsUNet(cfg.channels, NUM_CLASSES).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    state = TrainState(model, ema, torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0))
    if resume:
        state.step, state.seconds = load_checkpoint(ckpt, cfg, state.model, state.ema, state.opt)
    return state


def train_step(state: TrainState, cfg: DiffusionConfig, split, abar: torch.Tensor) -> float:
    """One optimisation step (batch, loss, AdamW, EMA), a pure function of (seed, step); returns the loss."""
    step = state.step
    x_t, t, cond, eps = diffusion_batch(split.train_images, split.train_labels, abar, cfg, step)
    loss = F.mse_loss(state.model(x_t, t, cond), eps)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
    for group in state.opt.param_groups:
        group["lr"] = learning_rate(cfg, step)
    state.opt.step()
    ema_update(state.ema, state.model, min(cfg.ema_decay, (1 + step) / (10 + step)))
    state.step = step + 1
    return loss.item()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def train_diffusion(cfg: DiffusionConfig, out_dir, resume: bool = False, stop_after: int | None = None,
                    progress: bool = True, overwrite: bool = False) -> dict:
    """Train (or resume) the UNet; writes the checkpoint and, when finished, ``digits_unet.safetensors`` (EMA).

    ``stop_after`` ends this run (with a checkpoint) after that many steps, as an interruption would. Ctrl-C
    finishes the step in progress, saves a checkpoint of the completed steps, then raises
    :class:`fastguide.interrupts.Interrupted` (a second Ctrl-C stops at once, keeping the last checkpoint).
    A checkpoint is only ever written between steps, so ``resume`` continues exactly.
    Returns {"step", "finished", "seconds_this_run", "seconds_all_runs", "final_loss"}.
    """
    cfg.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / CHECKPOINT_FILE
    state = initial_state(cfg, ckpt, resume, overwrite)
    split, schedule = load_digits_split(), digits.digits_schedule()
    abar = schedule.alphas_cumprod.float()
    end = cfg.steps if stop_after is None else min(cfg.steps, state.step + stop_after)
    t0, loss_avg = time.perf_counter(), None

    def save() -> None:
        save_checkpoint(ckpt, state.step, cfg, state.model, state.ema, state.opt,
                        state.seconds + time.perf_counter() - t0)

    bar = tqdm(total=cfg.steps, initial=state.step, desc="train unet", disable=not progress)
    with deferred_sigint() as interrupted, bar:
        while state.step < end:
            loss = train_step(state, cfg, split, abar)
            loss_avg = loss if loss_avg is None else 0.98 * loss_avg + 0.02 * loss
            bar.update()
            bar.set_postfix(loss=f"{loss_avg:.4f}", refresh=False)
            if interrupted:
                save()
                raise Interrupted(state.step, ckpt)
            if state.step % cfg.checkpoint_every == 0 and state.step < end:
                save()
    save()
    finished = end >= cfg.steps
    if finished:
        save_model(out_dir / digits.UNET_FILE, state.ema, digits.UNET_FORMAT, {
            "schedule_fingerprint": schedule.fingerprint(), "null_label": str(NULL_LABEL),
            "train_steps": str(cfg.steps), "train_config": json.dumps(asdict(cfg), sort_keys=True),
            "prediction_type": "epsilon"})
    return {"step": end, "finished": finished, "seconds_this_run": time.perf_counter() - t0,
            "seconds_all_runs": state.seconds + time.perf_counter() - t0, "final_loss": loss_avg}


def shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image [B, 1, 8, 8] by up to one pixel in each direction (padding with background, -1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    rows = torch.randint(0, 3, (b, 1), generator=gen) + torch.arange(h)
    cols = torch.randint(0, 3, (b, 1), generator=gen) + torch.arange(w)
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


@torch.no_grad()
def classifier_accuracy(clf, images, labels) -> float:
    return float((clf(images).argmax(1) == labels).float().mean())


def train_classifier(cfg: ClassifierConfig, out_dir, progress: bool = True) -> dict:
    """Train the evaluation classifier on the train split; writes ``digits_classifier.safetensors``."""
    split = load_digits_split()
    torch.manual_seed(cfg.seed)
    clf = DigitsClassifier(cfg.channels, cfg.feature_dim, NUM_CLASSES)
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=1e-4)
    n = split.train_images.shape[0]
    t0 = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="train classifier", disable=not progress):
        gen = step_generator(cfg.seed + 7, epoch)
        perm = torch.randperm(n, generator=gen)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x = shift_augment(split.train_images[idx], gen)
            loss = F.cross_entropy(clf(x), split.train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    clf.eval()
    acc = classifier_accuracy(clf, split.heldout_images, split.heldout_labels)
    save_model(Path(out_dir) / digits.CLASSIFIER_FILE, clf, digits.CLASSIFIER_FORMAT, {
        "heldout_accuracy": f"{acc:.6f}", "train_config": json.dumps(asdict(cfg), sort_keys=True)})
    return {"heldout_accuracy": acc, "seconds": time.perf_counter() - t0}
