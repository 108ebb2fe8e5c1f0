"""Argument validators shared by the library: each raises TypeError / ValueError naming the argument and what
was expected, and returns the value in the form the caller works with."""
from __future__ import annotations

import math

import numpy as np
import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_int(value, name: str, low: int | None = None) -> int:
    """An int (numpy ints too, bools not) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{name}: expected an int{bound}, got {value!r}")
    return int(value)


def check_steps(steps, num_train_timesteps: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        raise ValueError(f"steps: expected <= num_train_timesteps ({num_train_timesteps}), got {steps}")


def check_scale(scale, name: str = "scale"):
    """A guidance scale: a finite float >= 0, or a 1-D [B] tensor of them (returned as float64 on the CPU)."""
    if isinstance(scale, bool):
        raise TypeError(f"{name}: expected a float or a [B] tensor, got bool")
    if isinstance(scale, (int, float)):
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"{name}: expected a finite value >= 0, got {scale}")
        return float(scale)
    if isinstance(scale, torch.Tensor):
        if scale.ndim != 1 or not scale.is_floating_point() and scale.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected a float or a 1-D [B] tensor, got shape {tuple(scale.shape)} {scale.dtype}")
        s = scale.detach().double().cpu()
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{name}: expected finite values >= 0")
        return s
    raise TypeError(f"{name}: expected a float or a [B] tensor, got {type(scale).__name__}")


def check_lo_hi(value, name: str, expected: str) -> tuple[float, float]:
    """A (lo, hi) pair of floats with lo <= hi."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected {expected}, got {value!r}") from None
    if not lo <= hi:
        raise ValueError(f"{name}: expected lo <= hi, got ({lo}, {hi})")
    return lo, hi


def check_interval(interval) -> tuple[float, float] | None:
    """A guidance interval: None, or (lo, hi) model times."""
    if interval is None:
        return None
    return check_lo_hi(interval, "interval", "a (lo, hi) pair of model times")


def check_seeds(seeds, batch: int | None = None) -> list[int]:
    """Per-sample seeds: a sequence (or tensor) of ints >= 0, ``batch`` of them when given."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise TypeError(f"seeds: expected a sequence of ints, got {type(seeds).__name__}") from None
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"seeds: expected {batch} seeds (one per sample), got {len(seeds)}")
    if any(s < 0 for s in seeds):
        raise ValueError("seeds: expected non-negative ints")
    return seeds


def check_noise(noise, values: bool = True) -> torch.Tensor:
    """x_T: a non-empty float [B, C, H, W] tensor (finite, when ``values``); returned contiguous."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise: expected a torch.Tensor [B, C, H, W], got {type(noise).__name__}")
    if noise.ndim != 4:
        raise ValueError(f"noise: expected 4 dims [B, C, H, W], got shape {tuple(noise.shape)}")
    if noise.dtype not in FLOAT_DTYPES:
        raise TypeError(f"noise: expected float64/float32/float16/bfloat16, got {noise.dtype}")
    if noise.shape[0] < 1 or noise.numel() == 0:
        raise ValueError(f"noise: expected a non-empty batch, got shape {tuple(noise.shape)}")
    if values and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: contains NaN or inf")
    return noise.contiguous()


def check_cond(cond, batch: int, device) -> torch.Tensor:
    """Conditions for ``batch`` samples: [B] integer labels (as int64) or a [B, ...] float embedding tensor."""
    if isinstance(cond, int) and not isinstance(cond, bool):
        raise TypeError(f"cond: expected a [B] tensor or list of labels (B={batch}), got a single int; "
                        "use torch.full((B,), label) to give every sample the same label")
    if not isinstance(cond, torch.Tensor):
        try:
            cond = torch.as_tensor(cond)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"cond: expected a [B] tensor of labels, got {type(cond).__name__}") from None
    if cond.ndim == 0 or cond.shape[0] != batch:
        raise ValueError(f"cond: expected {batch} conditions (the noise batch), got shape {tuple(cond.shape)}")
    if not cond.is_floating_point():
        if cond.ndim != 1:
            raise ValueError(f"cond: integer labels must be 1-D [B], got shape {tuple(cond.shape)}")
        cond = cond.long()
    return cond.to(device)


def check_model_output(out, inp: torch.Tensor, step: int | None = None) -> None:
    """The model returned one tensor shaped like its input (``step``: where, for the message)."""
    where = "" if step is None else f" at step {step}"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected a tensor output, got {type(out).__name__}{where}")
    if out.shape != inp.shape:
        raise ValueError(f"model: output shape {tuple(out.shape)} != input shape {tuple(inp.shape)}{where} "
                         "(a learned-sigma model needs an adapter that returns the eps half)")
