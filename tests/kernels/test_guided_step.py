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
    exact = {k: (None if v is None else v.detach().cpu().double() if v.is_floating_point() else v.cpu())
             for k, v in low.items()}
    return {"low": low, "exact": exact}


def _kwargs(t: dict, case: Case) -> dict:
    return dict(cond_first=case.cond_first, table=t.get("table"), rows=t.get("rows"),
                table_steps=t.get("table_steps"), table_w=t.get("table_w"), clip_range=CLIP_RANGE if case.clip else None,
                z=t.get("z"))


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


def reference_out(case: Case, t: dict) -> torch.Tensor:
    b = case.shape[0]
    out = torch.empty((b, *case.shape[1:]), dtype=t["x"].dtype, device=t["x"].device)
    return reference.guided_step_into(out, t["x"], t["model_out"], t["g1"], t["coef"], **_kwargs(t, case))


def assert_matches_reference(case: Case, inputs: dict, out: torch.Tensor) -> None:
    exact = reference_out(case, inputs["exact"])
    assert not torch.isnan(exact).any()
    b = case.shape[0]
    for k in range(case.out_rows):
        block = out[k * b:(k + 1) * b].detach().cpu().double()
        assert not torch.isnan(block).any(), f"out block {k} was not written"
        err = (block - exact).abs().max().item()
        if case.dtype == torch.float32:
            rel = err / exact.abs().max().item()
            assert rel <= 1e-5, f"{case}: block {k} relative error {rel:.3g} > 1e-5"
        else:
            eager = reference_out(case, inputs["low"]).cpu().double()
            eager_err = (eager - exact).abs().max().item()
            assert err <= 2 * eager_err + 1e-3, f"{case}: block {k} error {err:.3g} > 2 x eager {eager_err:.3g} + 1e-3"


def check_case(case: Case) -> None:
    inputs = make_inputs(case)
    before = {k: v.clone() for k, v in inputs["low"].items() if v is not None}
    out = run_kernel(case, inputs["low"])
    assert_matches_reference(case, inputs, out)
    for k, v in before.items():  # the kernel writes only into out
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


def test_fake_tensor_propagation():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        out = torch.empty(6, 5, 7, 9)
        x = torch.empty(3, 5, 7, 9)
        res = gs.guided_step_into(out, x, torch.empty(6, 5, 7, 9), torch.empty(3), torch.empty(reference.NUM_COEF))
    assert res is out and res.shape == (6, 5, 7, 9)


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
    }[name]()


def _sample(backend, solver, guide, noise, cond):
    model = AnalyticModel(LATENT, NUM_CLASSES + 1)
    sampler = fg.Sampler(model, solver, guide, null_cond=NUM_CLASSES, backend=backend, progress=False)
    return sampler.sample(noise, cond, seeds=[11, 12])


@pytest.mark.parametrize("solver_name", ["ddim", "ddim_clip_v", "ddim_eta_sample", "ddpm", "flow"])
@pytest.mark.parametrize("rule", ["cfg", "recfg", "cfg_interval"])
def test_whole_sample_triton_equals_torch(solver_name, rule, monkeypatch):
    launches = []
    real_launch = gs.launch
    monkeypatch.setattr(gs, "launch", lambda *a: launches.append(1) or real_launch(*a))
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
    assert len(launches) == plan.steps  # the kernel ran every step
    want = _sample("torch", solver, guide, noise, cond)
    assert not torch.isnan(got).any()
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-5, f"triton vs torch sample: relative error {rel:.3g}"


def test_whole_sample_fp16_within_twice_eager_error():
    solver = _solver("ddim_clip_v")
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
