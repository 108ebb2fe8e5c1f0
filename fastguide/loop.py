"""The fixed-NFE sampling loop as free functions over static buffers.

    b = allocate(...)            # once per static key (batch, shape, dtype, rule, steps): LoopBuffers
    refill(b, ...)               # every call: copy this call's inputs into b, skipping what did not change
    sums = run_loop(b, config)   # S steps of  out = model(inp, t_i, labels); guided update written into b.x2
    graph = capture(b, config)   # or: the whole loop as one CUDA graph, then graph.replay() per call

At step i the model reads ``b.x2`` (the 2B batch [x | x] with labels [c | null]; B rows outside a guidance
interval) and the guided step writes x_next into every B-row block of ``b.x2``, so every step has the same
shapes and addresses: the hot step compiles once, and the loop can be captured once and replayed.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from fastguide.backends import StepImpl
from fastguide.checks import check_model_output
from fastguide.conditions import paired_conditions
from fastguide.kernels.reference import compute_dtype_for, copy_into_blocks
from fastguide.noise import step_noise


# ---------------------------------------------------------------------- what the loop reads
@dataclass(frozen=True, eq=False)
class PlanTensors:
    """The per-step device tensors of one plan (and guidance table) on one device and dtype. They depend on
    neither the noise nor the conditions, so calls share them; the ``*_host`` lists serve the eager
    host-scalar step."""

    plan: object  # the solvers.Plan these came from
    table_source: object  # the rule's table object (the cache checks identity)
    t: torch.Tensor  # [S] model times
    coef: torch.Tensor  # [S, NUM_COEF] in the compute dtype
    coef_host: list  # [S] rows of Python floats
    table: torch.Tensor | None = None  # [K, T, *shape] ratio rows on the device
    table_steps: torch.Tensor | None = None  # [S, 2] the table rows (i0, i1) around each step's model time
    table_steps_host: list | None = None
    table_w: torch.Tensor | None = None  # [S] the lerp weight between those rows (guidance data, not a coefficient)
    table_w_host: list | None = None
    table_w_source: torch.Tensor | None = None  # the host weights these were made from
    hist_weights: torch.Tensor | None = None  # [S, K] a multistep solver's weights of its history slots in x_next
    write_slots: torch.Tensor | None = None  # [S, W] int64: the slots each step writes
    write_coef: torch.Tensor | None = None  # [S, W, 2 + K]: what it writes there
    history_host: tuple | None = None  # (weights, write_slots, write_coef) as Python lists
    # The host step's multipliers as 0-d CPU tensors (compute dtype): a multiplication by one dispatches in about
    # half the time of one by a Python float on these small tensors. [S] tuples of NUM_COEF, [S] lists of W (the
    # x coefficient of each history write).
    coef_scalars: list | None = None
    write_scalars: list | None = None

    @classmethod
    def build(cls, plan, guidance, device, dtype, device_table: torch.Tensor | None = None) -> "PlanTensors":
        """``guidance``: the rule's StepGuidance for this plan (its table, table_steps and table_w);
        ``device_table``: the table already on ``device`` (another plan's tensors of the same table)."""
        cdt = compute_dtype_for(dtype)
        table_parts = {}
        if guidance.table is not None:
            table_parts = dict(
                table=guidance.table.to(device) if device_table is None else device_table,
                table_steps=guidance.table_steps.to(device),
                table_steps_host=[tuple(r) for r in guidance.table_steps.tolist()],
                table_w=guidance.table_w.to(device, cdt), table_w_host=guidance.table_w.tolist(),
                table_w_source=guidance.table_w)
        history_parts = {}
        if plan.history is not None:
            h = plan.history
            _check_write_slots(h.write_slots, h.slots)
            history_parts = dict(
                hist_weights=h.weights.to(device, cdt), write_slots=h.write_slots.to(device),
                write_coef=h.write_coef.to(device, cdt),
                history_host=(h.weights.tolist(), h.write_slots.tolist(), h.write_coef.tolist()),
                write_scalars=[list(step.to(cdt).unbind()) for step in h.write_coef[:, :, 0]])
        return cls(plan, guidance.table, plan.timesteps.to(device, cdt), plan.coef.to(device, cdt),
                   plan.coef.tolist(), **table_parts, **history_parts,
                   coef_scalars=[tuple(row.unbind()) for row in plan.coef.to(cdt)])

    def serves(self, plan, guidance) -> bool:
        """Whether these tensors are the ones ``plan`` with ``guidance``'s table needs."""
        if self.plan is not plan or self.table_source is not guidance.table:
            return False
        if guidance.table_w is None or self.table_w_source is guidance.table_w:
            return True
        return torch.equal(self.table_w_source, guidance.table_w)


def _check_write_slots(write_slots: torch.Tensor, slots: int) -> None:
    """Each step writes distinct slots in [0, K): checked once per plan on the host (the steps then need no sync)."""
    for i, row in enumerate(write_slots.tolist()):
        if len(set(row)) != len(row) or not all(0 <= s < slots for s in row):
            raise ValueError(f"solver: step {i} of the plan writes history slots {row}; expected distinct slots in "
                             f"[0, {slots})")


class StepInputs(NamedTuple):
    """What step i reads (views into the loop buffers and plan tensors): the model's input rows, labels and
    time, and the update's per-step operands. A NamedTuple: the compiled hot step takes it as one argument."""

    inp: torch.Tensor  # x2, or its B conditional rows outside a guidance interval
    labels: torch.Tensor
    t: torch.Tensor
    g1: torch.Tensor
    coef: torch.Tensor
    table_steps: torch.Tensor | None
    table_w: torch.Tensor | None
    z: torch.Tensor | None
    out_sum: torch.Tensor  # where the step's float32 output sum goes
    hist_coef: torch.Tensor | None  # [K] a multistep solver's history weights in x_next
    write_slots: torch.Tensor | None  # [W] the history slots this step writes
    write_coef: torch.Tensor | None  # [W, 2 + K] what it writes there


class StepConstants(NamedTuple):
    """What every step of one call reads alike."""

    x2: torch.Tensor
    table: torch.Tensor | None
    rows: torch.Tensor | None
    history: torch.Tensor | None
    batch: int
    cond_first: bool
    clip_range: float | None
    check_finite: bool
    rule_params: torch.Tensor | None = None  # [NUM_RULE_PARAMS] a rule with per-sample reductions
    rule_state: torch.Tensor | None = None  # [B, *shape] its state across steps (APG's running average)


@dataclass(frozen=True, eq=False)
class StepViews:
    """The per-step inputs of one LoopBuffers, made once per buffer set so a call does no slicing."""

    steps: tuple  # [S] StepInputs
    x_cur: torch.Tensor  # x2[:B]: x at the current step (cond_first or not, every block holds x)
    x_blocks: torch.Tensor  # x2 viewed as [k, B, ...]
    g1_bcast: tuple = ()  # [S] g1 viewed as [B, 1, ...] (the host step broadcasts it over a sample)
    history_slots: tuple | None = None  # [K] the history's slot views (the host step reads and writes slots)


@dataclass(eq=False)
class LoopBuffers:
    """Everything one fixed-NFE loop reads and writes, allocated once per static key and refilled in place, so
    the addresses a compiled step or a captured CUDA graph reads stay the same."""

    x2: torch.Tensor  # [R, *shape], R = 2B when any step is guided, else B; every B-row block holds x
    labels: torch.Tensor  # [R] or [R, ...]: [c | null] (cond_first) or [null | c]; [c] when R = B
    cond: torch.Tensor  # the conditional labels alone (a view into labels)
    g1: torch.Tensor  # [S, B] in the compute dtype
    rows: torch.Tensor | None  # [B] table rows of this call's labels
    z: torch.Tensor | None  # [S, B, *shape] per-step noise of a stochastic solver
    history: torch.Tensor | None  # [K, B, *shape] a multistep solver's states (zeroed every call)
    out_sums: torch.Tensor  # [S] float32 sum of each step's model output (non-finite iff the output was)
    guided: tuple  # [S] bool: the step runs the null half
    batch: int
    cond_first: bool
    model_free: tuple = ()  # [S] bool: the step runs no network (m = 0)
    zeros: torch.Tensor | None = None  # [B, *shape] zeros: the "model output" of a model-free step
    rule_params: torch.Tensor | None = None  # [NUM_RULE_PARAMS] in the compute dtype
    rule_params_source: torch.Tensor | None = None  # the host params rule_params holds
    rule_state: torch.Tensor | None = None  # [B, *shape] (zeroed every call)
    plan: PlanTensors | None = None
    views: StepViews | None = None
    g1_source: torch.Tensor | None = None  # the host g1 that g1 holds (a refill skips an unchanged one)
    null_source: object = None  # the null condition that labels hold
    graph: object = None  # the captured CUDA graph of the whole loop
    model_checked: bool = False  # the model's output was checked eagerly once (before a compiled step runs it)
    row_times: torch.Tensor | None = None  # per-row plans: [S, R] model times of every row of x2


def buffer_key(x: torch.Tensor, cond: torch.Tensor, plan: PlanTensors, guidance) -> tuple:
    """The static key of a call: calls with equal keys share buffers (and a captured graph). ``guidance``: the
    call's StepGuidance."""
    table = None if plan.table is None else (tuple(plan.table.shape), plan.table.dtype)
    rule = (guidance.rule_params is not None, guidance.rule_state, guidance.model_free)
    return (tuple(x.shape), x.dtype, x.device, tuple(cond.shape), cond.dtype, tuple(guidance.guided), plan.plan.steps,
            plan.plan.stochastic, plan.plan.history_slots, table, rule, getattr(plan.plan, "per_row", False))


def pair_labels(cond: torch.Tensor, null_cond, cond_first: bool) -> torch.Tensor:
    """[cond | null] (or [null | cond]); without a null condition (a conditional guide network reads the
    conditions on both halves) the second half repeats cond."""
    return paired_conditions(cond, cond if null_cond is None else null_cond, cond_first)


def allocate(x: torch.Tensor, cond: torch.Tensor, guidance, steps: int, stochastic: bool, null_cond,
             cond_first: bool, history_slots: int = 0) -> LoopBuffers:
    batch, dev = x.shape[0], x.device
    run_uncond = any(guidance.guided)
    labels = pair_labels(cond, null_cond, cond_first) if run_uncond else cond.clone()
    cdt = compute_dtype_for(x.dtype)
    rule = guidance.rule_params
    return LoopBuffers(
        x2=torch.empty((2 * batch if run_uncond else batch, *x.shape[1:]), dtype=x.dtype, device=dev),
        labels=labels, cond=labels[:batch] if (cond_first or not run_uncond) else labels[batch:],
        g1=torch.empty((steps, batch), dtype=compute_dtype_for(x.dtype), device=dev),
        rows=None if guidance.rows is None else torch.empty(batch, dtype=guidance.rows.dtype, device=dev),
        z=torch.empty((steps, *x.shape), dtype=x.dtype, device=dev) if stochastic else None,
        history=torch.zeros((history_slots, *x.shape), dtype=x.dtype, device=dev) if history_slots else None,
        out_sums=torch.zeros(steps, dtype=torch.float32, device=dev), guided=tuple(guidance.guided), batch=batch,
        cond_first=cond_first, null_source=null_cond, model_free=tuple(guidance.model_free or (False,) * steps),
        zeros=torch.zeros(x.shape, dtype=x.dtype, device=dev) if guidance.model_free else None,
        rule_params=None if rule is None else torch.empty(rule.shape, dtype=cdt, device=dev),
        rule_state=torch.zeros(x.shape, dtype=x.dtype, device=dev) if guidance.rule_state else None)


def bind_plan(b: LoopBuffers, plan: PlanTensors) -> None:
    """Point b at other plan tensors and make its per-step views (a captured graph read the old ones)."""
    n, batch, rows2 = b.g1.shape[0], b.batch, b.x2.shape[0]
    none = (None,) * n
    if plan.t.ndim == 2:  # per-row plans: [S, B] model times, repeated for every B-row block
        b.row_times = plan.t.repeat(1, rows2 // batch)
        t_all = b.row_times.unbind(0)
        t_cond = plan.t.unbind(0)
    else:
        t_all = plan.t.view(n, 1).expand(n, rows2).unbind(0)
        t_cond = plan.t.view(n, 1).expand(n, batch).unbind(0)
    x_cond = b.x2[:batch] if (b.cond_first or rows2 == batch) else b.x2[batch:]
    b.plan, b.graph = plan, None
    z = none if b.z is None else b.z.unbind(0)
    table_steps = none if plan.table_steps is None else plan.table_steps.unbind(0)
    table_w = none if plan.table_w is None else plan.table_w.unbind(0)
    hist = [none if t is None else t.unbind(0) for t in (plan.hist_weights, plan.write_slots, plan.write_coef)]
    steps = tuple(StepInputs(*((b.x2, b.labels, t_all[i]) if b.guided[i] else (x_cond, b.cond, t_cond[i])),
                             g1, coef, table_steps[i], table_w[i], z[i], out_sum, hist[0][i], hist[1][i], hist[2][i])
                  for i, (g1, coef, out_sum) in enumerate(zip(b.g1.unbind(0), plan.coef.unbind(0),
                                                              b.out_sums.unbind(0))))
    b.views = StepViews(steps, x_cur=b.x2[:batch], x_blocks=b.x2.view(rows2 // batch, batch, *b.x2.shape[1:]),
                        g1_bcast=b.g1.view(*b.g1.shape, *([1] * (b.x2.ndim - 1))).unbind(0),
                        history_slots=None if b.history is None else b.history.unbind(0))


def refill(b: LoopBuffers, x: torch.Tensor, cond: torch.Tensor, plan: PlanTensors, guidance, z, null_cond) -> None:
    """Copy this call's inputs into b; what did not change since the last call (the plan tensors, the guidance
    scales, the null condition) is skipped. A tensor null condition is re-read every call (it may have
    changed in place)."""
    if b.plan is not plan:
        if getattr(plan.plan, "per_row", False):
            _refill_row_plans(b, plan)
        else:
            bind_plan(b, plan)
    if b.null_source is not null_cond or isinstance(null_cond, torch.Tensor):
        b.labels.copy_(pair_labels(cond, null_cond, b.cond_first) if b.x2.shape[0] != b.batch else cond)
        b.null_source = null_cond
    else:
        b.cond.copy_(cond)
    if b.g1_source is not guidance.g1:
        b.g1.copy_(guidance.g1)
        b.g1_source = guidance.g1
    if b.rows is not None:
        b.rows.copy_(guidance.rows)
    # rules make their parameters afresh each call: compared by value, so an unchanged rule skips the copy
    if b.rule_params is not None and (b.rule_params_source is None
                                      or not torch.equal(b.rule_params_source, guidance.rule_params)):
        b.rule_params.copy_(guidance.rule_params)
        b.rule_params_source = guidance.rule_params
    if b.rule_state is not None:
        b.rule_state.zero_()
    if z is not None:
        b.z.copy_(z)
    if b.history is not None:
        b.history.zero_()
    scale = plan.plan.init_scale
    if isinstance(scale, torch.Tensor):  # per-row plans
        x = x * scale.to(x.device, x.dtype).view(-1, *([1] * (x.ndim - 1)))
    elif scale != 1.0:
        x = x * scale
    copy_into_blocks(b.x2, x, b.views.x_blocks)


ROW_PLAN_TENSORS = ("t", "coef", "table_steps", "table_w", "hist_weights", "write_slots", "write_coef")


def _refill_row_plans(b: LoopBuffers, plan: PlanTensors) -> None:
    """Per-row plans change with every batch's mix of step counts: b keeps its own copy of their tensors, refilled
    in place (its step views and a captured graph stay valid); bound once per buffer set."""
    own = b.plan
    if own is None or own.table is not plan.table or any(
            (getattr(own, n) is None) != (getattr(plan, n) is None)
            or getattr(own, n) is not None and getattr(own, n).shape != getattr(plan, n).shape
            for n in ROW_PLAN_TENSORS):
        copies = {n: None if getattr(plan, n) is None else getattr(plan, n).clone() for n in ROW_PLAN_TENSORS}
        bind_plan(b, dataclasses.replace(plan, **copies))
        return
    for n in ROW_PLAN_TENSORS:
        if getattr(plan, n) is not None:
            getattr(own, n).copy_(getattr(plan, n))
    b.row_times.copy_(plan.t.repeat(1, b.row_times.shape[1] // b.batch))
    # the host-side fields (the RowPlans for model times in callbacks and errors) follow this call's plan
    b.plan = dataclasses.replace(plan, **{n: getattr(own, n) for n in ROW_PLAN_TENSORS})


def draw_step_noise(plan, x: torch.Tensor, seeds: list[int] | None) -> torch.Tensor | None:
    """[S, B, *shape] per-step noise for a stochastic plan (from ``seeds``, else torch's global RNG), in the
    latent dtype (the fused kernel's narrowest variant); None for a deterministic plan."""
    if not plan.stochastic:
        return None
    if seeds is not None:
        return step_noise(seeds, plan.steps, x.shape[1:], x.dtype, x.device)
    return torch.randn((plan.steps, *x.shape), dtype=x.dtype, device=x.device)


def step_time(plan, i: int) -> float:
    """Step i's model time (per-row plans: the largest of the rows')."""
    return float(plan.timesteps[i].max())


# ---------------------------------------------------------------------- the step and the loop
def guided_update(out, step: StepInputs, const: StepConstants, step_fn) -> None:
    """x_next from the model output ``out``, written into every B-row block of x2 (a device-tensor step)."""
    history = {} if const.history is None else dict(history=const.history, hist_coef=step.hist_coef,
                                                     write_slots=step.write_slots, write_coef=step.write_coef)
    if const.rule_params is not None:
        history.update(rule_params=const.rule_params, rule_state=const.rule_state)
    step_fn(const.x2, const.x2[:const.batch], out, step.g1, step.coef, cond_first=const.cond_first, table=const.table,
            rows=const.rows, table_steps=step.table_steps, table_w=step.table_w, clip_range=const.clip_range,
            z=step.z, **history)


def hot_step(model, step_fn, step: StepInputs, const: StepConstants) -> None:
    """One step over static buffers: the forward of ``step.inp`` (x2, or its B conditional rows outside a
    guidance interval), then the guided update written into x2. Every per-step value is a tensor, so
    torch.compile traces each of the two input shapes once and never recompiles for a new step, scale or table
    row. Nothing is returned: the loop needs only what was written into x2 and out_sum (docs/design.md)."""
    out = model(step.inp, step.t, step.labels)
    if const.check_finite:
        step.out_sum.copy_(out.sum(dtype=torch.float32))  # one cheap reduction; checked once after the loop
    guided_update(out, step, const, step_fn)


def compile_hot_step(owner: object, **compile_kw) -> Callable:
    """torch.compile of a private copy of :func:`hot_step`: dynamo keeps its compiled variants (and its
    recompile limit) per code object, so each owner (a Sampler) gets its own and none evicts another's."""
    own = types.FunctionType(hot_step.__code__.replace(), hot_step.__globals__, f"hot_step_{id(owner):x}")
    return torch.compile(own, **compile_kw)


@dataclass(frozen=True)
class LoopConfig:
    """What stays fixed through one call's loop."""

    model: Callable  # the forward as the loop calls it (compiled alone, wrapped by the rule, or as given)
    step: StepImpl
    hot: Callable | None  # the compiled hot step (forward + update as one function), or None: eager steps
    clip_range: float | None
    check_finite: bool


def run_loop(b: LoopBuffers, config: LoopConfig, callback=None, progress: bool = False,
             sums_into_buffer: bool = False) -> torch.Tensor:
    """The S steps over b; returns the [S] float32 per-step output sums (for the finite check). Eager steps
    collect their sums in a list stacked once at the end; ``sums_into_buffer`` leaves them in b.out_sums
    instead (a captured loop's replays read them there)."""
    const = StepConstants(b.x2, b.plan.table, b.rows, b.history, b.batch, b.cond_first, config.clip_range,
                          config.check_finite, b.rule_params, b.rule_state)
    steps = range(len(b.views.steps))
    if progress:
        steps = tqdm(steps, desc="sampling", leave=False)
    if config.hot is not None:
        for i in steps:
            if b.model_free[i]:  # no network: the update with m = 0, outside the compiled step
                guided_update(b.zeros, b.views.steps[i], const, config.step.fn)
            else:
                config.hot(config.model, config.step.fn, b.views.steps[i], const)
            if callback is not None:
                callback(i, step_time(b.plan.plan, i), b.views.x_cur)
        return b.out_sums
    sums = _eager_loop(b, config, const, steps, callback)
    if not sums:
        return b.out_sums
    stacked = torch.stack(sums)
    if sums_into_buffer:
        b.out_sums.copy_(stacked)
        return b.out_sums
    return stacked


def _eager_loop(b: LoopBuffers, config: LoopConfig, const: StepConstants, steps, callback) -> list:
    """Each step: the forward, its output check, its output sum, then the update with host scalars (the torch
    step) or the plan's device rows (the reference or the Triton kernel)."""
    model, fn, views, plan, check_finite = config.model, config.step.fn, b.views, b.plan, config.check_finite
    host = config.step.host
    if host:
        n = len(views.steps)
        table_steps = plan.table_steps_host or [None] * n
        table_w = plan.table_w_host or [None] * n
        weights, slots, writes = plan.history_host or ([None] * n,) * 3
        history = {}
        unit_rows = [True] * n
        if const.rule_params is not None:
            history = dict(rule_params=b.rule_params_source.tolist(), rule_state=const.rule_state)
            unit_rows = (b.g1_source == 1).any(1).tolist()  # steps where some sample is unguided
    sums = []
    for i in steps:
        step = views.steps[i]
        if b.model_free[i]:
            out = b.zeros  # CFG-Zero*'s zero-init: m = 0 without running the network
            if check_finite:
                sums.append(b.out_sums[i])  # zero: never written
        else:
            out = model(step.inp, step.t, step.labels)
            check_model_output(out, step.inp, i)
            if check_finite:
                sums.append(out.sum(dtype=torch.float32))
        if host:
            if const.history is not None:
                history.update(history=views.history_slots, hist_coef=weights[i], write_slots=slots[i],
                               write_coef=writes[i], write_scalars=plan.write_scalars[i])
            if const.rule_params is not None:
                history["unit_rows"] = unit_rows[i]
            fn(const.x2, views.x_cur, out, views.g1_bcast[i], plan.coef_host[i], cond_first=const.cond_first,
               table=const.table, rows=const.rows, table_steps=table_steps[i], table_w=table_w[i],
               clip_range=const.clip_range, z=step.z, blocks=views.x_blocks, coef_scalars=plan.coef_scalars[i],
               **history)
        else:
            guided_update(out, step, const, fn)
        if callback is not None:
            callback(i, step_time(plan.plan, i), views.x_cur)
    return sums


def check_model_once(b: LoopBuffers, model) -> None:
    """Run the model eagerly once per input shape the loop feeds it (2B rows, B rows) and check its output, so a
    wrong shape or a tuple is a clear error instead of a failure deep inside the compiler."""
    if b.model_checked:
        return
    runs = [(i, guided) for i, guided in enumerate(b.guided) if not b.model_free[i]]
    first = {guided: i for i, guided in reversed(runs)}
    with torch.no_grad():
        for i in sorted(first.values()):
            step = b.views.steps[i]
            check_model_output(model(step.inp, step.t, step.labels), step.inp, i)
    b.model_checked = True


# ---------------------------------------------------------------------- CUDA graphs
def capture_cuda_graph(fn: Callable[[], object], warmup: int = 1) -> "torch.cuda.CUDAGraph":
    """Run ``fn`` ``warmup`` times on a side stream (compiles, autotunes, allocates), then capture one call of
    it as a CUDA graph. ``thread_local``: other threads of a serving process may use the GPU meanwhile."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return graph


def replay(b: LoopBuffers, config: LoopConfig) -> torch.Tensor:
    """The whole loop as one CUDA graph: captured on first use for b (and again after b's plan tensors
    change), then replayed. Returns the per-step sums the replay wrote."""
    if b.graph is None:
        saved = b.x2.clone()  # the warm-up run steps x2; the capture itself does not run
        b.graph = capture_cuda_graph(lambda: run_loop(b, config, sums_into_buffer=True))
        b.x2.copy_(saved)
    b.graph.replay()
    return b.out_sums


# ---------------------------------------------------------------------- after the loop
def raise_if_not_finite(b: LoopBuffers, step_sums: torch.Tensor, noise: torch.Tensor) -> None:
    """One host sync on the common path: the noise, every step's model output and the sample are finite iff
    their float32 sums are. A sum that overflows while every value is finite only sends this to the exact
    checks, which then name the culprit (or pass)."""
    x = b.x2[:b.batch]
    if math.isfinite((step_sums.sum() + x.sum(dtype=torch.float32) + noise.sum(dtype=torch.float32)).item()):
        return
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise: contains NaN or inf")
    bad_steps = (~torch.isfinite(step_sums)).nonzero().flatten().tolist()
    if bad_steps:
        i = bad_steps[0]
        t = step_time(b.plan.plan, i)
        raise ValueError(f"model: output contained NaN/inf, first at step {i} (t={t:g}); the sample is not valid")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("model: outputs were finite but the sample overflowed to NaN/inf (check the model's "
                         "output scale, the dtype, or the solver settings)")


# ---------------------------------------------------------------------- caches
class LRUCache:
    """A thread-safe mapping that keeps its ``capacity`` most recently used entries."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._get(key)

    def put(self, key, value) -> None:
        with self._lock:
            self._put(key, value)

    def _get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def _put(self, key, value) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def values(self) -> list:
        with self._lock:
            return list(self._items.values())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class BufferCache(LRUCache):
    """Loop buffers per static key. :meth:`claim` hands a call its buffers for the duration of a ``with``
    block; a call that finds its key's buffers claimed (re-entrant from a callback, or another thread's)
    gets fresh ones, which are not cached."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._claimed: set[int] = set()

    @contextmanager
    def claim(self, key, allocate: Callable[[], LoopBuffers]):
        with self._lock:  # find-and-claim is atomic across threads
            b = self._get(key)
            if b is None or id(b) in self._claimed:
                fresh = allocate()
                if b is None:
                    self._put(key, fresh)
                b = fresh
            self._claimed.add(id(b))
        try:
            yield b
        finally:
            with self._lock:
                self._claimed.discard(id(b))
