"""pytest-benchmark suite for one guided step: the fused kernel vs the eager reference vs torch.compile of it.

    python -m pytest benchmarks/bench_guided_step.py --benchmark-enable     # timed (pyproject disables by default)
    python -m pytest benchmarks/bench_guided_step.py                        # each case once (what CI runs)

On a GPU this times the issue's shapes (wall time per call including launch, synchronized). Without CUDA
(or with FASTGUIDE_BENCH_QUICK=1) it runs tiny CPU shapes, the kernel in the Triton interpreter, so the
CPU timings of the kernel are meaningless; GPU time per step and bandwidth come from report_guided_step.py.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available() and not os.environ.get("FASTGUIDE_BENCH_QUICK")
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel import

from fastguide.bench.kernel import GPU_SHAPES, make_step_inputs  # noqa: E402
from fastguide.kernels import guided_step as gs  # noqa: E402
from fastguide.kernels import reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SHAPES = GPU_SHAPES if CUDA else [(2, 4, 8, 8)]
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]
_COMPILED = {}


def make_step(shape, dtype, rule):
    d = make_step_inputs(shape, dtype, rule, DEVICE, lerp=True)
    return (d["out"], d["x"], d["model_out"], d["g1"], d["coef"]), d["kw"]


def _impl(name):
    if name == "triton":
        return lambda *a, **kw: gs.guided_step_into(*a, check=False, **kw)
    if name == "eager":
        return reference.guided_step_into
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(reference.guided_step_into, dynamic=False)
    return _COMPILED["fn"]


def _cases():
    for shape in SHAPES:
        for dtype in DTYPES:
            for rule in ("cfg", "recfg"):
                for impl in ("triton", "eager", "compiled"):
                    if impl == "compiled" and not CUDA and rule == "recfg":
                        continue  # each CPU compile costs ~15 s; one compiled case keeps CI quick
                    yield pytest.param(shape, dtype, rule, impl,
                                       id=f"{'x'.join(map(str, shape))}-{str(dtype)[6:]}-{rule}-{impl}")


@pytest.mark.parametrize("shape,dtype,rule,impl", list(_cases()))
def test_guided_step(benchmark, shape, dtype, rule, impl):
    args, kw = make_step(shape, dtype, rule)
    fn = _impl(impl)
    want = torch.empty_like(args[0])
    reference.guided_step_into(want, args[1].clone(), *args[2:], **kw)

    def step():
        fn(*args, **kw)
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up (compiles) and the correctness check below
    torch.testing.assert_close(args[0], want, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    benchmark(step)
