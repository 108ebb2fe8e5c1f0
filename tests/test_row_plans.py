"""Per-row plans (fastguide/row_plans.py, Sampler.sample(solvers=...)): rows with different step counts of one
solver family in one loop. Each row of a mixed batch equals the same rows sampled with its own plan alone (no
padding steps), bit for bit, for every solver family and rule; compiled and Triton (interpreter) steps too;
mismatched families and unsupported rules are refused.

The network is conftest's tiny_net (TinyNet, null label 10)."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import fastguide as fg
from fastguide.row_plans import RowPlans

SCHED = fg.NoiseSchedule.linear()
FAMILIES = {
    "ddim": lambda n: fg.DDIM(SCHED, steps=n),
    "ddim-eta": lambda n: fg.DDIM(SCHED, steps=n, eta=1.0),
    "dpm++2m": lambda n: fg.DPMSolver(SCHED, n, order=2),
    "dpm++3m-sde": lambda n: fg.DPMSolver(SCHED, n, order=3, algorithm_type="sde-dpmsolver++"),
    "unipc-3": lambda n: fg.UniPC(SCHED, n, order=3),
    "euler-a": lambda n: fg.Euler(SCHED, n, ancestral=True, spacing="trailing"),
    "heun": lambda n: fg.Heun(SCHED, n, spacing="trailing"),
    "plms": lambda n: fg.PLMS(SCHED, n, spacing="trailing"),
}
STEPS = [3, 5, 8, 5, 3, 8, 4]  # per row: one of each group at least twice, rows of one count not adjacent


def _table(shape):
    grid = torch.linspace(0, 999, 12, dtype=torch.float64)
    return fg.RatioTable(1 + 0.3 * torch.rand(11, 12, *shape, generator=torch.Generator().manual_seed(5)), grid)


def _rules(shape):
    return {"cfg": fg.CFG(2.5), "recfg": fg.ReCFG(2.5, table=_table(shape)), "apg": fg.APG(2.5, eta=0.5, momentum=0.3),
            "cfg-rescale-cosine": fg.CFG(3.0, rescale=0.7, schedule="cosine")}


def _inputs(shape, batch, seed=0):
    seeds = list(range(seed, seed + batch))
    return fg.seeded_noise(seeds, shape), torch.tensor([0, 3, 5, 9, 1, 2, 7][:batch]), seeds


def _check_rows_equal_alone(sampler, solvers_by_n, steps, noise, labels, seeds, scales):
    mixed = sampler.sample(noise, labels, seeds=seeds, scale=scales, solvers=[solvers_by_n[n] for n in steps])
    assert torch.isfinite(mixed).all()
    for n in sorted(set(steps)):
        alone = sampler.sample(noise, labels, seeds=seeds, scale=scales, solvers=[solvers_by_n[n]] * len(steps))
        rows = [b for b, k in enumerate(steps) if k == n]
        assert torch.equal(mixed[rows], alone[rows]), f"rows with {n} steps differ from their plan alone"
        # and the ordinary call on those rows alone (the host-scalar step: to float32 rounding)
        sub_scale = scales if not isinstance(scales, torch.Tensor) else scales[rows]
        sampler.solver = solvers_by_n[n]
        ordinary = sampler.sample(noise[rows], labels[rows], seeds=[seeds[b] for b in rows], scale=sub_scale)
        torch.testing.assert_close(mixed[rows], ordinary, rtol=1e-4, atol=1e-4)
    return mixed


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_mixed_step_counts_equal_each_plan_alone_for_every_family(tiny_net, family):
    net, _, _, _, shape = tiny_net
    solvers = {n: FAMILIES[family](n) for n in set(STEPS)}
    noise, labels, seeds = _inputs(shape, len(STEPS))
    scales = torch.linspace(1.0, 4.0, len(STEPS), dtype=torch.float64)  # row 0 unguided (g = 1)
    sampler = fg.Sampler(net, solvers[8], fg.CFG(2.0), null_cond=10, progress=False)
    for name, rule in _rules(shape).items():
        sampler.guidance = rule
        _check_rows_equal_alone(sampler, solvers, STEPS, noise, labels, seeds, None if "cosine" in name else scales)


@torch.no_grad()
def test_uniform_rows_match_the_ordinary_call(tiny_net):
    """All rows on one plan: the same samples as the ordinary call (which runs the eager host-scalar step, so to
    float32 rounding, not bits)."""
    net, _, _, _, shape = tiny_net
    noise, labels, seeds = _inputs(shape, 5, seed=40)
    for family in ("dpm++2m", "euler-a", "unipc-3"):
        solver = FAMILIES[family](6)
        sampler = fg.Sampler(net, solver, fg.APG(3.0, momentum=0.5), null_cond=10, progress=False)
        want = sampler.sample(noise, labels, seeds=seeds)
        got = sampler.sample(noise, labels, seeds=seeds, solvers=[solver] * 5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, sampler.sample(noise, labels, seeds=seeds, solvers=[FAMILIES[family](5)] * 5))


@torch.no_grad()
def test_padded_rows_are_identity_steps(tiny_net):
    """A row's sample after its own last step is what the loop returns: the padding steps leave it unchanged
    (checked through the callback at every step)."""
    net, _, _, _, shape = tiny_net
    solvers = {n: FAMILIES["dpm++3m-sde"](n) for n in (3, 8)}
    noise, labels, seeds = _inputs(shape, 2, seed=7)
    seen = []
    sampler = fg.Sampler(net, solvers[8], fg.CFG(3.0), null_cond=10, progress=False)
    out = sampler.sample(noise, labels, seeds=seeds, solvers=[solvers[3], solvers[8]],
                         callback=lambda i, t, x: seen.append(x[0].clone()))
    assert len(seen) == 8
    for i in range(2, 8):
        assert torch.equal(seen[i], out[0])
    assert not torch.equal(seen[1], out[0])


@torch.no_grad()
def test_a_fixed_loop_length_serves_every_mix_with_one_buffer_set(tiny_net):
    """loop_steps pads every mix to one length: one LoopBuffers, bound once (its step views, which a captured graph
    reads, are the same objects), the plan tensors refilled in place; each row still its plan alone."""
    net, _, _, _, shape = tiny_net
    solvers = {n: FAMILIES["unipc-3"](n) for n in (3, 5, 6)}
    noise, labels, seeds = _inputs(shape, 4, seed=21)
    sampler = fg.Sampler(net, solvers[6], fg.ReCFG(2.0, table=_table(shape)), null_cond=10, progress=False)
    views = None
    for mix in ([3, 5, 6, 3], [5, 5, 3, 3], [6, 3, 3, 6]):
        got = sampler.sample(noise, labels, seeds=seeds, solvers=[solvers[n] for n in mix], loop_steps=8)
        (b,) = [b for b in sampler.buffers.values() if b.plan.t.shape == (8, 4)]  # (the alone calls run 3-6 steps)
        views = b.views if views is None else views
        assert b.views is views
        for n in set(mix):
            alone = sampler.sample(noise, labels, seeds=seeds, solvers=[solvers[n]] * 4)
            rows = [i for i, k in enumerate(mix) if k == n]
            assert torch.equal(got[rows], alone[rows])
    with pytest.raises(ValueError, match="steps: expected an int >= the longest row plan's 6 steps"):
        sampler.sample(noise, labels, solvers=[solvers[6]] * 4, loop_steps=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_one_captured_graph_replays_every_mix_on_cuda(tiny_net):
    net, _, _, _, shape = tiny_net
    net = copy.deepcopy(net).cuda()
    solvers = {n: FAMILIES["dpm++2m"](n) for n in (3, 5, 8)}
    noise, labels, seeds = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(shape, 4, seed=2))
    eager = fg.Sampler(net, solvers[8], fg.CFG(2.0), null_cond=10, progress=False)
    graphed = fg.Sampler(net, solvers[8], fg.CFG(2.0), null_cond=10, progress=False).compile(cuda_graph=True)
    graphs = []
    for mix in ([3, 5, 8, 3], [8, 8, 3, 5], [5, 3, 3, 3]):
        solver_rows = [solvers[n] for n in mix]
        got = graphed.sample(noise, labels, seeds=seeds, solvers=solver_rows, loop_steps=8)
        want = eager.sample(noise, labels, seeds=seeds, solvers=solver_rows, loop_steps=8)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        graphs.append(next(iter(graphed.buffers.values())).graph)
    assert graphs[0] is not None and all(g is graphs[0] for g in graphs), "a new mix recaptured the loop"


@pytest.mark.parametrize("fuse_step", [True, False], ids=["fused-step", "model-only"])
@torch.no_grad()
def test_compiled_per_row_plans_match_eager_and_never_recompile(tiny_net, fuse_step):
    net, _, _, _, shape = tiny_net
    solvers = {n: FAMILIES["unipc-3"](n) for n in (3, 5, 8)}
    noise, labels, seeds = _inputs(shape, 4, seed=3)
    eager = fg.Sampler(net, solvers[8], fg.APG(2.0, momentum=0.2), null_cond=10, progress=False)
    compiled = fg.Sampler(net, solvers[8], fg.APG(2.0, momentum=0.2), null_cond=10,
                          progress=False).compile(fuse_step=fuse_step)
    mixes = [[8, 3, 5, 8], [3, 3, 8, 5], [5, 8, 8, 3]]  # every mix runs S = 8 steps
    compiled.sample(noise, labels, seeds=seeds, solvers=[solvers[n] for n in mixes[0]])
    graphs, recompiles = counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())
    for mix in mixes:
        for scale in (1.5, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)):
            got = compiled.sample(noise, labels, seeds=seeds, scale=scale, solvers=[solvers[n] for n in mix])
            want = eager.sample(noise, labels, seeds=seeds, scale=scale, solvers=[solvers[n] for n in mix])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs, "a new mix of step counts compiled a new graph"
    assert sum(counters["recompiles"].values()) == recompiles


@torch.no_grad()
def test_triton_per_row_plans_match_the_reference(tiny_net):
    """The fused kernel with per-row coefficients (interpreted on the CPU) against the reference step."""
    pytest.importorskip("triton")
    net, _, _, _, shape = tiny_net
    noise, labels, seeds = _inputs(shape, 3, seed=11)
    for family, rule in (("dpm++2m", fg.ReCFG(2.0, table=_table(shape))), ("euler-a", fg.APG(2.0, momentum=0.4))):
        solvers = [FAMILIES[family](n) for n in (4, 2, 3)]
        ref = fg.Sampler(net, solvers[0], rule, null_cond=10, progress=False)
        tri = fg.Sampler(net, solvers[0], rule, null_cond=10, progress=False, backend="triton")
        want = ref.sample(noise, labels, seeds=seeds, solvers=solvers)
        got = tri.sample(noise, labels, seeds=seeds, solvers=solvers)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rows_of_different_families_are_refused():
    dd, dpm2, dpm3 = fg.DDIM(SCHED, steps=4), fg.DPMSolver(SCHED, 4, order=2), fg.DPMSolver(SCHED, 4, order=3)
    with pytest.raises(ValueError, match="solvers: row 1's plan has history_slots"):
        RowPlans.stack([dd.plan, dpm2.plan])
    with pytest.raises(ValueError, match="solvers: row 1's plan has history_slots"):
        RowPlans.stack([dpm2.plan, dpm3.plan])
    v = fg.DDIM(fg.NoiseSchedule.linear(prediction_type="v_prediction"), steps=4)
    with pytest.raises(ValueError, match="solvers: row 1's plan has prediction_type"):
        RowPlans.stack([dd.plan, v.plan])
    with pytest.raises(ValueError, match="solvers: expected one solver per row"):
        RowPlans.stack([])


def test_bad_solvers_argument(tiny_net):
    net, solver, _, _, shape = tiny_net
    noise, labels, _ = _inputs(shape, 3)
    sampler = fg.Sampler(net, solver, fg.CFG(2.0), null_cond=10, progress=False)
    with pytest.raises(ValueError, match=r"solvers: expected one solver per row \(3\), got 2"):
        sampler.sample(noise, labels, solvers=[solver, solver])
    with pytest.raises(TypeError, match="solvers: row 1 is a str"):
        sampler.sample(noise, labels, solvers=[solver, "ddim", solver])
    with pytest.raises(TypeError, match="solvers: expected a sequence"):
        sampler.sample(noise, labels, solvers="ddim")

    class Classifier(torch.nn.Module):
        def forward(self, x, t):
            return x.flatten(1)[:, :11]

    with pytest.raises(ValueError, match="guidance: ClassifierGuidance cannot run rows"):
        sampler.sample(noise, labels, guidance=fg.ClassifierGuidance(Classifier(), 1.0), solvers=[solver] * 3)
