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


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Math runs in float64 for float64 inputs and in float32 otherwise (fp16/bf16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def guided_output(m_cond: torch.Tensor, m_uncond: torch.Tensor | None, g1: torch.Tensor, *, table=None, rows=None,
                  table_steps=None, table_w=None, dt: torch.dtype) -> torch.Tensor:
    """m = g1 m_cond + (1 - g1) R m_uncond in ``dt`` (m_cond alone without an unconditional half)."""
    m = m_cond.to(dt)
    if m_uncond is None:
        return m
    g1b = _bcast(g1.to(dt), m.ndim)
    g0 = 1 - g1b
    if table is not None:
        flat = table.flatten(0, 1)  # [K*T, *shape]; tensor indices keep this traceable without host syncs
        r0 = flat[rows * table.shape[1] + table_steps[0]].to(dt)
        r1 = flat[rows * table.shape[1] + table_steps[1]].to(dt)
        r = r0 + table_w.to(dt) * (r1 - r0)  # exactly r0 on grid points (w = 0, i1 = i0)
        g0 = g0 * r
    return g1b * m + g0 * m_uncond.to(dt)


def solver_update(xf: torch.Tensor, m: torch.Tensor, coef: torch.Tensor, *, clip_range=None, z=None, history=None,
                  hist_coef=None) -> torch.Tensor:
    """x_next (in xf's dtype) from x, the guided output m, the solver's history states and the noise z."""
    A, B, S, Px, Pm, C0, Cx, Cm = coef.to(xf.dtype).unbind()
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


def history_combination(history: torch.Tensor, weights: torch.Tensor, ndim: int) -> torch.Tensor:
    """sum_j weights[j] * history[j] over the K history slots [K, B, *shape], in the weights' dtype."""
    return (_bcast(weights, ndim + 1) * history.to(weights.dtype)).sum(0)


def history_writes(xf: torch.Tensor, m: torch.Tensor, history: torch.Tensor, write_coef: torch.Tensor) -> torch.Tensor:
    """[W, B, *shape]: each written state w = c[w, 0] x + c[w, 1] m + sum_j c[w, 2 + j] history[j] (the history read
    before any write of this step)."""
    c = write_coef.to(xf.dtype)
    return torch.stack([c[w, 0] * xf + c[w, 1] * m + history_combination(history, c[w, 2:], xf.ndim)
                        for w in range(c.shape[0])])


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
    hist_coef: [K] their weights in x_next.
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
) -> torch.Tensor:
    """The sampler-facing step: read the model's [2B] (or [B]) output in place, write x_next into every
    B-row block of ``out`` ([B] or [2B], the model's next input buffer; ``x`` may alias ``out[:B]``). A multistep
    solver also writes this step's new states (``write_coef`` [W, 2 + K]) into ``history`` at ``write_slots`` [W]."""
    batch = x.shape[0]
    dt = compute_dtype_for(x.dtype)
    m_cond, m_uncond = split_model_output(model_out, batch, cond_first)
    m = guided_output(m_cond, m_uncond, g1, table=table, rows=rows, table_steps=table_steps, table_w=table_w, dt=dt)
    xf = x.to(dt)
    x_next = solver_update(xf, m, coef, clip_range=clip_range, z=z, history=history, hist_coef=hist_coef)
    if write_coef is not None:
        history.index_copy_(0, write_slots, history_writes(xf, m, history, write_coef).to(history.dtype))
    return copy_into_blocks(out, x_next.to(x.dtype))
