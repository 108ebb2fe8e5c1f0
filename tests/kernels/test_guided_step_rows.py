"""Per-row plans in the fused kernel (PER_ROW: every batch row runs its own solver plan, coef [B, NUM_COEF] with
table_steps [B, 2], table_w [B], hist_coef [B, K] and write_coef [B, W, 2 + K]) against the float64 reference,
``reference.guided_step_into``, which is the spec of the per-row semantics.

On CI the kernels run in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1); on a CUDA machine run
the same tests on the GPU with FASTGUIDE_TEST_CUDA=1.

Inputs are fresh random tensors, never zeros; every row gets its own coefficients, history weights and writes, and
with a table its own step rows and lerp weight (even rows a lerp step i1 = i0 + 1, odd rows a grid step i1 = i0), so
a kernel reading another row's (or the batch's first) values fails. Rows have 2139 elements (3 fp32 blocks, 2 fp16
ones, with a ragged tail). ``out`` is NaN-filled before every call. Tolerances as tests/kernels/test_guided_step.py:
float32 outputs (and history slots, rule states) have a max-norm relative error <= 1e-5 to the float64 reference;
fp16 ones a max error <= 2 x (the eager step's error at that dtype, i.e. the reference run on the same
low-precision tensors) + 1e-3.

Coverage: cond-only / CFG / per-row ReCFG x clip x z x out [B] / [2B] x cond_first, history K 1..4 with W 1..2 (and
K2W0), the rules with per-sample reductions (CFG-Zero*, APG with its state, rescale) with a per-row table, rows padded
with the identity plan (x_next = x exactly, history kept exactly), per-row operands equal to a batch operand giving
the batch launch's bits, bad shapes and mixes of per-row and batch operands, torch.compile and fake tensors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from fastguide.kernels import guided_step as gs
from fastguide.kernels import reference
from fastguide.kernels.reference import NUM_COEF, NUM_RULE_PARAMS, Coef, RuleParam

USE_CUDA = os.environ.get("FASTGUIDE_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if USE_CUDA else "cpu")
if not USE_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need CUDA (FASTGUIDE_TEST_CUDA=1) or TRITON_INTERPRET=1", allow_module_level=True)

TABLE_K, TABLE_T = 4, 6
CLIP_RANGE = 1.0
SHAPE = (3, 3, 23, 31)  # 2139 elements a row: 3 fp32 blocks (2 fp16) with a ragged tail
ROW_SCALES = (1.0, 0.6, 2.5)  # per-row scales of c, u and the rule state: the rows' |D| differ by ~2.5x
HISTORY_ARGS = ("history", "hist_coef", "write_slots", "write_coef")
RULES = {  # the rules with per-sample reductions, as RuleParam settings (threshold: a cap between two rows' |D|)
    "cfg_zero_star": dict(zero_star=1.0),
    "apg": dict(eta=0.3, threshold=True, momentum=-0.5),
    "rescale": dict(rescale=0.7),
    "all": dict(zero_star=1.0, eta=0.3, threshold=True, momentum=-0.5, rescale=0.7),
}


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype = torch.float32
    uncond: bool = True  # model_out has 2B rows
    table: bool = False  # per-row ReCFG table steps and weights
    clip: bool = False
    noise: bool = False
    out_rows: int = 2
    cond_first: bool = True
    hist_k: int = 0
    hist_w: int = 0
    rule: str | None = None  # a key of RULES: the two-launch REDUCE path
    identity_rows: tuple = ()  # rows padded with the identity plan (x_next = x, history kept, g1 = 1)
    shape: tuple = SHAPE


def _uniform(shape, lo, hi):
    return torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo


def _row_scaled(t: torch.Tensor) -> torch.Tensor:
    scales = torch.tensor([ROW_SCALES[i % len(ROW_SCALES)] for i in range(t.shape[0])], dtype=torch.float64)
    return t * scales.view(-1, *([1] * (t.ndim - 1)))


def _identity_writes(write_slots: torch.Tensor, k: int) -> torch.Tensor:
    """[W, 2 + K] write coefficients that keep each written slot (state = the slot's old value)."""
    keep = torch.zeros((write_slots.shape[0], 2 + k), dtype=torch.float64)
    for j, slot in enumerate(write_slots.tolist()):
        keep[j, 2 + slot] = 1.0
    return keep


def _rule_params(case: Case, threshold: float) -> torch.Tensor:
    spec = RULES[case.rule]
    p = torch.zeros(NUM_RULE_PARAMS, dtype=torch.float64)
    p[RuleParam.ZERO_STAR] = spec.get("zero_star", 0.0)
    p[RuleParam.ETA] = spec.get("eta", 1.0)
    p[RuleParam.NORM_THRESHOLD] = threshold
    p[RuleParam.MOMENTUM] = spec.get("momentum", 0.0)
    p[RuleParam.RESCALE] = spec.get("rescale", 0.0)
    return p


def _direction_norms(case: Case, t: dict) -> torch.Tensor:
    """|D| per row (float64) of the exact inputs without a cap: the reference's next rule state with g1 != 1."""
    b = case.shape[0]
    m_cond, m_uncond = reference.split_model_output(t["model_out"], b, case.cond_first)
    u = m_uncond
    if case.table:
        flat = t["table"].flatten(0, 1)
        r0 = flat[t["rows"] * TABLE_T + t["table_steps"][:, 0]]
        r1 = flat[t["rows"] * TABLE_T + t["table_steps"][:, 1]]
        u = (r0 + t["table_w"].view(-1, *([1] * (r0.ndim - 1))) * (r1 - r0)) * m_uncond
    _, d = reference.reduced_guidance(m_cond, u, torch.full((b,), 2.0, dtype=torch.float64),
                                      _rule_params(case, 0.0), t.get("rule_state"))
    return d.flatten(1).norm(dim=1)


def make_inputs(case: Case) -> dict:
    """Fresh random per-row operands in the case's dtype (``low``) and their float64 twins (``exact``)."""
    b, latent = case.shape[0], case.shape[1:]
    c = _row_scaled(torch.randn(case.shape, dtype=torch.float64) + 0.2)
    u = _row_scaled(0.7 * torch.randn(case.shape, dtype=torch.float64) + 0.4) + 0.6 * c
    g1 = _uniform((b,), 1.5, 4.0)
    if case.rule is not None and b > 1:
        g1[1] = 1.0  # an unguided row: m = c and its state is kept
    coef = torch.cat([_uniform((b, 1), 0.5, 1.5), _uniform((b, 1), -1.0, -0.2), _uniform((b, 1), 0.1, 0.5),
                      _uniform((b, NUM_COEF - 3), -1.5, 1.5)], 1)  # A, B, S, then PX..CM (Coef), one row each
    t = {"x": torch.randn(case.shape, dtype=torch.float64),
         "model_out": (torch.cat((c, u) if case.cond_first else (u, c))) if case.uncond else c,
         "g1": g1, "coef": coef}
    if case.noise:
        t["z"] = torch.randn(case.shape, dtype=torch.float64)
    if case.table:
        i0 = torch.randint(0, TABLE_T - 1, (b,))
        i1 = torch.where(torch.arange(b) % 2 == 0, i0 + 1, i0)  # even rows lerp, odd rows sit on a grid step
        t.update(table=_uniform((TABLE_K, TABLE_T, *latent), 0.5, 1.5), rows=torch.randint(0, TABLE_K, (b,)),
                 table_steps=torch.stack([i0, i1], 1), table_w=_uniform((b,), 0.1, 0.9))
    if case.hist_k:
        k, w = case.hist_k, case.hist_w
        signs = torch.where(torch.rand((b, w, 2 + k)) < 0.5, -1.0, 1.0).double()
        t.update(history=torch.randn((k, *case.shape), dtype=torch.float64), hist_coef=_uniform((b, k), -0.8, 0.8))
        if w:  # (W = 0: no writes, both None as the reference's contract has it)
            t.update(write_slots=torch.randperm(k)[:w], write_coef=signs * _uniform((b, w, 2 + k), 0.2, 1.0))
    if case.rule is not None and RULES[case.rule].get("momentum") is not None:
        t["rule_state"] = _row_scaled(0.5 * torch.randn(case.shape, dtype=torch.float64) + 0.1)
    for i in case.identity_rows:  # what fastguide.row_plans pads a finished row with
        t["coef"][i] = torch.zeros(NUM_COEF, dtype=torch.float64)
        t["coef"][i, Coef.A] = t["coef"][i, Coef.CX] = 1.0
        t["g1"][i] = 1.0
        if case.hist_k:
            t["hist_coef"][i] = 0.0
        if case.hist_w:
            t["write_coef"][i] = _identity_writes(t["write_slots"], case.hist_k)
    low = {}
    for name, v in t.items():
        if not v.is_floating_point():
            low[name] = v.to(DEVICE)
        elif name in ("g1", "coef", "table_w", "hist_coef", "write_coef"):
            low[name] = v.to(DEVICE, torch.float32)
        else:
            low[name] = v.to(DEVICE, case.dtype)
    if case.rule is not None:
        exact = _exact(low)
        threshold = 0.0
        if RULES[case.rule].get("threshold"):
            norms = _direction_norms(case, exact)
            threshold = float((norms[0] * norms[2]).sqrt())  # between rows 0 and 2's |D|: caps one of them only
        low["rule_params"] = _rule_params(case, threshold).to(DEVICE, torch.float32)
    return {"low": low, "exact": _exact(low)}


def _exact(low: dict) -> dict:
    return {k: v.detach().cpu().double() if v.is_floating_point() else v.cpu() for k, v in low.items()}


def _kwargs(t: dict, case: Case) -> dict:
    kw = dict(cond_first=case.cond_first, clip_range=CLIP_RANGE if case.clip else None, z=t.get("z"))
    for name in ("table", "rows", "table_steps", "table_w", *HISTORY_ARGS, "rule_params", "rule_state"):
        kw[name] = t.get(name)
    return kw


def run_kernel(case: Case, low: dict) -> torch.Tensor:
    b = case.shape[0]
    out = torch.full((case.out_rows * b, *case.shape[1:]), float("nan"), dtype=case.dtype, device=DEVICE)
    returned = gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], **_kwargs(low, case))
    assert returned is out
    return out


def reference_step(case: Case, t: dict) -> tuple[torch.Tensor, dict]:
    """(x_next [B], the mutated history / rule state) from the reference, on copies of ``t``."""
    t = {k: (v.clone() if k in ("history", "rule_state") else v) for k, v in t.items()}
    out = torch.empty(case.shape, dtype=t["x"].dtype, device=t["x"].device)
    reference.guided_step_into(out, t["x"], t["model_out"], t["g1"], t["coef"], **_kwargs(t, case))
    return out, {k: t[k] for k in ("history", "rule_state") if k in t}


def _assert_close(case: Case, what: str, got, exact, eager) -> None:
    """fp32: max-norm relative error <= 1e-5; fp16: max error <= 2 x the eager step's + 1e-3."""
    got = got.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{case}: {what} was not written"
    err = (got - exact).abs().max().item()
    if case.dtype == torch.float32:
        rel = err / exact.abs().max().item()
        assert rel <= 1e-5, f"{case}: {what} relative error {rel:.3g} > 1e-5"
    else:
        eager_err = (eager.detach().cpu().double() - exact).abs().max().item()
        assert err <= 2 * eager_err + 1e-3, f"{case}: {what} error {err:.3g} > 2 x eager {eager_err:.3g} + 1e-3"


def check_case(case: Case) -> None:
    inputs = make_inputs(case)
    low = inputs["low"]
    before = {k: v.clone() for k, v in low.items()}
    out = run_kernel(case, low)
    exact, exact_states = reference_step(case, inputs["exact"])
    assert not torch.isnan(exact).any()
    eager, eager_states = (None, {}) if case.dtype == torch.float32 else reference_step(case, before)
    b = case.shape[0]
    for k in range(case.out_rows):
        block = out[k * b:(k + 1) * b]
        _assert_close(case, f"out block {k}", block, exact, eager)
        for i in case.identity_rows:
            assert torch.equal(block[i], before["x"][i]), f"{case}: identity row {i} is not x exactly"
    if case.hist_k:
        written = low["write_slots"].tolist() if case.hist_w else []
        for j in range(case.hist_k):
            got, old = low["history"][j], before["history"][j]
            if j not in written:
                assert torch.equal(got, old), f"{case}: history slot {j} is not written by this step but changed"
                continue
            assert (exact_states["history"][j] - old.cpu().double()).abs().max() > 0.1, "vacuous: the write kept it"
            _assert_close(case, f"history slot {j}", got, exact_states["history"][j],
                          None if eager is None else eager_states["history"][j])
            for i in case.identity_rows:
                assert torch.equal(got[i], old[i]), f"{case}: identity row {i} changed slot {j}"
    if "rule_state" in low:
        for i in range(b):
            if float(before["g1"][i]) == 1.0:  # unguided (and identity) rows keep their state bit for bit
                assert torch.equal(low["rule_state"][i], before["rule_state"][i]), f"{case}: row {i}'s state changed"
            else:
                _assert_close(case, f"state row {i}", low["rule_state"][i], exact_states["rule_state"][i],
                              None if eager is None else eager_states["rule_state"][i])
    for k, v in before.items():  # the kernels write only out, the history and the rule state
        if k not in ("history", "rule_state"):
            assert torch.equal(low[k], v), f"{k} was modified"


def _case_id(c: Case) -> str:
    parts = [str(c.dtype).removeprefix("torch."), "cfg" if c.uncond else "cond", "table" if c.table else "notable",
             "clip" if c.clip else "noclip", "z" if c.noise else "noz", f"out{c.out_rows}B",
             "cfirst" if c.cond_first else "ufirst"]
    parts += [f"K{c.hist_k}W{c.hist_w}"] if c.hist_k else []
    parts += [c.rule] if c.rule else []
    parts += [f"identity{''.join(map(str, c.identity_rows))}"] if c.identity_rows else []
    return "-".join(parts + ["x".join(map(str, c.shape))])


F16 = torch.float16
STEP_CASES = [
    Case(uncond=False, out_rows=1),
    Case(noise=True, cond_first=False),
    Case(table=True, clip=True, noise=True),
    Case(F16, table=True, clip=True, noise=True),
    Case(F16, out_rows=1, shape=(5, 2, 9, 11)),  # five rows, one ragged block each
    Case(table=True, clip=True, noise=True, hist_k=1, hist_w=1),
    Case(table=True, noise=True, hist_k=2, hist_w=1, cond_first=False),
    Case(table=True, clip=True, out_rows=1, hist_k=3, hist_w=2),
    Case(clip=True, noise=True, hist_k=4, hist_w=2),
    Case(F16, table=True, clip=True, noise=True, hist_k=4, hist_w=2),
    Case(F16, uncond=False, hist_k=2, hist_w=2),
    Case(table=True, noise=True, hist_k=2, hist_w=0),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=_case_id)
def test_per_row_plans_match_the_reference(case):
    check_case(case)


RULE_CASES = [
    Case(table=True, rule="cfg_zero_star"),
    Case(table=True, clip=True, noise=True, rule="apg"),
    Case(table=True, out_rows=1, cond_first=False, rule="rescale"),
    Case(F16, table=True, noise=True, rule="all"),
    Case(table=True, clip=True, noise=True, hist_k=4, hist_w=2, rule="apg"),
]


@pytest.mark.parametrize("case", RULE_CASES, ids=_case_id)
def test_per_row_plans_with_rules_match_the_reference(case):
    """The REDUCE path: the pre-pass reads each row's table steps and weight, the step each row's coefficients."""
    check_case(case)


IDENTITY_CASES = [
    Case(table=True, noise=True, hist_k=3, hist_w=2, identity_rows=(1,)),
    Case(F16, table=True, clip=True, noise=True, hist_k=4, hist_w=2, identity_rows=(0, 2)),
    Case(table=True, clip=True, noise=True, hist_k=2, hist_w=1, rule="apg", identity_rows=(2,)),
]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=_case_id)
def test_rows_padded_with_the_identity_plan_keep_x_and_history_exactly(case):
    """A row whose plan has finished runs identity steps (A = CX = 1, everything else 0, history weights 0, each
    write keeping its slot): x_next is x and its history is kept bit for bit, whatever the other rows do."""
    check_case(case)


def test_the_cases_are_not_vacuous():
    """The per-row values really differ between rows (a kernel reading row 0's, or the batch's, would fail), the
    table has lerp and grid rows, and the clip cases clamp some x0."""
    case = Case(table=True, clip=True, noise=True, hist_k=3, hist_w=2)
    t = make_inputs(case)["exact"]
    for name in ("coef", "table_w", "hist_coef", "write_coef"):
        for i in range(1, case.shape[0]):
            assert (t[name][i] != t[name][0]).all(), name
    steps = t["table_steps"]
    assert (steps[0::2, 1] == steps[0::2, 0] + 1).all() and (steps[1::2, 1] == steps[1::2, 0]).all()
    b = case.shape[0]
    g1 = t["g1"].view(-1, 1, 1, 1)
    m = g1 * t["model_out"][:b] + (1 - g1) * t["model_out"][b:]
    x0 = t["coef"][:, Coef.PX].view(-1, 1, 1, 1) * t["x"] + t["coef"][:, Coef.PM].view(-1, 1, 1, 1) * m
    frac = (x0.abs() > CLIP_RANGE).double().mean().item()
    assert 0.05 < frac < 0.95


# ---------------------------------------------------------------------------- per-row == batch, bit for bit
def _batch_inputs(case: Case) -> dict:
    """Low-precision operands with one plan for the batch (coef [NUM_COEF], table_steps [2], table_w [], ...)."""
    low = make_inputs(case)["low"]
    low["coef"] = low["coef"][0].clone()
    if case.table:
        low["table_steps"] = torch.tensor([2, 3], device=DEVICE)
        low["table_w"] = low["table_w"][0].clone()
    if case.hist_k:
        low["hist_coef"] = low["hist_coef"][0].clone()
        low["write_coef"] = low["write_coef"][0].clone()
    return low


def _as_rows(low: dict, b: int) -> dict:
    """The same operands per row: every row a copy of the batch's (stride-0 views: the launcher makes them dense)."""
    rows = dict(low, coef=low["coef"].expand(b, NUM_COEF))
    if "table_steps" in low:
        rows.update(table_steps=low["table_steps"].expand(b, 2), table_w=low["table_w"].expand(b))
    if "hist_coef" in low:
        rows.update(hist_coef=low["hist_coef"].expand(b, -1), write_coef=low["write_coef"].expand(b, -1, -1))
    return rows


@pytest.mark.parametrize("case", [
    Case(table=True, clip=True, noise=True, hist_k=4, hist_w=2),
    Case(F16, table=True, noise=True, out_rows=1, hist_k=1, hist_w=1),
    Case(table=True, clip=True, noise=True, hist_k=2, hist_w=1, rule="all"),
], ids=_case_id)
def test_per_row_operands_equal_to_the_batch_give_the_batch_bits(case):
    """Rows that all carry the batch's plan give exactly the batch launch's out, history and rule state."""
    b = case.shape[0]
    batch = _batch_inputs(case)
    per_row = _as_rows(batch, b)
    results = []
    for low in (batch, per_row):
        low = dict(low, **{k: low[k].clone() for k in ("history", "rule_state") if k in low})
        out = run_kernel(case, low)
        results.append([out] + [low[k] for k in ("history", "rule_state") if k in low])
    for got, want in zip(*reversed(results)):
        assert not torch.isnan(want).any()
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------- bad input
def _good():
    """Valid per-row operands with a table and a history (K = 3, W = 2), B = 3."""
    case = Case(table=True, noise=True, hist_k=3, hist_w=2)
    low = make_inputs(case)["low"]
    out = torch.empty((6, *SHAPE[1:]), device=DEVICE)
    return {"out": out, **{k: low[k] for k in ("x", "model_out", "g1", "coef", "z", "table", "rows", "table_steps",
                                                "table_w", *HISTORY_ARGS)}}


def _call(**kw):
    args = [kw.pop(k) for k in ("out", "x", "model_out", "g1", "coef")]
    return gs.guided_step_into(*args, **kw)


def _set(**values):
    return lambda a: a.update({k: v(a) for k, v in values.items()})


def _batch_plan(a):
    """The batch's plan except one operand (set by the caller)."""
    a.update(coef=a["coef"][0], table_steps=a["table_steps"][0], table_w=a["table_w"][0], hist_coef=a["hist_coef"][0],
             write_coef=a["write_coef"][0])


def _batch_plan_but(**values):
    def mutate(a):
        per_row = {k: v(a) for k, v in values.items()}
        _batch_plan(a)
        a.update(per_row)
    return mutate


# name: (mutation, argument named, a part of the message that says the expected shape)
BAD_INPUTS = {
    "coef_rows": (_set(coef=lambda a: torch.rand(4, NUM_COEF, device=DEVICE)), "coef", "(3, 8)"),
    "coef_columns": (_set(coef=lambda a: a["coef"][:, :7]), "coef", "(3, 8)"),
    "coef_3d": (_set(coef=lambda a: a["coef"][None]), "coef", "(3, 8)"),
    "table_steps_batch": (_set(table_steps=lambda a: a["table_steps"][0]), "table_steps", "[B, 2] = (3, 2)"),
    "table_steps_rows": (_set(table_steps=lambda a: a["table_steps"][:2]), "table_steps", "[B, 2] = (3, 2)"),
    "table_steps_columns": (_set(table_steps=lambda a: torch.zeros(3, 3, dtype=torch.long, device=DEVICE)),
                            "table_steps", "[B, 2] = (3, 2)"),
    "table_w_batch": (_set(table_w=lambda a: a["table_w"][0]), "table_w", "[B] = (3,)"),
    "table_w_column": (_set(table_w=lambda a: a["table_w"][:, None]), "table_w", "[B] = (3,)"),
    "table_w_rows": (_set(table_w=lambda a: torch.rand(4, device=DEVICE)), "table_w", "[B] = (3,)"),
    "hist_coef_batch": (_set(hist_coef=lambda a: a["hist_coef"][0]), "hist_coef", "[B, K] = (3, 3)"),
    "hist_coef_rows": (_set(hist_coef=lambda a: torch.rand(2, 3, device=DEVICE)), "hist_coef", "[B, K] = (3, 3)"),
    "write_coef_batch": (_set(write_coef=lambda a: a["write_coef"][0]), "write_coef", "[B, W, 2 + K] = (3, 2, 5)"),
    "write_coef_rows": (_set(write_coef=lambda a: a["write_coef"][:1]), "write_coef", "[B, W, 2 + K] = (3, 2, 5)"),
    "write_coef_columns": (_set(write_coef=lambda a: a["write_coef"][..., :4]), "write_coef",
                           "[B, W, 2 + K] = (3, 2, 5)"),
    "write_slots_per_row": (_set(write_slots=lambda a: a["write_slots"].expand(3, 2)), "write_slots",
                            "[W] (shared by all rows"),
    # one plan for the batch (coef [NUM_COEF]) with one operand per row
    "batch_coef_row_table_steps": (_batch_plan_but(table_steps=lambda a: a["table_steps"]), "table_steps",
                                   "[2] = (2,)"),
    "batch_coef_row_table_w": (_batch_plan_but(table_w=lambda a: a["table_w"]), "table_w", "shape () or (1,)"),
    "batch_coef_row_hist_coef": (_batch_plan_but(hist_coef=lambda a: a["hist_coef"]), "hist_coef", "[K] = (3,)"),
    "batch_coef_row_write_coef": (_batch_plan_but(write_coef=lambda a: a["write_coef"]), "write_coef",
                                  "[W, 2 + K] = (2, 5)"),
    "step_outside_the_table": (_set(table_steps=lambda a: torch.tensor([[0, 1], [2, 2], [TABLE_T - 1, TABLE_T]],
                                                                       device=DEVICE)),
                               "table_steps", "of batch rows [2]"),
}


def test_the_good_inputs_are_fine():
    """The unmodified inputs of the bad-input cases pass validation and run (once: the cases below only validate)."""
    args = _good()
    _call(**args)
    batch = _good()
    _batch_plan(batch)
    _call(**batch)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_per_row_input_raises_a_clear_error(name):
    mutate, arg, expected = BAD_INPUTS[name]
    args = _good()
    gs.validate(**args)  # the unmodified inputs are fine (validated only: no launch)
    mutate(args)
    with pytest.raises(ValueError, match=rf"^{arg}:") as err:
        _call(**args)
    assert expected in str(err.value), str(err.value)


def test_unchecked_bad_per_row_steps_never_read_outside_the_table():
    """With check=False a bad step of one row is clamped into the table like a batch step (no out-of-bounds read)."""
    case = Case(table=True, noise=True)
    inputs = make_inputs(case)
    low = inputs["low"]
    low["table_steps"] = torch.tensor([[TABLE_T + 5, 0], [-2, -2], [1, 2]], device=DEVICE)
    out = torch.full((6, *SHAPE[1:]), float("nan"), device=DEVICE)
    gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], check=False, **_kwargs(low, case))
    exact = dict(inputs["exact"], table_steps=torch.tensor([[TABLE_T - 1, 0], [0, 0], [1, 2]]))
    want, _ = reference_step(case, exact)
    assert ((out[:3].cpu().double() - want).abs().max() / want.abs().max()).item() <= 1e-5


# ---------------------------------------------------------------------------- integration
def test_torch_compile_fullgraph_traces_per_row_plans():
    """The op with per-row operands traces without a graph break, equals eager (out and history), and new per-row
    values reuse the graph."""
    case = Case(table=True, clip=True, noise=True, hist_k=2, hist_w=1)
    low = make_inputs(case)["low"]
    fixed = {k: v for k, v in _kwargs(low, case).items() if k not in ("table_steps", "table_w", *HISTORY_ARGS)}
    b = case.shape[0]

    def step(buf, history, model_out, g1, coef, table_steps, table_w, hist_coef, write_coef):
        gs.guided_step_into(buf, buf[:b], model_out, g1, coef, table_steps=table_steps, table_w=table_w,
                            history=history, hist_coef=hist_coef, write_slots=low["write_slots"],
                            write_coef=write_coef, **fixed)

    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    buf, history = torch.cat([low["x"], low["x"]]), low["history"].clone()
    eager_buf, eager_history = buf.clone(), history.clone()
    per_step = [(low["coef"], low["table_steps"], low["table_w"], low["hist_coef"], low["write_coef"]),
                (low["coef"].flip(0), low["table_steps"].flip(0), low["table_w"] * 0.5, low["hist_coef"] * -1.3,
                 low["write_coef"] * 0.7)]
    for i, values in enumerate(per_step):
        compiled(buf, history, low["model_out"], low["g1"], *values)
        step(eager_buf, eager_history, low["model_out"], low["g1"], *values)
        assert not torch.isnan(buf).any()
        assert torch.equal(buf, eager_buf) and torch.equal(history, eager_history)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_fake_tensor_propagation_with_per_row_plans():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out, x = torch.empty(6, 5, 7, 9), torch.empty(3, 5, 7, 9)
        res = gs.guided_step_into(out, x, torch.empty(6, 5, 7, 9), torch.empty(3), torch.empty(3, NUM_COEF),
                                  table=torch.empty(2, 4, 5, 7, 9), rows=torch.zeros(3, dtype=torch.long),
                                  table_steps=torch.zeros(3, 2, dtype=torch.long), table_w=torch.empty(3),
                                  history=torch.empty(2, 3, 5, 7, 9), hist_coef=torch.empty(3, 2),
                                  write_slots=torch.zeros(1, dtype=torch.long), write_coef=torch.empty(3, 1, 4))
    assert res is out
