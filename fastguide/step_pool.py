"""Rows that join and leave a running loop: iteration-level batching of sampling requests.

    pool = StepPool(model, null_cond=10, latent_shape=(1, 8, 8), buckets=(1, 2, 4, 8, 16, 32, 64))
    pool.admit("a", noise_a, cond=7, plan=solver_6.plan, rule=CFG(3.0), scale=4.0, seed=1)
    finished = pool.step()             # one step of every row: [(key, sample, largest batch it ran in), ...]
    pool.admit("b", noise_b, ...)       # a new row joins between any two steps

A fixed loop (fastguide/row_plans.py) runs a batch of rows for its longest row's steps, so a 4-step row in a
10-step batch costs 10 network rows and a request that arrives after the batch started waits for it to end.
Here every row is at its own step of its own plan: each :meth:`step` gathers the rows (padded to the next
bucket size), runs one batched forward and the per-row guided update (the reference step of per-row plans,
``kernels/reference.py``: the guided output once per group of rows with one rule and one step form, then the
solver update once per set of history write slots), and scatters x, the multistep history and the rule's state
back into each row's slot; a row leaves after its last step and a new one
can take its slot at once. Rows of different rules share every forward (a rule acts only in the update), except
a rule with a network of its own (a guide network), which needs the pool to itself.

Each row's arithmetic is its plan's alone (the same per-row operands, the same reference step as
``Sampler.sample(solvers=...)``); only the network's batch size can differ between steps (a network's float
results can depend on the batch size, not on other rows). With one bucket size every forward has that size,
and a row's sample is bit-identical to the same request run alone in a batch of that size (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastguide.checks import check_model_output
from fastguide.conditions import paired_conditions
from fastguide.guidance import StepGuidance, with_scale
from fastguide.kernels.reference import (NUM_COEF, compute_dtype_for, guided_output, history_writes, solver_update,
                                        split_model_output)
from fastguide.noise import step_noise
from fastguide.row_plans import FAMILY_FIELDS

MAX_RULES = 16  # rules whose device tensors (a ReCFG table) a pool keeps
MAX_PLANS = 256  # plans whose per-step operands a pool keeps (one per solver and step count in a server)


@dataclass(eq=False)
class _RuleTensors:
    """What the rows of one rule share on the device: its table and its per-call reduction parameters."""

    rule: object
    table_source: torch.Tensor | None = None
    table: torch.Tensor | None = None
    params_source: torch.Tensor | None = None
    params: torch.Tensor | None = None


@dataclass(eq=False)
class _PlanOperands:
    """A plan's per-step operands on the pool's device, made once per plan (rows of one plan share them)."""

    plan: object
    t: torch.Tensor  # [S] model times (compute dtype)
    coef: torch.Tensor  # [S, NUM_COEF] float64 (packed with each row's g1)
    hist_w: torch.Tensor | None  # [S, K] float64
    write_slots: tuple | None  # [S] tuples of the slots each step writes
    write_coef: torch.Tensor | None  # [S, W * (2 + K)] float64


@dataclass(eq=False)
class _Row:
    """One admitted row: its slot, its rule's and plan's shared tensors and its own per-step operands."""

    key: object
    slot: int
    rule: _RuleTensors
    plan: _PlanOperands
    steps: int
    cond: int
    packed: torch.Tensor  # [S, P] compute dtype: the columns g1 | coef | table_w (0 without a table) | hist_w | write_coef
    guided: tuple
    model_free: tuple
    z: torch.Tensor | None  # [S, *shape] per-step noise
    table_row: torch.Tensor | None  # [1] int64
    table_steps: torch.Tensor | None  # [S, 2]
    pos: int = 0
    largest_batch: int = 0


class StepPool:
    """Up to ``buckets[-1]`` rows of one solver family, each at its own step of its own plan and rule.

    ``model``, ``null_cond``, ``cond_first``: as :class:`fastguide.Sampler`'s (``model(x, t, cond)``, the
    conditional rows first in the batched forward when ``cond_first``). ``buckets``: the batch sizes a step's
    forward is padded to (increasing). ``latent_shape``: one sample's shape.
    """

    def __init__(self, model, *, null_cond, latent_shape, buckets, device="cpu", dtype=torch.float32,
                 cond_first: bool = True):
        if not callable(model):
            raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
        self.model, self.null_cond, self.cond_first = model, null_cond, cond_first
        self.latent_shape, self.buckets = tuple(latent_shape), tuple(buckets)
        self.device, self.dtype, self.cdt = torch.device(device), dtype, compute_dtype_for(dtype)
        self.capacity = self.buckets[-1]
        self.x = torch.zeros((self.capacity, *self.latent_shape), dtype=dtype, device=self.device)
        self.rows: dict[int, _Row] = {}  # slot -> row
        self.history = self.rule_state = None
        self._family = None  # the rows' plans' FAMILY_FIELDS and history write count
        self._clip_range = None
        self._rules: dict[int, _RuleTensors] = {}  # id(rule) -> its device tensors (the entry holds the rule)
        self._plans: dict[int, _PlanOperands] = {}  # id(plan) -> its operands (the entry holds the plan)

    # ------------------------------------------------------------------ rows in
    def check_rule(self, rule) -> None:
        """A ValueError unless ``rule`` can run rows here: traceable (no autograd in the step), and a rule with a
        network of its own only in a pool of its own rows."""
        if not getattr(rule, "traceable", False) or not hasattr(rule, "prepare"):
            raise ValueError(f"rule: {type(rule).__name__} cannot run rows with plans of their own")
        others = {id(r.rule.rule): r.rule.rule for r in self.rows.values() if r.rule.rule is not rule}
        if others and (self.own_forward(rule) or any(self.own_forward(o) for o in others.values())):
            raise ValueError(f"rule: {type(rule).__name__} runs a network of its own (or a running row's rule "
                             "does), so its rows cannot share forwards with another rule's; wait for the pool to empty")

    def own_forward(self, rule) -> bool:
        """Whether ``rule`` runs a network of its own (a guide network): its rows need forwards of their own."""
        return rule.wrap_model(self.model, None, self.null_cond, cond_first=self.cond_first, batch=1) is not self.model

    @property
    def free(self) -> int:
        return self.capacity - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, key, noise: torch.Tensor, *, cond: int, plan, rule, scale: float, seed: int) -> None:
        """Start a row from x_T = ``noise`` [*latent_shape] (times the plan's initial scale) with its own ``plan``
        (one solver family for every row of the pool), guidance ``rule`` at ``scale``, and ``seed`` (its per-step
        noise, as :func:`fastguide.row_plans.row_step_noise` draws it)."""
        if not self.free:
            raise RuntimeError("admit: the pool is full")
        self.check_rule(rule)
        family = tuple(getattr(plan, f) for f in FAMILY_FIELDS) + (
            None if plan.history is None else plan.history.write_slots.shape[1],)
        if self.rows and family != self._family:
            raise ValueError(f"plan: this row's plan is of another solver family ({family}) than the rows running "
                             f"({self._family})")
        sg = _row_guidance(rule, plan, cond, scale, self.latent_shape)
        shared = self._rule_tensors(rule, sg)
        ops = self._plan_operands(plan)
        self._family, self._clip_range = family, plan.clip_range
        self._allocate_state(plan.history_slots, sg.rule_state)
        slot = next(s for s in range(self.capacity) if s not in self.rows)
        dev, n = self.device, plan.steps
        table_w = torch.zeros(n, 1, dtype=torch.float64) if sg.table is None else sg.table_w.view(n, 1).to(torch.float64)
        parts = [sg.g1.view(n, 1), ops.coef, table_w] + ([] if ops.hist_w is None else [ops.hist_w, ops.write_coef])
        row = _Row(
            key, slot, shared, ops, n, int(cond), torch.cat(parts, 1).to(dev, self.cdt), sg.guided, sg.model_free,
            step_noise([seed], n, self.latent_shape, self.dtype, dev)[:, 0] if plan.stochastic else None,
            None if sg.table is None else sg.rows.to(dev),
            None if sg.table is None else sg.table_steps.to(dev))
        if float(plan.init_scale) == 1.0:
            self.x[slot] = noise
        else:
            scale0 = torch.tensor([float(plan.init_scale)], dtype=torch.float64).to(self.dtype)
            self.x[slot] = noise.to(dev, self.dtype) * scale0.to(dev)
        if self.history is not None:
            self.history[:, slot] = 0
        if self.rule_state is not None:
            self.rule_state[slot] = 0
        self.rows[slot] = row

    def _plan_operands(self, plan) -> _PlanOperands:
        """The plan's operands, made once per plan (the entry holds the plan, so its id stays its own)."""
        ops = self._plans.get(id(plan))
        if ops is not None:
            return ops
        if len(self._plans) >= MAX_PLANS:
            self._plans = _in_use(self._plans, {id(r.plan) for r in self.rows.values()})
        h = plan.history
        ops = self._plans[id(plan)] = _PlanOperands(
            plan, plan.timesteps.to(self.device, self.cdt), plan.coef.to(torch.float64),
            None if h is None else h.weights.to(torch.float64),
            None if h is None else tuple(tuple(s) for s in h.write_slots.tolist()),
            None if h is None else h.write_coef.to(torch.float64).flatten(1))
        return ops

    def _rule_tensors(self, rule, sg) -> _RuleTensors:
        """The device copies of the rule's table and reduction parameters, made once per rule (kept for the
        next rows of the rule; the parameters are the rule's, the same at every scale: a row whose differ is
        refused)."""
        if id(rule) not in self._rules and len(self._rules) >= MAX_RULES:
            self._rules = _in_use(self._rules, {id(r.rule) for r in self.rows.values()})
        shared = self._rules.get(id(rule))
        if shared is None:
            shared = self._rules[id(rule)] = _RuleTensors(rule)
        if sg.table is not None and sg.table is not shared.table_source:
            shared.table_source, shared.table = sg.table, sg.table.to(self.device)
        if sg.rule_params is not None:
            if shared.params_source is None:
                shared.params_source, shared.params = sg.rule_params, sg.rule_params.to(self.device, self.cdt)
            elif not torch.equal(shared.params_source, sg.rule_params):
                raise ValueError("rule: this row's rule parameters differ from those of the rule's earlier rows")
        return shared

    def _allocate_state(self, slots: int, rule_state: bool) -> None:
        shape = (self.capacity, *self.latent_shape)
        if slots and (self.history is None or self.history.shape[0] != slots):
            self.history = torch.zeros((slots, *shape), dtype=self.dtype, device=self.device)
        if rule_state and self.rule_state is None:
            self.rule_state = torch.zeros(shape, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ one step of every row
    def step(self) -> list[tuple[object, torch.Tensor, int]]:
        """One step of every row (rows that leave return (key, sample [*latent_shape] on the device, the largest
        forward batch it ran in))."""
        if not self.rows:
            return []
        rows = [self.rows[s] for s in sorted(self.rows)]
        net = [r for r in rows if not r.model_free[r.pos]]
        out_c = out_u = None
        if net:
            out_c, out_u, batch = self._forward(net)
            for r in net:
                r.largest_batch = max(r.largest_batch, batch)
        self._update(rows, net, out_c, out_u)
        done = []
        for r in rows:
            r.pos += 1
            if r.pos == r.steps:
                del self.rows[r.slot]
                done.append((r.key, self.x[r.slot].clone(), r.largest_batch))
        return done

    def _forward(self, net: list[_Row]):
        """The batched [cond | null] forward of the rows that run the network at their step, padded to the next
        bucket (padding repeats the first row); returns its cond and null halves (rows in ``net`` order)."""
        n = len(net)
        batch = next(b for b in self.buckets if b >= n)
        order = [r.slot for r in net] + [net[0].slot] * (batch - n)
        picked = net + [net[0]] * (batch - n)
        slots = torch.tensor(order, device=self.device)
        x = self.x.index_select(0, slots)
        cond = torch.tensor([r.cond for r in picked], device=self.device)
        t = torch.stack([r.plan.t[r.pos] for r in picked])
        guided = any(r.guided[r.pos] for r in net)
        if guided:
            inp, labels, t = torch.cat([x, x]), paired_conditions(cond, self.null_cond, self.cond_first), t.repeat(2)
        else:
            inp, labels = x, cond
        wrapped = net[0].rule.rule.wrap_model(self.model, None, self.null_cond, cond_first=self.cond_first,
                                              batch=batch)
        out = wrapped(inp, t, labels)
        check_model_output(out, inp)
        c, u = split_model_output(out, batch, self.cond_first)
        return c[:n], None if u is None else u[:n], batch

    def _update(self, rows: list[_Row], net: list[_Row], out_c, out_u) -> None:
        """Every row's reference step (kernels/reference.py, the functions ``guided_step_into`` runs, in its
        order), in two passes over groups of rows: the guided output m once per rule and form (model-free, guided
        or not), then the solver update and history writes once per set of history write slots. Each row's
        arithmetic is element-wise or over its own elements, so a group's size does not change its bits."""
        dev, dt, n = self.device, self.cdt, len(rows)
        slots = torch.tensor([r.slot for r in rows], device=dev)
        x = self.x.index_select(0, slots)
        packed = torch.stack([r.packed[r.pos] for r in rows])  # [n, P]: one gather of every per-row scalar
        nc, hist = NUM_COEF, rows[0].plan.hist_w
        g1, coef, table_w = packed[:, 0], packed[:, 1:1 + nc], packed[:, 1 + nc]
        hist_w = write_coef = None
        if hist is not None:
            k = hist.shape[1]
            hist_w = packed[:, 2 + nc:2 + nc + k]
            write_coef = packed[:, 2 + nc + k:].unflatten(1, (-1, 2 + k))
        place = {id(r): j for j, r in enumerate(net)}
        m = torch.empty((n, *self.latent_shape), dtype=dt, device=dev)
        for (_, free, guided), members in _groups(rows, lambda r: (id(r.rule), r.model_free[r.pos],
                                                                    r.guided[r.pos])).items():
            at = torch.tensor(members, device=dev)
            if free:
                m.index_fill_(0, at, 0)
                continue
            picked = [rows[i] for i in members]
            j = torch.tensor([place[id(r)] for r in picked], device=dev)
            c = out_c.index_select(0, j)
            if not guided:
                m.index_copy_(0, at, c.to(dt))
                continue
            shared, head = picked[0].rule, picked[0]
            table = shared.table if head.table_row is not None else None
            state = None
            if shared.params is not None and self.rule_state is not None:
                state = self.rule_state.index_select(0, slots.index_select(0, at))
            m.index_copy_(0, at, guided_output(
                c, out_u.index_select(0, j), g1.index_select(0, at), table=table,
                rows=None if table is None else torch.cat([r.table_row for r in picked]),
                table_steps=None if table is None else torch.stack([r.table_steps[r.pos] for r in picked]),
                table_w=None if table is None else table_w.index_select(0, at),
                rule_params=shared.params, rule_state=state, dt=dt))
            if state is not None:
                self.rule_state.index_copy_(0, slots.index_select(0, at), state)
        z = None if rows[0].z is None else torch.stack([r.z[r.pos] for r in rows])
        xf = x.to(dt)
        for write_slots, members in _groups(rows, lambda r: None if r.plan.write_slots is None
                                             else r.plan.write_slots[r.pos]).items():
            whole = len(members) == n
            at = None if whole else torch.tensor(members, device=dev)

            def part(v):
                return v if v is None or whole else v.index_select(0, at)

            mine = slots if whole else slots.index_select(0, at)
            xg, mg = part(xf), part(m)
            history = None if self.history is None else self.history.index_select(1, mine)
            x_next = solver_update(xg, mg, part(coef), clip_range=self._clip_range, z=part(z), history=history,
                                   hist_coef=part(hist_w))
            if write_slots is not None:
                history.index_copy_(0, torch.tensor(write_slots, device=dev),
                                    history_writes(xg, mg, history, part(write_coef)).to(history.dtype))
                self.history.index_copy_(1, mine, history)
            self.x.index_copy_(0, mine, x_next.to(self.dtype))

    def clear(self) -> list:
        """Drop every row (after a failed step); returns their keys."""
        keys = [r.key for r in self.rows.values()]
        self.rows.clear()
        return keys


def _row_guidance(rule, plan, cond: int, scale: float, latent_shape) -> StepGuidance:
    """The rule prepared for one row at its own scale: what :func:`fastguide.row_plans.merge_guidance` gives a
    batch of that row alone (g1 [S, 1]; a zero-init step is not guided)."""
    sg = with_scale(rule, float(scale)).prepare(plan, torch.tensor([int(cond)]), latent_shape)
    free = tuple(bool(f) for f in sg.model_free) if sg.model_free else (False,) * plan.steps
    guided = tuple(bool(g) and not f for g, f in zip(sg.guided, free))
    return StepGuidance(sg.g1, guided, sg.table, sg.rows, sg.table_steps, sg.table_w, sg.rule_params, sg.rule_state,
                        free)


def _groups(rows, form) -> dict:
    """form(row) -> the indices of ``rows`` with that form, in order."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(form(r), []).append(i)
    return groups


def _in_use(cache: dict, live: set) -> dict:
    """The entries of a full cache that a running row still uses (``live``: ids of the entries)."""
    return {k: v for k, v in cache.items() if id(v) in live}
