"""pytest-benchmark suite for whole guided samples: fastguide vs a diffusers-style loop on the same network.

    python -m pytest benchmarks/bench_sampler.py --benchmark-enable --benchmark-columns=median,ops
    python -m pytest benchmarks/bench_sampler.py             # each case once (what CI runs, timing disabled)

Two groups, each compared within one run (pytest-benchmark groups, medians):
- ``e2e-B{batch}``: images/s of one NFE-10 DDIM + CFG sample with the digits UNet: diffusers-style eager loop
  (cat, forward, chunk, combine, DDIMScheduler.step), fastguide eager, fastguide compiled.
- ``overhead-B{batch}``: the same loops with the network replaced by a stub that returns a fixed output, so
  the time is everything but the network (batching, CFG combine, solver update, copies): diffusers-style,
  fastguide's eager step (host scalars), and fastguide's fused compiled step, plus the stub's own NFE calls
  (eager and compiled) to subtract. `fastguide.bench.overhead.run_overhead` (`fastguide bench --overhead`) measures
  the same thing with the modes interleaved in blocks and does the subtraction.
Input noise rotates over 4 sets. FASTGUIDE_BENCH_QUICK=1 (CI) runs batch 1 only.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastguide as fg
from fastguide.bench.end_to_end import diffusers_scheduler_for, diffusers_style_loop
from fastguide.bench.overhead import StubNet
from fastguide.demo.unet import DigitsUNet

QUICK = bool(os.environ.get("FASTGUIDE_BENCH_QUICK"))
BATCHES = [1] if QUICK else [1, 16, 64]
MODES = ["diffusers_eager", "fastguide_eager", "fastguide_compiled"]
NFE, SCALE, NULL, SHAPE = 10, 3.0, 10, (1, 8, 8)


def digits_net():
    try:
        from fastguide.demo.digits import load_digits_model

        return load_digits_model()
    except Exception:  # timing does not depend on the weights; fall back to a fresh network
        torch.manual_seed(0)
        return DigitsUNet().eval()


def make_runner(net, mode: str, batch: int):
    schedule = fg.NoiseSchedule.linear(timestep_spacing="trailing")
    noises = [torch.randn(batch, *SHAPE) for _ in range(4)]
    labels = torch.arange(batch) % 10
    state = {"r": 0}

    def nxt():
        state["r"] += 1
        return noises[state["r"] % 4]

    if mode in ("network_eager", "network_compiled"):  # the network part of the overhead loops: NFE stub calls
        x2, t2 = torch.randn(2 * batch, *SHAPE), torch.full((1,), 500.0).expand(2 * batch)  # as the loops pass t
        l2 = torch.cat([labels, torch.full_like(labels, NULL)])
        call = torch.compile(net, dynamic=False) if mode == "network_compiled" else net
        call(x2, t2, l2)
        return lambda: [call(x2, t2, l2) for _ in range(NFE)][-1][:batch]
    if mode == "diffusers_eager":
        sch = diffusers_scheduler_for(schedule, NFE)
        return lambda: diffusers_style_loop(net, sch, nxt(), labels, NULL, SCALE)
    sampler = fg.Sampler(net, fg.DDIM(schedule, steps=NFE), fg.CFG(SCALE), null_cond=NULL, progress=False)
    if mode == "fastguide_compiled":
        sampler.compile()
    elif mode == "fastguide_fused":  # the stub network compiled together with the guided update
        sampler.compile(fuse_step=True)
    sampler.sample(noises[0], labels)  # warm-up (compiles once)
    return lambda: sampler.sample(nxt(), labels)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", MODES)
def test_end_to_end(benchmark, mode, batch):
    benchmark.group = f"e2e-B{batch}"
    benchmark.extra_info.update(batch=batch, nfe=NFE)
    with torch.inference_mode():
        run = make_runner(digits_net(), mode, batch)
        out = benchmark.pedantic(run, rounds=3 if QUICK else 15, warmup_rounds=1)
    assert out.shape == (batch, *SHAPE) and torch.isfinite(out).all()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["diffusers_eager", "fastguide_eager", "fastguide_fused", "network_eager",
                                  "network_compiled"])
def test_overhead(benchmark, mode, batch):
    benchmark.group = f"overhead-B{batch}"
    benchmark.extra_info.update(batch=batch, nfe=NFE, per="sample of NFE steps")
    with torch.inference_mode():
        run = make_runner(StubNet(torch.randn(2 * batch, *SHAPE)), mode, batch)
        out = benchmark.pedantic(run, rounds=3 if QUICK else 50, warmup_rounds=2)
    assert out.shape == (batch, *SHAPE)
