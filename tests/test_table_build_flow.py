"""ReCFG tables for flow-matching models (fastguide.FlowSchedule): x_t = (1 - sigma) x0 + sigma n on a sigma grid,
the same sums, estimators, storage, resume and torchrun scale-out as discrete tables, looked up by sigma."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.table import RatioTable
from fastguide.table_build import RatioSums, image_noise

TESTS = Path(__file__).resolve().parent
SHAPE, NULL, CLASSES = (1, 2, 3), 3, 3
MEANS = torch.randn(CLASSES + 1, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
GRID = [0.005, 0.25, 0.5, 0.75, 1.0]


def velocity(x, t, c):
    """A smooth stand-in for a flow model; every call must read a sigma of the grid (or a sampler's)."""
    s = t.view(-1, 1, 1, 1).to(x.dtype)
    return (x - (1 - s) * MEANS[c].to(x.dtype)) / (s + 0.3) + 0.1 * torch.tanh(x.roll(1, 3))


def dataset():
    labels = torch.tensor([0, 1, 2, 0, 0, 1, 2, 1, 2, 0, 1, 2])
    images = MEANS[labels] + 0.2 * torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(1),
                                               dtype=torch.float64)
    return images, labels


def build(model=velocity, **kw):
    images, labels = dataset()
    args = dict(timesteps=GRID, num_classes=CLASSES, samples_per_class=3, null_cond=NULL, batch_size=2, seed=4,
                progress=False)
    return fg.accumulate_ratio_sums(model, fg.FlowSchedule(), images, labels, **{**args, **kw})


def test_sums_are_the_hand_computed_ones():
    """Every (class, sigma) cell: the sums of m_c, m_u, m_c m_u, m_u^2 over the class's first 3 images, noised as
    (1 - sigma) x0 + sigma n with the build's per-image noise, the model reading t = sigma."""
    seen = set()

    def model(x, t, c):
        seen.update(t.tolist())
        return velocity(x, t, c)
    sums = build(model)
    assert seen == set(GRID) and sums.timesteps.dtype == np.float64 and sums.timesteps.tolist() == GRID
    images, labels = dataset()
    for c in range(CLASSES):
        idx = (labels == c).nonzero().flatten()[:3]
        want = [torch.zeros(len(GRID), *SHAPE, dtype=torch.float64) for _ in range(4)]
        for j, i in enumerate(idx.tolist()):
            noise = image_noise(4, c, j, len(GRID), SHAPE)
            for k, s in enumerate(GRID):
                x = ((1 - s) * images[i] + s * noise[k]).unsqueeze(0)
                t = torch.tensor([s], dtype=torch.float64)
                mc, mu = velocity(x, t, torch.tensor([c]))[0], velocity(x, t, torch.tensor([NULL]))[0]
                for acc, v in zip(want, (mc, mu, mc * mu, mu * mu)):
                    acc[k] += v
        for name, w in zip(("sum_c", "sum_u", "sum_cu", "sum_uu"), want):
            torch.testing.assert_close(getattr(sums, name)[c], w, rtol=1e-12, atol=1e-12)
    assert (sums.count == 3).all()
    table = sums.finalize("least_squares", dtype=torch.float64)
    assert table.metadata["noising"] == "flow" and "num_train_timesteps" not in table.metadata
    c, k = 1, 2  # one entry by hand: E[m_c m_u] / E[m_u^2]
    torch.testing.assert_close(table.ratios[c, k], sums.sum_cu[c, k] / sums.sum_uu[c, k], rtol=1e-12, atol=0)


def test_recfg_with_a_flow_table_looks_rows_up_by_sigma(tmp_path):
    """FlowEuler with shift 3 (sigmas between the grid's): the sampler equals a hand loop with R interpolated in
    sigma per element (np.interp); the table survives a save / load."""
    table = build().finalize("least_squares", dtype=torch.float64)
    table.save(tmp_path / "flow.safetensors")
    table = RatioTable.load(tmp_path / "flow.safetensors")
    solver = fg.FlowEuler(5, shift=3.0)
    sig = solver.plan.timesteps.numpy()
    assert sig.min() >= GRID[0] and not set(sig.tolist()) <= set(GRID)
    noise, labels = torch.randn(3, *SHAPE, dtype=torch.float64), torch.tensor([0, 2, 1])
    got = fg.Sampler(velocity, solver, fg.ReCFG(2.5, table), null_cond=NULL, progress=False).sample(noise, labels)
    ratios = table.ratios.numpy()
    x = noise.clone()
    for i, s in enumerate(sig):
        t = torch.full((3,), float(s), dtype=torch.float64)
        mc, mu = velocity(x, t, labels), velocity(x, t, torch.full_like(labels, NULL))
        r = np.stack([np.apply_along_axis(lambda col: np.interp(s, GRID, col), 0, ratios[int(c)]) for c in labels])
        m = 2.5 * mc + (1 - 2.5) * torch.from_numpy(r) * mu
        x = x + float(solver.plan.coef[i, fg.kernels.reference.Coef.B]) * m
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)


def test_flow_and_diffusion_tables_are_not_mixed():
    flow_table = build().finalize("least_squares", dtype=torch.float64)
    schedule = fg.NoiseSchedule.linear()
    noise, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="table: built with flow noising .* the solver's plan is discrete"):
        fg.Sampler(velocity, fg.DDIM(schedule, 4), fg.ReCFG(2.0, flow_table, out_of_range="clamp"), null_cond=NULL,
                   progress=False).sample(noise, labels)
    images, labels3 = dataset()
    discrete = fg.accumulate_ratio_sums(velocity, schedule, images, labels3, timesteps=[10, 500, 999],
                                        num_classes=CLASSES, samples_per_class=3, null_cond=NULL, progress=False)
    with pytest.raises(ValueError, match="table: built with discrete noising .* the solver's plan is flow"):
        fg.Sampler(velocity, fg.FlowEuler(4), fg.ReCFG(2.0, discrete.finalize(), out_of_range="clamp"),
                   null_cond=NULL, progress=False).sample(noise, labels)


@pytest.mark.parametrize("grid, match", [([0.0, 0.5], r"sigmas in \(0, 1\]"), ([0.5, 1.5], r"sigmas in \(0, 1\]"),
                                         ([0.5, 0.5], "distinct"), ([], "non-empty"), ([float("nan")], "sigmas"),
                                         ([[0.5]], "1-D")])
def test_bad_sigma_grids_are_refused(grid, match):
    with pytest.raises(ValueError, match=f"timesteps: .*{match}"):
        build(timesteps=grid)


def test_an_interrupted_build_resumes_to_identical_sums(tmp_path):
    want = build()
    calls = []

    def failing(x, t, c):
        calls.append(1)
        if len(calls) > 9:
            raise RuntimeError("simulated crash")
        return velocity(x, t, c)
    ckpt = tmp_path / "build.ckpt.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(failing, checkpoint=ckpt, checkpoint_every=1)
    assert ckpt.exists()
    got = build(checkpoint=ckpt, checkpoint_every=1)
    for name in ("sum_c", "sum_u", "sum_cu", "sum_uu", "count"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    RatioSums.load(ckpt)  # the checkpoint is a readable sums file


KILL_ENV = "FASTGUIDE_TEST_KILL_AFTER_CALLS"


def flow_source():
    """build-table --model input: the flow stand-in and the dataset above with a FlowSchedule. With
    FASTGUIDE_TEST_KILL_AFTER_CALLS=N the process SIGKILLs itself at model call N + 1."""
    import os
    import signal

    images, labels = dataset()
    kill_after, calls = int(os.environ.get(KILL_ENV, "0")), []

    def model(x, t, c):
        calls.append(1)
        if kill_after and len(calls) > kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return velocity(x, t, c)
    return {"model": model, "schedule": fg.FlowSchedule(), "images": images, "labels": labels, "null_cond": NULL,
            "num_classes": CLASSES, "model_fingerprint": "flow-stand-in-v1"}


CLI_ARGS = ["build-table", "--model", "test_table_build_flow:flow_source", "--timesteps", "0.25,0.5,1",
            "--samples-per-class", "3", "--batch-size", "2", "--seed", "4", "--dtype", "float64", "--no-progress"]


def run_build(args, env_extra=None, ranks=None):
    import os

    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent),
                                                               os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks else [sys.executable]
    return subprocess.run([*prefix, "-m", "fastguide", *args], env=env, cwd=str(TESTS), capture_output=True,
                          text=True, timeout=240)


def test_a_build_killed_with_sigkill_resumes_bit_exactly(tmp_path):
    """9 images in 5 batches x 3 sigmas = 15 calls: SIGKILL inside batch 4, rerun the same command, and the table
    equals an uninterrupted build bit for bit."""
    import signal

    ref = run_build([*CLI_ARGS, "--out", str(tmp_path / "ref.safetensors")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = [*CLI_ARGS, "--out", str(tmp_path / "t.safetensors"), "--checkpoint", str(tmp_path / "ck.safetensors"),
            "--checkpoint-every", "1"]
    killed = run_build(args, env_extra={KILL_ENV: str(3 * 3 + 1)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "t.safetensors").exists() and (tmp_path / "ck.safetensors").exists()
    again = run_build(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert torch.equal(RatioTable.load(tmp_path / "t.safetensors").ratios,
                       RatioTable.load(tmp_path / "ref.safetensors").ratios)


def test_build_table_cli_on_two_ranks_equals_one_process(tmp_path):
    outs = {}
    for ranks in (None, 2):
        out = tmp_path / f"t{ranks or 1}.safetensors"
        proc = run_build([*CLI_ARGS, "--out", str(out)], ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[ranks or 1] = RatioTable.load(out)
    one, two = outs[1], outs[2]
    assert one.timesteps.tolist() == [0.25, 0.5, 1.0] and one.metadata["noising"] == "flow"
    torch.testing.assert_close(two.ratios, one.ratios, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="--timesteps: expected a count or a comma list of sigmas"):
        from fastguide.commands.build_table import parse_timesteps

        parse_timesteps("0.5,x", None, flow=True)
    assert parse_timesteps("4", None, flow=True).tolist() == [0.25, 0.5, 0.75, 1.0]
