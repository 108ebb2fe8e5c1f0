"""The eager torch guided step: :func:`fastguide.kernels.reference.guided_step_into` with host scalars.

On the CPU (and for eager sampling anywhere without Triton) every torch op costs a few microseconds of
dispatch, so this path takes the per-step scalars as Python floats / ints from the host plan and does the
whole step in about six in-place ops. It is not CUDA-graph capturable (the scalars are baked into the ops);
compiled and captured loops use the reference or the Triton kernel with device tensors instead. Tested
against the reference in tests/kernels/test_torch_step.py.
"""
from __future__ import annotations

import functools

import torch

from fastguide.kernels.reference import (NORMALIZE_EPS, ZERO_STAR_EPS, Coef, compute_dtype_for, copy_into_blocks,
                                         split_model_output)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skip the dispatch when there is nothing to convert


def guided_step_into_host(out: torch.Tensor, x: torch.Tensor, model_out: torch.Tensor, g1: torch.Tensor,
                          coef, *, cond_first: bool = True, table: torch.Tensor | None = None,
                          rows: torch.Tensor | None = None, table_steps=None, table_w: float | None = None,
                          clip_range: float | None = None, z: torch.Tensor | None = None,
                          history: torch.Tensor | None = None, hist_coef=None, write_slots=None, write_coef=None,
                          rule_params=None, rule_state: torch.Tensor | None = None, unit_rows: bool = True,
                          blocks: torch.Tensor | None = None, coef_scalars=None, write_scalars=None) -> torch.Tensor:
    """Same contract as the reference, except ``coef`` is a sequence of NUM_COEF Python floats (the columns of
    ``Coef``), ``table_steps`` a pair of Python ints (i0, i1), ``table_w`` a Python float, ``hist_coef`` K floats,
    ``write_slots`` W ints and ``write_coef`` W rows of 2 + K floats. Zero weights are skipped (a history slot
    not yet written is never read). ``rule_params``: NUM_RULE_PARAMS floats (the columns of ``RuleParam``; what a
    rule does not use is skipped), ``rule_state`` a tensor as in the reference; ``unit_rows=False`` promises that no
    row's g1 is 1 (the loop knows it from the host scales), which skips keeping those rows unguided. ``blocks``:
    ``out`` viewed as [k, B, ...] (optional; a loop makes it once instead of every step). A loop also passes g1
    already viewed as [B, 1, ...], ``history`` as its K slot views, and ``coef_scalars`` / ``write_scalars``: the
    multipliers ``coef`` / each write's x coefficient as 0-d CPU tensors in the compute dtype (the same values,
    multiplied in about half the dispatch time of a Python float)."""
    A, B, S, Px, Pm, C0, Cx, Cm = coef
    if coef_scalars is not None:
        B, Px, C0 = coef_scalars[Coef.B], coef_scalars[Coef.PX], coef_scalars[Coef.C0]
    batch = x.shape[0]
    dt = compute_dtype_for(x.dtype)
    m_cond, m_uncond = split_model_output(model_out, batch, cond_first)
    m = _as(m_cond, dt)
    if m_uncond is not None:
        g1b = _as(g1, dt)
        if g1b.ndim != x.ndim:
            g1b = g1b.view(batch, *([1] * (x.ndim - 1)))
        m_u = _as(m_uncond, dt)
        if table is not None:
            i0, i1 = table_steps
            ratio = _as(table[:, i0].index_select(0, rows), dt)
            if i1 != i0:
                ratio = torch.lerp(ratio, _as(table[:, i1].index_select(0, rows), dt), table_w)
            m_u = ratio.mul_(m_u)  # R * m_u; R == 1 leaves m_u bit-identical, so a unit table is exactly CFG
        if rule_params is not None:
            m = _reduced_guidance_host(m, m_u, g1b, rule_params, rule_state, unit_rows)
        else:
            m = torch.lerp(m_u, m, g1b)  # m_u + g1 (m_c - m_u) = g1 m_c + (1 - g1) R m_u
    xf = _as(x, dt)
    if clip_range is None:
        y = torch.mul(m, B).add_(xf, alpha=A)
    else:
        y = torch.mul(xf, Px).add_(m, alpha=Pm).clamp_(-clip_range, clip_range)
        y.mul_(C0).add_(xf, alpha=Cx)
        if Cm != 0:
            y.add_(m, alpha=Cm)
    if z is not None and S != 0:
        y.add_(_as(z, dt), alpha=S)
    if history is not None:
        _add_history(y, history, hist_coef, dt)
        if write_coef is not None:
            xs = [c[0] for c in write_coef] if write_scalars is None else write_scalars
            states = [_add_history(torch.mul(xf, cx).add_(m, alpha=c[1]), history, c[2:], dt)
                      for c, cx in zip(write_coef, xs)]
            for slot, state in zip(write_slots, states):  # all computed from the history before this step's writes
                history[slot].copy_(state)
    return copy_into_blocks(out, y, blocks)  # y is a fresh tensor, so x aliasing out[:B] is safe


def _add_history(y: torch.Tensor, history: torch.Tensor, weights, dt: torch.dtype) -> torch.Tensor:
    for j, w in enumerate(weights):
        if w != 0:
            y.add_(_as(history[j], dt), alpha=w)
    return y


_ROW_DIMS = tuple(tuple(range(1, n)) for n in range(9))  # a sample's dims, by the batch's ndim


def _reduced_guidance_host(c: torch.Tensor, u: torch.Tensor, g1: torch.Tensor, params, state,
                           unit_rows: bool = True) -> torch.Tensor:
    """:func:`fastguide.kernels.reference.reduced_guidance` with the parameters as host floats, so the parts a rule
    does not use cost nothing (CFG-Zero*: alpha only; APG without a cap: no norm; no rescale: no std; no row at
    g1 = 1: no masking). Every op here is dispatch-bound on small latents, so the per-sample factors are made with
    the fewest ops, the host floats passed as scalar arguments (alpha=, value=, min=) rather than multiplied in
    (a Python float operand is wrapped into a tensor on every call)."""
    zero_star, eta, threshold, beta, phi = params
    dims = _ROW_DIMS[c.ndim] if c.ndim < len(_ROW_DIMS) else tuple(range(1, c.ndim))
    g1b = g1 if g1.ndim == c.ndim else g1.view(-1, *([1] * (c.ndim - 1)))
    au = u
    if zero_star:
        au = (c * u).sum(dims, keepdim=True).div_((u * u).sum(dims, keepdim=True).add_(ZERO_STAR_EPS)).mul(u)
    if threshold <= 0 and eta == 1 and state is None:
        m = torch.lerp(au, c, g1b)  # alpha u + g1 (c - alpha u): CFG, CFG-Zero*, APG without cap or projection
    else:
        d = c - au
        if state is not None and beta != 0:
            d.add_(_as(state, c.dtype), alpha=beta)
        gs = g1b
        if threshold > 0:  # g1 min(1, threshold / |D|) = g1 threshold / max(|D|, threshold)
            norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True).clamp_(min=threshold)
            gs = torch.addcdiv(_scalar(0.0, c.dtype), g1b, norm, value=threshold)
        direction = d
        if eta != 1:  # D - (1 - eta) <D, c> / |c|^2 c
            cc = (c * c).sum(dims, keepdim=True).clamp_(min=NORMALIZE_EPS * NORMALIZE_EPS)
            direction = torch.addcmul(d, (d * c).sum(dims, keepdim=True).div_(cc), c, value=eta - 1)
        m = torch.addcmul(au, gs, direction)
        if state is not None:
            state.copy_(torch.where(g1b == 1, state, d) if unit_rows else d)
    if phi > 0:
        m.mul_(_rescale_factor(c, m, phi))
    return torch.where(g1b == 1, c, m) if unit_rows else m


def _rescale_factor(c: torch.Tensor, m: torch.Tensor, phi: float) -> torch.Tensor:
    """(1 - phi) + phi std(c) / std(m) per sample, [B, 1, ...]: the two samples' centred norms from one stacked
    sum, subtraction and norm (the std's n - 1 cancels), then one addcdiv. torch's CPU std is a slow per-row kernel
    on these small rows (~50 us a call at B = 64 x 64 elements, against ~20 us for this whole factor); the values
    agree to rounding."""
    cm = torch.stack((c, m))  # [2, B, *shape]
    dims = tuple(range(2, cm.ndim))
    centred = torch.sub(cm, cm.sum(dims, keepdim=True), alpha=c.shape[0] / c.numel())
    norm_c, norm_m = torch.linalg.vector_norm(centred, dim=dims, keepdim=True).unbind()
    return torch.addcdiv(_scalar(1.0 - phi, c.dtype), norm_c, norm_m, value=phi)


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d CPU tensor of ``value`` (read only), made once per value: the term of an addcdiv that has none. Made
    outside inference mode, so a first call under it does not hand later autograd code an inference tensor."""
    with torch.inference_mode(False):
        return torch.tensor(value, dtype=dtype)
