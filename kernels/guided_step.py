"""The fused guided-step Triton kernel: exactly :func:`fastguide.kernels.reference.guided_step_into`.

One program handles BLOCK consecutive elements of one batch row (grid = (blocks per row, B)), so the
row's g1, label row and the step's coefficients are loaded once per program, then every streamed operand
is read once and x_next is stored into each B-row block of ``out``:

    m  = g1 * m_cond + (1 - g1) * R * m_uncond        R = lerp(table[row, i0], table[row, i1], w)  (1 for CFG)
    y  = A * x + B * m + S * z                         (no clip)
    y  = C0 * clamp(Px * x + Pm * m, -r, r) + Cx * x + Cm * m + S * z   (clip)

A multistep solver's history [K, B, *shape] adds ``sum_j hist_coef[j] * history[j]`` to y (before S * z) and the
step writes W new states, ``history[write_slots[w]] = c[w, 0] x + c[w, 1] m + sum_j c[w, 2 + j] history[j]``
(``c = write_coef``), all from the history as read before this step's writes: each thread loads its elements of
the K slots, then stores its elements of the W written ones (the same elements, so no other program reads them).

Per-step scalars (coef [NUM_COEF] float32, g1 [B] float32, rows [B], table_steps [2], table_w [] float32,
hist_coef [K] float32, write_slots [W] int, write_coef [W, 2 + K] float32) are read from device memory,
so changing them never recompiles and the launch is CUDA-graph capturable. K and W are compile-time (0: no
history). Per-row plans (PER_ROW, each row its own solver plan: coef [B, NUM_COEF], table_steps [B, 2], table_w [B],
hist_coef [B, K], write_coef [B, W, 2 + K]; write_slots stays [W]) move each pointer to the program's row once, then
load the same scalars. Math is float32; float64 inputs fall back to the reference. See docs/kernel.md.

The rules with per-sample reductions (``rule_params``, :func:`fastguide.kernels.reference.reduced_guidance`) run as
two launches: :func:`rule_moments_kernel` writes each row's partial moments of (c, v = c - R u, a = the rule state)
into a float32 workspace [B, NUM_M, NBP] (one column per program, no atomics), then ``guided_step_kernel`` with
REDUCE sums its row's partials in a fixed order, derives the row's coefficients and streams the step as above with
m = k_c c + k_v v + k_a a (and the new rule state D = (1 - alpha) c + alpha v + beta a).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastguide.kernels import reference
from fastguide.kernels.reference import Coef, RuleParam

NUM_WARPS = 8
VECTOR_BYTES = 16  # one 128-bit access per thread per operand
MAX_BATCH = 65535  # CUDA grid axis 1 limit
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_HISTORY_SLOTS = 4  # K: DPM-Solver++ 3M reads 2, UniPC-3 reads 4 (the SASS proof covers up to these)
MAX_HISTORY_WRITES = 2  # W: UniPC writes 2 states a step (the corrected sample and the converted output)
# The coefficient columns as compile-time offsets (a @triton.jit function may read only constexpr globals).
COEF_A, COEF_B, COEF_S, COEF_PX, COEF_PM, COEF_C0, COEF_CX, COEF_CM = (tl.constexpr(int(c)) for c in Coef)
NUM_COEF = tl.constexpr(reference.NUM_COEF)
RP_ZERO_STAR, RP_ETA, RP_NORM_THRESHOLD, RP_MOMENTUM, RP_RESCALE = (tl.constexpr(int(p)) for p in RuleParam)
ZERO_STAR_EPS = tl.constexpr(reference.ZERO_STAR_EPS)
NORMALIZE_EPS = tl.constexpr(reference.NORMALIZE_EPS)
# The per-row moments of the reduction pre-pass, over c = m_cond, v = c - R m_uncond and a = the rule state:
# row sums S_x (for the stds) and the Gram entries Q_xy = <x, y>. The state's four come last (HAS_STATE only).
MOMENT_NAMES = ("S_c", "S_v", "Q_cc", "Q_vv", "Q_cv", "S_a", "Q_aa", "Q_ca", "Q_va")
M_SC, M_SV, M_CC, M_VV, M_CV, M_SA, M_AA, M_CA, M_VA = (tl.constexpr(i) for i in range(len(MOMENT_NAMES)))
NUM_MOMENTS_STATELESS, NUM_MOMENTS_STATE = 5, 9
MAX_PARTIALS = 64  # pre-pass programs per row at most: the step kernel's programs each sum NBP <= 64 partials
# Sums are tl.reduce(x, axis, _sum_combine), which is what tl.sum compiles to for float32; spelled out because the
# Triton interpreter runs every @jit call (tl.sum is one) through a ~2 ms patching step, but takes its numpy fast
# path for a reduce with this combine function (the kernels' tests would otherwise take minutes).
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # not in this triton: an equivalent combine function (correct, slower when interpreted)
    @triton.jit
    def _sum_combine(a, b):
        return a + b


@triton.jit
def rule_moments_kernel(
    ws_ptr, m_cond_ptr, m_uncond_ptr, state_ptr, table_ptr, rows_ptr, steps_ptr, w_ptr,
    n_per_row, blocks_per_partial, table_k, table_t,
    HAS_TABLE: tl.constexpr, HAS_STATE: tl.constexpr, NUM_M: tl.constexpr, NBP: tl.constexpr,
    BLOCK: tl.constexpr, VEC: tl.constexpr, PER_ROW: tl.constexpr = False,
):
    """Partial moments of one row (grid axis 1) over ``blocks_per_partial`` consecutive BLOCKs (grid axis 0):
    writes ws[row, j, partial] for the moments j of MOMENT_NAMES (the state's only with HAS_STATE). Each thread
    accumulates its VEC elements (one 128-bit vector of every operand) per block into one float32 per moment; the
    block-wide sums run once at the end."""
    row = tl.program_id(1).to(tl.int64)
    part = tl.program_id(0)
    base = row * n_per_row
    lanes = tl.arange(0, BLOCK // VEC)[:, None] * VEC + tl.arange(0, VEC)[None, :]  # [threads' vectors, VEC]
    if PER_ROW:  # the row's own table steps [B, 2] and lerp weight [B]
        steps_ptr += row * 2
        w_ptr += row
    if HAS_TABLE:
        label_row = tl.minimum(tl.maximum(tl.load(rows_ptr + row).to(tl.int64), 0), table_k - 1)
        i0 = tl.minimum(tl.maximum(tl.load(steps_ptr).to(tl.int64), 0), table_t - 1)
        i1 = tl.minimum(tl.maximum(tl.load(steps_ptr + 1).to(tl.int64), 0), table_t - 1)
        slab0 = (label_row * table_t + i0) * n_per_row
        slab1 = (label_row * table_t + i1) * n_per_row
        lerp = i1 != i0
        w = tl.load(w_ptr)
    s_c = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    s_v = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    q_cc = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    q_vv = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    q_cv = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    if HAS_STATE:
        s_a = tl.full((BLOCK // VEC,), 0.0, tl.float32)
        q_aa = tl.full((BLOCK // VEC,), 0.0, tl.float32)
        q_ca = tl.full((BLOCK // VEC,), 0.0, tl.float32)
        q_va = tl.full((BLOCK // VEC,), 0.0, tl.float32)
    start = part * blocks_per_partial * BLOCK
    for i in range(0, blocks_per_partial):
        offs = start + i * BLOCK + lanes
        mask = offs < n_per_row
        c = tl.load(m_cond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(m_uncond_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_TABLE:
            ratio = tl.load(table_ptr + slab0 + offs, mask=mask, other=0.0).to(tl.float32)  # (0 past the row)
            ratio1 = tl.load(table_ptr + slab1 + offs, mask=mask & lerp, other=0.0).to(tl.float32)
            ratio = tl.where(lerp, ratio + w * (ratio1 - ratio), ratio)
            u = ratio * u
        v = c - u
        s_c += tl.reduce(c, 1, _sum_combine)
        s_v += tl.reduce(v, 1, _sum_combine)
        q_cc += tl.reduce(c * c, 1, _sum_combine)
        q_vv += tl.reduce(v * v, 1, _sum_combine)
        q_cv += tl.reduce(c * v, 1, _sum_combine)
        if HAS_STATE:
            a = tl.load(state_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            s_a += tl.reduce(a, 1, _sum_combine)
            q_aa += tl.reduce(a * a, 1, _sum_combine)
            q_ca += tl.reduce(c * a, 1, _sum_combine)
            q_va += tl.reduce(v * a, 1, _sum_combine)
    ws_row = ws_ptr + row * (NUM_M * NBP) + part
    tl.store(ws_row + M_SC * NBP, tl.reduce(s_c, 0, _sum_combine))
    tl.store(ws_row + M_SV * NBP, tl.reduce(s_v, 0, _sum_combine))
    tl.store(ws_row + M_CC * NBP, tl.reduce(q_cc, 0, _sum_combine))
    tl.store(ws_row + M_VV * NBP, tl.reduce(q_vv, 0, _sum_combine))
    tl.store(ws_row + M_CV * NBP, tl.reduce(q_cv, 0, _sum_combine))
    if HAS_STATE:
        tl.store(ws_row + M_SA * NBP, tl.reduce(s_a, 0, _sum_combine))
        tl.store(ws_row + M_AA * NBP, tl.reduce(q_aa, 0, _sum_combine))
        tl.store(ws_row + M_CA * NBP, tl.reduce(q_ca, 0, _sum_combine))
        tl.store(ws_row + M_VA * NBP, tl.reduce(q_va, 0, _sum_combine))


@triton.jit
def guided_step_kernel(
    out_ptr, out2_ptr, x_ptr, m_cond_ptr, m_uncond_ptr, g1_ptr, coef_ptr,
    table_ptr, rows_ptr, steps_ptr, w_ptr, z_ptr,
    hist_ptr, hist_coef_ptr, write_slots_ptr, write_coef_ptr,
    n_per_row, table_k, table_t, clip_range, ws_ptr, rule_params_ptr, state_ptr, n_partials,
    HAS_UNCOND: tl.constexpr, HAS_TABLE: tl.constexpr, CLIP: tl.constexpr, HAS_Z: tl.constexpr,
    TWO_OUT: tl.constexpr, BLOCK: tl.constexpr, HIST_K: tl.constexpr = 0, HIST_W: tl.constexpr = 0,
    REDUCE: tl.constexpr = False, HAS_STATE: tl.constexpr = False, NUM_M: tl.constexpr = 5, NBP: tl.constexpr = 1,
    PER_ROW: tl.constexpr = False,
):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_per_row
    base = row * n_per_row
    if PER_ROW:  # the row's own plan: every per-step scalar below is then read at the same offset from its row
        coef_ptr += row * NUM_COEF
        steps_ptr += row * 2
        w_ptr += row
        hist_coef_ptr += row * HIST_K
        write_coef_ptr += row * (HIST_W * (2 + HIST_K))
    if REDUCE:  # (before the streamed loads: the partials' reduction then holds no streamed registers)
        # The row's coefficients from its moments; every program of the row sums the same partials in the same
        # order, so they all get the same ones. In the basis (c, v = c - u, a): m = kc c + kv v + ka a and the
        # next state D = c - alpha u + beta a = ab c + alpha v + beta a with ab = 1 - alpha. When c and u are
        # close (as cond and uncond outputs are) |D|^2 and 1 - alpha then come from <v, v> and <c, v> without
        # the cancellation that <c, c> - 2 alpha <c, u> + alpha^2 <u, u> would suffer in float32.
        g1 = tl.load(g1_ptr + row)
        pidx = tl.arange(0, NBP)
        pmask = pidx < n_partials
        ws_row = ws_ptr + row * (NUM_M * NBP) + pidx
        s_c = tl.reduce(tl.load(ws_row + M_SC * NBP, mask=pmask, other=0.0), 0, _sum_combine)
        s_v = tl.reduce(tl.load(ws_row + M_SV * NBP, mask=pmask, other=0.0), 0, _sum_combine)
        q_cc = tl.reduce(tl.load(ws_row + M_CC * NBP, mask=pmask, other=0.0), 0, _sum_combine)
        q_vv = tl.reduce(tl.load(ws_row + M_VV * NBP, mask=pmask, other=0.0), 0, _sum_combine)
        q_cv = tl.reduce(tl.load(ws_row + M_CV * NBP, mask=pmask, other=0.0), 0, _sum_combine)
        zero_star = tl.load(rule_params_ptr + RP_ZERO_STAR) != 0.0
        eta = tl.load(rule_params_ptr + RP_ETA)
        threshold = tl.load(rule_params_ptr + RP_NORM_THRESHOLD)
        phi = tl.load(rule_params_ptr + RP_RESCALE)
        # CFG-Zero*: alpha = <c, u> / (|u|^2 + eps), 1 - alpha = (<v, v> - <c, v> + eps) / (|u|^2 + eps).
        den = q_cc - 2.0 * q_cv + q_vv + ZERO_STAR_EPS
        alpha = tl.where(zero_star, (q_cc - q_cv) / den, 1.0)
        ab = tl.where(zero_star, (q_vv - q_cv + ZERO_STAR_EPS) / den, 0.0)
        d2 = ab * ab * q_cc + alpha * alpha * q_vv + 2.0 * ab * alpha * q_cv  # |D|^2
        dc = ab * q_cc + alpha * q_cv  # <D, c>
        if HAS_STATE:
            s_a = tl.reduce(tl.load(ws_row + M_SA * NBP, mask=pmask, other=0.0), 0, _sum_combine)
            q_aa = tl.reduce(tl.load(ws_row + M_AA * NBP, mask=pmask, other=0.0), 0, _sum_combine)
            q_ca = tl.reduce(tl.load(ws_row + M_CA * NBP, mask=pmask, other=0.0), 0, _sum_combine)
            q_va = tl.reduce(tl.load(ws_row + M_VA * NBP, mask=pmask, other=0.0), 0, _sum_combine)
            beta = tl.load(rule_params_ptr + RP_MOMENTUM)
            d2 += beta * (beta * q_aa + 2.0 * (ab * q_ca + alpha * q_va))
            dc += beta * q_ca
        # APG: the norm cap (|D| = 0 gives threshold / 0 = inf -> 1) and the projection onto c.
        sc = tl.where(threshold > 0.0, tl.minimum(threshold / tl.sqrt(tl.maximum(d2, 0.0)), 1.0), 1.0)
        c_norm = tl.maximum(tl.sqrt(q_cc), NORMALIZE_EPS)
        gs = g1 * sc
        kc = alpha + gs * (ab - (1.0 - eta) * dc / (c_norm * c_norm))
        kv = alpha * (gs - 1.0)
        # guidance_rescale: std(c) / std(m) from the centered second moments (the n - 1 cancels).
        n = n_per_row.to(tl.float32)
        c_cc = q_cc - s_c * s_c / n
        var_m = kc * kc * c_cc + kv * kv * (q_vv - s_v * s_v / n) + 2.0 * kc * kv * (q_cv - s_c * s_v / n)
        if HAS_STATE:
            ka = gs * beta
            var_m += ka * (ka * (q_aa - s_a * s_a / n) + 2.0 * (kc * (q_ca - s_c * s_a / n)
                                                               + kv * (q_va - s_v * s_a / n)))
        factor = tl.where(phi > 0.0, (1.0 - phi) + phi * tl.sqrt(c_cc / var_m), 1.0)
        unguided = g1 == 1.0  # m = c exactly, the state kept
        kc = tl.where(unguided, 1.0, kc * factor)
        kv = tl.where(unguided, 0.0, kv * factor)
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    m = tl.load(m_cond_ptr + base + offs, mask=mask).to(tl.float32)
    if HAS_UNCOND:
        if not REDUCE:  # (a REDUCE step loaded it above, with its row's coefficients)
            g1 = tl.load(g1_ptr + row)
        m_uncond = tl.load(m_uncond_ptr + base + offs, mask=mask).to(tl.float32)
        g0 = 1.0 - g1
        if HAS_TABLE:
            # Indices are clamped so a bad label or step can never read outside the table (the launcher's
            # check raises for them; the clamp only matters with check=False).
            label_row = tl.minimum(tl.maximum(tl.load(rows_ptr + row).to(tl.int64), 0), table_k - 1)
            i0 = tl.minimum(tl.maximum(tl.load(steps_ptr).to(tl.int64), 0), table_t - 1)
            i1 = tl.minimum(tl.maximum(tl.load(steps_ptr + 1).to(tl.int64), 0), table_t - 1)
            slab0 = (label_row * table_t + i0) * n_per_row
            slab1 = (label_row * table_t + i1) * n_per_row
            ratio = tl.load(table_ptr + slab0 + offs, mask=mask).to(tl.float32)
            # On grid steps (i0 == i1) the second row is predicated off: one table read per element.
            lerp = i1 != i0
            ratio1 = tl.load(table_ptr + slab1 + offs, mask=mask & lerp, other=0.0).to(tl.float32)
            w = tl.load(w_ptr)
            ratio = tl.where(lerp, ratio + w * (ratio1 - ratio), ratio)
            if REDUCE:
                m_uncond = ratio * m_uncond  # u = R m_uncond, as the pre-pass computed it
            else:
                g0 = g0 * ratio
        if REDUCE:
            v = m - m_uncond
            if HAS_STATE:
                a_prev = tl.load(state_ptr + base + offs, mask=mask).to(tl.float32)
                # The running average D = c - alpha u + beta a; a row with g1 == 1 keeps its state.
                d = ab * m + alpha * v + beta * a_prev
                keep = tl.where(g1 != 1.0, n_per_row, 0)  # the row's elements to write: all or none
                tl.store(state_ptr + base + offs, d.to(state_ptr.dtype.element_ty), mask=offs < keep)
                m = kc * m + kv * v + tl.where(unguided, 0.0, ka * factor) * a_prev
            else:
                m = kc * m + kv * v
        else:
            m = g1 * m + g0 * m_uncond
    if CLIP:
        px = tl.load(coef_ptr + COEF_PX)
        pm = tl.load(coef_ptr + COEF_PM)
        c0 = tl.load(coef_ptr + COEF_C0)
        cx = tl.load(coef_ptr + COEF_CX)
        cm = tl.load(coef_ptr + COEF_CM)
        x0 = tl.clamp(px * x + pm * m, -clip_range, clip_range)
        y = c0 * x0 + cx * x + cm * m
    else:
        a = tl.load(coef_ptr + COEF_A)
        b = tl.load(coef_ptr + COEF_B)
        y = a * x + b * m
    if HIST_K > 0:
        # history[j] of this row is B * n_per_row elements after history[j - 1] (grid axis 1 is B).
        slot_stride = tl.num_programs(1).to(tl.int64) * n_per_row
        hist_row = hist_ptr + base + offs
        if HIST_W > 0:
            acc0 = tl.load(write_coef_ptr) * x + tl.load(write_coef_ptr + 1) * m
        if HIST_W > 1:
            acc1 = tl.load(write_coef_ptr + (2 + HIST_K)) * x + tl.load(write_coef_ptr + (3 + HIST_K)) * m
        for j in tl.static_range(HIST_K):  # every slot is loaded once, before any write of this step
            h = tl.load(hist_row + j * slot_stride, mask=mask).to(tl.float32)
            y += tl.load(hist_coef_ptr + j) * h
            if HIST_W > 0:
                acc0 += tl.load(write_coef_ptr + (2 + j)) * h
            if HIST_W > 1:
                acc1 += tl.load(write_coef_ptr + (4 + HIST_K + j)) * h
        # Slots are clamped into [0, K) so a bad slot can never write outside the history (check=True raises).
        if HIST_W > 0:
            slot0 = tl.minimum(tl.maximum(tl.load(write_slots_ptr).to(tl.int64), 0), HIST_K - 1)
            tl.store(hist_row + slot0 * slot_stride, acc0.to(hist_ptr.dtype.element_ty), mask=mask)
        if HIST_W > 1:
            slot1 = tl.minimum(tl.maximum(tl.load(write_slots_ptr + 1).to(tl.int64), 0), HIST_K - 1)
            tl.store(hist_row + slot1 * slot_stride, acc1.to(hist_ptr.dtype.element_ty), mask=mask)
    if HAS_Z:
        s = tl.load(coef_ptr + COEF_S)
        y = y + s * tl.load(z_ptr + base + offs, mask=mask).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + base + offs, y, mask=mask)
    if TWO_OUT:
        tl.store(out2_ptr + base + offs, y, mask=mask)


def launch_config(dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK, num_warps): each thread owns one 128-bit vector of every streamed operand of ``dtype``."""
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size() * 32 * NUM_WARPS, NUM_WARPS


# ---------------------------------------------------------------------------- validation
def _dense_strides(shape, channels_last: bool) -> list[int]:
    """Strides of a dense tensor of ``shape`` whose trailing (C, H, W) dims are in NCHW or NHWC order."""
    order = list(range(len(shape)))  # dims from outermost to innermost
    if channels_last:
        c = len(shape) - 3
        order = order[:c] + [c + 1, c + 2, c]
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return strides


def _has_layout(t: torch.Tensor, channels_last: bool) -> bool:
    want = _dense_strides(t.shape, channels_last)
    return all(s == w for s, w, n in zip(t.stride(), want, t.shape) if n > 1)


def _check_tensor(name: str, t, device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (where out is), got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_plan_shape(name: str, t: torch.Tensor, per_row: bool, batch: int, shape: tuple, dims: str) -> None:
    """A per-step operand of the plan: ``shape`` ([dims]) with one plan for the batch (coef [NUM_COEF]), or
    (batch, *shape) ([B, dims]) with per-row plans (coef [B, NUM_COEF])."""
    want = (batch, *shape) if per_row else tuple(shape)
    if tuple(t.shape) == want:
        return
    if per_row:
        raise ValueError(f"{name}: per-row coef [B, NUM_COEF] needs {name} [{', '.join(['B'] + [dims] * bool(dims))}] "
                         f"= {want}, got shape {tuple(t.shape)}")
    raise ValueError(f"{name}: expected shape [{dims}] = {want} with coef [NUM_COEF] (one plan for the batch), "
                     f"got shape {tuple(t.shape)}")


def validate(out, x, model_out, g1, coef, *, table=None, rows=None, table_steps=None, table_w=None,
             clip_range=None, z=None, history=None, hist_coef=None, write_slots=None, write_coef=None,
             rule_params=None, rule_state=None) -> bool:
    """Check everything the kernel relies on that needs no device->host sync; return whether the
    streamed operands are channels_last. Raises ValueError / TypeError naming the bad argument. coef [NUM_COEF]
    is one plan for the batch; coef [B, NUM_COEF] per-row plans, which need every other per-step operand given
    per row too (table_steps [B, 2], table_w [B], hist_coef [B, K], write_coef [B, W, 2 + K])."""
    _check_tensor("out", out, getattr(out, "device", None), KERNEL_DTYPES)
    device, batch = out.device, x.shape[0] if isinstance(x, torch.Tensor) else None
    _check_tensor("x", x, device, (out.dtype,))
    _check_tensor("model_out", model_out, device, (out.dtype,))
    if x.ndim < 2 or batch < 1:
        raise ValueError(f"x: expected [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if batch > MAX_BATCH:
        raise ValueError(f"x: batch {batch} exceeds the kernel's grid limit {MAX_BATCH}; split the batch")
    latent = tuple(x.shape[1:])
    if out.shape[0] not in (batch, 2 * batch) or tuple(out.shape[1:]) != latent:
        raise ValueError(f"out: expected shape {(batch, *latent)} or {(2 * batch, *latent)}, got {tuple(out.shape)}")
    if model_out.shape[0] not in (batch, 2 * batch) or tuple(model_out.shape[1:]) != latent:
        raise ValueError(f"model_out: expected shape {(2 * batch, *latent)} (cond + uncond) or {(batch, *latent)}, "
                         f"got {tuple(model_out.shape)}")
    _check_tensor("g1", g1, device, (torch.float32,))
    _check_shape("g1", g1, (batch,))
    _check_tensor("coef", coef, device, (torch.float32,))
    per_row = coef.ndim == 2
    if tuple(coef.shape) != ((batch, reference.NUM_COEF) if per_row else (reference.NUM_COEF,)):
        raise ValueError(f"coef: expected shape ({reference.NUM_COEF},) (one plan for the batch) or "
                         f"({batch}, {reference.NUM_COEF}) (per-row plans, [B, NUM_COEF]), got {tuple(coef.shape)}")
    if z is not None:
        _check_tensor("z", z, device, (out.dtype, torch.float32))
        _check_shape("z", z, x.shape)
    if clip_range is not None and (isinstance(clip_range, bool) or not isinstance(clip_range, (int, float))):
        raise TypeError(f"clip_range: expected a float or None, got {type(clip_range).__name__}")
    if table is not None:
        _check_tensor("table", table, device, KERNEL_DTYPES)
        if table.ndim != x.ndim + 1 or tuple(table.shape[2:]) != latent or table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError(f"table: expected shape [K, T, {', '.join(map(str, latent))}], got {tuple(table.shape)}")
        if rows is None:
            raise ValueError("rows: a ratio table needs the per-sample table rows [B]")
        if table_steps is None:
            raise ValueError("table_steps: a ratio table needs the step's table rows (i0, i1)")
        if table_w is None:
            raise ValueError("table_w: a ratio table needs the step's lerp weight between its two rows")
        _check_tensor("rows", rows, device, INDEX_DTYPES)
        _check_shape("rows", rows, (batch,))
        _check_tensor("table_steps", table_steps, device, INDEX_DTYPES)
        _check_plan_shape("table_steps", table_steps, per_row, batch, (2,), "2")
        _check_tensor("table_w", table_w, device, (torch.float32,))
        if per_row:
            _check_plan_shape("table_w", table_w, per_row, batch, (), "")
        elif table_w.numel() != 1:
            raise ValueError(f"table_w: expected one lerp weight (shape () or (1,)) with coef [NUM_COEF] (one plan "
                             f"for the batch), got shape {tuple(table_w.shape)}")
    _validate_history(x, device, history, hist_coef, write_slots, write_coef, per_row)
    _validate_rule(x, device, rule_params, rule_state)
    channels_last = x.ndim == 4 and not _has_layout(out, False) and _has_layout(out, True)
    streamed = [("out", out), ("x", x), ("model_out", model_out)] + ([("z", z)] if z is not None else [])
    streamed += [("table", table)] if table is not None else []
    streamed += [("history", history)] if history is not None else []
    streamed += [("rule_state", rule_state)] if rule_state is not None else []
    for name, t in streamed:
        if not _has_layout(t, channels_last):
            fmt = "channels_last" if channels_last else "contiguous"
            raise ValueError(f"{name}: expected a dense {fmt} tensor like out (strides {tuple(t.stride())}); "
                             "all streamed operands must share out's memory format (contiguous or channels_last)")
    return channels_last


def _validate_history(x, device, history, hist_coef, write_slots, write_coef, per_row: bool = False) -> None:
    """A multistep solver's operands: history [K, B, *shape] in x's dtype, hist_coef [K] float32 and, together,
    write_slots [W] int and write_coef [W, 2 + K] float32 (1 <= K <= MAX_HISTORY_SLOTS, W <= MAX_HISTORY_WRITES).
    ``per_row``: hist_coef [B, K] and write_coef [B, W, 2 + K] (write_slots [W] stays shared by all rows)."""
    if history is None:
        for name, t in (("hist_coef", hist_coef), ("write_slots", write_slots), ("write_coef", write_coef)):
            if t is not None:
                raise ValueError(f"{name}: given without history (the solver's states it belongs to)")
        return
    _check_tensor("history", history, device, (x.dtype,))
    k = history.shape[0] if history.ndim == x.ndim + 1 else None
    if k is None or tuple(history.shape[1:]) != tuple(x.shape):
        raise ValueError(f"history: expected shape [K, {', '.join(map(str, x.shape))}] (K slots of x's shape), "
                         f"got {tuple(history.shape)}")
    if not 1 <= k <= MAX_HISTORY_SLOTS:
        raise ValueError(f"history: the kernel runs 1 to {MAX_HISTORY_SLOTS} history slots, got {k}")
    if hist_coef is None:
        raise ValueError("hist_coef: history needs the step's weights of its slots [K]")
    _check_tensor("hist_coef", hist_coef, device, (torch.float32,))
    batch = x.shape[0]
    _check_plan_shape("hist_coef", hist_coef, per_row, batch, (k,), "K")
    if (write_slots is None) != (write_coef is None):
        missing = "write_slots" if write_slots is None else "write_coef"
        raise ValueError(f"{missing}: write_slots [W] and write_coef [W, 2 + K] go together")
    if write_slots is None:
        return
    _check_tensor("write_slots", write_slots, device, INDEX_DTYPES)
    if write_slots.ndim != 1:
        shared = " (shared by all rows, also with per-row plans)" if per_row else ""
        raise ValueError(f"write_slots: expected shape [W]{shared}, got {tuple(write_slots.shape)}")
    w = write_slots.shape[0]
    if w > MAX_HISTORY_WRITES:
        raise ValueError(f"write_slots: the kernel writes at most {MAX_HISTORY_WRITES} states a step, got {w}")
    _check_tensor("write_coef", write_coef, device, (torch.float32,))
    _check_plan_shape("write_coef", write_coef, per_row, batch, (w, 2 + k), "W, 2 + K")


def _validate_rule(x, device, rule_params, rule_state) -> None:
    """A rule with per-sample reductions: rule_params [NUM_RULE_PARAMS] float32 (the columns of RuleParam) and
    its optional state [B, *shape] in x's dtype (the layout is checked with the other streamed operands)."""
    if rule_params is None:
        if rule_state is not None:
            raise ValueError("rule_state: given without rule_params (the rule whose state it is)")
        return
    _check_tensor("rule_params", rule_params, device, (torch.float32,))
    _check_shape("rule_params", rule_params, (reference.NUM_RULE_PARAMS,))
    if rule_state is not None:
        _check_tensor("rule_state", rule_state, device, (x.dtype,))
        _check_shape("rule_state", rule_state, x.shape)


def check_indices(table: torch.Tensor | None, rows: torch.Tensor | None, table_steps: torch.Tensor | None,
                  history: torch.Tensor | None = None, write_slots: torch.Tensor | None = None) -> None:
    """Raise if a label row is outside [0, K) or a step outside [0, T) of the table, or if a history write slot is
    outside [0, K) of the history or written twice (one device->host sync)."""
    checks, flags = [], []
    if table is not None:
        k, t = table.shape[0], table.shape[1]
        bad_rows = (rows < 0) | (rows >= k)
        bad_steps = (table_steps < 0) | (table_steps >= t)
        checks += ["rows", "table_steps"]
        flags += [bad_rows.any(), bad_steps.any()]
    if write_slots is not None and write_slots.numel():
        bad_slots = (write_slots < 0) | (write_slots >= history.shape[0])
        checks += ["write_slots", "write_slots_twice"]
        flags += [bad_slots.any(), (write_slots[:, None] == write_slots[None, :]).sum() != write_slots.numel()]
    if not checks:
        return
    bad = dict(zip(checks, torch.stack(flags).tolist()))
    if bad.get("rows"):
        raise ValueError(f"rows: label rows {rows[bad_rows][:5].tolist()} are outside the table's [0, {k})")
    if bad.get("table_steps"):
        if table_steps.ndim == 2:  # per-row plans: name the batch rows whose steps are bad
            bad_b = bad_steps.any(1).nonzero().flatten()[:5]
            raise ValueError(f"table_steps: step rows {table_steps[bad_b].tolist()} of batch rows {bad_b.tolist()} "
                             f"are outside the plan's table rows [0, {t})")
        raise ValueError(f"table_steps: step rows {table_steps.tolist()} are outside the plan's table rows [0, {t})")
    if bad.get("write_slots"):
        raise ValueError(f"write_slots: slots {write_slots.tolist()} are outside the history's [0, {history.shape[0]})")
    if bad.get("write_slots_twice"):
        raise ValueError(f"write_slots: slots {write_slots.tolist()} write one slot twice in a step")


def _can_sync() -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------------------- launch
def partials_layout(n_per_row: int, block: int) -> tuple[int, int, int]:
    """(pre-pass programs per row, BLOCKs each covers, NBP = that count padded to a power of two) for a row of
    ``n_per_row`` elements: one BLOCK per program up to MAX_PARTIALS programs, then several BLOCKs each."""
    blocks = triton.cdiv(n_per_row, block)
    per_partial = triton.cdiv(blocks, MAX_PARTIALS)
    n_partials = triton.cdiv(blocks, per_partial)
    return n_partials, per_partial, triton.next_power_of_2(n_partials)


def launch_moments(m_cond, m_uncond, table, rows, table_steps, table_w, rule_state, block: int, num_warps: int,
                   per_row: bool = False):
    """The reduction pre-pass: (workspace [B, NUM_M, NBP] float32 of per-program partial moments, n_partials,
    NBP). The workspace is fresh each call (torch.empty: capturable in a CUDA graph); columns >= n_partials are
    never written and never read. ``per_row``: table_steps [B, 2] and table_w [B]."""
    batch, n_per_row = m_cond.shape[0], m_cond[0].numel()
    has_table, has_state = table is not None, rule_state is not None
    num_m = NUM_MOMENTS_STATE if has_state else NUM_MOMENTS_STATELESS
    n_partials, per_partial, nbp = partials_layout(n_per_row, block)
    ws = torch.empty((batch, num_m, nbp), dtype=torch.float32, device=m_cond.device)
    rule_moments_kernel[(n_partials, batch)](
        ws, m_cond, m_uncond, rule_state if has_state else m_cond, table if has_table else m_cond,
        rows if has_table else ws, table_steps if has_table else ws, table_w if has_table else ws,
        n_per_row, per_partial, table.shape[0] if has_table else 1, table.shape[1] if has_table else 1,
        HAS_TABLE=has_table, HAS_STATE=has_state, NUM_M=num_m, NBP=nbp, BLOCK=block,
        VEC=VECTOR_BYTES // m_cond.element_size(), PER_ROW=per_row and has_table, num_warps=num_warps,
    )
    return ws, n_partials, nbp


def launch(out, x, m_cond, m_uncond, g1, coef, table, rows, table_steps, table_w, clip_range, z,
           history=None, hist_coef=None, write_slots=None, write_coef=None, rule_params=None, rule_state=None) -> None:
    """Launch the kernel on validated operands (no checks, no syncs). With ``rule_params`` and an unconditional
    half, the reduction pre-pass runs first and the step kernel reads its partial moments (two launches). A coef
    [B, NUM_COEF] (per-row plans) means every per-step operand has its row axis (``validate``)."""
    batch, n_per_row = x.shape[0], x[0].numel()
    per_row = coef.ndim == 2
    block, num_warps = launch_config(out.dtype)
    has_uncond, has_table = m_uncond is not None, m_uncond is not None and table is not None
    two_out = out.shape[0] == 2 * batch
    hist_k = 0 if history is None else history.shape[0]
    hist_w = 0 if write_slots is None else write_slots.shape[0]
    reduce = has_uncond and rule_params is not None
    has_state = reduce and rule_state is not None
    ws, n_partials, nbp = None, 1, 1
    if reduce:
        ws, n_partials, nbp = launch_moments(m_cond, m_uncond, table if has_table else None, rows, table_steps,
                                             table_w, rule_state if has_state else None, block, num_warps,
                                             per_row)
    grid = (triton.cdiv(n_per_row, block), batch)
    guided_step_kernel[grid](
        out, out[batch:] if two_out else out, x, m_cond, m_uncond if has_uncond else m_cond, g1, coef,
        table if has_table else x, rows if has_table else g1, table_steps if has_table else g1,
        table_w if has_table else g1, z if z is not None else x,
        history if hist_k else x, hist_coef if hist_k else g1, write_slots if hist_w else g1,
        write_coef if hist_w else g1,
        n_per_row, table.shape[0] if has_table else 1, table.shape[1] if has_table else 1,
        float(clip_range) if clip_range is not None else 0.0,
        ws if reduce else g1, rule_params if reduce else g1, rule_state if has_state else x, n_partials,
        HAS_UNCOND=has_uncond, HAS_TABLE=has_table, CLIP=clip_range is not None, HAS_Z=z is not None,
        TWO_OUT=two_out, BLOCK=block, HIST_K=hist_k, HIST_W=hist_w, REDUCE=reduce, HAS_STATE=has_state,
        NUM_M=NUM_MOMENTS_STATE if has_state else NUM_MOMENTS_STATELESS, NBP=nbp, PER_ROW=per_row,
        num_warps=num_warps,
    )


def _contiguous(t):
    return None if t is None else t.contiguous()


def _launch_step(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z,
                 history=None, hist_coef=None, write_slots=None, write_coef=None, rule_params=None,
                 rule_state=None) -> None:
    m_cond, m_uncond = reference.split_model_output(model_out, x.shape[0], cond_first)
    launch(out, x, m_cond, m_uncond, g1.contiguous(), coef.contiguous(), table, _contiguous(rows),
           _contiguous(table_steps), _contiguous(table_w), clip_range, z, history=history,
           hist_coef=_contiguous(hist_coef), write_slots=_contiguous(write_slots), write_coef=_contiguous(write_coef),
           rule_params=_contiguous(rule_params), rule_state=rule_state)


@torch.library.custom_op("fastguide::guided_step", mutates_args=("out", "history", "rule_state"))
def guided_step_op(out: torch.Tensor, x: torch.Tensor, model_out: torch.Tensor, g1: torch.Tensor,
                   coef: torch.Tensor, cond_first: bool, table: torch.Tensor | None, rows: torch.Tensor | None,
                   table_steps: torch.Tensor | None, table_w: torch.Tensor | None, clip_range: float | None,
                   z: torch.Tensor | None, history: torch.Tensor | None, hist_coef: torch.Tensor | None,
                   write_slots: torch.Tensor | None, write_coef: torch.Tensor | None,
                   rule_params: torch.Tensor | None, rule_state: torch.Tensor | None) -> None:
    """torch.library entry point (validated inputs): torch.compile traces it as one opaque op, no graph break.
    It mutates ``out``, (a multistep solver's step) ``history`` and (a rule with a state) ``rule_state``; a rule
    with per-sample reductions runs its pre-pass and the step inside this one op.

    A custom_op rather than a triton_op: a triton_op cannot be traced by torch.compile when the kernel runs
    under TRITON_INTERPRET (it reads data pointers of fake tensors), so CI could not test it."""
    _launch_step(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z,
                 history, hist_coef, write_slots, write_coef, rule_params, rule_state)


@guided_step_op.register_fake
def _(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z, history, hist_coef,
      write_slots, write_coef, rule_params, rule_state) -> None:
    return None


def _traced(t: torch.Tensor) -> bool:
    """True under torch.compile / export or for fake / functional tensors: go through the registered op."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


def guided_step_into(out, x, model_out, g1, coef, *, cond_first=True, table=None, rows=None, table_steps=None,
                     table_w=None, clip_range=None, z=None, history=None, hist_coef=None, write_slots=None,
                     write_coef=None, rule_params=None, rule_state=None, check: bool = True):
    """Drop-in for :func:`fastguide.kernels.reference.guided_step_into`, fused into one kernel launch (two for a
    rule with per-sample reductions, ``rule_params``: a moment pre-pass, then the step).

    float64 inputs run the reference. ``check=True`` also verifies that ``rows`` lie in [0, K) and
    ``table_steps`` in [0, T), and that ``write_slots`` are distinct slots in [0, K) of ``history``, which costs
    one device->host sync; it is skipped automatically while torch.compile traces or a CUDA graph captures.
    Callers whose indices are valid by construction (the Sampler: RatioTable.rows_for / step_rows and the
    solver's plan validate on the host) should pass ``check=False``; the kernel clamps indices either way, so a
    bad index can never read outside the table or write outside the history.
    ``rule_params`` [NUM_RULE_PARAMS] float32 on out's device (read by the kernel: new values never recompile);
    ``rule_state`` [B, *shape] in x's dtype and layout, updated in place (rows with g1 == 1 keep theirs). Without
    an unconditional half (``model_out`` has B rows) m = m_cond and the state is not touched.
    Per-row plans (each row its own solver plan): coef [B, NUM_COEF] with table_steps [B, 2], table_w [B],
    hist_coef [B, K] and write_coef [B, W, 2 + K] (write_slots [W] and rule_params stay shared).
    Eager calls launch the kernel directly (the torch.library dispatch costs more host time than the launch).
    """
    hist = dict(history=history, hist_coef=hist_coef, write_slots=write_slots, write_coef=write_coef)
    rule = dict(rule_params=rule_params, rule_state=rule_state)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return reference.guided_step_into(out, x, model_out, g1, coef, cond_first=cond_first, table=table, rows=rows,
                                          table_steps=table_steps, table_w=table_w, clip_range=clip_range, z=z,
                                          **hist, **rule)
    validate(out, x, model_out, g1, coef, table=table, rows=rows, table_steps=table_steps, table_w=table_w,
             clip_range=clip_range, z=z, **hist, **rule)
    has_uncond = model_out.shape[0] == 2 * x.shape[0]
    uses_table = table is not None and has_uncond
    traced = _traced(out)
    if check and (uses_table or write_slots is not None) and not traced and _can_sync():
        check_indices(table if uses_table else None, rows, table_steps, history, write_slots)
    if not uses_table:
        table = rows = table_steps = table_w = None
    if not has_uncond:  # m = m_cond: no reduction, the state is not touched
        rule_params = rule_state = None
    clip = None if clip_range is None else float(clip_range)
    step = guided_step_op if traced else _launch_step
    step(out, x, model_out, g1, coef, bool(cond_first), table, rows, table_steps, table_w, clip, z, history, hist_coef,
         write_slots, write_coef, rule_params, rule_state)
    return out
