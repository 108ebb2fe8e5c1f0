"""The eager host-scalar torch step (kernels/torch_step.py) against the reference (the spec)."""
import itertools
import zlib

import pytest
import torch

from fastguide.kernels.reference import NUM_COEF, Coef, guided_step_into
from fastguide.kernels.torch_step import guided_step_into_host

SHAPES = [(3, 5, 7, 9), (1, 16, 4, 4), (2, 1, 8, 8)]
RULES = ["cond-only", "cfg", "recfg", "recfg-lerp"]


def make_case(shape, rule, clip, with_z, cond_first, two_out, dtype, gen):
    b, latent = shape[0], shape[1:]

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    coef = rnd(NUM_COEF)
    if not with_z:
        coef[Coef.S] = 0.0
    model_out = rnd(b if rule == "cond-only" else 2 * b, *latent)
    case = dict(x=rnd(b, *latent), model_out=model_out, g1=1 + 4 * torch.rand(b, generator=gen, dtype=torch.float64),
                coef=coef, cond_first=cond_first, clip_range=0.7 if clip else None,
                z=rnd(b, *latent) if with_z else None, two_out=two_out)
    if rule.startswith("recfg"):
        k, t = 4, 5
        case["table"] = 0.5 + torch.rand(k, t, *latent, generator=gen, dtype=torch.float64)
        case["rows"] = torch.randint(0, k, (b,), generator=gen)
        i0 = int(torch.randint(0, t - 1, (1,), generator=gen))
        case["table_steps"] = (i0, i0 + 1 if rule == "recfg-lerp" else i0)
        case["table_w"] = float(torch.rand((), generator=gen, dtype=torch.float64)) if rule == "recfg-lerp" else 0.0
    cast = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in ("coef", "g1")
                else v) for k, v in case.items()}
    return case, cast


def run(fn, case, host: bool, in_place: bool):
    b = case["x"].shape[0]
    rows = 2 * b if case["two_out"] else b
    out = torch.full((rows, *case["x"].shape[1:]), float("nan"), dtype=case["x"].dtype)
    x = case["x"]
    if in_place:
        out[:b] = x
        x = out[:b]
    coef = case["coef"].tolist() if host else case["coef"]
    steps, w = case.get("table_steps"), case.get("table_w")
    if steps is not None and not host:
        steps, w = torch.tensor(steps), torch.tensor(w, dtype=torch.float64)
    g1 = case["g1"].float() if case["x"].dtype != torch.float64 else case["g1"]
    fn(out, x, case["model_out"], g1, coef, cond_first=case["cond_first"], table=case.get("table"),
       rows=case.get("rows"), table_steps=steps, table_w=w, clip_range=case["clip_range"], z=case["z"])
    return out


@pytest.mark.parametrize("rule,clip,with_z,cond_first,two_out,in_place",
                         list(itertools.product(RULES, [False, True], [False, True], [True, False], [True, False],
                                                [True, False])))
def test_matches_reference_in_float64(rule, clip, with_z, cond_first, two_out, in_place):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rule, clip, with_z, cond_first, two_out, in_place)).encode()))
    for shape in SHAPES:
        case, _ = make_case(shape, rule, clip, with_z, cond_first, two_out, torch.float64, gen)
        want = run(guided_step_into, case, host=False, in_place=False)
        got = run(guided_step_into_host, case, host=True, in_place=in_place)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("clip", [False, True])
def test_low_precision_error_at_most_twice_eager(dtype, rule, clip):
    """Error to the float64 reference <= 2x the reference's own error at that dtype (+ small atol)."""
    gen = torch.Generator().manual_seed(7)
    case64, case = make_case((3, 5, 7, 9), rule, clip, True, True, True, dtype, gen)
    exact = run(guided_step_into, case64, host=False, in_place=False)
    eager = run(guided_step_into, case, host=False, in_place=False).double()
    got = run(guided_step_into_host, case, host=True, in_place=True).double()
    atol = 1e-5 if dtype == torch.float32 else 1e-3
    assert (got - exact).abs().max() <= 2 * (eager - exact).abs().max() + atol


def test_recfg_with_unit_table_is_exactly_cfg():
    gen = torch.Generator().manual_seed(3)
    case, _ = make_case((3, 5, 7, 9), "recfg", False, False, True, True, torch.float32, gen)
    case = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "coef" else v)
            for k, v in case.items()}
    cfg = run(guided_step_into_host, {**case, "table": None, "rows": None, "table_steps": None}, True, False)
    ones = run(guided_step_into_host, {**case, "table": torch.ones_like(case["table"])}, True, False)
    assert torch.equal(cfg, ones)


@pytest.mark.parametrize("writes", [1, 2])
@pytest.mark.parametrize("cond_first", [True, False])
def test_history_reads_and_writes_match_the_reference(writes, cond_first):
    """A multistep step: x_next gains weighted history slots and the step writes W new states, all from the
    history as it was before the step (so a slot both read and written is read first)."""
    gen = torch.Generator().manual_seed(17 + writes)
    case, _ = make_case((3, 5, 7, 9), "cfg", False, True, cond_first, True, torch.float64, gen)
    k = 3
    history = torch.randn(k, 3, 5, 7, 9, generator=gen, dtype=torch.float64)
    hist_coef = torch.randn(k, generator=gen, dtype=torch.float64)
    hist_coef[1] = 0.0  # a zero weight is skipped by the host step: it must not change the result
    write_slots = torch.tensor([0, 2][:writes])
    write_coef = torch.randn(writes, 2 + k, generator=gen, dtype=torch.float64)
    results = []
    for host in (False, True):
        h = history.clone()
        b = 3
        out = torch.full((6, 5, 7, 9), float("nan"), dtype=torch.float64)
        kw = dict(history=h, hist_coef=hist_coef.tolist() if host else hist_coef,
                  write_slots=write_slots.tolist() if host else write_slots,
                  write_coef=write_coef.tolist() if host else write_coef)
        fn = guided_step_into_host if host else guided_step_into
        fn(out, case["x"], case["model_out"], case["g1"], case["coef"].tolist() if host else case["coef"],
           cond_first=cond_first, z=case["z"], **kw)
        results.append((out, h))
    (out_ref, h_ref), (out_host, h_host) = results
    torch.testing.assert_close(out_host, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_host, h_ref, rtol=1e-12, atol=1e-12)
    assert not torch.equal(h_ref[write_slots], history[write_slots])  # the written slots changed
    untouched = [j for j in range(k) if j not in write_slots.tolist()]
    assert torch.equal(h_ref[untouched], history[untouched])
    # the written state is the documented combination of x, the guided m and the old slots
    m_c, m_u = (case["model_out"][:b], case["model_out"][b:]) if cond_first else (case["model_out"][b:],
                                                                                 case["model_out"][:b])
    g1 = case["g1"].view(-1, 1, 1, 1)
    m = g1 * m_c + (1 - g1) * m_u
    c = write_coef[0]
    want0 = c[0] * case["x"] + c[1] * m + sum(c[2 + j] * history[j] for j in range(k))
    torch.testing.assert_close(h_ref[write_slots[0]], want0, rtol=1e-12, atol=1e-12)
