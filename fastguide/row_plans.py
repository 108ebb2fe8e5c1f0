"""A batch whose rows each run their own plan: requests with different step counts in one loop.

Row b runs its own plan for its n_b steps, then identity steps (x_next = x: A = 1, B = 0, no noise, no history
weight, each history write keeping its slot) up to S = max n_b. Every per-step operand of the loop gains a row
axis (model times [S, B], coefficients [S, B, NUM_COEF], history weights [S, B, K] and writes [S, B, W, 2 + K],
table rows [S, B, 2] and weights [S, B]); the step implementations read them per row (kernels/reference.py:
``per_row_columns``), so one loop of S steps serves every mix of step counts of one solver family, and its row b
gives the same bits as that row's plan run alone through the same step (tested).

The rows' plans must agree on what the loop fixes per call: the kind of model time, the prediction type, the
clip range, the history's slot count and write count, and which slots each step writes (the same solver with
another step count does; DPM-Solver++ with UniPC does not).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastguide.guidance import StepGuidance, with_scale
from fastguide.noise import step_noise
from fastguide.solvers import History, coef_row

IDENTITY_ROW = coef_row(A=1.0, CX=1.0)  # x_next = x in both forms (clip: C0 * clamp(0) + 1 * x)
FAMILY_FIELDS = ("kind", "prediction_type", "clip_range", "history_slots")  # what rows of one loop share


@dataclass(frozen=True, eq=False)
class RowPlans:
    """Per-row plans stacked into one loop of ``steps`` = max n_b steps (float64 on the CPU). Duck-types
    :class:`fastguide.solvers.Plan` for the loop: the same fields with a row axis after the step axis."""

    plans: tuple  # [B] the rows' own solvers.Plan
    timesteps: torch.Tensor  # [S, B] model times (a finished row repeats its last one)
    coef: torch.Tensor  # [S, B, NUM_COEF]
    init_scale: torch.Tensor | float  # [B] x_T = init_scale * noise per row (1.0 when every row's is 1)
    history: History | None  # weights [S, B, K], write_slots [S, W] (shared), write_coef [S, B, W, 2 + K]
    clip_range: float | None
    prediction_type: str
    kind: str
    per_row = True

    @classmethod
    def stack(cls, plans, steps: int | None = None, write_slots: torch.Tensor | None = None) -> "RowPlans":
        """``steps``: the loop's length (default: the longest plan's; more pads every row with identity steps, so
        batches of any mix have one length: one captured CUDA graph). ``write_slots`` [steps, W]: the slots the loop
        writes at each step when they are fixed (an exported graph's); each row's plan must write those."""
        plans = tuple(plans)
        if not plans:
            raise ValueError("solvers: expected one solver per row, got none")
        first = plans[0]
        for b, p in enumerate(plans):
            for what in FAMILY_FIELDS:
                if getattr(p, what) != getattr(first, what):
                    raise ValueError(f"solvers: row {b}'s plan has {what} {getattr(p, what)!r} but row 0's has "
                                     f"{getattr(first, what)!r}; rows of one batch need one solver family")
        longest = max(p.steps for p in plans)
        if steps is None:
            steps = longest
        elif isinstance(steps, bool) or not isinstance(steps, int) or steps < longest:
            raise ValueError(f"steps: expected an int >= the longest row plan's {longest} steps, got {steps!r}")
        t = torch.stack([_pad(p.timesteps, steps, p.timesteps[-1]) for p in plans], 1)
        identity = torch.tensor(IDENTITY_ROW, dtype=torch.float64)
        coef = torch.stack([_pad(p.coef, steps, identity) for p in plans], 1)
        scales = [float(p.init_scale) for p in plans]
        init_scale = 1.0 if all(s == 1.0 for s in scales) else torch.tensor(scales, dtype=torch.float64)
        return cls(plans, t, coef, init_scale, _stack_histories(plans, steps, write_slots), first.clip_range,
                   first.prediction_type, first.kind)

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def steps_per_row(self) -> list[int]:
        return [p.steps for p in self.plans]

    @property
    def history_slots(self) -> int:
        return 0 if self.history is None else self.history.slots

    @property
    def schedule(self):
        return self.plans[0].schedule

    @functools.cached_property
    def stochastic(self) -> bool:
        return any(p.stochastic for p in self.plans)


def _pad(rows: torch.Tensor, steps: int, fill: torch.Tensor) -> torch.Tensor:
    """rows [n, ...] extended to [steps, ...] with ``fill`` (one step's value)."""
    extra = steps - rows.shape[0]
    if not extra:
        return rows
    return torch.cat([rows, fill.to(rows.dtype).expand(extra, *rows.shape[1:])])


def _stack_histories(plans, steps: int, fixed_slots: torch.Tensor | None = None) -> History | None:
    first = plans[0].history
    if first is None:
        return None
    k, w = first.slots, first.write_slots.shape[1]
    slots = torch.full((steps, w), -1, dtype=torch.int64) if fixed_slots is None else fixed_slots.clone()
    for b, p in enumerate(plans):
        h = p.history
        if h.write_slots.shape[1] != w:
            raise ValueError(f"solvers: row {b}'s plan writes {h.write_slots.shape[1]} history states a step, row 0's "
                             f"{w}; rows of one batch need one solver family")
        n = p.steps
        mine = slots[:n]
        clash = (mine >= 0) & (mine != h.write_slots)
        if bool(clash.any()):
            i = int(clash.any(1).nonzero()[0])
            raise ValueError(f"solvers: at step {i} row {b}'s plan writes history slots {h.write_slots[i].tolist()}, "
                             f"another row's {mine[i].tolist()}; rows of one batch need one solver family")
        slots[:n] = h.write_slots
    longest = max(p.steps for p in plans)
    if fixed_slots is None:
        slots[longest:] = slots[longest - 1]  # steps no row runs: any distinct slots, kept
    keep = torch.zeros(steps, w, 2 + k, dtype=torch.float64)  # a finished row's writes keep their slots
    for i in range(steps):
        for j in range(w):
            keep[i, j, 2 + int(slots[i, j])] = 1.0
    weights = torch.stack([torch.cat([p.history.weights, torch.zeros(steps - p.steps, k, dtype=torch.float64)])
                           for p in plans], 1)
    writes = torch.stack([torch.cat([p.history.write_coef, keep[p.steps:]]) for p in plans], 1)
    return History(weights, slots, writes)


def merge_guidance(rule, plans: RowPlans, cond: torch.Tensor, latent_shape, scale=None) -> StepGuidance:
    """The rule prepared for each group of rows that share a plan, merged into one StepGuidance of the stacked
    loop: g1 [S, B] (1 on a row's identity steps), the steps any row guides, table rows [S, B, 2] and weights
    [S, B]. ``scale``: this call's scale (a float, or [B] per row)."""
    if not rule.traceable:  # classifier guidance wraps the model with the one plan's score scales
        raise ValueError(f"guidance: {type(rule).__name__} cannot run rows with plans of their own")
    steps, batch = plans.steps, cond.shape[0]
    if batch != len(plans.plans):
        raise ValueError(f"solvers: expected one solver per row ({batch}), got {len(plans.plans)}")
    if scale is not None and isinstance(scale, torch.Tensor) and scale.numel() != batch:
        raise ValueError(f"scale: expected {batch} per-sample values (the batch), got {scale.numel()}")
    groups: dict[int, list[int]] = {}
    for b, p in enumerate(plans.plans):
        groups.setdefault(id(p), []).append(b)
    g1 = torch.ones(steps, batch, dtype=torch.float64)
    guided, free = [False] * steps, [None] * steps
    table = rows = table_steps = table_w = rule_params = None
    rule_state = False
    for idx in groups.values():
        plan = plans.plans[idx[0]]
        n, sel = plan.steps, torch.tensor(idx)
        part = rule if scale is None else with_scale(rule, scale if not isinstance(scale, torch.Tensor)
                                                     else scale.reshape(-1)[sel])
        sg = part.prepare(plan, cond[sel], latent_shape)
        g1[:n, sel] = sg.g1
        guided[:n] = [a or bool(g) for a, g in zip(guided[:n], sg.guided)]
        for i, f in enumerate(sg.model_free or (False,) * n):
            if free[i] is not None and free[i] != f:
                raise ValueError(f"solvers: step {i} runs no network for some rows but does for others (zero-init "
                                 "steps); give the rows plans with the same zero-init steps")
            free[i] = f
        if sg.table is not None:
            if table is None:
                table, rows = sg.table, torch.zeros(batch, dtype=sg.rows.dtype)
                table_steps = torch.zeros(steps, batch, 2, dtype=sg.table_steps.dtype)
                table_w = torch.zeros(steps, batch, dtype=torch.float64)
            rows[sel] = sg.rows
            table_steps[:n, sel] = sg.table_steps.unsqueeze(1)
            table_w[:n, sel] = sg.table_w.view(n, 1).to(torch.float64)
        rule_params, rule_state = sg.rule_params, sg.rule_state
    longest = max(p.steps for p in plans.plans)
    for i in range(longest, steps):  # steps no row runs: as the last one, so the static key stays that of any mix
        guided[i] = guided[longest - 1]
    model_free = tuple(bool(f) for f in free) if any(free) else None
    if model_free is not None:
        guided = [g and not f for g, f in zip(guided, model_free)]
    return StepGuidance(g1, tuple(guided), table, rows, table_steps, table_w, rule_params, rule_state, model_free)


def row_step_noise(plans: RowPlans, seeds, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[S, B, *shape] per-step noise: row b's first n_b steps as its own plan alone draws them from seeds[b]
    (``fastguide.noise.step_noise``), zero on its identity steps."""
    z = torch.zeros((plans.steps, len(seeds), *shape), dtype=dtype, device=device)
    for b, (seed, n) in enumerate(zip(seeds, plans.steps_per_row)):
        z[:n, b] = step_noise([seed], n, shape, dtype, device)[:, 0]
    return z
