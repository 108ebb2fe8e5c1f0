"""The specification of one guided sampling step, in plain torch (float64-capable).

Every solver and guidance rule in fastguide reduces to this element-wise form (see docs/design.md):

    m      = g1 * m_cond + g0 * m_uncond          g0 = (1 - g1) * R        (CFG: R = 1)
    R      = lerp(table[row, i0], table[row, i1], w)                        (ReCFG; w = 0 on grid points)
    no clip:  x_next = A * x + B * m + S * z
    clip:     x0 = clamp(Px * x + Pm * m, -r, r);  x_next = C0 * x0 + Cx * x + Cm * m + S * z

``m`` is the model's raw output (epsilon, v or sample prediction, or a flow velocity); the per-step
scalars ``coef`` (the columns of :class:`Coef`) come from the solver's plan (float64 on the host); the table
rows ``table_steps`` and their lerp weight ``table_w`` come from the guidance rule.
With no unconditional half (``m_uncond`` absent: outside a guidance interval, or classifier guidance
whose gradient is already folded into ``m_cond``) ``m = m_cond``.

The fused Triton kernel (``guided_step.py``) implements exactly :func:`guided_step_into` and is tested
against it.
"""
from __future__ import annotations

from enum import IntEnum

import torch


class Coef(IntEnum):
    """The columns of a solver plan's per-step coefficient rows, named once for every implementation."""

    A = 0  # x_next = A x + B m + S z (no clip)
    B = 1
    S = 2  # the per-step noise's scale (stochastic solvers)
    PX = 3  # x0 = PX x + PM m (clip: x0 is clamped to [-r, r])
    PM = 4
    C0 = 5  # x_next = C0 x0 + CX x + CM m + S z (clip)
    CX = 6
    CM = 7


NUM_COEF = len(Coef)


class RuleParam(IntEnum):
    """The per-call parameters of the guidance rules that need per-sample reductions (the columns of
    ``rule_params``), named once for every implementation. All zero except ETA = 1 is plain CFG."""

    ZERO_STAR = 0  # 1: CFG-Zero*'s per-sample alpha = <m_c, u> / (|u|^2 + eps) scales u; 0: alpha = 1
    ETA = 1  # APG: the weight of the guidance direction's part parallel to m_cond (1 keeps it: CFG)
    NORM_THRESHOLD = 2  # APG: the guidance direction's norm is capped at this (0: no cap)
    MOMENTUM = 3  # APG: the running average's weight of its previous value (the rule state carries it)
    RESCALE = 4  # guidance_rescale phi: mix of m and m * std(m_cond) / std(m) (0: off)


NUM_RULE_PARAMS = len(RuleParam)
assert [p.name for p in RuleParam] == ["ZERO_STAR", "ETA", "NORM_THRESHOLD", "MOMENTUM", "RESCALE"]  # unbind order
ZERO_STAR_EPS = 1e-8  # added to |u|^2 (diffusers' cfg_zero_star_scale)
NORMALIZE_EPS = 1e-12  # |m_cond| floor of the projection (torch.nn.functional.normalize's)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float64 for float64 inputs and in float32 otherwise (fp16/bf16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def guided_output(m_cond: torch.Tensor, m_uncond: torch.Tensor | None, g1: torch.Tensor, *, table=None, rows=None,
                  table_steps=None, table_w=None, rule_params=None, rule_state=None, dt: torch.dtype) -> torch.Tensor:
    """m = g1 m_cond + (1 - g1) R m_uncond in ``dt`` (m_cond alone without an unconditional half).

    With ``rule_params`` [NUM_RULE_PARAMS] the rules that need per-sample reductions (:func:`reduced_guidance`)
    combine m_cond and R m_uncond instead; their rule state (APG's running average, [B, *shape]) is updated in
    place."""
    m = m_cond.to(dt)
    if m_uncond is None:
        return m
    g1b = _bcast(g1.to(dt), m.ndim)
    u, r = m_uncond.to(dt), None
    if table is not None:
        flat = table.flatten(0, 1)  # [K*T, *shape]; tensor indices keep this traceable without host syncs
        r0 = flat[rows * table.shape[1] + table_steps[..., 0]].to(dt)  # [2] for the batch, or [B, 2] per row
        r1 = flat[rows * table.shape[1] + table_steps[..., 1]].to(dt)
        r = r0 + _bcast(table_w.to(dt), m.ndim) * (r1 - r0)  # exactly r0 on grid points (w = 0, i1 = i0)
    if rule_params is not None:
        prev = None if rule_state is None else rule_state.to(dt)
        m, state = reduced_guidance(m, u if r is None else r * u, g1.to(dt), rule_params.to(dt), prev)
        if rule_state is not None:
            rule_state.copy_(state)
        return m
    g0 = 1 - g1b
    return g1b * m + (g0 if r is None else g0 * r) * u


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def reduced_guidance(c: torch.Tensor, u: torch.Tensor, g1: torch.Tensor, params: torch.Tensor,
                     prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, the next rule state) of the rules with per-sample reductions, one formula for all of them:

        alpha = <c, u> / (|u|^2 + 1e-8)  (CFG-Zero*, ZERO_STAR = 1)  else 1
        D     = c - alpha u + beta prev                 (APG's running average with momentum beta; the next state)
        s     = min(1, threshold / |D|)  (threshold > 0)  else 1
        m     = alpha u + g1 s (D - (1 - eta) <D, c> / max(|c|, 1e-12)^2 c)
        m     = m ((1 - phi) + phi std(c) / std(m))    (guidance_rescale phi > 0; unbiased std over each sample)

    ``c``, ``u``: the conditional and (ratio-scaled) unconditional outputs [B, *shape]; norms, dot products and
    stds are per sample. A row with g1 == 1 is unguided: m = c and its state is kept (as a sample alone with
    scale 1 would run). With eta = 1 and no threshold, momentum or rescale this is CFG."""
    zero_star, eta, threshold, beta, phi = params.unbind()  # the RuleParam order
    nd = c.ndim
    alpha_raw = _row_sum(c * u) / (_row_sum(u * u) + ZERO_STAR_EPS)
    alpha = _bcast(torch.where(zero_star != 0, alpha_raw, torch.ones_like(alpha_raw)), nd)
    base = c - alpha * u
    d = base if prev is None else base + beta * prev
    d_norm = _row_sum(d * d).sqrt()
    s = torch.where(threshold > 0, torch.clamp(threshold / d_norm, max=1.0), torch.ones_like(d_norm))
    c_norm = _row_sum(c * c).sqrt().clamp(min=NORMALIZE_EPS)
    proj = (1 - eta) * _row_sum(d * c) / (c_norm * c_norm)
    g1b = _bcast(g1, nd)
    m = alpha * u + g1b * _bcast(s, nd) * (d - _bcast(proj, nd) * c)
    dims = list(range(1, nd))
    factor = (1 - phi) + phi * c.std(dim=dims) / m.std(dim=dims)
    m = torch.where(phi > 0, m * _bcast(factor, nd), m)
    m = torch.where(g1b == 1, c, m)
    if prev is None:
        return m, d
    # The kept state as a combination of base and prev (the same values as torch.where(g1 == 1, prev, d)):
    # inductor (torch 2.13) fails to compile a where that reads the mutated state again beside a reduction.
    guided = (g1b != 1).to(c.dtype)
    return m, guided * base + (beta * guided + (1 - guided)) * prev


def solver_update(xf: torch.Tensor, m: torch.Tensor, coef: torch.Tensor, *, clip_range=None, z=None, history=None,
                  hist_coef=None) -> torch.Tensor:
    """x_next (in xf's dtype) from x, the guided output m, the solver's history states and the noise z.
    ``coef``: [NUM_COEF] for the batch, or [B, NUM_COEF] per row (a batch of rows with plans of their own)."""
    A, B, S, Px, Pm, C0, Cx, Cm = per_row_columns(coef.to(xf.dtype), xf.ndim)
    if clip_range is None:
        out = A * xf + B * m
    else:
        x0 = (Px * xf + Pm * m).clamp(-clip_range, clip_range)
        out = C0 * x0 + Cx * xf + Cm * m
    if history is not None:
        out = out + history_combination(history, hist_coef.to(xf.dtype), xf.ndim)
    if z is not None:
        out = out + S * z.to(xf.dtype)
    return out


def per_row_columns(values: torch.Tensor, ndim: int) -> tuple[torch.Tensor, ...]:
    """The columns of [N] (one value each for the batch) or [B, N] (one per row, broadcast over a row's
    elements of an ``ndim``-dimensional batch)."""
    if values.ndim == 1:
        return values.unbind()
    return tuple(_bcast(v, ndim) for v in values.unbind(-1))


def history_combination(history: torch.Tensor, weights: torch.Tensor, ndim: int) -> torch.Tensor:
    """sum_j weights[j] * history[j] over the K history slots [K, B, *shape], in the weights' dtype; ``weights``
    [K] for the batch or [B, K] per row."""
    w = weights if weights.ndim == 1 else weights.transpose(0, 1)  # [K] or [K, B]
    return (_bcast(w, ndim + 1) * history.to(weights.dtype)).sum(0)


def history_writes(xf: torch.Tensor, m: torch.Tensor, history: torch.Tensor, write_coef: torch.Tensor) -> torch.Tensor:
    """[W, B, *shape]: each written state w = c[w, 0] x + c[w, 1] m + sum_j c[w, 2 + j] history[j] (the history read
    before any write of this step); ``write_coef`` [W, 2 + K] for the batch or [B, W, 2 + K] per row."""
    c = write_coef.to(xf.dtype)
    per_row = c.ndim == 3
    states = []
    for w in range(c.shape[-2]):
        cw = c[:, w] if per_row else c[w]
        cx, cm = per_row_columns(cw[..., :2], xf.ndim)
        states.append(cx * xf + cm * m + history_combination(history, cw[..., 2:], xf.ndim))
    return torch.stack(states)


def guided_step(
    x: torch.Tensor,
    m_cond: torch.Tensor,
    m_uncond: torch.Tensor | None,
    g1: torch.Tensor,
    coef: torch.Tensor,
    *,
    table: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    table_steps: torch.Tensor | None = None,
    table_w: torch.Tensor | None = None,
    clip_range: float | None = None,
    z: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    hist_coef: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One guided step; returns x_next in x's dtype.

    x, m_cond, m_uncond, z: [B, *shape]; g1: [B]; coef: [NUM_COEF] (the columns of :class:`Coef`);
    table: [K, T, *shape] ratio rows; rows: [B] int64 row per sample; table_steps: [2] int (i0, i1);
    table_w: [] the lerp weight between the two rows; history: [K, B, *shape] a multistep solver's past states,
    hist_coef: [K] their weights in x_next. Per-row plans (each row its own solver plan): coef [B, NUM_COEF],
    table_steps [B, 2], table_w [B], hist_coef [B, K] (and ``guided_step_into``'s write_coef [B, W, 2 + K]).
    """
    dt = compute_dtype or compute_dtype_for(x.dtype)
    m = guided_output(m_cond, m_uncond, g1, table=table, rows=rows, table_steps=table_steps, table_w=table_w, dt=dt)
    return solver_update(x.to(dt), m, coef, clip_range=clip_range, z=z, history=history,
                         hist_coef=hist_coef).to(x.dtype)


def copy_into_blocks(out: torch.Tensor, y: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Write y [B, ...] into every B-row block of out [k*B, ...] with one broadcasting copy (any memory
    layout). ``blocks``: out already viewed as [k, B, ...] (a loop makes that view once)."""
    if blocks is None:
        blocks = out.view(out.shape[0] // y.shape[0], *y.shape)
    blocks.copy_(y)
    return out


def split_model_output(model_out: torch.Tensor, batch: int, cond_first: bool = True):
    """Views of the cond and uncond halves of a [2B, ...] model output (no copies); uncond None for [B, ...]."""
    if model_out.shape[0] == batch:
        return model_out, None
    if model_out.shape[0] != 2 * batch:
        raise ValueError(f"model_out: expected {batch} or {2 * batch} rows, got {model_out.shape[0]}")
    first, second = model_out[:batch], model_out[batch:]
    return (first, second) if cond_first else (second, first)


def guided_step_into(
    out: torch.Tensor,
    x: torch.Tensor,
    model_out: torch.Tensor,
    g1: torch.Tensor,
    coef: torch.Tensor,
    *,
    cond_first: bool = True,
    table: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    table_steps: torch.Tensor | None = None,
    table_w: torch.Tensor | None = None,
    clip_range: float | None = None,
    z: torch.Tensor | None = None,
    history: torch.Tensor | None = None,
    hist_coef: torch.Tensor | None = None,
    write_slots: torch.Tensor | None = None,
    write_coef: torch.Tensor | None = None,
    rule_params: torch.Tensor | None = None,
    rule_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampler-facing step: read the model's [2B] (or [B]) output in place, write x_next into every
    B-row block of ``out`` ([B] or [2B], the model's next input buffer; ``x`` may alias ``out[:B]``). A multistep
    solver also writes this step's new states (``write_coef`` [W, 2 + K]) into ``history`` at ``write_slots`` [W].
    ``rule_params`` [NUM_RULE_PARAMS] (the columns of :class:`RuleParam`): a rule with per-sample reductions
    (:func:`reduced_guidance`; its state ``rule_state`` [B, *shape], APG's running average, updated in place)."""
    batch = x.shape[0]
    dt = compute_dtype_for(x.dtype)
    m_cond, m_uncond = split_model_output(model_out, batch, cond_first)
    m = guided_output(m_cond, m_uncond, g1, table=table, rows=rows, table_steps=table_steps, table_w=table_w,
                      rule_params=rule_params, rule_state=rule_state, dt=dt)
    xf = x.to(dt)
    x_next = solver_update(xf, m, coef, clip_range=clip_range, z=z, history=history, hist_coef=hist_coef)
    if write_coef is not None:
        history.index_copy_(0, write_slots, history_writes(xf, m, history, write_coef).to(history.dtype))
    return copy_into_blocks(out, x_next.to(x.dtype))
