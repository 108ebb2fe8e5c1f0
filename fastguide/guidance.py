"""Guidance rules as data: per-step, per-sample g1 and the source of g0 (scalar 1 - g1, or a ratio-table row).

    CFG:    m = g1 * m_c + (1 - g1) * m_u                 (g1 = g = 1 + w)
    ReCFG:  m = g1 * m_c + (1 - g1) * R[c, t] * m_u       (element-wise, arXiv 2410.18737)
    CFGZeroStar, APG, CFG(rescale=phi): per-sample reductions (kernels/reference.py: reduced_guidance)
    Classifier guidance: eps = eps_c - s * sqrt(1 - abar_t) * grad_x log p(y | x_t)   (a model wrapper)

Every CFG-family rule takes a scale schedule over the steps, an interval, ``rescale`` and a second (guide)
network for the unconditional half.

A guidance interval (lo, hi) applies the rule only at steps whose model time t lies in [lo, hi];
elsewhere the step is purely conditional (g1 = 1, and the sampler runs only the B conditional rows).

Every rule answers ``prepare(plan, cond, latent_shape) -> StepGuidance`` (what one sampling call needs) and
``wrap_model(model, plan, null_cond)`` (the model the loop calls: the model itself, except for rules that
change the model output themselves, as classifier guidance does, k-diffusion style).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch

from fastguide.checks import check_choices, check_in_range, check_int, check_interval, check_model_output, check_scale
from fastguide.conditions import null_batch
from fastguide.kernels.reference import NUM_RULE_PARAMS, RuleParam, compute_dtype_for
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
    rule_params: torch.Tensor | None = None  # [NUM_RULE_PARAMS] float64: a rule with per-sample reductions
    rule_state: bool = False  # the rule carries a [B, *shape] state across steps (APG's momentum)
    model_free: tuple[bool, ...] | None = None  # [S] steps that run no network (m = 0: CFG-Zero*'s zero-init)


class GuidanceRule:
    """What every rule shares: ``needs_null`` (the sampler needs a null condition), ``traceable`` (the loop
    may compile the hot step and capture it: no autograd inside), and the identity :meth:`wrap_model`."""

    needs_null = True
    traceable = True
    interval = None

    def wrap_model(self, model, plan, null_cond, *, cond_first: bool = True, batch: int | None = None):
        """The forward the loop calls (``batch``: the call's B; 2B-row steps carry the null half)."""
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


DEFAULT_SCALE = 4.0
SCHEDULES = ("constant", "linear", "cosine", "linear-decreasing", "cosine-decreasing")


def schedule_shape(name: str, steps: int) -> torch.Tensor:
    """[S] float64 multipliers of the guidance strength w = g - 1 over the plan's steps for a named schedule
    (Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight Schedulers"), each with mean 1 over the steps
    (the static scale's average guidance). ``r`` runs 0 -> 1 over the steps (r = 1 - t / T): the increasing
    schedules start at g = 1 (their first step runs no null half) and the decreasing ones end there."""
    check_choices(("schedule", name, SCHEDULES))
    r = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.full((1,), 0.5, dtype=torch.float64)
    shapes = {"constant": lambda: torch.ones_like(r), "linear": lambda: 2 * r, "linear-decreasing": lambda: 2 * (1 - r),
              "cosine": lambda: 1 - torch.cos(math.pi * r), "cosine-decreasing": lambda: 1 + torch.cos(math.pi * r)}
    return shapes[name]()


@dataclass(frozen=True)
class GuideNetwork:
    """A second network that gives the guided step its "unconditional" half (AutoGuidance, Karras et al. 2024):
    ``model(x, t, cond)`` of the main model's contract and output shape, typically a smaller or less trained
    version of it. ``conditional``: it reads the samples' conditions (AutoGuidance); False: the null condition
    (a separate unconditional network)."""

    model: Callable
    conditional: bool = True

    def __post_init__(self):
        if not callable(self.model):
            raise TypeError(f"guide: expected a callable guide network model(x, t, cond), got {type(self.model).__name__}")


def check_guide(guide) -> GuideNetwork | None:
    if guide is None or isinstance(guide, GuideNetwork):
        return guide
    if callable(guide):
        return GuideNetwork(guide)
    raise TypeError(f"guide: expected a GuideNetwork or a callable model(x, t, cond), got {type(guide).__name__}")


class CFG(GuidanceRule):
    """Classifier-free guidance ``m = m_u + g (m_c - m_u)``; ``CFG.from_w(w)`` is the ``(1 + w) m_c - w m_u`` spelling.

    ``scale``: g, a float or a [B] tensor (one per sample). ``interval`` (lo, hi): guide only at steps whose
    model time lies in it. ``rescale``: guidance_rescale phi in [0, 1] (Lin et al. 2023: m is mixed with
    m std(m_c) / std(m), per sample). ``schedule``: the scale over the steps: a name in :data:`SCHEDULES` (the
    strength g - 1 shaped over the steps, mean ``scale - 1``), or the scale itself at every step: a [S] or
    [S, B] tensor or a callable ``schedule(step, t) -> float | [B] tensor`` (then ``scale`` is not given).
    ``guide``: a :class:`GuideNetwork` (or a callable) that computes the unconditional half instead of the model.
    Steps where every sample's scale is 1 run the conditional rows only.
    """

    def __init__(self, scale=None, interval=None, *, rescale=0.0, schedule=None, guide=None):
        self.schedule = check_schedule(schedule)
        explicit = self.schedule is not None and not isinstance(self.schedule, str)
        if explicit and scale is not None:
            raise ValueError("scale: this rule's schedule gives the scale at every step; pass one or the other")
        self.scale = None if explicit else check_scale(DEFAULT_SCALE if scale is None else scale)
        self.interval = check_interval(interval)
        self.rescale = check_in_range(rescale, "rescale", 0.0, 1.0)
        self.guide = check_guide(guide)

    @classmethod
    def from_w(cls, w, interval=None, **kw):
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            return cls(1.0 + w, interval, **kw)
        return cls(check_scale(w + 1.0 if isinstance(w, torch.Tensor) else w), interval, **kw)

    @property
    def needs_null(self) -> bool:
        return self.guide is None or not self.guide.conditional

    def wrap_model(self, model, plan, null_cond, *, cond_first: bool = True, batch: int | None = None):
        if self.guide is None:
            return model
        if batch is None:
            raise ValueError("batch: guidance by a guide network needs the call's batch to split the forward")
        return PairedNetworks(model, self.guide.model, self.guide.conditional, cond_first, batch)

    def _g1(self, timesteps: torch.Tensor, batch: int):
        """([S, B] float64 g1, [S] guided flags). A float scale's result is kept for the next call with the
        same scale, interval, schedule name, timesteps and batch (the sampler then skips re-uploading it)."""
        memo_ok = isinstance(self.scale, float) and (self.schedule is None or isinstance(self.schedule, str))
        key = (self.scale, self.interval, self.schedule, batch) if memo_ok else None
        memo = self.__dict__.get("_g1_memo")
        if key is not None and memo is not None and memo[0] == key and memo[1] is timesteps:
            return memo[2]
        result = self._compute_g1(timesteps, batch)
        if key is not None:
            self._g1_memo = (key, timesteps, result)
        return result

    def scales(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        """[S, B] float64: the guidance scale of every step and sample, before the interval."""
        steps = len(timesteps)
        if self.schedule is not None and not isinstance(self.schedule, str):
            return _explicit_schedule(self.schedule, timesteps, batch)
        if isinstance(self.scale, torch.Tensor):
            if self.scale.numel() != batch:
                raise ValueError(f"scale: expected {batch} per-sample values (the batch), got {self.scale.numel()}")
            g = self.scale.view(1, batch)
        else:
            g = torch.full((1, batch), self.scale, dtype=torch.float64)
        if self.schedule is None or self.schedule == "constant":
            return g.expand(steps, batch)
        return 1 + (g - 1) * schedule_shape(self.schedule, steps).view(steps, 1)

    def _compute_g1(self, timesteps: torch.Tensor, batch: int):
        g = self.scales(timesteps, batch)
        in_interval = self.guided_steps(timesteps)
        if not any(in_interval):
            lo, hi = self.interval
            raise ValueError(f"interval: [{lo:g}, {hi:g}] contains no step of the plan, whose model times run from "
                             f"{float(timesteps.min()):g} to {float(timesteps.max()):g}")
        if all(in_interval):
            g1 = g.clone(memory_format=torch.contiguous_format)  # never the caller's schedule tensor itself
        else:
            g1 = torch.where(torch.tensor(in_interval).view(-1, 1), g, torch.ones(1, 1, dtype=torch.float64))
        return g1, tuple((g1 != 1).any(1).tolist())

    def guided_steps(self, timesteps: torch.Tensor) -> list[bool]:
        """Which steps lie in the guidance interval (every step without one)."""
        if self.interval is None:
            return [True] * len(timesteps)
        lo, hi = self.interval
        return [bool(lo <= float(t) <= hi) for t in timesteps]

    def rule_params(self) -> torch.Tensor | None:
        """[NUM_RULE_PARAMS] float64 (the columns of RuleParam) when the rule needs per-sample reductions."""
        if self.rescale == 0:
            return None
        return make_rule_params(rescale=self.rescale)

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        return StepGuidance(g1, guided, rule_params=self.rule_params())

    def _options(self) -> str:
        parts = [f"interval={self.interval}"] if self.interval is not None else []
        parts += [f"rescale={self.rescale}"] if self.rescale else []
        parts += [f"schedule={self.schedule!r}"] if isinstance(self.schedule, str) else (
            ["schedule=<explicit>"] if self.schedule is not None else [])
        parts += ["guide=GuideNetwork"] if self.guide is not None else []
        return "".join(", " + p for p in parts)

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale}{self._options()})"


def make_rule_params(zero_star=False, eta=1.0, norm_threshold=0.0, momentum=0.0, rescale=0.0) -> torch.Tensor:
    """[NUM_RULE_PARAMS] float64 in RuleParam order; the defaults are plain CFG."""
    values = [0.0] * NUM_RULE_PARAMS
    values[RuleParam.ZERO_STAR] = float(zero_star)
    values[RuleParam.ETA] = eta
    values[RuleParam.NORM_THRESHOLD] = norm_threshold
    values[RuleParam.MOMENTUM] = momentum
    values[RuleParam.RESCALE] = rescale
    return torch.tensor(values, dtype=torch.float64)  # one op (five item writes cost ~10 us a sampling call)


def check_schedule(schedule):
    """None, a name in SCHEDULES, a [S] / [S, B] tensor of scales, or a callable (step, t) -> scale."""
    if schedule is None or callable(schedule):
        return schedule
    if isinstance(schedule, str):
        check_choices(("schedule", schedule, SCHEDULES))
        return schedule
    if isinstance(schedule, torch.Tensor):
        if schedule.ndim not in (1, 2) or not (schedule.is_floating_point() or schedule.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"schedule: expected a [S] or [S, B] tensor of scales, got shape {tuple(schedule.shape)} "
                             f"{schedule.dtype}")
        s = schedule.detach().double().cpu()
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise ValueError("schedule: expected finite scales >= 0")
        return s
    raise TypeError(f"schedule: expected a name in {SCHEDULES}, a [S] or [S, B] tensor or a callable (step, t) -> "
                    f"scale, got {type(schedule).__name__}")


def _explicit_schedule(schedule, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    steps = len(timesteps)
    if isinstance(schedule, torch.Tensor):
        if schedule.shape[0] != steps or (schedule.ndim == 2 and schedule.shape[1] != batch):
            want = f"[{steps}] or [{steps}, {batch}]"
            raise ValueError(f"schedule: expected {want} scales (one per step of the plan, optionally per sample), "
                             f"got shape {tuple(schedule.shape)}")
        return schedule.view(steps, 1).expand(steps, batch) if schedule.ndim == 1 else schedule
    rows = []
    for i, t in enumerate(timesteps.tolist()):
        g = check_scale(schedule(i, t), f"schedule({i}, {t:g})")
        if isinstance(g, torch.Tensor) and g.numel() != batch:
            raise ValueError(f"schedule({i}, {t:g}): expected a float or {batch} per-sample scales, got {g.numel()}")
        rows.append(g.view(batch) if isinstance(g, torch.Tensor) else torch.full((batch,), g, dtype=torch.float64))
    return torch.stack(rows)


class PairedNetworks:
    """The batched forward of guidance by a second network: on 2B-row calls the conditional rows through
    ``model`` and the others through ``guide`` (with the samples' conditions when ``conditional``, else the null
    condition); with ``batch`` B, B-row calls (sampling steps without a null half) run ``model`` alone, and
    without it every call carries both halves (a ratio-table build: ``accumulate_ratio_sums(PairedNetworks(model,
    guide, True, cond_first=True), ...)`` estimates ReCFG's ratio between the two networks' outputs)."""

    def __init__(self, model, guide, conditional: bool, cond_first: bool = True, batch: int | None = None):
        self.model, self.guide, self.conditional, self.cond_first, self.batch = model, guide, conditional, cond_first, batch

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = n // 2 if self.batch is None else self.batch
        if n != 2 * batch:
            if self.batch is None:
                raise ValueError(f"x: a paired forward without a batch needs both halves (an even row count), got {n}")
            return self.model(x, t, cond)
        c, g = (slice(0, batch), slice(batch, n)) if self.cond_first else (slice(batch, n), slice(0, batch))
        out_c = self.model(x[c], t[c], cond[c])
        out_g = self.guide(x[g], t[g], cond[c] if self.conditional else cond[g])
        if not isinstance(out_g, torch.Tensor) or out_g.shape != out_c.shape:
            shape = tuple(out_g.shape) if isinstance(out_g, torch.Tensor) else type(out_g).__name__
            raise ValueError(f"guide: the guide network's output is {shape}; expected the model's {tuple(out_c.shape)}")
        out_g = out_g.to(out_c.dtype)
        return torch.cat([out_c, out_g] if self.cond_first else [out_g, out_c])


class ReCFG(CFG):
    """Rectified CFG: ``m = g1 m_c + (1 - g1) R[c, t] m_u`` with R from a ratio table.

    ``table``: a :class:`fastguide.RatioTable`, or a tensor [K, S, *latent_shape] whose last row is the
    mean row and whose S rows are the solver's steps. ``unknown_label='mean'`` sends labels outside the
    table to the mean row instead of raising. ``out_of_range='clamp'`` uses the nearest grid row for
    sampler timesteps outside the table's grid instead of raising.
    """

    def __init__(self, scale=None, table=None, interval=None, unknown_label: str = "error",
                 out_of_range: str = "error", *, rescale=0.0, schedule=None, guide=None):
        super().__init__(scale, interval, rescale=rescale, schedule=schedule, guide=guide)
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
        built_for = self.table.metadata.get("noising")
        if built_for is not None and (built_for == "flow") != (plan.kind == "flow"):
            raise ValueError(f"table: built with {built_for} noising (a {'flow' if built_for == 'flow' else 'diffusion'}"
                             f" model's table), but the solver's plan is {plan.kind}; rebuild it for this model")
        if plan.schedule is not None and "schedule_fingerprint" in self.table.metadata:
            self.table.check_compatible(schedule=plan.schedule)
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        steps, w = self.table.step_rows(plan.timesteps, self.out_of_range)
        rows = self.table.rows_for(cond, self.unknown_label)
        return StepGuidance(g1, guided, self.table.ratios, rows, steps, w, rule_params=self.rule_params())


class CFGZeroStar(CFG):
    """CFG-Zero* (Fan et al. 2025): ``m = alpha m_u + g (m_c - alpha m_u)`` with the per-sample, per-step
    ``alpha = <m_c, m_u> / |m_u|^2`` (the least-squares scale of m_u towards m_c: an online, per-sample, scalar
    cousin of ReCFG's ratio), and m = 0 at the first ``zero_init_steps`` steps, which run no network at all.
    As diffusers' ClassifierFreeZeroStarGuidance; the other options as :class:`CFG`'s.

    Zero-init is the paper's rule for flow-matching velocities (v = 0 keeps x where it is); ``None`` (the default)
    means 1 step for flow, v, sample and denoiser predictions and 0 for epsilon prediction, where m = 0 reads as
    x0 = x / sqrt(abar_t) and blows the first step up (at t near T, by 1 / sqrt(abar_T)). Asking for zero-init
    steps with an epsilon plan is refused."""

    def __init__(self, scale=None, zero_init_steps: int | None = None, interval=None, *, rescale=0.0, schedule=None,
                 guide=None):
        super().__init__(scale, interval, rescale=rescale, schedule=schedule, guide=guide)
        self.zero_init_steps = None if zero_init_steps is None else check_int(zero_init_steps, "zero_init_steps", low=0)

    def rule_params(self) -> torch.Tensor:
        return make_rule_params(zero_star=True, rescale=self.rescale)

    def zero_init_for(self, plan) -> int:
        """The zero-init steps this rule runs with ``plan``."""
        eps = plan.kind != "flow" and plan.prediction_type == "epsilon"
        if self.zero_init_steps is None:
            return 0 if eps else 1
        if eps and self.zero_init_steps > 0:
            raise ValueError(f"zero_init_steps: {self.zero_init_steps} zero-init steps with an epsilon-prediction plan: "
                             "m = 0 there means x0 = x / sqrt(abar_t), which blows the first step up; zero-init is "
                             "for flow-matching velocities (and v / sample / denoiser outputs). Pass zero_init_steps=0")
        if self.zero_init_steps >= plan.steps:
            raise ValueError(f"zero_init_steps: {self.zero_init_steps} zero-init steps leave none of the plan's "
                             f"{plan.steps} steps to sample; expected fewer")
        return self.zero_init_steps

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        k = self.zero_init_for(plan)
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        free = tuple(i < k for i in range(plan.steps))
        guided = tuple(gd and not f for gd, f in zip(guided, free))
        return StepGuidance(g1, guided, rule_params=self.rule_params(), model_free=free if k else None)

    def _options(self) -> str:
        return f", zero_init_steps={self.zero_init_steps}" + super()._options()


class APG(CFG):
    """Adaptive projected guidance (Sadat et al. 2024), as diffusers' AdaptiveProjectedGuidance: the guidance
    direction D = m_c - m_u (with ``momentum`` beta: D = m_c - m_u + beta D_prev, a running average carried across
    the guided steps), its norm capped at ``norm_threshold`` (0: no cap), and its part parallel to m_c weighted by
    ``eta``: ``m = m_u + g (D_orth + eta D_par)``. eta = 1 with no cap and no momentum is CFG. Norms and the
    projection are per sample. The other options as :class:`CFG`'s."""

    def __init__(self, scale=None, eta: float = 1.0, norm_threshold: float = 15.0, momentum: float = 0.0,
                 interval=None, *, rescale=0.0, schedule=None, guide=None):
        super().__init__(scale, interval, rescale=rescale, schedule=schedule, guide=guide)
        self.eta = check_in_range(eta, "eta", 0.0)
        self.norm_threshold = check_in_range(norm_threshold, "norm_threshold", 0.0)
        # |beta| >= 1 makes the running average grow without bound
        self.momentum = check_in_range(momentum, "momentum", -1.0, 1.0, open_low=True, open_high=True)

    def rule_params(self) -> torch.Tensor:
        return make_rule_params(eta=self.eta, norm_threshold=self.norm_threshold, momentum=self.momentum,
                                rescale=self.rescale)

    def prepare(self, plan, cond: torch.Tensor, latent_shape) -> StepGuidance:
        g1, guided = self._g1(plan.timesteps, cond.shape[0])
        return StepGuidance(g1, guided, rule_params=self.rule_params(), rule_state=self.momentum != 0)

    def _options(self) -> str:
        return f", eta={self.eta}, norm_threshold={self.norm_threshold}, momentum={self.momentum}" + super()._options()


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

    def wrap_model(self, model, plan, null_cond, *, cond_first: bool = True, batch: int | None = None):
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
        raise TypeError(f"guidance: expected a fastguide guidance rule (CFG, ReCFG, CFGZeroStar, APG, "
                        f"ClassifierGuidance), got {type(guidance).__name__}")
    if guidance.needs_null and null_cond is None:
        raise ValueError(f"null_cond: {type(guidance).__name__} needs the unconditional (null) condition")
    return guidance


def with_scale(guidance: GuidanceRule, scale) -> GuidanceRule:
    """A shallow copy of a rule with another scale (validated like the constructor's)."""
    if not hasattr(guidance, "scale"):
        raise ValueError(f"scale: {type(guidance).__name__} has no scale to override")
    if guidance.scale is None:
        raise ValueError(f"scale: this {type(guidance).__name__}'s schedule gives the scale at every step; "
                         "pass another schedule (guidance=...) instead")
    g = copy.copy(guidance)
    g.scale = check_scale(scale)
    return g
