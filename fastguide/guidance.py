"""Guidance rules as data: per-step, per-sample g1 and the source of g0 (scalar 1 - g1, or a ratio-table row).

    CFG:    m = g1 * m_c + (1 - g1) * m_u                 (g1 = g = 1 + w)
    ReCFG:  m = g1 * m_c + (1 - g1) * R[c, t] * m_u       (element-wise, arXiv 2410.18737)
    Classifier guidance: eps = eps_c - s * sqrt(1 - abar_t) * grad_x log p(y | x_t)

A guidance interval (lo, hi) applies the rule only at steps whose model time t lies in [lo, hi];
elsewhere the step is purely conditional (g1 = 1, and the sampler runs only the B conditional rows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastguide.table import RatioTable, check_lo_hi


def _check_scale(scale, name: str = "scale"):
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


def _check_interval(interval):
    if interval is None:
        return None
    return check_lo_hi(interval, "interval", "a (lo, hi) pair of model times")


@dataclass
class StepGuidance:
    """What the sampler gets from a rule for one sampling call (host tensors; the sampler moves them)."""

    g1: torch.Tensor  # [S, B] float64
    guided: tuple[bool, ...] | list[bool]  # [S] run the unconditional half at this step?
    table: torch.Tensor | None = None  # [K, T, *shape]
    rows: torch.Tensor | None = None  # [B] int64
    table_steps: torch.Tensor | None = None  # [S, 2] int64
    table_w: torch.Tensor | None = None  # [S] float64


class CFG:
    """Classifier-free guidance ``m = m_u + g (m_c - m_u)``; ``CFG.from_w(w)`` is the ``(1 + w) m_c - w m_u`` spelling."""

    needs_uncond = True

    def __init__(self, scale=4.0, interval=None):
        self.scale = _check_scale(scale)
        self.interval = _check_interval(interval)

    @classmethod
    def from_w(cls, w, interval=None):
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            return cls(1.0 + w, interval)
        return cls(_check_scale(w + 1.0 if isinstance(w, torch.Tensor) else w), interval)

    def _g1(self, timesteps: torch.Tensor, batch: int):
        """([S, B] float64 g1, [S] guided flags). A float scale's result is kept for the next call with the
        same scale, interval, timesteps and batch (the sampler then skips re-uploading it)."""
        key = None if isinstance(self.scale, torch.Tensor) else (self.scale, self.interval, batch)
        memo = self.__dict__.get("_g1_memo")
        if key is not None and memo is not None and memo[0] == key and memo[1] is timesteps:
            return memo[2]
        result = self._compute_g1(timesteps, batch)
        if key is not None:
            self._g1_memo = (key, timesteps, result)
        return result

    def _compute_g1(self, timesteps: torch.Tensor, batch: int):
        if isinstance(self.scale, torch.Tensor):
            if self.scale.numel() != batch:
                raise ValueError(f"scale: expected {batch} per-sample values (the batch), got {self.scale.numel()}")
            g = self.scale.view(1, batch)
        else:
            g = torch.full((1, batch), self.scale, dtype=torch.float64)
        guided = tuple(self.guided_steps(timesteps))
        if all(guided):
            return g.expand(len(guided), batch), guided
        g1 = torch.where(torch.tensor(guided).view(-1, 1), g, torch.ones(1, 1, dtype=torch.float64))
        return g1, guided

    def guided_steps(self, timesteps: torch.Tensor) -> list[bool]:
        if self.interval is None:
            return [True] * len(timesteps)
        lo, hi = self.interval
        return [bool(lo <= float(t) <= hi) for t in timesteps]

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        return StepGuidance(g1, guided)

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale}, interval={self.interval})"


class ReCFG(CFG):
    """Rectified CFG: ``m = g1 m_c + (1 - g1) R[c, t] m_u`` with R from a ratio table.

    ``table``: a :class:`fastguide.RatioTable`, or a tensor [K, S, *latent_shape] whose last row is the
    mean row and whose S rows are the solver's steps. ``unknown_label='mean'`` sends labels outside the
    table to the mean row instead of raising. ``out_of_range='clamp'`` uses the nearest grid row for
    sampler timesteps outside the table's grid instead of raising.
    """

    def __init__(self, scale=4.0, table=None, interval=None, unknown_label: str = "error",
                 out_of_range: str = "error"):
        super().__init__(scale, interval)
        if table is None:
            raise ValueError("table: ReCFG needs a ratio table (fastguide.RatioTable or a [K, S, C, H, W] tensor)")
        if isinstance(table, torch.Tensor):
            table = RatioTable(table)
        if not isinstance(table, RatioTable):
            raise TypeError(f"table: expected a fastguide.RatioTable or a tensor, got {type(table).__name__}")
        self.table, self.unknown_label, self.out_of_range = table, unknown_label, out_of_range

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        if tuple(latent_shape) != self.table.latent_shape:
            raise ValueError(f"table: ratio table is for latents of shape {self.table.latent_shape}, "
                             f"but noise has shape {tuple(latent_shape)}")
        if cond.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or cond.ndim != 1:
            raise TypeError("cond: ReCFG needs integer condition ids [B] (labels or table condition ids)")
        if plan.schedule is not None and "schedule_fingerprint" in self.table.metadata:
            self.table.check_compatible(schedule=plan.schedule)
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        steps, w = self.table.step_rows(plan.timesteps, self.out_of_range)
        rows = self.table.rows_for(cond, self.unknown_label)
        return StepGuidance(g1, guided, self.table.ratios, rows, steps, w)


class ClassifierGuidance:
    """``eps = eps_c - scale * sqrt(1 - abar_t) * grad_x log p(y | x_t)`` (Dhariwal & Nichol 2021).

    ``classifier(x_t, t) -> logits [B, K]``. The model runs on the B conditional rows only; with
    ``use_null_cond=True`` it runs with the null condition instead (classifier guidance of an
    unconditional model). Needs an epsilon-prediction discrete solver.
    """

    needs_uncond = False

    def __init__(self, classifier, scale=1.0, use_null_cond: bool = False):
        if not callable(classifier):
            raise TypeError("classifier: expected a callable classifier(x_t, t) -> logits [B, K]")
        self.classifier, self.scale, self.use_null_cond = classifier, _check_scale(scale), bool(use_null_cond)
        self.interval = None

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        if plan.kind != "discrete" or plan.prediction_type != "epsilon":
            raise ValueError("guidance: ClassifierGuidance needs an epsilon-prediction DDIM/DDPM solver, got "
                             f"{plan.kind} / {plan.prediction_type}")
        if cond.ndim != 1 or cond.is_floating_point():
            raise TypeError("cond: ClassifierGuidance needs integer class labels [B]")
        return StepGuidance(torch.ones(plan.steps, cond.shape[0], dtype=torch.float64), [False] * plan.steps)

    def guided_eps(self, eps_c: torch.Tensor, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                   eps_scale: float) -> torch.Tensor:
        # The classifier runs in float32; the update runs in the step's compute dtype, so a float64 run stays
        # float64 (and scale 0 leaves eps_c untouched).
        cdt = torch.float64 if eps_c.dtype == torch.float64 else torch.float32
        scale = self.scale if not isinstance(self.scale, torch.Tensor) else \
            self.scale.to(x.device, cdt).view(-1, *([1] * (x.ndim - 1)))
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t).float(), dim=-1)
            sel = logp.gather(1, labels.view(-1, 1).long()).sum()
            (grad,) = torch.autograd.grad(sel, xg)
        return (eps_c.to(cdt) - scale * eps_scale * grad.to(cdt)).to(eps_c.dtype)

    def __repr__(self):
        return f"ClassifierGuidance(scale={self.scale})"
