"""The fused guided-step kernel against the reference (the spec), evaluated in float64.

On CI the kernel runs in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1); on a CUDA
machine run the same tests on the GPU with FASTGUIDE_TEST_CUDA=1.

Tolerances: float32 outputs have a max-norm relative error <= 1e-5 to the float64 reference; fp16 / bf16
outputs have max error <= 2 x (max error of the eager torch step at that dtype, i.e. the reference run on
the same low-precision tensors) + 1e-3.

Coverage: the core test is the full product of rule (cond-only / CFG / ReCFG on a grid step / ReCFG with
lerp) x clipping x noise z x cond_first x in-place x out [B] or [2B] x dtype fp32/fp16 on (3, 5, 7, 9)
(cond_first is moot without an uncond half, so cond-only runs it once). Shapes, layouts, table / z dtypes
and bf16 are covered by smaller tests with every option on.

Multistep solvers' history states: the full product of rule x clipping x noise z x out [B] or [2B] x dtype x
every reachable (K slots, W writes) with K in 1..4 and W in 0..min(2, K) on (2, 5, 7, 9) (in place, as the Sampler
calls it),
plus shapes and layouts with history, checked on out and on every history slot after the step (written slots
against the reference, the others bit-identical). Every slot is read with a non-zero weight, so every written
slot is also read in the same step (it cannot be NaN-poisoned; the tests assert its value changed instead).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.kernels import reference
from fastguide.kernels.reference import Coef
from fastguide.kernels import guided_step as gs

USE_CUDA = os.environ.get("FASTGUIDE_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if USE_CUDA else "cpu")
if not USE_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need CUDA (FASTGUIDE_TEST_CUDA=1) or TRITON_INTERPRET=1", allow_module_level=True)

needs_cuda_for_bf16 = pytest.mark.skipif(not USE_CUDA, reason="bf16 arithmetic is not supported by the Triton "
                                         "interpreter; bf16 runs with FASTGUIDE_TEST_CUDA=1 on a GPU")
RULES = ("cond", "cfg", "recfg", "recfg_lerp")
TABLE_K, TABLE_T = 4, 6
CLIP_RANGE = 1.0
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    rule: str = "cfg"
    clip: bool = False
    noise: bool = False
    cond_first: bool = True
    inplace: bool = False
    out_rows: int = 2  # out holds x_next in 1 or 2 B-row blocks
    dtype: torch.dtype = torch.float32
    table_dtype: torch.dtype | None = None  # None: same as dtype
    z_dtype: torch.dtype | None = None  # None: same as dtype
    shape: tuple = (3, 5, 7, 9)
    channels_last: bool = False
    hist_k: int = 0  # a multistep solver's history slots K (0: none)
    hist_w: int = 0  # the states the step writes W (<= K, distinct slots)


def _uniform(shape, lo, hi):
    return torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo


def _as(t, dtype, channels_last=False):
    t = t.to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def make_inputs(case: Case) -> dict:
    """Fresh random operands in the case's dtypes/layouts (never zeros) and their float64 twins."""
    b, latent = case.shape[0], case.shape[1:]
    uncond = case.rule != "cond"
    master = {
        "x": torch.randn(case.shape, dtype=torch.float64),
        "model_out": torch.randn((2 * b if uncond else b, *latent), dtype=torch.float64),
        "g1": _uniform((b,), 1.0, 5.0),
        "coef": torch.cat([_uniform((1,), 0.5, 1.5), _uniform((1,), -1.0, -0.2), _uniform((1,), 0.1, 0.5),
                           _uniform((5,), -1.5, 1.5)]),  # A, B, S, then PX..CM (Coef)
        "z": torch.randn(case.shape, dtype=torch.float64) if case.noise else None,
    }
    if case.rule in ("recfg", "recfg_lerp"):
        master["table"] = _uniform((TABLE_K, TABLE_T, *latent), 0.5, 1.5)
        master["rows"] = torch.randint(0, TABLE_K, (b,))
        i0 = int(torch.randint(0, TABLE_T - 1, ()))
        master["table_steps"] = torch.tensor([i0, i0 + 1 if case.rule == "recfg_lerp" else i0])
        master["table_w"] = _uniform((), 0.1, 0.9)
    cl = case.channels_last
    low = {
        "x": _as(master["x"], case.dtype, cl),
        "model_out": _as(master["model_out"], case.dtype, cl),
        "g1": _as(master["g1"], torch.float32),
        "coef": _as(master["coef"], torch.float32),
        "z": None if master["z"] is None else _as(master["z"], case.z_dtype or case.dtype, cl),
    }
    if "table" in master:
        table = master["table"].to(case.table_dtype or case.dtype).to(DEVICE)
        if cl:  # channels_last inside each [C, H, W] slab, like x
            table = table.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        low.update(table=table, rows=master["rows"].to(DEVICE), table_steps=master["table_steps"].to(DEVICE),
                   table_w=_as(master["table_w"], torch.float32))
    if case.hist_k:
        k, w = case.hist_k, case.hist_w
        history = torch.randn((k, *case.shape), dtype=torch.float64).to(DEVICE, case.dtype)
        if cl:  # channels_last inside each [C, H, W] slab, like x
            history = history.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        signs = torch.where(torch.rand((w, 2 + k)) < 0.5, -1.0, 1.0).double()
        low.update(history=history, hist_coef=_as(_uniform((k,), -0.8, 0.8), torch.float32),
                   write_slots=torch.randperm(k)[:w].to(DEVICE),
                   write_coef=_as(signs * _uniform((w, 2 + k), 0.2, 1.0), torch.float32))
    exact = {k: (None if v is None else v.detach().cpu().double() if v.is_floating_point() else v.cpu())
             for k, v in low.items()}
    return {"low": low, "exact": exact}


HISTORY_ARGS = ("history", "hist_coef", "write_slots", "write_coef")


def _kwargs(t: dict, case: Case) -> dict:
    kw = dict(cond_first=case.cond_first, table=t.get("table"), rows=t.get("rows"),
              table_steps=t.get("table_steps"), table_w=t.get("table_w"), clip_range=CLIP_RANGE if case.clip else None,
              z=t.get("z"))
    if case.hist_k:
        kw.update({k: t[k] for k in HISTORY_ARGS})
        if not case.hist_w:  # W = 0: no writes (the reference's contract: both None)
            kw.update(write_slots=None, write_coef=None)
    return kw


def run_kernel(case: Case, low: dict) -> torch.Tensor:
    """out after the kernel; out is poisoned with NaN first, except the rows x aliases when in place."""
    b = case.shape[0]
    out = torch.full((case.out_rows * b, *case.shape[1:]), float("nan"), dtype=case.dtype, device=DEVICE)
    if case.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    x = low["x"]
    if case.inplace:
        out[:b].copy_(x)
        x = out[:b]
    returned = gs.guided_step_into(out, x, low["model_out"], low["g1"], low["coef"], **_kwargs(low, case))
    assert returned is out
    return out


def reference_step(case: Case, t: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x_next, the history after the step) from the reference, on copies (``t`` is left as it was)."""
    b = case.shape[0]
    out = torch.empty((b, *case.shape[1:]), dtype=t["x"].dtype, device=t["x"].device)
    t = dict(t, history=t["history"].clone()) if case.hist_k else t
    reference.guided_step_into(out, t["x"], t["model_out"], t["g1"], t["coef"], **_kwargs(t, case))
    return out, t.get("history")


def reference_out(case: Case, t: dict) -> torch.Tensor:
    return reference_step(case, t)[0]


def _assert_close(case: Case, what: str, got: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor | None) -> None:
    """fp32: max-norm relative error <= 1e-5; fp16 / bf16: max error <= 2 x the eager step's + 1e-3."""
    assert not torch.isnan(got).any(), f"{what} was not written"
    err = (got - exact).abs().max().item()
    if case.dtype == torch.float32:
        rel = err / exact.abs().max().item()
        assert rel <= 1e-5, f"{case}: {what} relative error {rel:.3g} > 1e-5"
    else:
        eager_err = (eager - exact).abs().max().item()
        assert err <= 2 * eager_err + 1e-3, f"{case}: {what} error {err:.3g} > 2 x eager {eager_err:.3g} + 1e-3"


def assert_matches_reference(case: Case, inputs: dict, out: torch.Tensor, history: torch.Tensor | None = None) -> None:
    """out (and ``history``, the kernel's history after the step) against the float64 reference."""
    exact, exact_hist = reference_step(case, inputs["exact"])
    assert not torch.isnan(exact).any()
    eager, eager_hist = (None, None) if case.dtype == torch.float32 else reference_step(case, inputs["pristine"])
    b = case.shape[0]
    for k in range(case.out_rows):
        _assert_close(case, f"out block {k}", out[k * b:(k + 1) * b].detach().cpu().double(), exact,
                      None if eager is None else eager.cpu().double())
    if not case.hist_k:
        return
    written = inputs["low"]["write_slots"].tolist()[:case.hist_w]
    for j in range(case.hist_k):
        got, old = history[j].cpu(), inputs["pristine"]["history"][j].cpu()
        if j not in written:
            assert torch.equal(got, old), f"{case}: history slot {j} is not written by this step but changed"
            continue
        want = exact_hist[j]
        assert (want - old.double()).abs().max() > 0.1, "vacuous: the written state equals the old one"
        _assert_close(case, f"history slot {j}", got.double(), want,
                      None if eager_hist is None else eager_hist[j].cpu().double())


def check_case(case: Case) -> None:
    inputs = make_inputs(case)
    before = {k: v.clone() for k, v in inputs["low"].items() if v is not None}
    inputs["pristine"] = before
    out = run_kernel(case, inputs["low"])
    assert_matches_reference(case, inputs, out, inputs["low"].get("history"))
    for k, v in before.items():  # the kernel writes only into out (and the history, checked above)
        if k != "history":
            assert torch.equal(inputs["low"][k], v), f"{k} was modified"


def _core_cases():
    for rule in RULES:
        for clip in (False, True):
            for noise in (False, True):
                for cond_first in ((True,) if rule == "cond" else (True, False)):
                    for inplace in (False, True):
                        for out_rows in (1, 2):
                            for dtype in (torch.float32, torch.float16):
                                yield Case(rule, clip, noise, cond_first, inplace, out_rows, dtype)


def _case_id(c: Case) -> str:
    return "-".join([c.rule, "clip" if c.clip else "noclip", "z" if c.noise else "noz",
                     "cfirst" if c.cond_first else "ufirst", "inplace" if c.inplace else "outofplace",
                     f"out{c.out_rows}B", str(c.dtype).removeprefix("torch.")])


@pytest.mark.parametrize("case", list(_core_cases()), ids=_case_id)
def test_every_rule_option_combination(case):
    check_case(case)


# Every reachable (K, W): 1..4 history slots, 0..2 distinct written slots.
HISTORY_KW = [(k, w) for k in range(1, gs.MAX_HISTORY_SLOTS + 1) for w in range(min(k, gs.MAX_HISTORY_WRITES) + 1)]


def _history_cases():
    for rule in RULES:
        for clip in (False, True):
            for noise in (False, True):
                for out_rows in (1, 2):
                    for dtype in (torch.float32, torch.float16):
                        for k, w in HISTORY_KW:  # B = 2 (rows > 0 are indexed; the interpreter's cost is per row)
                            yield Case(rule, clip, noise, True, True, out_rows, dtype, shape=(2, 5, 7, 9), hist_k=k,
                                       hist_w=w)


def _history_case_id(c: Case) -> str:
    return "-".join([c.rule, "clip" if c.clip else "noclip", "z" if c.noise else "noz", f"out{c.out_rows}B",
                     str(c.dtype).removeprefix("torch."), f"K{c.hist_k}W{c.hist_w}"])


@pytest.mark.parametrize("case", list(_history_cases()), ids=_history_case_id)
def test_every_history_option_combination(case):
    check_case(case)


FULL = dict(rule="recfg_lerp", clip=True, noise=True, inplace=True, out_rows=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda_for_bf16)])
@pytest.mark.parametrize("shape,channels_last", [
    ((3, 5, 7, 9), False), ((3, 5, 7, 9), True),
    ((1, 16, 8, 8), False), ((1, 16, 8, 8), True),
    ((2, 3, 40, 41), False),  # several blocks per row plus a ragged tail
    ((2, 7), False),  # any [B, ...] rank
])
@pytest.mark.parametrize("rule", ["cfg", "recfg_lerp"])
def test_shapes_layouts_dtypes(shape, channels_last, dtype, rule):
    check_case(Case(**{**FULL, "rule": rule}, dtype=dtype, shape=shape, channels_last=channels_last))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda_for_bf16)])
@pytest.mark.parametrize("shape,channels_last", [
    ((3, 5, 7, 9), True), ((1, 16, 8, 8), False), ((1, 16, 8, 8), True),
    ((2, 3, 40, 41), False),  # several blocks per row plus a ragged tail
    ((2, 7), False),
])
@pytest.mark.parametrize("hist_k,hist_w", [(1, 1), (4, 2)])
def test_history_shapes_layouts_dtypes(shape, channels_last, dtype, hist_k, hist_w):
    check_case(Case(**FULL, dtype=dtype, shape=shape, channels_last=channels_last, hist_k=hist_k, hist_w=hist_w))


@pytest.mark.parametrize("dtype,table_dtype", [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.float16, torch.float16),
    pytest.param(torch.float32, torch.bfloat16, marks=needs_cuda_for_bf16),
    pytest.param(torch.bfloat16, torch.float32, marks=needs_cuda_for_bf16),
])
@pytest.mark.parametrize("rule", ["recfg", "recfg_lerp"])
def test_table_dtypes(dtype, table_dtype, rule):
    check_case(Case(**{**FULL, "rule": rule}, dtype=dtype, table_dtype=table_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda_for_bf16)])
def test_float32_noise_with_low_precision_x(dtype):
    """The Sampler draws z in float32 for fp16/bf16 latents."""
    check_case(Case(**FULL, dtype=dtype, z_dtype=torch.float32))


def test_clipping_is_active_in_the_clip_cases():
    """Guard against a vacuous clip test: the random inputs must push some x0 outside [-r, r]."""
    inputs = make_inputs(Case(clip=True))["exact"]
    b = inputs["x"].shape[0]
    px, pm = inputs["coef"][Coef.PX], inputs["coef"][Coef.PM]
    g1 = inputs["g1"].view(-1, 1, 1, 1)
    m = g1 * inputs["model_out"][:b] + (1 - g1) * inputs["model_out"][b:]
    frac = ((px * inputs["x"] + pm * m).abs() > CLIP_RANGE).double().mean().item()
    assert 0.05 < frac < 0.95


def test_float64_runs_the_reference():
    case = Case(**FULL)
    inputs = make_inputs(case)
    ex = {k: (None if v is None else v.to(DEVICE)) for k, v in inputs["exact"].items()}
    out = torch.full((6, 5, 7, 9), float("nan"), dtype=torch.float64, device=DEVICE)
    gs.guided_step_into(out, ex["x"], ex["model_out"], ex["g1"], ex["coef"], **_kwargs(ex, case))
    want = reference_out(case, inputs["exact"])
    assert torch.equal(out[:3].cpu(), want) and torch.equal(out[3:].cpu(), want)


def test_unchecked_bad_indices_never_read_outside_the_table():
    """With check=False a bad label/step is clamped into the table (no out-of-bounds read)."""
    case = Case(rule="recfg_lerp", noise=True, clip=True)
    inputs = make_inputs(case)
    low = inputs["low"]
    low["rows"] = torch.tensor([TABLE_K + 7, -3, 1], device=DEVICE)
    low["table_steps"] = torch.tensor([TABLE_T - 1, TABLE_T + 100], device=DEVICE)
    out = torch.full((6, 5, 7, 9), float("nan"), device=DEVICE)
    gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], check=False, **_kwargs(low, case))
    exact = dict(inputs["exact"], rows=torch.tensor([TABLE_K - 1, 0, 1]), table_steps=torch.tensor([TABLE_T - 1] * 2))
    want = reference_out(case, exact)
    assert ((out[:3].cpu().double() - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_unchecked_bad_write_slots_never_write_outside_the_history():
    """With check=False a bad write slot is clamped into [0, K) (no out-of-bounds write)."""
    case = Case(rule="cfg", noise=True, hist_k=3, hist_w=2)
    inputs = make_inputs(case)
    low = inputs["low"]
    low["write_slots"] = torch.tensor([-4, 3 + 9], device=DEVICE)
    canary = torch.randn((5, *case.shape), device=DEVICE)  # history is a view into the middle of a larger buffer
    guarded = canary.clone()
    guarded[1:4] = low["history"]
    low["history"] = guarded[1:4]
    inputs["pristine"] = {k: v.clone() for k, v in low.items() if v is not None}
    out = torch.full((6, 5, 7, 9), float("nan"), device=DEVICE)
    gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], check=False, **_kwargs(low, case))
    assert torch.equal(guarded[0], canary[0]) and torch.equal(guarded[4], canary[4])
    inputs["exact"]["write_slots"] = torch.tensor([0, 2])
    inputs["low"]["write_slots"] = torch.tensor([0, 2])
    inputs["pristine"]["write_slots"] = torch.tensor([0, 2], device=DEVICE)
    assert_matches_reference(case, inputs, out, low["history"])


def test_float64_history_runs_the_reference():
    case = Case(**FULL, hist_k=3, hist_w=2)
    inputs = make_inputs(case)
    ex = {k: (None if v is None else v.to(DEVICE)) for k, v in inputs["exact"].items()}
    history = ex["history"].clone()
    out = torch.full((6, 5, 7, 9), float("nan"), dtype=torch.float64, device=DEVICE)
    gs.guided_step_into(out, ex["x"], ex["model_out"], ex["g1"], ex["coef"], **_kwargs(dict(ex, history=history), case))
    want, want_hist = reference_step(case, inputs["exact"])
    assert torch.equal(out[:3].cpu(), want) and torch.equal(history.cpu(), want_hist)


# ---------------------------------------------------------------------------- bad input
def _good():
    case = Case(rule="recfg_lerp", noise=True)
    low = make_inputs(case)["low"]
    out = torch.empty((6, 5, 7, 9), device=DEVICE)
    return dict(out=out, x=low["x"], model_out=low["model_out"], g1=low["g1"], coef=low["coef"],
                table=low["table"], rows=low["rows"], table_steps=low["table_steps"], table_w=low["table_w"], z=low["z"])


def _call(**kw):
    args = [kw.pop(k) for k in ("out", "x", "model_out", "g1", "coef")]
    return gs.guided_step_into(*args, **kw)


META = torch.device("meta")
BAD_INPUTS = {
    "model_out_rows": (lambda a: a.update(model_out=torch.randn(9, 5, 7, 9, device=DEVICE)), ValueError, "model_out"),
    "model_out_latent": (lambda a: a.update(model_out=torch.randn(6, 5, 7, 8, device=DEVICE)), ValueError, "model_out"),
    "out_rows": (lambda a: a.update(out=torch.empty(4, 5, 7, 9, device=DEVICE)), ValueError, "out"),
    "z_shape": (lambda a: a.update(z=torch.randn(3, 5, 7, 8, device=DEVICE)), ValueError, "z"),
    "x_dtype": (lambda a: a.update(x=a["x"].half()), TypeError, "x"),
    "model_out_dtype": (lambda a: a.update(model_out=a["model_out"].half()), TypeError, "model_out"),
    "int_out": (lambda a: a.update(out=a["out"].int()), TypeError, "out"),
    "g1_shape": (lambda a: a.update(g1=a["g1"][:2]), ValueError, "g1"),
    "g1_float64": (lambda a: a.update(g1=a["g1"].double()), TypeError, "g1"),
    "coef_len": (lambda a: a.update(coef=a["coef"][:7]), ValueError, "coef"),
    "g1_device": (lambda a: a.update(g1=torch.empty(3, device=META)), ValueError, "g1"),
    "table_device": (lambda a: a.update(table=torch.empty(TABLE_K, TABLE_T, 5, 7, 9, device=META)), ValueError, "table"),
    "table_shape": (lambda a: a.update(table=a["table"][..., :8]), ValueError, "table"),
    "table_int": (lambda a: a.update(table=a["table"].int()), TypeError, "table"),
    "rows_missing": (lambda a: a.update(rows=None), ValueError, "rows"),
    "rows_float": (lambda a: a.update(rows=a["rows"].float()), TypeError, "rows"),
    "rows_shape": (lambda a: a.update(rows=a["rows"][:1]), ValueError, "rows"),
    "label_outside_table": (lambda a: a.update(rows=torch.tensor([0, TABLE_K, 1], device=DEVICE)), ValueError, "rows"),
    "negative_label": (lambda a: a.update(rows=torch.tensor([0, -1, 1], device=DEVICE)), ValueError, "rows"),
    "step_outside_plan": (lambda a: a.update(table_steps=torch.tensor([TABLE_T - 1, TABLE_T], device=DEVICE)),
                          ValueError, "table_steps"),
    "steps_shape": (lambda a: a.update(table_steps=torch.tensor([1], device=DEVICE)), ValueError, "table_steps"),
    "table_w_missing": (lambda a: a.update(table_w=None), ValueError, "table_w"),
    "table_w_shape": (lambda a: a.update(table_w=torch.zeros(2, device=DEVICE)), ValueError, "table_w"),
    "table_w_float64": (lambda a: a.update(table_w=a["table_w"].double()), TypeError, "table_w"),
    "clip_bool": (lambda a: a.update(clip_range=True), TypeError, "clip_range"),
    "x_channels_last_out_not": (lambda a: a.update(x=a["x"].contiguous(memory_format=torch.channels_last)),
                                ValueError, "x"),
    "strided_model_out": (lambda a: a.update(model_out=torch.randn(6, 5, 7, 18, device=DEVICE)[..., ::2]),
                          ValueError, "model_out"),
    "x_not_tensor": (lambda a: a.update(x=a["x"].tolist()), TypeError, "x"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(name):
    mutate, exc, arg = BAD_INPUTS[name]
    args = _good()
    _call(**dict(args))  # the unmodified inputs are fine
    mutate(args)
    with pytest.raises(exc, match=rf"^{arg}:"):
        _call(**args)


def _good_history():
    low = make_inputs(Case(rule="cfg", noise=True, hist_k=3, hist_w=2))["low"]
    return dict(out=torch.empty((6, 5, 7, 9), device=DEVICE),
                **{k: low[k] for k in ("x", "model_out", "g1", "coef", "z", *HISTORY_ARGS)})


def _slots(*values):
    return lambda a: a.update(write_slots=torch.tensor(values, device=DEVICE))


BAD_HISTORY = {
    "history_not_tensor": (lambda a: a.update(history=a["history"].tolist()), TypeError, "history"),
    "history_dtype": (lambda a: a.update(history=a["history"].half()), TypeError, "history"),
    "history_device": (lambda a: a.update(history=torch.empty(3, 3, 5, 7, 9, device=META)), ValueError, "history"),
    "history_latent": (lambda a: a.update(history=a["history"][..., :8]), ValueError, "history"),
    "history_batch": (lambda a: a.update(history=a["history"][:, :2]), ValueError, "history"),
    "history_rank": (lambda a: a.update(history=a["history"][0]), ValueError, "history"),
    "history_no_slots": (lambda a: a.update(history=a["history"][:0], hist_coef=a["hist_coef"][:0],
                                            write_slots=None, write_coef=None), ValueError, "history"),
    "history_too_many_slots": (lambda a: a.update(history=torch.randn(5, 3, 5, 7, 9, device=DEVICE),
                                                  hist_coef=torch.rand(5, device=DEVICE),
                                                  write_coef=torch.rand(2, 7, device=DEVICE)), ValueError, "history"),
    "history_strided": (lambda a: a.update(history=torch.randn(3, 3, 5, 7, 18, device=DEVICE)[..., ::2]),
                        ValueError, "history"),
    "history_slots_not_dense": (lambda a: a.update(history=torch.randn(3, 4, 5, 7, 9, device=DEVICE)[:, :3]),
                                ValueError, "history"),
    "hist_coef_missing": (lambda a: a.update(hist_coef=None), ValueError, "hist_coef"),
    "hist_coef_shape": (lambda a: a.update(hist_coef=a["hist_coef"][:2]), ValueError, "hist_coef"),
    "hist_coef_float64": (lambda a: a.update(hist_coef=a["hist_coef"].double()), TypeError, "hist_coef"),
    "hist_coef_device": (lambda a: a.update(hist_coef=torch.empty(3, device=META)), ValueError, "hist_coef"),
    "hist_coef_without_history": (lambda a: a.update(history=None, write_slots=None, write_coef=None), ValueError,
                                  "hist_coef"),
    "write_coef_without_history": (lambda a: a.update(history=None, hist_coef=None, write_slots=None), ValueError,
                                   "write_coef"),
    "write_slots_missing": (lambda a: a.update(write_slots=None), ValueError, "write_slots"),
    "write_coef_missing": (lambda a: a.update(write_coef=None), ValueError, "write_coef"),
    "write_slots_float": (lambda a: a.update(write_slots=a["write_slots"].float()), TypeError, "write_slots"),
    "write_slots_2d": (lambda a: a.update(write_slots=a["write_slots"].view(1, 2)), ValueError, "write_slots"),
    "write_slots_too_many": (lambda a: a.update(write_slots=torch.tensor([0, 1, 2], device=DEVICE),
                                                write_coef=torch.rand(3, 5, device=DEVICE)), ValueError, "write_slots"),
    "write_slots_device": (lambda a: a.update(write_slots=torch.empty(2, dtype=torch.long, device=META)), ValueError,
                           "write_slots"),
    "write_slot_outside_history": (_slots(0, 3), ValueError, "write_slots"),
    "negative_write_slot": (_slots(-1, 1), ValueError, "write_slots"),
    "write_slot_twice": (_slots(2, 2), ValueError, "write_slots"),
    "write_coef_columns": (lambda a: a.update(write_coef=a["write_coef"][:, :4]), ValueError, "write_coef"),
    "write_coef_rows": (lambda a: a.update(write_coef=a["write_coef"][:1]), ValueError, "write_coef"),
    "write_coef_float64": (lambda a: a.update(write_coef=a["write_coef"].double()), TypeError, "write_coef"),
}


@pytest.mark.parametrize("name", list(BAD_HISTORY))
def test_bad_history_input_raises_a_clear_error(name):
    mutate, exc, arg = BAD_HISTORY[name]
    args = _good_history()
    _call(**{**args, "history": args["history"].clone()})  # the unmodified inputs are fine
    mutate(args)
    with pytest.raises(exc, match=rf"^{arg}:"):
        _call(**args)


def test_bad_write_slots_are_not_checked_with_check_false():
    """check=False skips the one sync (the Sampler's plans are checked on the host); the kernel clamps instead."""
    args = _good_history()
    _slots(0, 3)(args)
    _call(**args, check=False)


# ---------------------------------------------------------------------------- integration
def test_torch_compile_fullgraph_traces_the_op():
    case = Case(**FULL)
    low = make_inputs(case)["low"]
    kw = _kwargs(low, case)

    def step(buf, model_out, g1, coef):
        gs.guided_step_into(buf, buf[:3], model_out, g1, coef, **kw)
        return buf * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    buf = torch.cat([low["x"], low["x"]])
    eager_buf = buf.clone()
    got = compiled(buf, low["model_out"], low["g1"], low["coef"])
    want = step(eager_buf, low["model_out"], low["g1"], low["coef"])
    assert torch.equal(got, want) and torch.equal(buf, eager_buf)
    coef2 = low["coef"] * 1.1  # new per-step values: same graph, new result
    got2 = compiled(buf, low["model_out"], low["g1"], coef2)
    assert torch.equal(got2, step(eager_buf, low["model_out"], low["g1"], coef2))


def test_torch_compile_fullgraph_traces_the_op_with_history():
    """The op mutates the history too: compiled == eager for out and history, and new per-step history weights and
    slots (tensor values) reuse the graph."""
    case = Case(**FULL, hist_k=3, hist_w=2)
    low = make_inputs(case)["low"]
    kw = {k: v for k, v in _kwargs(low, case).items() if k not in HISTORY_ARGS}

    def step(buf, history, model_out, g1, coef, hist_coef, write_slots, write_coef):
        gs.guided_step_into(buf, buf[:3], model_out, g1, coef, history=history, hist_coef=hist_coef,
                            write_slots=write_slots, write_coef=write_coef, **kw)
        return buf * 2

    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    buf = torch.cat([low["x"], low["x"]])
    history = low["history"].clone()
    eager_buf, eager_history = buf.clone(), history.clone()
    per_step = [(low["hist_coef"], low["write_slots"], low["write_coef"]),
                (low["hist_coef"] * -1.3, low["write_slots"].flip(0), low["write_coef"] * 0.7)]
    for i, (hc, ws, wc) in enumerate(per_step):
        got = compiled(buf, history, low["model_out"], low["g1"], low["coef"], hc, ws, wc)
        want = step(eager_buf, eager_history, low["model_out"], low["g1"], low["coef"], hc, ws, wc)
        assert torch.equal(got, want) and torch.equal(buf, eager_buf) and torch.equal(history, eager_history)
        assert not torch.equal(history, low["history"])
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_fake_tensor_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        out = torch.empty(6, 5, 7, 9)
        x = torch.empty(3, 5, 7, 9)
        res = gs.guided_step_into(out, x, torch.empty(6, 5, 7, 9), torch.empty(3), torch.empty(reference.NUM_COEF))
        history = torch.empty(2, 3, 5, 7, 9)
        res_h = gs.guided_step_into(out, x, torch.empty(6, 5, 7, 9), torch.empty(3), torch.empty(reference.NUM_COEF),
                                    history=history, hist_coef=torch.empty(2),
                                    write_slots=torch.zeros(1, dtype=torch.long), write_coef=torch.empty(1, 4))
    assert res is out and res.shape == (6, 5, 7, 9) and res_h is out


@pytest.mark.skipif(not USE_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_reads_new_scalars_on_replay():
    """Replays with new coef / g1 values give the new results: the values are read from device memory."""
    case = Case(**FULL)
    low = make_inputs(case)["low"]
    kw = _kwargs(low, case)
    out = torch.empty((6, 5, 7, 9), device=DEVICE)
    x = low["x"].clone()
    gs.guided_step_into(out, x, low["model_out"], low["g1"], low["coef"], **kw)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gs.guided_step_into(out, x, low["model_out"], low["g1"], low["coef"], **kw)
    for scale in (1.0, 0.5, 2.0):
        low["coef"].mul_(scale)
        low["g1"].add_(scale)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty_like(out)
        reference.guided_step_into(want, x, low["model_out"], low["g1"], low["coef"], **kw)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not USE_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_reads_new_history_weights_and_slots_on_replay():
    """A captured multistep step: replays with new history weights, write coefficients and slots (written in place)
    step like the reference with those values, so a captured loop can run any plan with the same K and W."""
    case = Case(**FULL, hist_k=3, hist_w=2)
    low = make_inputs(case)["low"]
    kw = _kwargs(low, case)
    out = torch.empty((6, 5, 7, 9), device=DEVICE)
    x, history = low["x"].clone(), low["history"].clone()
    step_kw = dict(kw, history=history)
    gs.guided_step_into(out, x, low["model_out"], low["g1"], low["coef"], **step_kw)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gs.guided_step_into(out, x, low["model_out"], low["g1"], low["coef"], **step_kw)
    for scale, slots in ((1.0, [0, 2]), (-0.5, [2, 1]), (2.0, [1, 0])):
        low["hist_coef"].mul_(scale)
        low["write_coef"].mul_(scale)
        low["write_slots"].copy_(torch.tensor(slots))
        start = torch.randn_like(history)
        history.copy_(start)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want, want_hist = torch.empty_like(out), start.clone()
        reference.guided_step_into(want, x, low["model_out"], low["g1"], low["coef"], **dict(kw, history=want_hist))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(history, want_hist, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- whole samples
class AnalyticModel:
    """m(x, t, c) = a(t) x + b(t) e[c]: cheap, smooth, label-dependent, identical on every backend."""

    def __init__(self, latent, num_labels):
        gen = torch.Generator().manual_seed(7)
        self.emb = torch.randn((num_labels, *latent), generator=gen, dtype=torch.float64)

    def __call__(self, x, t, cond):
        tf = t.to(torch.float64).view(-1, *([1] * (x.ndim - 1))) / 1000.0
        e = self.emb.to(x.device)[cond.long()]
        return ((0.3 + 0.5 * tf) * x.double() + (1.0 - 0.4 * tf) * e).to(x.dtype)


LATENT, NUM_CLASSES = (3, 5, 7), 3


def _table_for(plan_timesteps):
    ts = np.asarray(plan_timesteps, dtype=np.float64)
    grid = np.linspace(ts.min(), ts.max(), 4)  # coarser than the plan: most steps interpolate
    ratios = _uniform((NUM_CLASSES + 1, 4, *LATENT), 0.7, 1.3).float()
    return fg.RatioTable(ratios, grid)


def _solver(name):
    sched = fg.NoiseSchedule.linear()
    return {
        "ddim": lambda: fg.DDIM(sched, steps=6),
        "ddim_clip_v": lambda: fg.DDIM(sched, steps=5, clip_sample=True, clip_sample_range=1.0,
                                       prediction_type="v_prediction"),
        "ddim_eta_sample": lambda: fg.DDIM(sched, steps=5, eta=0.7, prediction_type="sample"),
        "ddpm": lambda: fg.DDPM(sched, steps=5),
        "flow": lambda: fg.FlowEuler(steps=5),
        "dpm++2m": lambda: fg.DPMSolver(sched, steps=6, order=2),  # K = 1, W = 1
        "dpm++3m": lambda: fg.DPMSolver(sched, steps=6, order=3),  # K = 2, W = 1
        "unipc2": lambda: fg.UniPC(sched, steps=6, order=2),  # K = 3, W = 2
        "unipc3": lambda: fg.UniPC(sched, steps=6, order=3, prediction_type="v_prediction"),  # K = 4, W = 2
    }[name]()


def _sample(backend, solver, guide, noise, cond):
    model = AnalyticModel(LATENT, NUM_CLASSES + 1)
    sampler = fg.Sampler(model, solver, guide, null_cond=NUM_CLASSES, backend=backend, progress=False)
    return sampler.sample(noise, cond, seeds=[11, 12])


@pytest.mark.parametrize("solver_name", ["ddim", "ddim_clip_v", "ddim_eta_sample", "ddpm", "flow",
                                         "dpm++2m", "dpm++3m", "unipc2", "unipc3"])
@pytest.mark.parametrize("rule", ["cfg", "recfg", "cfg_interval"])
def test_whole_sample_triton_equals_torch(solver_name, rule, monkeypatch):
    launches = []
    real_launch = gs.launch
    monkeypatch.setattr(gs, "launch", lambda *a, **kw: launches.append(kw["history"]) or real_launch(*a, **kw))
    solver = _solver(solver_name)
    plan = solver.plan
    ts = np.asarray(plan.timesteps, dtype=np.float64)
    guide = {
        "cfg": lambda: fg.CFG(3.0),
        "recfg": lambda: fg.ReCFG(3.0, table=_table_for(ts)),
        "cfg_interval": lambda: fg.CFG(torch.tensor([2.0, 4.0]), interval=(np.median(ts), ts.max())),
    }[rule]()
    noise = torch.randn((2, *LATENT), device=DEVICE)
    cond = torch.tensor([2, 0], device=DEVICE)
    got = _sample("triton", solver, guide, noise, cond)
    assert len(launches) == plan.steps  # the kernel ran every step (with the history states of a multistep plan)
    assert all((h is None) == (plan.history is None) for h in launches)
    want = _sample("torch", solver, guide, noise, cond)
    assert not torch.isnan(got).any()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"triton vs torch sample: relative error {rel:.3g}"


@pytest.mark.parametrize("solver_name", ["ddim_clip_v", "unipc3"])
def test_whole_sample_fp16_within_twice_eager_error(solver_name):
    solver = _solver(solver_name)
    guide = fg.ReCFG(3.0, table=_table_for(solver.plan.timesteps))
    noise = torch.randn((2, *LATENT), device=DEVICE)
    cond = torch.tensor([1, 2], device=DEVICE)
    exact = _sample("torch", solver, guide, noise.double(), cond).cpu()
    got = _sample("triton", solver, guide, noise.half(), cond).cpu().double()
    eager = _sample("torch", solver, guide, noise.half(), cond).cpu().double()
    err, eager_err = (got - exact).abs().max().item(), (eager - exact).abs().max().item()
    assert err <= 2 * eager_err + 1e-3


# ---------------------------------------------------------------------------- benchmarks stay runnable
def test_benchmark_suite_runs_at_tiny_sizes():
    """CI exercises benchmarks/bench_guided_step.py (each benchmark once, timing disabled)."""
    env = dict(os.environ, FASTGUIDE_BENCH_QUICK="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(REPO / "benchmarks" / "bench_guided_step.py")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
