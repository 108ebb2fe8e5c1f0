"""Rows that join and leave a running loop (fastguide/step_pool.py): each row, whenever it joined and whoever ran
beside it, equals its own plan run alone (``Sampler.sample(solvers=[...])``, the same per-row reference step) bit
for bit, for every solver family and the rules with state (APG's momentum), tables (ReCFG), model-free steps
(CFG-Zero*) and guidance intervals; with the digits network at one bucket size (every forward the same size), and
with a batch-invariant network at several; bad use refused."""
import json
import random
import subprocess
import sys

import pytest
import torch

import fastguide as fg
from benchmark_scripts import BENCHMARKS
from fastguide.demo import digits
from fastguide.noise import seeded_noise
from fastguide.step_pool import StepPool
from gaussian_models import MEANS, NULL, SHAPE, gaussian_eps

SCHEDULE = fg.NoiseSchedule.linear()


def run_pool(pool, requests, make_solver, join_per_step, shape, rule):
    """Admit ``requests`` (cond, seed, steps, scale) at most ``join_per_step`` before each step, each with ``rule``
    (or ``rule[k]`` for request k); returns the samples by request index, and how many requests joined running
    rows."""
    pending, got, mixed = list(enumerate(requests)), {}, 0
    while pending or len(pool):
        for _ in range(min(join_per_step, pool.free, len(pending))):
            k, (c, s, n, sc) = pending.pop(0)
            mixed += len(pool) > 0
            pool.admit(k, seeded_noise([s], shape)[0], cond=c, plan=make_solver(n).plan,
                       rule=rule[k] if isinstance(rule, list) else rule, scale=sc, seed=s)
        for key, x, _ in pool.step():
            got[key] = x
    return got, mixed


def alone(model, rule, request, make_solver, shape, pad_to=1, pad=(0, 0, 3, 1.0)):
    """The request's sample as row 0 of one Sampler call with a plan per row (``pad_to`` rows)."""
    rows = [request] + [pad] * (pad_to - 1)
    sampler = fg.Sampler(model, make_solver(request[2]), rule, null_cond=NULL if shape == SHAPE else digits.NULL_LABEL,
                         backend="torch", progress=False, check_finite=False)
    with torch.no_grad():
        return sampler.sample(seeded_noise([r[1] for r in rows], shape), torch.tensor([r[0] for r in rows]),
                              seeds=[r[1] for r in rows], scale=torch.tensor([r[3] for r in rows], dtype=torch.float64),
                              solvers=[make_solver(r[2]) for r in rows])[0]


DIGITS_SOLVERS = ("unipc", "dpm++3m", "euler-a", "plms")
DIGITS_RULES = ("cfg", "apg", "recfg-ls", "cfg-zero-star")


@pytest.fixture(scope="module")
def digits_model():
    return digits.load_digits_model()


@pytest.mark.parametrize("solver", DIGITS_SOLVERS)
def test_digits_rows_joining_mid_loop_equal_their_plan_alone(digits_model, solver):
    """Rows of four rules (APG's momentum, ReCFG's table, CFG-Zero*'s reductions) and 3-9 steps join a running pool
    of 8; each equals its request alone in a Sampler call of 8 rows."""
    rng = random.Random(DIGITS_SOLVERS.index(solver))
    requests = [(rng.randrange(10), rng.randrange(10**6), rng.randint(3, 9), rng.choice([0.5, 2.0, 4.5]))
                for _ in range(10)]
    tables = digits.load_digits_tables()
    rules = {name: digits.make_guidance(name, 3.0, tables) for name in DIGITS_RULES}
    row_rules = [rules[DIGITS_RULES[k % len(DIGITS_RULES)]] for k in range(len(requests))]
    make = lambda n: digits.make_solver(solver, n)  # noqa: E731
    pool = StepPool(digits_model, null_cond=digits.NULL_LABEL, latent_shape=digits.IMAGE_SHAPE, buckets=(8,))
    got, mixed = run_pool(pool, requests, make, join_per_step=3, shape=digits.IMAGE_SHAPE, rule=row_rules)
    assert mixed >= 5, "requests did not join running rows: the test did not exercise the pool"
    for k, request in enumerate(requests):
        want = alone(digits_model, row_rules[k], request, make, digits.IMAGE_SHAPE, pad_to=8)
        assert torch.isfinite(want).all()
        assert torch.equal(got[k], want), f"request {request} ({DIGITS_RULES[k % 4]}) differs from its plan alone"


GAUSSIAN_SOLVERS = {
    "dpm++2m": lambda n: fg.DPMSolver(SCHEDULE, n),
    "unipc-3": lambda n: fg.UniPC(SCHEDULE, n, order=3),
    "ddim-eta1": lambda n: fg.DDIM(SCHEDULE, n, eta=1.0),
    "pndm": lambda n: fg.PLMS(SCHEDULE, n),
    "euler-a": lambda n: fg.Euler(SCHEDULE, n, ancestral=True),
    "heun-karras": lambda n: fg.Heun(SCHEDULE, n, sigma_schedule="karras"),
}
GAUSSIAN_RULES = {
    "cfg-interval": fg.CFG(3.0, interval=(200, 700)),
    "apg": fg.APG(2.0, momentum=-0.5),
    "cfg-zero-star": fg.CFGZeroStar(3.0, zero_init_steps=0),
}


@pytest.mark.parametrize("solver", GAUSSIAN_SOLVERS)
@pytest.mark.parametrize("rule", GAUSSIAN_RULES)
def test_rows_at_every_bucket_size_equal_their_plan_alone(solver, rule):
    """A network whose rows do not depend on the batch size: the pool's forwards of 1, 2, 4 rows (padding
    included) change nothing, so each row equals its plan alone in a batch of one."""
    model = gaussian_eps(SCHEDULE.alphas_cumprod)
    rng = random.Random(7)
    requests = [(rng.randrange(NULL), rng.randrange(10**6), rng.randint(3, 8), rng.choice([1.0, 2.5, 4.0]))
                for _ in range(9)]
    pool = StepPool(model, null_cond=NULL, latent_shape=SHAPE, buckets=(1, 2, 4))
    got, mixed = run_pool(pool, requests, GAUSSIAN_SOLVERS[solver], join_per_step=2, shape=SHAPE,
                          rule=GAUSSIAN_RULES[rule])
    assert mixed >= 4
    for k, request in enumerate(requests):
        want = alone(model, GAUSSIAN_RULES[rule], request, GAUSSIAN_SOLVERS[solver], SHAPE)
        assert torch.equal(got[k], want), f"request {request} differs from its plan alone"
        ordinary = fg.Sampler(model, GAUSSIAN_SOLVERS[solver](request[2]), GAUSSIAN_RULES[rule], null_cond=NULL,
                              progress=False).sample(seeded_noise([request[1]], SHAPE), torch.tensor([request[0]]),
                                                     seeds=[request[1]], scale=request[3])[0]
        # the ordinary call's host-scalar step rounds differently: float32 rounding of the sample's scale
        assert (got[k] - ordinary).abs().max() <= 1e-5 * (1 + ordinary.abs().max())


def flow_velocity(x, t, c):
    """A batch-invariant stand-in for a flow-matching network (CFG-Zero*'s zero-init steps are for velocities)."""
    return torch.tanh(x - MEANS[c].to(x.dtype)) * (1 + t.view(-1, 1, 1, 1).to(x.dtype) / 1000)


@pytest.mark.parametrize("rule", [fg.CFGZeroStar(3.0, zero_init_steps=2), fg.CFG(2.0)], ids=["zero-init", "cfg"])
def test_flow_rows_with_model_free_steps_equal_their_plan_alone(rule):
    """CFG-Zero*'s first steps run no network (m = 0): rows at those steps and rows past them share a step."""
    rng = random.Random(3)
    requests = [(rng.randrange(NULL), rng.randrange(10**6), rng.randint(3, 7), rng.choice([1.5, 3.0])) for _ in range(7)]
    make = lambda n: fg.FlowEuler(steps=n, shift=3.0)  # noqa: E731
    pool = StepPool(flow_velocity, null_cond=NULL, latent_shape=SHAPE, buckets=(2, 4))
    got, mixed = run_pool(pool, requests, make, join_per_step=1, shape=SHAPE, rule=rule)
    assert mixed >= 4
    for k, request in enumerate(requests):
        assert torch.equal(got[k], alone(flow_velocity, rule, request, make, SHAPE))


def test_a_different_seed_or_scale_changes_the_row():
    """The comparison above can fail: the pool's rows follow their own seed and scale."""
    model = gaussian_eps(SCHEDULE.alphas_cumprod)
    make = GAUSSIAN_SOLVERS["ddim-eta1"]
    pool = StepPool(model, null_cond=NULL, latent_shape=SHAPE, buckets=(4,))
    got, _ = run_pool(pool, [(1, 5, 6, 2.0)], make, 1, SHAPE, rule=fg.CFG(3.0))
    for other in [(1, 6, 6, 2.0), (1, 5, 6, 2.5)]:
        assert (got[0] - alone(model, fg.CFG(3.0), other, make, SHAPE)).abs().max() > 1e-3


def test_bad_use_is_refused():
    model = gaussian_eps(SCHEDULE.alphas_cumprod)
    pool = StepPool(model, null_cond=NULL, latent_shape=SHAPE, buckets=(1, 2))
    noise, cfg = seeded_noise([0], SHAPE)[0], fg.CFG(3.0)
    pool.admit("a", noise, cond=1, plan=fg.DPMSolver(SCHEDULE, 4).plan, rule=cfg, scale=2.0, seed=0)
    with pytest.raises(ValueError, match="plan: this row's plan is of another solver family"):
        pool.admit("b", noise, cond=1, plan=fg.UniPC(SCHEDULE, 4).plan, rule=cfg, scale=2.0, seed=0)
    guided_by_net = fg.CFG(2.0, guide=fg.GuideNetwork(model))
    with pytest.raises(ValueError, match="rule: CFG runs a network of its own"):
        pool.admit("b", noise, cond=1, plan=fg.DPMSolver(SCHEDULE, 4).plan, rule=guided_by_net, scale=2.0, seed=0)
    classifier = fg.ClassifierGuidance(lambda x, t: x.flatten(1)[:, :NULL], scale=1.0)
    with pytest.raises(ValueError, match="rule: ClassifierGuidance cannot run rows with plans of their own"):
        pool.admit("b", noise, cond=1, plan=fg.DPMSolver(SCHEDULE, 4).plan, rule=classifier, scale=2.0, seed=0)
    pool.admit("c", noise, cond=1, plan=fg.DPMSolver(SCHEDULE, 6).plan, rule=fg.APG(2.0), scale=2.0, seed=0)
    with pytest.raises(RuntimeError, match="admit: the pool is full"):
        pool.admit("d", noise, cond=1, plan=fg.DPMSolver(SCHEDULE, 6).plan, rule=cfg, scale=2.0, seed=0)
    assert sorted(pool.clear()) == ["a", "c"] and len(pool) == 0
    with pytest.raises(TypeError, match="model: expected a callable"):
        StepPool("net", null_cond=NULL, latent_shape=SHAPE, buckets=(1,))


def test_a_guide_network_runs_in_a_pool_of_its_own_rows():
    """A rule with a second network (AutoGuidance) wraps the forward: its rows run alone in the pool, and equal
    their plan alone."""
    model = gaussian_eps(SCHEDULE.alphas_cumprod)
    guide = lambda x, t, c: 0.9 * model(x, t, c)  # noqa: E731
    rule = fg.CFG(2.0, guide=fg.GuideNetwork(guide))
    pool = StepPool(model, null_cond=NULL, latent_shape=SHAPE, buckets=(1, 2, 4))
    requests = [(1, 11, 5, 2.0), (2, 12, 3, 3.0), (3, 13, 4, 1.5)]
    got, mixed = run_pool(pool, requests, GAUSSIAN_SOLVERS["unipc-3"], 1, SHAPE, rule=rule)
    assert mixed >= 2
    for k, request in enumerate(requests):
        assert torch.equal(got[k], alone(model, rule, request, GAUSSIAN_SOLVERS["unipc-3"], SHAPE))


def test_the_overhead_benchmark_runs_at_a_tiny_size_and_refuses_a_bad_json_path(tmp_path):
    script = BENCHMARKS / "step_pool_overhead.py"
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, str(script), "--steps", "4", "--blocks", "2", "--capacity", "4",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["timed_steps"] == 4 and report["capacity"] == 4 and report["admitted_per_step"] > 0
    assert report["pool_ms_per_step"] == pytest.approx(report["admit_ms_per_step"] + report["step_ms_stub_network"])
    assert report["digits_forward_ms"] > 0 and report["step_ms_stub_network"] > 0
    bad = subprocess.run([sys.executable, str(script), "--json", str(tmp_path)], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--json" in bad.stderr, bad.stderr
