"""PLMS (the linear multistep half of PNDM, Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as
diffusers' PNDMScheduler runs it with ``skip_prk_steps=True`` (Stable Diffusion's shipped configuration).

Every step applies the same transfer x_prev = c_s x - c_m eps' (PNDM's eq. 11) to a combination eps' of the
model outputs seen so far: the first step uses e_0; the second re-runs the first interval from its start with
(e_0 + e_1) / 2 (a Heun-like warm-up, so ``steps`` intervals cost ``steps + 1`` evaluations); then
Adams-Bashforth of orders 2, 3 and 4 over the stored outputs (e_1 is not stored, as in diffusers). The stored
outputs and the first state live in history slots, assigned here so that at most 3 are live.
"""
from __future__ import annotations

import numpy as np
import torch

from fastguide.checks import check_int
from fastguide.kernels.reference import NUM_COEF
from fastguide.schedule import (NoiseSchedule, check_scheduler_keys, config_items, config_value,
                                schedule_from_scheduler_config)
from fastguide.solvers import History, Plan, check_schedule, coef_row, vp_score_scale

SPACINGS = ("linspace", "leading", "trailing")
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
SLOTS = 3


class PLMS:
    """PLMS over ``steps`` intervals (``steps + 1`` evaluations, ``plan.steps``), eps or v prediction."""

    def __init__(self, schedule: NoiseSchedule, steps: int, spacing: str = "leading", steps_offset: int = 0,
                 set_alpha_to_one: bool = False, prediction_type: str | None = None):
        check_schedule(schedule, steps)
        if steps < 2:
            raise ValueError(f"steps: PLMS needs at least 2 intervals, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
        if not isinstance(set_alpha_to_one, bool):
            raise TypeError(f"set_alpha_to_one: expected True or False, got {set_alpha_to_one!r}")
        pred = schedule.prediction_type if prediction_type is None else prediction_type
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type: PLMS takes epsilon or v_prediction, got {pred!r}")
        self.schedule, self.steps = schedule, steps
        train = plms_grid(schedule.num_train_timesteps, steps, spacing, check_int(steps_offset, "steps_offset", 0))
        abar = schedule.alphas_cumprod.float()
        final = torch.tensor(1.0) if set_alpha_to_one else abar[0]
        ratio = schedule.num_train_timesteps // steps
        times, coef, weights, slots, writes = [], [], [], [], []
        ets: list[int] = []  # history slots of the stored outputs, oldest first
        where: dict[str, int] = {}
        for n, t in enumerate(train):
            t, prev = int(t), int(t) - ratio
            if n == 1:  # re-run the first interval from its start with (e_0 + e_1) / 2
                t, prev = t + ratio, t
            a_t, a_p = abar[t], (abar[prev] if prev >= 0 else final)
            c_s, c_m = _transfer(a_t, a_p)
            # eps' = sum over (m, stored outputs) with weights; the sample is x, or the first state at n = 1
            if n == 1:
                mix, sample = {"m": 0.5, ets[-1]: 0.5}, where["x0"]
            else:
                ab = ADAMS_BASHFORTH[len(ets) + 1]
                mix, sample = {"m": ab[0], **{ets[-k]: ab[k] for k in range(1, len(ab))}}, None
            c_x = c_s
            if pred == "v_prediction":  # eps = sqrt(a_t) v + sqrt(1 - a_t) sample
                sa, sb = float(a_t.sqrt()), float((1 - a_t).sqrt())
                mix = {k: sa * v for k, v in mix.items()}
                c_x = c_s - c_m * sb
            row_x, row_m = (0.0 if sample is not None else c_x), -c_m * mix.pop("m")
            w = [0.0] * SLOTS
            for slot, v in mix.items():
                w[slot] -= c_m * v
            if sample is not None:
                w[sample] += c_x
            new = []  # this step's writes: (slot, [cx, cm, slots...])
            if n == 0:
                where["x0"] = 0
                new = [(0, [1.0, 0.0] + [0.0] * SLOTS), (1, [0.0, 1.0] + [0.0] * SLOTS)]
                ets = [1]
            elif n >= 2:
                ets = ets[-3:]
                live = set(ets[-2:]) if len(ets) == 3 else set(ets)
                free = next(s for s in range(SLOTS) if s not in live)
                new = [(free, [0.0, 1.0] + [0.0] * SLOTS)]
                ets = ets + [free]
                if len(ets) > 3:
                    ets = ets[-3:]
            while len(new) < 2:  # a step that writes less rewrites a slot it does not write with itself
                keep = next(j for j in range(SLOTS) if j not in {slot for slot, _ in new})
                new.append((keep, [0.0, 0.0] + [1.0 if j == keep else 0.0 for j in range(SLOTS)]))
            times.append(float(train[n]))
            coef.append(coef_row(A=row_x, B=row_m))
            weights.append(w)
            slots.append([s for s, _ in new])
            writes.append([c for _, c in new])
        history = History(torch.tensor(weights, dtype=torch.float64), torch.tensor(slots, dtype=torch.int64),
                          torch.tensor(writes, dtype=torch.float64))
        coef_t = torch.tensor(coef, dtype=torch.float64).reshape(-1, NUM_COEF)
        abar64 = schedule.alphas_cumprod
        score_scale = torch.tensor([vp_score_scale(float(abar64[int(t)]), pred) for t in train], dtype=torch.float64)
        self.plan = Plan(torch.tensor(times, dtype=torch.float64), coef_t, score_scale, None, pred, "discrete", schedule,
                         history)

    @classmethod
    def from_diffusers(cls, config, steps: int) -> "PLMS":
        """From a PNDMScheduler config with ``skip_prk_steps=True``."""
        cfg = config_items(config)
        check_scheduler_keys(cfg, "PNDMScheduler", "PLMS", {"skip_prk_steps", "set_alpha_to_one"})
        if not config_value(cfg, "skip_prk_steps", bool, False):
            raise ValueError("config: skip_prk_steps=False (PNDM's Runge-Kutta warm-up) is not supported; fastguide "
                             "steps PLMS, the skip_prk_steps=True configuration Stable Diffusion ships")
        schedule = schedule_from_scheduler_config(cfg, "leading")
        return cls(schedule, steps, spacing=schedule.timestep_spacing, steps_offset=schedule.steps_offset,
                   set_alpha_to_one=config_value(cfg, "set_alpha_to_one", bool, False),
                   prediction_type=schedule.prediction_type)

    def __repr__(self):
        return f"PLMS(steps={self.steps}, evaluations={self.plan.steps})"




def _transfer(a_t: torch.Tensor, a_p: torch.Tensor) -> tuple[float, float]:
    """(c_s, c_m) of x_prev = c_s x - c_m eps, with diffusers' float32 intermediate roundings."""
    c_s = (a_p / a_t) ** 0.5
    den = a_t * (1 - a_p) ** 0.5 + (a_t * (1 - a_t) * a_p) ** 0.5
    return float(c_s), float(a_p - a_t) / float(den)


def plms_grid(num_train: int, steps: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The steps + 1 model times of PLMS: the spacing's timesteps, the second one repeated, as diffusers orders
    them (high to low)."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (num_train // steps)).round().astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(num_train, 0, -num_train / steps))[::-1].astype(np.int64) - 1
    if ts.min() < 0 or ts.max() > num_train - 1:
        raise ValueError(f"steps_offset: {steps_offset} pushes timesteps outside [0, {num_train - 1}]")
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
