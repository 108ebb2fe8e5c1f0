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
history). Math is float32; float64 inputs fall back to the reference. See docs/kernel.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastguide.kernels import reference
from fastguide.kernels.reference import Coef

NUM_WARPS = 8
VECTOR_BYTES = 16  # one 128-bit access per thread per operand
MAX_BATCH = 65535  # CUDA grid axis 1 limit
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_HISTORY_SLOTS = 4  # K: DPM-Solver++ 3M reads 2, UniPC-3 reads 4 (the SASS proof covers up to these)
MAX_HISTORY_WRITES = 2  # W: UniPC writes 2 states a step (the corrected sample and the converted output)
# The coefficient columns as compile-time offsets (a @triton.jit function may read only constexpr globals).
COEF_A, COEF_B, COEF_S, COEF_PX, COEF_PM, COEF_C0, COEF_CX, COEF_CM = (tl.constexpr(int(c)) for c in Coef)


@triton.jit
def guided_step_kernel(
    out_ptr, out2_ptr, x_ptr, m_cond_ptr, m_uncond_ptr, g1_ptr, coef_ptr,
    table_ptr, rows_ptr, steps_ptr, w_ptr, z_ptr,
    hist_ptr, hist_coef_ptr, write_slots_ptr, write_coef_ptr,
    n_per_row, table_k, table_t, clip_range,
    HAS_UNCOND: tl.constexpr, HAS_TABLE: tl.constexpr, CLIP: tl.constexpr, HAS_Z: tl.constexpr,
    TWO_OUT: tl.constexpr, BLOCK: tl.constexpr, HIST_K: tl.constexpr = 0, HIST_W: tl.constexpr = 0,
):
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_per_row
    base = row * n_per_row
    x = tl.load(x_ptr + base + offs, mask=mask).to(tl.float32)
    m = tl.load(m_cond_ptr + base + offs, mask=mask).to(tl.float32)
    if HAS_UNCOND:
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
            g0 = g0 * ratio
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


def validate(out, x, model_out, g1, coef, *, table=None, rows=None, table_steps=None, table_w=None,
             clip_range=None, z=None, history=None, hist_coef=None, write_slots=None, write_coef=None) -> bool:
    """Check everything the kernel relies on that needs no device->host sync; return whether the
    streamed operands are channels_last. Raises ValueError / TypeError naming the bad argument."""
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
    _check_shape("coef", coef, (reference.NUM_COEF,))
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
        _check_shape("table_steps", table_steps, (2,))
        _check_tensor("table_w", table_w, device, (torch.float32,))
        if table_w.numel() != 1:
            raise ValueError(f"table_w: expected one lerp weight (shape () or (1,)), got shape {tuple(table_w.shape)}")
    _validate_history(x, device, history, hist_coef, write_slots, write_coef)
    channels_last = x.ndim == 4 and not _has_layout(out, False) and _has_layout(out, True)
    streamed = [("out", out), ("x", x), ("model_out", model_out)] + ([("z", z)] if z is not None else [])
    streamed += [("table", table)] if table is not None else []
    streamed += [("history", history)] if history is not None else []
    for name, t in streamed:
        if not _has_layout(t, channels_last):
            fmt = "channels_last" if channels_last else "contiguous"
            raise ValueError(f"{name}: expected a dense {fmt} tensor like out (strides {tuple(t.stride())}); "
                             "all streamed operands must share out's memory format (contiguous or channels_last)")
    return channels_last


def _validate_history(x, device, history, hist_coef, write_slots, write_coef) -> None:
    """A multistep solver's operands: history [K, B, *shape] in x's dtype, hist_coef [K] float32 and, together,
    write_slots [W] int and write_coef [W, 2 + K] float32 (1 <= K <= MAX_HISTORY_SLOTS, W <= MAX_HISTORY_WRITES)."""
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
    _check_shape("hist_coef", hist_coef, (k,))
    if (write_slots is None) != (write_coef is None):
        missing = "write_slots" if write_slots is None else "write_coef"
        raise ValueError(f"{missing}: write_slots [W] and write_coef [W, 2 + K] go together")
    if write_slots is None:
        return
    _check_tensor("write_slots", write_slots, device, INDEX_DTYPES)
    if write_slots.ndim != 1:
        raise ValueError(f"write_slots: expected shape [W], got {tuple(write_slots.shape)}")
    w = write_slots.shape[0]
    if w > MAX_HISTORY_WRITES:
        raise ValueError(f"write_slots: the kernel writes at most {MAX_HISTORY_WRITES} states a step, got {w}")
    _check_tensor("write_coef", write_coef, device, (torch.float32,))
    _check_shape("write_coef", write_coef, (w, 2 + k))


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
def launch(out, x, m_cond, m_uncond, g1, coef, table, rows, table_steps, table_w, clip_range, z,
           history=None, hist_coef=None, write_slots=None, write_coef=None) -> None:
    """Launch the kernel on validated operands (no checks, no syncs)."""
    batch, n_per_row = x.shape[0], x[0].numel()
    block, num_warps = launch_config(out.dtype)
    has_uncond, has_table = m_uncond is not None, m_uncond is not None and table is not None
    two_out = out.shape[0] == 2 * batch
    hist_k = 0 if history is None else history.shape[0]
    hist_w = 0 if write_slots is None else write_slots.shape[0]
    grid = (triton.cdiv(n_per_row, block), batch)
    guided_step_kernel[grid](
        out, out[batch:] if two_out else out, x, m_cond, m_uncond if has_uncond else m_cond, g1, coef,
        table if has_table else x, rows if has_table else g1, table_steps if has_table else g1,
        table_w if has_table else g1, z if z is not None else x,
        history if hist_k else x, hist_coef if hist_k else g1, write_slots if hist_w else g1,
        write_coef if hist_w else g1,
        n_per_row, table.shape[0] if has_table else 1, table.shape[1] if has_table else 1,
        float(clip_range) if clip_range is not None else 0.0,
        HAS_UNCOND=has_uncond, HAS_TABLE=has_table, CLIP=clip_range is not None, HAS_Z=z is not None,
        TWO_OUT=two_out, BLOCK=block, HIST_K=hist_k, HIST_W=hist_w, num_warps=num_warps,
    )


def _contiguous(t):
    return None if t is None else t.contiguous()


def _launch_step(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z,
                 history=None, hist_coef=None, write_slots=None, write_coef=None) -> None:
    m_cond, m_uncond = reference.split_model_output(model_out, x.shape[0], cond_first)
    launch(out, x, m_cond, m_uncond, g1.contiguous(), coef.contiguous(), table, _contiguous(rows),
           _contiguous(table_steps), table_w, clip_range, z, history=history, hist_coef=_contiguous(hist_coef),
           write_slots=_contiguous(write_slots), write_coef=_contiguous(write_coef))


@torch.library.custom_op("fastguide::guided_step", mutates_args=("out", "history"))
def guided_step_op(out: torch.Tensor, x: torch.Tensor, model_out: torch.Tensor, g1: torch.Tensor,
                   coef: torch.Tensor, cond_first: bool, table: torch.Tensor | None, rows: torch.Tensor | None,
                   table_steps: torch.Tensor | None, table_w: torch.Tensor | None, clip_range: float | None,
                   z: torch.Tensor | None, history: torch.Tensor | None, hist_coef: torch.Tensor | None,
                   write_slots: torch.Tensor | None, write_coef: torch.Tensor | None) -> None:
    """torch.library entry point (validated inputs): torch.compile traces it as one opaque op, no graph break.
    It mutates ``out`` and (a multistep solver's step) ``history``.

    A custom_op rather than a triton_op: a triton_op cannot be traced by torch.compile when the kernel runs
    under TRITON_INTERPRET (it reads data pointers of fake tensors), so CI could not test it."""
    _launch_step(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z,
                 history, hist_coef, write_slots, write_coef)


@guided_step_op.register_fake
def _(out, x, model_out, g1, coef, cond_first, table, rows, table_steps, table_w, clip_range, z, history, hist_coef,
      write_slots, write_coef) -> None:
    return None


def _traced(t: torch.Tensor) -> bool:
    """True under torch.compile / export or for fake / functional tensors: go through the registered op."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


def guided_step_into(out, x, model_out, g1, coef, *, cond_first=True, table=None, rows=None, table_steps=None,
                     table_w=None, clip_range=None, z=None, history=None, hist_coef=None, write_slots=None,
                     write_coef=None, check: bool = True):
    """Drop-in for :func:`fastguide.kernels.reference.guided_step_into`, fused into one kernel launch.

    float64 inputs run the reference. ``check=True`` also verifies that ``rows`` lie in [0, K) and
    ``table_steps`` in [0, T), and that ``write_slots`` are distinct slots in [0, K) of ``history``, which costs
    one device->host sync; it is skipped automatically while torch.compile traces or a CUDA graph captures.
    Callers whose indices are valid by construction (the Sampler: RatioTable.rows_for / step_rows and the
    solver's plan validate on the host) should pass ``check=False``; the kernel clamps indices either way, so a
    bad index can never read outside the table or write outside the history.
    Eager calls launch the kernel directly (the torch.library dispatch costs more host time than the launch).
    """
    hist = dict(history=history, hist_coef=hist_coef, write_slots=write_slots, write_coef=write_coef)
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return reference.guided_step_into(out, x, model_out, g1, coef, cond_first=cond_first, table=table, rows=rows,
                                          table_steps=table_steps, table_w=table_w, clip_range=clip_range, z=z, **hist)
    validate(out, x, model_out, g1, coef, table=table, rows=rows, table_steps=table_steps, table_w=table_w,
             clip_range=clip_range, z=z, **hist)
    uses_table = table is not None and model_out.shape[0] == 2 * x.shape[0]
    traced = _traced(out)
    if check and (uses_table or write_slots is not None) and not traced and _can_sync():
        check_indices(table if uses_table else None, rows, table_steps, history, write_slots)
    if not uses_table:
        table = rows = table_steps = table_w = None
    clip = None if clip_range is None else float(clip_range)
    step = guided_step_op if traced else _launch_step
    step(out, x, model_out, g1, coef, bool(cond_first), table, rows, table_steps, table_w, clip, z, history, hist_coef,
         write_slots, write_coef)
    return out
