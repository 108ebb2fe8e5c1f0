"""Sampler.compile(): the compiled hot step never recompiles for new scales / steps / rules / solvers, compiles
each phase of a guidance interval once, runs the registered Triton op inside compiled code without graph breaks,
warms up ahead of the first call, and picks its torch.compile mode; the sampler benchmark suite stays runnable.

The network is conftest's tiny_net (TinyNet, its solver and ratio table); eager_sample is the uncompiled reference.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import fastguide as fg


@pytest.mark.parametrize("fuse_step", [True, False], ids=["fused-step", "model-only"])
@torch.no_grad()
def test_compiled_sampler_no_recompiles_across_scales_steps_and_rules(tiny_net, eager_sample, fuse_step):
    net, solver, table, B, SHAPE = tiny_net
    noise = fg.seeded_noise(range(B), SHAPE)
    labels = torch.tensor([0, 3, 5, 9])
    sampler = fg.Sampler(net, solver, fg.CFG(2.0), null_cond=10, progress=False).compile(fuse_step=fuse_step)
    recfg = fg.ReCFG(2.0, table=table)
    sampler.sample(noise, labels)  # warm-up: one compile per rule kind
    sampler.sample(noise, labels, guidance=recfg)
    graphs = counters["stats"]["unique_graphs"]
    recompiles_before = sum(counters["recompiles"].values())
    for g in (1.5, 2.5, 3.0, 5.0, 7.5):
        for rule in (fg.CFG(1.0), recfg):
            got = sampler.sample(noise, labels, guidance=rule, scale=g)
            rule_g = fg.ReCFG(g, table=table) if isinstance(rule, fg.ReCFG) else fg.CFG(g)
            want = eager_sample(net, solver, rule_g, noise, labels)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs, "a new scale or rule compiled a new graph"
    assert sum(counters["recompiles"].values()) == recompiles_before


@torch.no_grad()
def test_compiled_sampler_per_sample_scales_and_graph_breaks(tiny_net, eager_sample):
    net, solver, table, B, SHAPE = tiny_net
    noise = fg.seeded_noise(range(10, 10 + B), SHAPE)
    labels = torch.tensor([1, 1, 2, 7])
    scales = torch.tensor([1.0, 2.0, 4.0, 8.0])
    breaks = sum(counters["graph_break"].values())
    sampler = fg.Sampler(net, solver, fg.ReCFG(scales, table=table), null_cond=10, progress=False)
    sampler.compile(fuse_step=True)
    got = sampler.sample(noise, labels)
    want = eager_sample(net, solver, fg.ReCFG(scales, table=table), noise, labels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


@torch.no_grad()
def test_compiled_guidance_interval_compiles_both_phases_once(tiny_net, eager_sample):
    """Inside the interval the fused step runs the 2B batch, outside the B conditional rows: two static
    shapes, each compiled once, and the result equals eager sampling."""
    net, solver, table, B, SHAPE = tiny_net
    ts = solver.plan.timesteps
    interval = (float(ts[3]), float(ts[1]))
    noise = fg.seeded_noise(range(20, 20 + B), SHAPE)
    labels = torch.tensor([2, 4, 6, 8])
    sampler = fg.Sampler(net, solver, fg.CFG(3.0, interval=interval), null_cond=10, progress=False).compile()
    graphs = counters["stats"]["unique_graphs"]
    got = sampler.sample(noise, labels)
    assert counters["stats"]["unique_graphs"] - graphs == 2  # the 2B phase and the B phase
    for g in (1.5, 4.0):
        got = sampler.sample(noise, labels, scale=g)
        want = eager_sample(net, solver, fg.CFG(g, interval=interval), noise, labels)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] - graphs == 2


@pytest.mark.parametrize("rule", ["cfg", "recfg", "cfg-interval"])
@torch.no_grad()
def test_compiled_sampler_with_the_triton_op_matches_torch(tiny_net, rule):
    """The GPU configuration (forward + registered Triton op compiled as one function), run here through the
    Triton interpreter: no graph breaks, same samples as the torch backend."""
    net, solver, table, B, SHAPE = tiny_net
    ts = solver.plan.timesteps
    guide = {"cfg": fg.CFG(3.0), "recfg": fg.ReCFG(3.0, table=table),
             "cfg-interval": fg.CFG(3.0, interval=(float(ts[-1]), float(ts[2])))}[rule]
    noise = fg.seeded_noise(range(30, 30 + B), SHAPE)
    labels = torch.tensor([1, 5, 9, 0])
    breaks = sum(counters["graph_break"].values())
    got = fg.Sampler(net, solver, guide, null_cond=10, backend="triton", progress=False).compile().sample(noise, labels)
    want = fg.Sampler(net, solver, guide, null_cond=10, backend="torch", progress=False).sample(noise, labels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])


@torch.no_grad()
def test_swapping_the_solver_keeps_the_compiled_step(tiny_net, eager_sample):
    """An NFE sweep on one compiled sampler: new deterministic solvers compile nothing new; stochastic ones
    add one graph (the per-step noise input) the first time only."""
    net, solver, _, B, SHAPE = tiny_net
    noise, labels = fg.seeded_noise(range(B), SHAPE), torch.tensor([2, 2, 7, 1])
    sampler = fg.Sampler(net, solver, fg.CFG(3.0), null_cond=10, progress=False).compile()
    sampler.sample(noise, labels)
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    sched = fg.NoiseSchedule.linear()
    def sweep(solvers):
        for other in solvers:
            sampler.solver = other
            seeds = list(range(B))
            got = sampler.sample(noise, labels, seeds=seeds)
            torch.testing.assert_close(got, eager_sample(net, other, fg.CFG(3.0), noise, labels, seeds=seeds),
                                       rtol=1e-4, atol=1e-4)

    sweep([fg.DDIM(sched, steps=3), fg.DDIM(sched, steps=9), solver])
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == recompiles
    sweep([fg.DDIM(sched, steps=4, eta=1.0)])
    graphs += 1  # z is now a tensor, not None
    assert counters["stats"]["unique_graphs"] == graphs
    sweep([fg.DDPM(sched, steps=7), fg.DDIM(sched, steps=5, eta=0.5)])
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(TypeError, match="solver: expected a fastguide solver"):
        sampler.solver = "ddim"


@pytest.mark.parametrize("mode, cuda_graph, device, want", [
    (None, True, "cuda", "max-autotune-no-cudagraphs"),  # what the floor compiles the network with
    (None, True, "cpu", None),
    (None, False, "cuda", None),
    ("default", True, "cuda", "default"),
    ("max-autotune", False, "cpu", "max-autotune"),
])
def test_compile_mode_defaults_to_max_autotune_only_for_cuda_graphs_on_cuda(tiny_net, mode, cuda_graph, device,
                                                                            want):
    net, solver, *_ = tiny_net
    sampler = fg.Sampler(net, solver, fg.CFG(2.0), null_cond=10, progress=False)
    sampler.compile(mode=mode, cuda_graph=cuda_graph)
    assert sampler.compile_options(torch.device(device))["mode"] == want


@torch.no_grad()
def test_warmup_compiles_ahead_so_the_first_real_call_compiles_nothing(tiny_net, eager_sample):
    net, solver, table, B, SHAPE = tiny_net
    sampler = fg.Sampler(net, solver, fg.CFG(3.0), null_cond=10, progress=False).compile()
    seconds = sampler.warmup((B, *SHAPE))
    seconds_recfg = sampler.warmup((B, *SHAPE), guidance=fg.ReCFG(2.0, table=table))
    assert seconds > 0 and seconds_recfg > 0
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    noise, labels = fg.seeded_noise(range(B), SHAPE), torch.tensor([3, 1, 4, 1])
    got = sampler.sample(noise, labels, scale=5.0)
    got_recfg = sampler.sample(noise, labels, guidance=fg.ReCFG(4.0, table=table))
    assert counters["stats"]["unique_graphs"] == graphs
    assert sum(counters["recompiles"].values()) == recompiles
    torch.testing.assert_close(got, eager_sample(net, solver, fg.CFG(5.0), noise, labels), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_recfg, eager_sample(net, solver, fg.ReCFG(4.0, table=table), noise, labels),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(4, 2, 5), (0, 2, 5, 6), "4x2x5x6", (4, 2, 5.0, 6)])
def test_warmup_rejects_a_shape_that_is_not_four_positive_ints(tiny_net, shape):
    net, solver, *_ = tiny_net
    with pytest.raises(ValueError, match=r"noise_shape: expected 4 positive ints \(B, C, H, W\)"):
        fg.Sampler(net, solver, fg.CFG(3.0), null_cond=10, progress=False).warmup(shape)


def test_sampler_benchmark_suite_runs_at_tiny_sizes():
    """CI exercises benchmarks/bench_sampler.py (each case once, timing disabled)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FASTGUIDE_BENCH_QUICK="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(repo / "benchmarks" / "bench_sampler.py")],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "8 passed" in res.stdout  # 3 end-to-end + 5 overhead cases at batch 1


@pytest.mark.parametrize("pair", ["dpm++2m", "unipc2"])
@torch.no_grad()
def test_compiled_multistep_with_the_triton_op_matches_torch_and_switches_solvers_without_recompiling(tiny_net, pair,
                                                                                                      monkeypatch):
    """A multistep plan's history through the registered Triton op (interpreter) inside the compiled hot step: the
    same samples as the torch backend, no graph breaks, and a second solver with the same history slots and writes
    per step (K, W) compiles nothing new (its weights and slots are tensor values)."""
    net, _, table, B, SHAPE = tiny_net
    sched = fg.NoiseSchedule.linear()
    first, second = {
        "dpm++2m": (fg.DPMSolver(sched, steps=6, order=2),  # K = 1, W = 1
                    fg.DPMSolver(sched, steps=6, order=2, algorithm_type="dpmsolver", final_sigmas_type="sigma_min",
                                 sigma_schedule="karras")),
        "unipc2": (fg.UniPC(sched, steps=6, order=2),  # K = 3, W = 2
                   fg.UniPC(sched, steps=6, order=2, solver_type="bh1", sigma_schedule="karras")),
    }[pair]
    assert first.plan.history.write_coef.shape[1:] == second.plan.history.write_coef.shape[1:]
    noise = fg.seeded_noise(range(40, 40 + B), SHAPE)
    labels = torch.tensor([3, 1, 4, 1])
    guide = fg.ReCFG(3.0, table=table)
    breaks = sum(counters["graph_break"].values())
    sampler = fg.Sampler(net, first, guide, null_cond=10, backend="triton", progress=False).compile()

    from fastguide.kernels import guided_step as gs

    launches, real_launch = [], gs.launch
    monkeypatch.setattr(gs, "launch", lambda *a, **kw: launches.append(kw["history"].shape[0]) or real_launch(*a, **kw))

    def check(solver):
        sampler.solver = solver
        launches.clear()
        got = sampler.sample(noise, labels)
        assert launches == [solver.plan.history_slots] * solver.plan.steps  # the kernel ran every step, with history
        want = fg.Sampler(net, solver, guide, null_cond=10, backend="torch", progress=False).sample(noise, labels)
        assert torch.isfinite(want).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32, inductor's network vs eager

    check(first)
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    check(second)
    check(first)  # a second call re-zeroes the same history buffers
    assert counters["stats"]["unique_graphs"] == graphs, "a solver with the same history shape compiled a new graph"
    assert sum(counters["recompiles"].values()) == recompiles
    assert sum(counters["graph_break"].values()) == breaks, dict(counters["graph_break"])
