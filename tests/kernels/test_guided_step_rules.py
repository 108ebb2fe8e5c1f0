"""The rules with per-sample reductions (``rule_params``: CFG-Zero*, APG, guidance_rescale) in the fused kernel's
two-launch path (moment pre-pass + REDUCE step) against the float64 reference, ``reference.guided_step_into``.

On CI the kernels run in the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1); on a CUDA machine run
the same tests on the GPU with FASTGUIDE_TEST_CUDA=1.

Inputs are fresh random tensors, never zeros: u is correlated with c and both have non-zero means, so alpha, the
projection and both stds are far from trivial; the rows have different scales, so a norm threshold between two
rows' |D| caps one and not the other; g1 is per sample with row 1 exactly 1 (unguided: m = c, state kept). ``out``
is NaN-filled before every call. Tolerances as tests/kernels/test_guided_step.py: float32 outputs (and states) have
a max-norm relative error <= 1e-5 to the float64 reference; fp16 / bf16 ones a max error <= 2 x (the eager step's
error at that dtype, i.e. the reference run on the same low-precision tensors) + 1e-3.

Coverage: the full product of the rule options (zero_star x eta x threshold x momentum with a state x rescale) x
table (CFG / ReCFG lerp) in float32, and in float16 with the table alternating; cond_first, out [B] / [2B], clip and
noise z rotate over those cases. Then history + clip + z, shapes (several partials a row, more than MAX_PARTIALS
blocks, rank 2, channels_last), the pre-pass loop (several blocks per partial), no unconditional half, bad input,
torch.compile(fullgraph=True) through the custom op and determinism.
"""
from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, replace

import pytest
import torch

from fastguide.kernels import guided_step as gs
from fastguide.kernels import reference
from fastguide.kernels.reference import NUM_RULE_PARAMS, RuleParam

USE_CUDA = os.environ.get("FASTGUIDE_TEST_CUDA") == "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if USE_CUDA else "cpu")
if not USE_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("kernel tests need CUDA (FASTGUIDE_TEST_CUDA=1) or TRITON_INTERPRET=1", allow_module_level=True)

needs_cuda_for_bf16 = pytest.mark.skipif(not USE_CUDA, reason="bf16 arithmetic is not supported by the Triton "
                                         "interpreter; bf16 runs with FASTGUIDE_TEST_CUDA=1 on a GPU")
TABLE_K, TABLE_T = 3, 5
CLIP_RANGE = 1.0
LATENT = (3, 37, 29)  # 3219 elements a row: 4 fp32 blocks (2 fp16) with a ragged tail
ROW_SCALES = (1.0, 0.6, 2.5)  # rows 0 and 2 are guided; their |D| differ by ~2.5x


@dataclass(frozen=True)
class Case:
    zero_star: bool = True
    eta: float = 1.0
    threshold: bool = False  # a norm cap between the guided rows' |D|: binds on one, not on the other
    momentum: float | None = None  # None: no rule state; else APG's momentum beta with a state
    rescale: float = 0.0
    table: str | None = None  # None, "grid" or "lerp"
    dtype: torch.dtype = torch.float32
    shape: tuple = (3, *LATENT)
    cond_first: bool = True
    out_rows: int = 2
    clip: bool = False
    noise: bool = False
    hist_k: int = 0
    hist_w: int = 0
    channels_last: bool = False
    uncond: bool = True  # model_out has 2B rows


def _uniform(shape, lo, hi):
    return torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo


def _rows(t: torch.Tensor) -> torch.Tensor:
    """Scale each sample by ROW_SCALES (cycled)."""
    scales = torch.tensor([ROW_SCALES[i % len(ROW_SCALES)] for i in range(t.shape[0])], dtype=torch.float64)
    return t * scales.view(-1, *([1] * (t.ndim - 1)))


def _as(t, dtype, channels_last=False):
    t = t.to(device=DEVICE, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _slabs_channels_last(t: torch.Tensor) -> torch.Tensor:
    """[K, T or B, C, H, W] with each [C, H, W] slab channels_last, like x."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _params(case: Case, threshold: float = 0.0) -> torch.Tensor:
    p = torch.zeros(NUM_RULE_PARAMS, dtype=torch.float64)
    p[RuleParam.ZERO_STAR] = float(case.zero_star)
    p[RuleParam.ETA] = case.eta
    p[RuleParam.NORM_THRESHOLD] = threshold
    p[RuleParam.MOMENTUM] = 0.0 if case.momentum is None else case.momentum
    p[RuleParam.RESCALE] = case.rescale
    return p


def _kwargs(t: dict, case: Case) -> dict:
    kw = dict(cond_first=case.cond_first, table=t.get("table"), rows=t.get("rows"), table_steps=t.get("table_steps"),
              table_w=t.get("table_w"), clip_range=CLIP_RANGE if case.clip else None, z=t.get("z"),
              rule_params=t["rule_params"], rule_state=t.get("rule_state"))
    if case.hist_k:
        kw.update({k: t[k] for k in ("history", "hist_coef", "write_slots", "write_coef")})
    return kw


def _u_effective(case: Case, t: dict) -> torch.Tensor:
    """R m_uncond (float64) of the exact inputs."""
    b = case.shape[0]
    m_cond, m_uncond = reference.split_model_output(t["model_out"], b, case.cond_first)
    if case.table is None:
        return m_uncond
    flat = t["table"].flatten(0, 1)
    r0, r1 = flat[t["rows"] * TABLE_T + t["table_steps"][0]], flat[t["rows"] * TABLE_T + t["table_steps"][1]]
    return (r0 + t["table_w"] * (r1 - r0)) * m_uncond


def _direction_norms(case: Case, t: dict) -> torch.Tensor:
    """|D| per row (float64) for the case's zero_star and momentum: the reference's next state with g1 != 1."""
    b = case.shape[0]
    m_cond = reference.split_model_output(t["model_out"], b, case.cond_first)[0]
    _, d = reference.reduced_guidance(m_cond, _u_effective(case, t), torch.full((b,), 2.0, dtype=torch.float64),
                                      _params(case), t.get("rule_state"))
    return d.flatten(1).norm(dim=1)


def make_inputs(case: Case) -> dict:
    """Fresh random operands in the case's dtypes / layouts and their float64 twins (``exact``)."""
    b, latent = case.shape[0], case.shape[1:]
    c = _rows(torch.randn(case.shape, dtype=torch.float64) + 0.2)
    u = _rows(0.7 * torch.randn(case.shape, dtype=torch.float64) + 0.4) + 0.6 * c
    halves = (c, u) if case.cond_first else (u, c)
    g1 = _uniform((b,), 1.5, 4.0)
    if b > 1:
        g1[1] = 1.0  # an unguided row: m = c and its state is kept
    cl = case.channels_last
    low = {"x": _as(torch.randn(case.shape, dtype=torch.float64), case.dtype, cl),
           "model_out": _as(torch.cat(halves) if case.uncond else c, case.dtype, cl),
           "g1": _as(g1, torch.float32),
           "coef": _as(torch.cat([_uniform((1,), 0.5, 1.5), _uniform((1,), -1.0, -0.2), _uniform((1,), 0.1, 0.5),
                                  _uniform((5,), -1.5, 1.5)]), torch.float32)}
    if case.noise:
        low["z"] = _as(torch.randn(case.shape, dtype=torch.float64), case.dtype, cl)
    if case.table is not None:
        table = _uniform((TABLE_K, TABLE_T, *latent), 0.5, 1.5).to(DEVICE, case.dtype)
        i0 = int(torch.randint(0, TABLE_T - 1, ()))
        low.update(table=_slabs_channels_last(table) if cl else table, rows=torch.randint(0, TABLE_K, (b,)).to(DEVICE),
                   table_steps=torch.tensor([i0, i0 + 1 if case.table == "lerp" else i0], device=DEVICE),
                   table_w=_as(_uniform((), 0.1, 0.9), torch.float32))
    if case.momentum is not None:
        low["rule_state"] = _as(_rows(0.5 * torch.randn(case.shape, dtype=torch.float64) + 0.1), case.dtype, cl)
    if case.hist_k:
        k, w = case.hist_k, case.hist_w
        history = torch.randn((k, *case.shape), dtype=torch.float64).to(DEVICE, case.dtype)
        low.update(history=_slabs_channels_last(history) if cl else history,
                   hist_coef=_as(_uniform((k,), -0.8, 0.8), torch.float32),
                   write_slots=torch.randperm(k)[:w].to(DEVICE),
                   write_coef=_as(_uniform((w, 2 + k), 0.2, 1.0), torch.float32))
    exact = {k: v.detach().cpu().double() if v.is_floating_point() else v.cpu() for k, v in low.items()}
    threshold = 1.0 if case.threshold else 0.0  # (no unconditional half: no direction to cap)
    if case.threshold and case.uncond:
        norms = _direction_norms(case, exact)
        threshold = float((norms[0] * norms[2]).sqrt())  # between the guided rows' |D| (they differ ~2.5x)
    low["rule_params"] = _as(_params(case, threshold), torch.float32)
    exact["rule_params"] = low["rule_params"].cpu().double()
    return {"low": low, "exact": exact}


def reference_step(case: Case, t: dict) -> tuple[torch.Tensor, dict]:
    """(x_next [B], the mutated states: rule_state / history) from the reference, on copies of ``t``."""
    t = {k: (v.clone() if k in ("rule_state", "history") and v is not None else v) for k, v in t.items()}
    out = torch.empty((case.shape[0], *case.shape[1:]), dtype=t["x"].dtype, device=t["x"].device)
    reference.guided_step_into(out, t["x"], t["model_out"], t["g1"], t["coef"], **_kwargs(t, case))
    return out, {k: t[k] for k in ("rule_state", "history") if k in t}


def run_kernel(case: Case, low: dict) -> torch.Tensor:
    out = torch.full((case.out_rows * case.shape[0], *case.shape[1:]), float("nan"), dtype=case.dtype,
                     device=DEVICE)
    if case.channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    returned = gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], **_kwargs(low, case))
    assert returned is out
    return out


def _assert_close(case: Case, what: str, got, exact, eager) -> None:
    """fp32: max-norm relative error <= 1e-5; fp16 / bf16: max error <= 2 x the eager step's + 1e-3."""
    got = got.detach().cpu().double()
    assert not torch.isnan(got).any(), f"{case}: {what} was not written"
    err = (got - exact).abs().max().item()
    if case.dtype == torch.float32:
        rel = err / exact.abs().max().item()
        assert rel <= 1e-5, f"{case}: {what} relative error {rel:.3g} > 1e-5"
    else:
        eager_err = (eager.detach().cpu().double() - exact).abs().max().item()
        assert err <= 2 * eager_err + 1e-3, f"{case}: {what} error {err:.3g} > 2 x eager {eager_err:.3g} + 1e-3"


def check_case(case: Case) -> dict:
    inputs = make_inputs(case)
    low = inputs["low"]
    before = {k: v.clone() for k, v in low.items()}
    out = run_kernel(case, low)
    exact, exact_states = reference_step(case, inputs["exact"])
    assert not torch.isnan(exact).any()
    eager, eager_states = (None, {}) if case.dtype == torch.float32 else reference_step(case, before)
    b = case.shape[0]
    for k in range(case.out_rows):
        _assert_close(case, f"out block {k}", out[k * b:(k + 1) * b], exact, eager)
    guided = [i for i in range(b) if float(before["g1"][i]) != 1.0]
    if case.momentum is not None:
        state, old = low["rule_state"], before["rule_state"]
        for i in range(b):
            if i not in guided or not case.uncond:  # kept: bit for bit
                assert torch.equal(state[i], old[i]), f"{case}: the state of unguided row {i} changed"
            else:
                _assert_close(case, f"state row {i}", state[i], exact_states["rule_state"][i],
                              None if eager is None else eager_states["rule_state"][i])
    if case.hist_k:
        for j in range(case.hist_k):
            if j in low["write_slots"].tolist():
                _assert_close(case, f"history slot {j}", low["history"][j], exact_states["history"][j],
                              None if eager is None else eager_states["history"][j])
            else:
                assert torch.equal(low["history"][j], before["history"][j])
    for k, v in before.items():  # the kernels write only out, the state and the history
        if k not in ("rule_state", "history"):
            assert torch.equal(low[k], v), f"{k} was modified"
    return inputs


# ---------------------------------------------------------------------------- every rule option combination
RULE_OPTIONS = list(itertools.product((False, True), (1.0, 0.3), (False, True), (None, -0.5), (0.0, 0.7)))


ROTATED = ("cond_first", "out_rows", "clip", "noise")
OPTION_FIELDS = ("zero_star", "eta", "threshold", "momentum", "rescale", "table", "dtype")


def _rule_cases():
    """Every rule option combination x (CFG, ReCFG lerp) in float32; in float16 with the table alternating.
    cond_first, out rows, clip and z are drawn per case from a fixed-seed generator (every pair of a drawn value
    and an option value occurs: test_the_cases_are_not_vacuous)."""
    draw = random.Random(20261202)
    for dtype in (torch.float32, torch.float16):
        for j, (zero_star, eta, threshold, momentum, rescale) in enumerate(RULE_OPTIONS):
            tables = (None, "lerp") if dtype == torch.float32 else ((None, "lerp")[(j + j // 8) % 2],)
            for table in tables:
                yield Case(zero_star, eta, threshold, momentum, rescale, table, dtype, cond_first=draw.random() < 0.5,
                           out_rows=draw.choice((1, 2)), clip=draw.random() < 0.5, noise=draw.random() < 0.5)


def _case_id(c: Case) -> str:
    return "-".join([f"zs{int(c.zero_star)}", f"eta{c.eta:g}", "thr" if c.threshold else "nothr",
                     "nostate" if c.momentum is None else f"mom{c.momentum:g}", f"phi{c.rescale:g}",
                     c.table or "cfg", str(c.dtype).removeprefix("torch."), "cfirst" if c.cond_first else "ufirst",
                     f"out{c.out_rows}B", "clip" if c.clip else "noclip", "z" if c.noise else "noz"])


@pytest.mark.parametrize("case", list(_rule_cases()), ids=_case_id)
def test_every_rule_option_combination(case):
    check_case(case)


def test_the_cases_are_not_vacuous():
    """The threshold binds on one guided row and not on the other; alpha, the projection and the rescale factor
    are far from their trivial values; every rotated option takes both values."""
    case = Case(zero_star=True, eta=0.3, threshold=True, momentum=-0.5, rescale=0.7)
    t = make_inputs(case)["exact"]
    threshold = float(t["rule_params"][RuleParam.NORM_THRESHOLD])
    caps = (threshold / _direction_norms(case, t)).tolist()
    assert caps[0] > 1.2 and caps[2] < 0.8  # row 0 uncapped, row 2 capped (s = 0.63)
    c, u = t["model_out"][:3], _u_effective(case, t)
    alpha = ((c * u).flatten(1).sum(1) / (u * u).flatten(1).sum(1))
    assert ((alpha - 1).abs() > 0.05).all() and (alpha > 0.2).all()
    m, _ = reference.reduced_guidance(c, u, t["g1"], t["rule_params"].clone().index_fill_(0, torch.tensor(
        [int(RuleParam.RESCALE)]), 0.0), t["rule_state"])
    ratio = c.flatten(1).std(1) / m.flatten(1).std(1)
    assert ((ratio[[0, 2]] - 1).abs() > 0.09).all()  # std(c) / std(m) is far from 1 on the guided rows
    cases = list(_rule_cases())
    for drawn in ROTATED:
        for option in OPTION_FIELDS:
            pairs = {(getattr(c, drawn), getattr(c, option)) for c in cases}
            values = {getattr(c, drawn) for c in cases}, {getattr(c, option) for c in cases}
            assert len(pairs) == len(values[0]) * len(values[1]) == 2 * len(values[1]), (drawn, option)


# ---------------------------------------------------------------------------- history, shapes, layouts, dtypes
HEAVY = dict(zero_star=True, eta=0.3, threshold=True, momentum=-0.5, rescale=0.7, table="lerp", clip=True, noise=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hist_k,hist_w", [(1, 1), (4, 2)])
@pytest.mark.parametrize("table", [None, "grid"])
def test_with_history_clip_and_noise(dtype, hist_k, hist_w, table):
    check_case(Case(**{**HEAVY, "table": table}, dtype=dtype, shape=(3, 5, 7, 9), hist_k=hist_k, hist_w=hist_w,
                    cond_first=hist_k == 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda_for_bf16)])
@pytest.mark.parametrize("shape,channels_last", [
    ((3, 5, 7, 9), False),  # one block a row
    ((3, 16, 8, 8), True),
    ((3, 7), False),  # any [B, ...] rank
])
def test_shapes_layouts_dtypes(shape, channels_last, dtype):
    check_case(Case(**HEAVY, dtype=dtype, shape=shape, channels_last=channels_last))


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_cuda_for_bf16)])
def test_bf16_every_option(dtype):
    check_case(Case(**HEAVY, dtype=dtype))


def test_more_blocks_than_partials():
    """A row of more than MAX_PARTIALS blocks: each pre-pass program loops over two blocks (the last one ragged)
    and the step sums NBP = 64 partials."""
    n = (gs.MAX_PARTIALS + 3) * gs.launch_config(torch.float32)[0] + 5
    n_partials, per_partial, nbp = gs.partials_layout(n, gs.launch_config(torch.float32)[0])
    assert (n_partials, per_partial, nbp) == (34, 2, 64)
    check_case(Case(**{**HEAVY, "table": None}, shape=(3, n), out_rows=1))


@pytest.mark.parametrize("dtype,latent", [(torch.float32, LATENT), (torch.float16, (5, 37, 29))])
def test_several_blocks_per_partial(dtype, latent, monkeypatch):
    """With at most 2 partials a row, each pre-pass program sums 2 blocks (fp16: the last partial's second block
    lies wholly past the row)."""
    monkeypatch.setattr(gs, "MAX_PARTIALS", 2)
    block = gs.launch_config(dtype)[0]
    n = latent[0] * latent[1] * latent[2]
    assert gs.partials_layout(n, block)[:2] == (2, 2) and -(-n // block) in (3, 4)  # 3 or 4 blocks a row
    check_case(Case(**HEAVY, dtype=dtype, shape=(3, *latent)))


def test_partials_layout():
    assert gs.partials_layout(1, 1024) == (1, 1, 1)
    assert gs.partials_layout(3 * 1024 + 1, 1024) == (4, 1, 4)
    assert gs.partials_layout(64 * 1024, 1024) == (64, 1, 64)
    assert gs.partials_layout(64 * 1024 + 1, 1024) == (33, 2, 64)
    assert gs.partials_layout(16 * 128 * 128, 1024) == (64, 4, 64)  # (16, 128, 128) fp32: 256 blocks


# ---------------------------------------------------------------------------- special rows and parameters
def test_without_an_unconditional_half_m_is_m_cond_and_the_state_is_untouched():
    """model_out with B rows: no reduction, m = m_cond; the state (NaN-poisoned) is neither read nor written."""
    case = Case(**HEAVY, uncond=False)
    inputs = make_inputs(case)
    low = inputs["low"]
    low["rule_state"].fill_(float("nan"))
    out = run_kernel(case, low)
    exact, _ = reference_step(case, dict(inputs["exact"], rule_state=None))
    _assert_close(case, "out", out[:3], exact, None)
    _assert_close(case, "out block 1", out[3:], exact, None)
    assert torch.isnan(low["rule_state"]).all()


def test_close_cond_and_uncond_outputs_keep_float32_accuracy():
    """Real guidance: m_cond and m_uncond differ by a few percent, so |D| << |c|. The kernel's moments are in the
    basis (c, v = c - u), which keeps |D|^2, <D, c> and 1 - alpha free of that cancellation: still <= 1e-5."""
    case = Case(**{**HEAVY, "table": None, "clip": False, "noise": False})
    inputs = make_inputs(case)
    low, exact = inputs["low"], inputs["exact"]
    c = exact["model_out"][:3]
    u = c + _rows(0.03 * torch.randn(c.shape, dtype=torch.float64) + 0.01)
    low["model_out"] = _as(torch.cat([c, u]), case.dtype)
    exact["model_out"] = low["model_out"].cpu().double()
    low["rule_state"] = _as(_rows(0.03 * torch.randn(c.shape, dtype=torch.float64)), case.dtype)  # a past D
    exact["rule_state"] = low["rule_state"].cpu().double()
    exact["rule_params"][RuleParam.NORM_THRESHOLD] = 0.0
    norms = _direction_norms(case, exact)
    assert (norms / exact["model_out"][:3].flatten(1).norm(dim=1)).max() < 0.1  # |D| < |c| / 10
    low["rule_params"][RuleParam.NORM_THRESHOLD] = float((norms[0] * norms[2]).sqrt())
    exact["rule_params"] = low["rule_params"].cpu().double()
    state_before = low["rule_state"].clone()
    out = run_kernel(case, low)
    want, states = reference_step(case, exact)
    _assert_close(case, "out", out[:3], want, None)
    for i in (0, 2):
        _assert_close(case, f"state row {i}", low["rule_state"][i], states["rule_state"][i], None)
    assert torch.equal(low["rule_state"][1], state_before[1])


def test_momentum_without_a_state_is_ignored():
    """No rule state: D = c - alpha u whatever MOMENTUM says (the reference's prev is None)."""
    case = Case(**HEAVY)
    inputs = make_inputs(case)
    for t in (inputs["low"], inputs["exact"]):
        t.pop("rule_state")
    out = run_kernel(replace(case, momentum=None), inputs["low"])
    exact, _ = reference_step(replace(case, momentum=None), inputs["exact"])
    assert float(inputs["exact"]["rule_params"][RuleParam.MOMENTUM]) == -0.5
    _assert_close(case, "out", out[:3], exact, None)


def test_first_apg_step_zero_state():
    """A zeroed state (what the loop starts from) with momentum: the state becomes D = c - alpha u."""
    case = Case(zero_star=False, eta=0.0, threshold=True, momentum=0.75)
    inputs = make_inputs(case)
    inputs["low"]["rule_state"].zero_()
    inputs["exact"]["rule_state"].zero_()
    out = run_kernel(case, inputs["low"])
    exact, states = reference_step(case, inputs["exact"])
    _assert_close(case, "out", out[:3], exact, None)
    _assert_close(case, "state row 0", inputs["low"]["rule_state"][0], states["rule_state"][0], None)
    assert torch.equal(inputs["low"]["rule_state"][1], torch.zeros_like(inputs["low"]["rule_state"][1]))


def test_cfg_parameters_match_the_plain_cfg_step():
    """ETA = 1 and every other parameter 0 is plain CFG: the REDUCE path equals the rule-free kernel's output."""
    case = Case(zero_star=False, table="lerp")
    low = make_inputs(case)["low"]
    out = run_kernel(case, low)
    plain = torch.full_like(out, float("nan"))
    kw = {k: v for k, v in _kwargs(low, case).items() if k not in ("rule_params", "rule_state")}
    gs.guided_step_into(plain, low["x"], low["model_out"], low["g1"], low["coef"], **kw)
    assert ((out - plain).abs().max() / plain.abs().max()).item() <= 1e-6


def test_every_row_unguided_is_m_cond():
    """g1 == 1 everywhere: m = c exactly on every row (the step as without guidance), every state row kept."""
    case = Case(**HEAVY)
    inputs = make_inputs(case)
    inputs["low"]["g1"].fill_(1.0)
    old_state = inputs["low"]["rule_state"].clone()
    out = run_kernel(case, inputs["low"])
    cond_only = torch.full_like(out, float("nan"))
    low = inputs["low"]
    kw = {k: v for k, v in _kwargs(low, case).items() if k not in ("rule_params", "rule_state", "table", "rows",
                                                                     "table_steps", "table_w", "cond_first")}
    gs.guided_step_into(cond_only, low["x"], low["model_out"][:3], low["g1"], low["coef"], **kw)
    assert torch.equal(out, cond_only) and torch.equal(low["rule_state"], old_state)


def test_deterministic():
    """No atomics: the same inputs give the same bits (out and state)."""
    case = Case(**HEAVY)
    inputs = make_inputs(case)
    low = inputs["low"]
    start = low["rule_state"].clone()
    outs, states = [], []
    for _ in range(2):
        low["rule_state"].copy_(start)
        outs.append(run_kernel(case, low))
        states.append(low["rule_state"].clone())
    assert torch.equal(outs[0], outs[1]) and torch.equal(states[0], states[1])


def test_float64_runs_the_reference():
    case = Case(**HEAVY)
    t = make_inputs(case)["exact"]
    ex = {k: v.to(DEVICE, copy=True) for k, v in t.items()}
    out = torch.full((6, *LATENT), float("nan"), dtype=torch.float64, device=DEVICE)
    gs.guided_step_into(out, ex["x"], ex["model_out"], ex["g1"], ex["coef"], **_kwargs(ex, case))
    want, states = reference_step(case, t)
    assert torch.equal(out[:3].cpu(), want) and torch.equal(out[3:].cpu(), want)
    assert torch.equal(ex["rule_state"].cpu(), states["rule_state"])


# ---------------------------------------------------------------------------- bad input
META = torch.device("meta")


def _good():
    case = Case(**HEAVY, shape=(3, 5, 7, 9))
    low = make_inputs(case)["low"]
    return dict(out=torch.empty((6, 5, 7, 9), device=DEVICE), x=low["x"], model_out=low["model_out"], g1=low["g1"],
                coef=low["coef"], **{k: v for k, v in _kwargs(low, case).items() if k != "cond_first"})


BAD_RULE = {
    "rule_params_not_tensor": (lambda a: a.update(rule_params=a["rule_params"].tolist()), TypeError, "rule_params"),
    "rule_params_float64": (lambda a: a.update(rule_params=a["rule_params"].double()), TypeError, "rule_params"),
    "rule_params_shape": (lambda a: a.update(rule_params=a["rule_params"][:4]), ValueError, "rule_params"),
    "rule_params_2d": (lambda a: a.update(rule_params=a["rule_params"].view(1, -1)), ValueError, "rule_params"),
    "rule_params_device": (lambda a: a.update(rule_params=torch.empty(NUM_RULE_PARAMS, device=META)), ValueError,
                           "rule_params"),
    "rule_state_without_params": (lambda a: a.update(rule_params=None), ValueError, "rule_state"),
    "rule_state_not_tensor": (lambda a: a.update(rule_state=a["rule_state"].tolist()), TypeError, "rule_state"),
    "rule_state_dtype": (lambda a: a.update(rule_state=a["rule_state"].half()), TypeError, "rule_state"),
    "rule_state_shape": (lambda a: a.update(rule_state=a["rule_state"][:2]), ValueError, "rule_state"),
    "rule_state_latent": (lambda a: a.update(rule_state=a["rule_state"][..., :8]), ValueError, "rule_state"),
    "rule_state_device": (lambda a: a.update(rule_state=torch.empty(3, 5, 7, 9, device=META)), ValueError,
                          "rule_state"),
    "rule_state_strided": (lambda a: a.update(rule_state=torch.randn(3, 5, 7, 18, device=DEVICE)[..., ::2]),
                           ValueError, "rule_state"),
    "rule_state_channels_last": (lambda a: a.update(rule_state=a["rule_state"].contiguous(
        memory_format=torch.channels_last)), ValueError, "rule_state"),
}


def _call(**kw):
    args = [kw.pop(k) for k in ("out", "x", "model_out", "g1", "coef")]
    return gs.guided_step_into(*args, **kw)


@pytest.mark.parametrize("name", list(BAD_RULE))
def test_bad_rule_input_raises_a_clear_error(name):
    mutate, exc, arg = BAD_RULE[name]
    args = _good()
    _call(**{**args, "rule_state": args["rule_state"].clone()})  # the unmodified inputs are fine
    mutate(args)
    with pytest.raises(exc, match=rf"^{arg}:"):
        _call(**args)


# ---------------------------------------------------------------------------- torch.compile, fake tensors, graphs
def test_torch_compile_fullgraph_traces_both_kernels_as_one_op():
    """compiled == eager for out and the state; new rule parameters (tensor values) reuse the graph."""
    case = Case(**HEAVY, shape=(3, 5, 7, 9))
    low = make_inputs(case)["low"]
    kw = {k: v for k, v in _kwargs(low, case).items() if k not in ("rule_params", "rule_state")}

    def step(buf, state, model_out, g1, coef, rule_params):
        gs.guided_step_into(buf, buf[:3], model_out, g1, coef, rule_params=rule_params, rule_state=state, **kw)
        return buf * 2

    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    buf = torch.cat([low["x"], low["x"]])
    state = low["rule_state"].clone()
    eager_buf, eager_state = buf.clone(), state.clone()
    params2 = low["rule_params"].clone()
    params2[RuleParam.ETA], params2[RuleParam.NORM_THRESHOLD], params2[RuleParam.ZERO_STAR] = 0.8, 0.0, 0.0
    for i, params in enumerate((low["rule_params"], params2)):
        got = compiled(buf, state, low["model_out"], low["g1"], low["coef"], params)
        want = step(eager_buf, eager_state, low["model_out"], low["g1"], low["coef"], params)
        assert torch.equal(got, want) and torch.equal(buf, eager_buf) and torch.equal(state, eager_state)
        assert not torch.equal(state, low["rule_state"])
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


def test_fake_tensor_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        out, x = torch.empty(6, 5, 7, 9), torch.empty(3, 5, 7, 9)
        res = gs.guided_step_into(out, x, torch.empty(6, 5, 7, 9), torch.empty(3), torch.empty(reference.NUM_COEF),
                                  rule_params=torch.empty(NUM_RULE_PARAMS), rule_state=torch.empty(3, 5, 7, 9))
    assert res is out


@pytest.mark.skipif(not USE_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_reads_new_rule_params_on_replay():
    """A captured rule step (both launches, the workspace allocated inside): replays with new parameters and a new
    state step like the reference with those values, so a captured loop runs any parameters without recompiling."""
    case = Case(**HEAVY)
    low = make_inputs(case)["low"]
    kw = _kwargs(low, case)
    out = torch.empty((6, *LATENT), device=DEVICE)
    gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], **kw)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gs.guided_step_into(out, low["x"], low["model_out"], low["g1"], low["coef"], **kw)
    for eta, zero_star in ((0.0, 1.0), (1.0, 0.0), (0.5, 1.0)):
        low["rule_params"][RuleParam.ETA], low["rule_params"][RuleParam.ZERO_STAR] = eta, zero_star
        start = torch.randn_like(low["rule_state"])
        low["rule_state"].copy_(start)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want, want_state = torch.empty_like(out), start.clone()
        reference.guided_step_into(want, low["x"], low["model_out"], low["g1"], low["coef"],
                                   **dict(kw, rule_state=want_state))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(low["rule_state"], want_state, rtol=1e-5, atol=1e-5)
