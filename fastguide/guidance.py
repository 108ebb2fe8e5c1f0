"""Guidance rules as data: per-step, per-sample g1 and the source of g0 (scalar 1 - g1, or a ratio-table row).

    CFG:    m = g1 * m_c + (1 - g1) * m_u                 (g1 = g = 1 + w)
    ReCFG:  m = g1 * m_c + (1 - g1) * R[c, t] * m_u       (element-wise, arXiv 2410.18737)
    Classifier guidance: eps = eps_c - s * sqrt(1 - abar_t) * grad_x log p(y | x_t)   (a model wrapper)

A guidance interval (lo, hi) applies the rule only at steps whose model time t lies in [lo, hi];
elsewhere the step is purely conditional (g1 = 1, and the sampler runs only the B conditional rows).

Every rule answers ``prepare(plan, cond, latent_shape) -> StepGuidance`` (what one sampling call needs) and
``wrap_model(model, plan, null_cond)`` (the model the loop calls: the model itself, except for rules that
change the model output themselves, as classifier guidance does, k-diffusion style).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from fastguide.checks import check_interval, check_model_output, check_scale
from fastguide.conditions import null_batch
from fastguide.kernels.reference import compute_dtype_for
from fastguide.table import RatioTable


@dataclass
class StepGuidance:
    """What the sampler gets from a rule for one sampling call (host tensors; the sampler moves them)."""

    g1: torch.Tensor  # [S, B] float64
    guided: tuple[bool, ...] | list[bool]  # [S] run the unconditional half at this step?
    table: torch.Tensor | None = None  # [K, T, *shape]
    rows: torch.Tensor | None = None  # [B] int64
    table_steps: torch.Tensor | None = None  # [S, 2] int64: the table rows (i0, i1) around each step's time
    table_w: torch.Tensor | None = None  # [S] float64: the lerp weight between them (0 on grid points)


class GuidanceRule:
    """What every rule shares: ``needs_null`` (the sampler needs a null condition), ``traceable`` (the loop
    may compile the hot step and capture it: no autograd inside), and the identity :meth:`wrap_model`."""

    needs_null = True
    traceable = True
    interval = None

    def wrap_model(self, model, plan, null_cond):
        return model

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        raise NotImplementedError


class NoGuidance(GuidanceRule):
    """The conditional model alone: B rows a step, no null half (what ``Sampler(model, solver)`` runs)."""

    needs_null = False

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        return StepGuidance(torch.ones(plan.steps, cond.shape[0], dtype=torch.float64), (False,) * plan.steps)

    def __repr__(self):
        return "NoGuidance()"


class CFG(GuidanceRule):
    """Classifier-free guidance ``m = m_u + g (m_c - m_u)``; ``CFG.from_w(w)`` is the ``(1 + w) m_c - w m_u`` spelling."""

    def __init__(self, scale=4.0, interval=None):
        self.scale = check_scale(scale)
        self.interval = check_interval(interval)

    @classmethod
    def from_w(cls, w, interval=None):
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            return cls(1.0 + w, interval)
        return cls(check_scale(w + 1.0 if isinstance(w, torch.Tensor) else w), interval)

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
        if not any(guided):
            lo, hi = self.interval
            raise ValueError(f"interval: [{lo:g}, {hi:g}] contains no step of the plan, whose model times run from "
                             f"{float(timesteps.min()):g} to {float(timesteps.max()):g}")
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


class ClassifierGuidance(GuidanceRule):
    """``m = m_c - scale * k_t * grad log p(y | x_t)`` (Dhariwal & Nichol 2021), the gradient taken with respect to
    what the model reads and ``k_t`` the plan's ``score_scale``: sqrt(1 - abar_t) for a VP eps model (their
    rule), and the equivalent for v / sample prediction and sigma-space and EDM plans (the same added score).

    ``classifier(x_t, t) -> logits [B, K]`` reads what the model reads. The model runs on the B conditional rows
    only; with ``use_null_cond=True`` it runs with the null condition instead (classifier guidance of an
    unconditional model). Every diffusion solver takes it; flow-matching plans (no score scale at sigma = 1) do
    not. The gradient needs autograd, so the loop runs it eagerly (no compiled hot step, no CUDA graph).
    """

    traceable = False

    def __init__(self, classifier, scale=1.0, use_null_cond: bool = False):
        if not callable(classifier):
            raise TypeError("classifier: expected a callable classifier(x_t, t) -> logits [B, K]")
        self.classifier, self.scale, self.use_null_cond = classifier, check_scale(scale), bool(use_null_cond)

    @property
    def needs_null(self) -> bool:
        return self.use_null_cond

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        if not bool(torch.isfinite(plan.score_scale).all()):
            raise ValueError(f"guidance: ClassifierGuidance needs a diffusion solver's plan (a finite score scale at "
                             f"every step); this {plan.kind} / {plan.prediction_type} plan has none at some step (flow "
                             "matching, or v / sample prediction at zero terminal SNR)")
        if cond.ndim != 1 or cond.is_floating_point():
            raise TypeError("cond: ClassifierGuidance needs integer class labels [B]")
        return StepGuidance(torch.ones(plan.steps, cond.shape[0], dtype=torch.float64), (False,) * plan.steps)

    def wrap_model(self, model, plan, null_cond):
        return ClassifierGuidedModel(model, self.classifier, self.scale, plan.timesteps, plan.score_scale,
                                     null_cond if self.use_null_cond else None)

    def __repr__(self):
        return f"ClassifierGuidance(scale={self.scale})"


class ClassifierGuidedModel:
    """``model`` with the classifier's gradient folded into its output; ``model_times`` / ``score_scales`` [S]:
    the plan's model times and its score scale at each (so fractional times of sigma-space plans get the plan's
    own); ``null_cond``: run the model with the null condition, the classifier with the labels."""

    def __init__(self, model, classifier, scale, model_times: torch.Tensor, score_scales: torch.Tensor,
                 null_cond=None):
        self.model, self.classifier, self.scale, self.null_cond = model, classifier, scale, null_cond
        self.model_times, self.score_scales = model_times.double(), score_scales.double()

    def score_scale(self, t: torch.Tensor) -> torch.Tensor:
        """k [B] float64 at each row's model time (one of the plan's)."""
        hit = t.detach().double().cpu()[:, None] == self.model_times[None, :]
        if not bool(hit.any(1).all()):
            raise ValueError(f"t: ClassifierGuidance got a model time outside its plan: {t.tolist()}")
        return self.score_scales[hit.double().argmax(1)]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        m = self.model(x, t, cond if self.null_cond is None else null_batch(self.null_cond, cond))
        check_model_output(m, x)
        # The classifier runs in float32; the update in the step's compute dtype, so a float64 run stays float64
        # (and scale 0 leaves the output untouched).
        cdt = compute_dtype_for(m.dtype)
        bcast = (-1, *([1] * (x.ndim - 1)))
        k = self.score_scale(t).to(x.device).view(bcast)
        if isinstance(self.scale, torch.Tensor):
            factor = self.scale.to(x.device, cdt).view(bcast) * k.to(cdt)
        else:
            factor = (self.scale * k).to(cdt)
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logp = torch.log_softmax(self.classifier(xg, t).float(), dim=-1)
            (grad,) = torch.autograd.grad(logp.gather(1, cond.view(-1, 1).long()).sum(), xg)
        return (m.to(cdt) - factor * grad.to(cdt)).to(m.dtype)


def check_guidance(guidance, null_cond) -> GuidanceRule:
    """A guidance rule whose null condition (if it needs one) the sampler has."""
    if not isinstance(guidance, GuidanceRule):
        raise TypeError(f"guidance: expected CFG, ReCFG or ClassifierGuidance, got {type(guidance).__name__}")
    if guidance.needs_null and null_cond is None:
        raise ValueError(f"null_cond: {type(guidance).__name__} needs the unconditional (null) condition")
    return guidance


def with_scale(guidance: GuidanceRule, scale) -> GuidanceRule:
    """A shallow copy of a rule with another scale (validated like the constructor's)."""
    if not hasattr(guidance, "scale"):
        raise ValueError(f"scale: {type(guidance).__name__} has no scale to override")
    g = copy.copy(guidance)
    g.scale = check_scale(scale)
    return g
