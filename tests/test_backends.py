"""fastguide.backends: which guided-step implementation a loop runs. "torch" is the eager host-scalar step
unfused and the reference with device tensors fused; "auto" on the CPU is "torch"; "triton" on the CPU runs the
fused kernel in the Triton interpreter (conftest sets TRITON_INTERPRET=1) and is refused without it; an unknown
backend is refused by check_backend. Each implementation is run against the reference on fresh random inputs."""
import functools
import os
import re

import pytest
import torch

from fastguide.backends import BACKENDS, StepImpl, check_backend, step_impl, triton_available
from fastguide.kernels import reference
from fastguide.kernels.reference import NUM_COEF
from fastguide.kernels.torch_step import guided_step_into_host

CPU = torch.device("cpu")
# The kernel runs in the Triton interpreter on the CPU (conftest); with FASTGUIDE_TEST_CUDA=1 on the GPU instead.
KERNEL_DEVICE = torch.device("cuda" if os.environ.get("FASTGUIDE_TEST_CUDA") == "1" and torch.cuda.is_available()
                             else "cpu")


def run_step(impl: StepImpl, dtype=torch.float64, device=CPU):
    """One CFG step with noise, [2B] output, through ``impl`` and through the reference, on the same inputs."""
    b, latent = 3, (2, 4, 5)
    x = torch.randn(b, *latent, dtype=torch.float64)
    model_out = torch.randn(2 * b, *latent, dtype=torch.float64)
    g1 = 1 + 3 * torch.rand(b, dtype=torch.float64)
    coef = torch.cat([0.5 + torch.rand(1, dtype=torch.float64), -torch.rand(1, dtype=torch.float64),  # A, B, S, ...
                      0.1 + 0.4 * torch.rand(1, dtype=torch.float64), torch.randn(NUM_COEF - 3, dtype=torch.float64)])
    z = torch.randn(b, *latent, dtype=torch.float64)
    want = reference.guided_step_into(torch.empty(2 * b, *latent, dtype=torch.float64), x, model_out, g1, coef, z=z)
    low = dict(x=x.to(device, dtype), model_out=model_out.to(device, dtype), z=z.to(device, dtype),
               g1=g1.to(device, dtype if dtype == torch.float64 else torch.float32))
    out = torch.full((2 * b, *latent), float("nan"), dtype=dtype, device=device)
    step_coef = coef.tolist() if impl.host else coef.to(device, low["g1"].dtype)
    impl.fn(out, low["x"], low["model_out"], low["g1"], step_coef, z=low["z"])
    return out.cpu().double(), want


def test_torch_unfused_is_the_host_scalar_step():
    impl = step_impl("torch", CPU, fused=False)
    assert impl == StepImpl(guided_step_into_host, host=True, fused=False)
    got, want = run_step(impl)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_fused_is_the_reference_with_device_tensors():
    impl = step_impl("torch", CPU, fused=True)
    assert impl == StepImpl(reference.guided_step_into, host=False, fused=True)
    got, want = run_step(impl)
    assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [False, True])
def test_auto_on_the_cpu_is_torch(fused):
    assert step_impl("auto", CPU, fused) == step_impl("torch", CPU, fused)
    assert step_impl("auto", CPU, fused).host is not fused


@pytest.mark.parametrize("fused", [False, True])
def test_triton_runs_the_fused_kernel_in_the_interpreter_on_the_cpu(fused):
    from fastguide.kernels import guided_step

    assert triton_available()
    impl = step_impl("triton", KERNEL_DEVICE, fused)
    assert not impl.host and impl.fused is fused
    assert isinstance(impl.fn, functools.partial) and impl.fn.func is guided_step.guided_step_into
    assert impl.fn.keywords == {"check": False}  # indices were validated on the host
    got, want = run_step(impl, torch.float32, KERNEL_DEVICE)  # float32: the kernel itself, not its float64 path
    assert not torch.isnan(got).any()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_triton_without_cuda_or_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"^backend: 'triton' needs CUDA tensors \(or TRITON_INTERPRET=1 for the CPU "
                                         r"interpreter\)$"):
        step_impl("triton", CPU, fused=False)
    assert step_impl("torch", CPU, fused=False).host  # the other backends do not need it


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_backend_returns_a_known_backend(backend):
    assert check_backend(backend) == backend


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, "triton "])
def test_check_backend_refuses_an_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"^backend: expected one of \('auto', 'torch', 'triton'\), got "
                                         + re.escape(repr(backend)) + "$"):
        check_backend(backend)
