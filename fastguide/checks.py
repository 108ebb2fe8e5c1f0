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


def real(value, name: str) -> float:
    """float(value) for a real number; an int too large for a float is a ValueError naming ``name``."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: {value} is too large") from None


def check_choices(*choices) -> None:
    """Each (name, value, allowed): value must be one of allowed (a ValueError naming it otherwise)."""
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


def check_in_range(value, name: str, low=None, high=None, *, open_low: bool = False, open_high: bool = False) -> float:
    """A finite real number in [low, high] (``open_*``: the bound itself excluded); returned as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = real(value, name)
    below = low is not None and (v <= low if open_low else v < low)
    above = high is not None and (v >= high if open_high else v > high)
    if not math.isfinite(v) or below or above:
        lo = "" if low is None else ("(" if open_low else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if open_high else "]")
        where = f"in {lo}, {hi}" if low is not None and high is not None else (f">= {low:g}" if high is None else f"<= {high:g}")
        if low is not None and high is None and open_low:
            where = f"> {low:g}"
        raise ValueError(f"{name}: expected a finite value {where}, got {value!r}")
    return v


def check_steps(steps, num_train_timesteps: int | None = None) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps: expected an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        raise ValueError(f"steps: expected <= num_train_timesteps ({num_train_timesteps}), got {steps}")


def check_scale(scale, name: str = "scale"):
    """A guidance scale: a finite float >= 0, or a 1-D [B] tensor of them (returned as float64 on the CPU)."""
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a float or a [B] tensor, got bool")
    if isinstance(scale, (int, float, np.integer, np.floating)):
        value = real(scale, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite value >= 0, got {scale}")
        return value
    if isinstance(scale, torch.Tensor):
        if scale.ndim != 1 or not scale.is_floating_point() and scale.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected a float or a 1-D [B] tensor, got shape {tuple(scale.shape)} {scale.dtype}")
        s = scale.detach().double().cpu()
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"{name}: expected finite values >= 0")
        return s
    raise TypeError(f"{name}: expected a float or a [B] tensor, got {type(scale).__name__}")


def check_lo_hi(value, name: str, expected: str) -> tuple[float, float]:
    """A (lo, hi) pair of real numbers (a tuple, list, array or tensor of two; not NaN) with lo <= hi."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 2 or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            for v in value):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    lo, hi = real(value[0], name), real(value[1], name)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name}: expected numbers, got ({lo}, {hi})")
    if not lo <= hi:
        raise ValueError(f"{name}: expected lo <= hi, got ({lo}, {hi})")
    return lo, hi


def check_interval(interval) -> tuple[float, float] | None:
    """A guidance interval: None, or (lo, hi) model times."""
    if interval is None:
        return None
    return check_lo_hi(interval, "interval", "a (lo, hi) pair of model times")


MAX_SEED = 2**63 - 1  # seeds index torch generators and are mixed in int64 arithmetic


def check_seed(seed, name: str = "seed") -> int:
    """One seed: an int (numpy ints too; bools, floats and strings are not seeds) in [0, 2**63 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name}: expected a non-negative int below 2**63, got {seed}")
    return int(seed)


def check_seeds(seeds, batch: int | None = None) -> list[int]:
    """Per-sample seeds: a sequence of ints (or a 1-D integer tensor), ``batch`` of them when given."""
    if isinstance(seeds, torch.Tensor):
        if seeds.ndim != 1 or seeds.dtype == torch.bool or seeds.is_floating_point() or seeds.is_complex():
            raise TypeError(f"seeds: expected a 1-D integer tensor, got shape {tuple(seeds.shape)} {seeds.dtype}")
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise TypeError(f"seeds: expected a sequence of ints, got {type(seeds).__name__}")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer))]
    if bad:
        raise TypeError(f"seeds: expected a sequence of ints, got {type(bad[0]).__name__} {bad[0]!r}")
    seeds = [int(s) for s in seeds]
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds: expected non-negative ints below 2**63, got {[s for s in seeds if not 0 <= s <= MAX_SEED][:3]}")
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"seeds: expected {batch} seeds (one per sample), got {len(seeds)}")
    return seeds


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """A tensor shape: a sequence of positive ints."""
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"{name}: expected a tuple of ints, got {shape!r}")
    dims = tuple(shape)
    if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
        raise ValueError(f"{name}: expected positive ints, got {dims!r}")
    return tuple(int(d) for d in dims)


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
    if isinstance(cond, (str, bytes)):
        raise TypeError(f"cond: expected a [B] tensor of labels, got {type(cond).__name__}")
    if not isinstance(cond, torch.Tensor):
        try:
            cond = torch.as_tensor(cond)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"cond: expected a [B] tensor of labels, got {type(cond).__name__}") from None
    if cond.ndim == 0 or cond.shape[0] != batch:
        raise ValueError(f"cond: expected {batch} conditions (the noise batch), got shape {tuple(cond.shape)}")
    if cond.dtype == torch.bool or cond.is_complex():
        raise TypeError(f"cond: expected integer labels or float embeddings, got {cond.dtype}")
    if not cond.is_floating_point():
        if cond.ndim != 1:
            raise ValueError(f"cond: integer labels must be 1-D [B], got shape {tuple(cond.shape)}")
        cond = cond.long()
    return cond.to(device)


def check_label_range(cond: torch.Tensor, num_classes: int, null_cond=None) -> None:
    """Integer labels lie in the model's classes [0, num_classes) (or are its null label)."""
    low, high = torch.aminmax(cond)
    if int(low) >= 0 and int(high) < num_classes:
        return
    outside = (cond < 0) | (cond >= num_classes)
    if isinstance(null_cond, int) and not isinstance(null_cond, bool):
        outside &= cond != null_cond
    bad = cond[outside]
    if bad.numel():
        null = f" or the null label {null_cond}" if isinstance(null_cond, int) else ""
        raise ValueError(f"cond: labels {bad[:5].tolist()} are outside the model's classes [0, {num_classes}){null}")


def check_model_output(out, inp: torch.Tensor, step: int | None = None) -> None:
    """The model returned one tensor shaped like its input (``step``: where, for the message)."""
    where = "" if step is None else f" at step {step}"
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected a tensor output, got {type(out).__name__}{where}")
    if out.shape != inp.shape:
        raise ValueError(f"model: output shape {tuple(out.shape)} != input shape {tuple(inp.shape)}{where} "
                         "(a learned-sigma model needs an adapter that returns the eps half)")


def count_non_finite(t: torch.Tensor) -> int:
    """How many entries of a tensor are NaN or inf (0 for integer tensors)."""
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
