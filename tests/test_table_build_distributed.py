"""`fastguide build-table` end to end: torchrun with 2 CPU ranks (gloo) equals one process; a build killed
with SIGKILL resumes from its checkpoint to the identical table; `table-info` describes the result.

The model comes from `analytic_source` below through the pluggable `--model module:function` spec. Only the
torchrun and the SIGKILL runs are subprocesses (each pays torch's import); the rest calls the CLI in-process.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastguide.cli import main as cli_main
from fastguide.table import RatioTable
from fastguide.table_build import RatioSums

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SOURCE = "test_table_build_distributed:analytic_source"
KILL_ENV = "FASTGUIDE_TEST_KILL_AFTER_CALLS"
# 3 classes x 10 images, batch 4 -> 8 image batches x 3 timesteps = 24 model calls.
BUILD_ARGS = ["build-table", "--model", SOURCE, "--timesteps", "0,400,999", "--samples-per-class", "10",
              "--batch-size", "4", "--seed", "11", "--dtype", "float64", "--estimator", "least_squares", "--no-progress"]


def analytic_source():
    """Build inputs for the CLI: the analytic Gaussian model of test_table_build, dataset with mixed-class batches.
    With FASTGUIDE_TEST_KILL_AFTER_CALLS=N the process SIGKILLs itself at model call N + 1."""
    from test_table_build import SCHED, dataset, make_problem

    mu, model = make_problem(num_classes=3, shape=(1, 3, 2), seed=7)
    images, labels = dataset(mu, 12, order="interleaved")
    kill_after = int(os.environ.get(KILL_ENV, "0"))

    def maybe_killed(x, t, c):
        if kill_after and model.calls >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return model(x, t, c)

    return {"model": maybe_killed, "schedule": SCHED, "images": images, "labels": labels, "null_cond": 3,
            "num_classes": 3, "model_fingerprint": "analytic-gaussian-v1"}


def run_cli(args, env_extra=None, torchrun_ranks=None):
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    if torchrun_ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(torchrun_ranks), "-m", "fastguide", *args]
    else:
        cmd = [sys.executable, "-m", "fastguide", *args]
    return subprocess.run(cmd, env=env, cwd=str(TESTS), capture_output=True, text=True, timeout=240)


def cli(args, capsys):
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    assert cli_main([*BUILD_ARGS, "--out", str(d / "t.safetensors"), "--save-sums", str(d / "s.safetensors")]) == 0
    return d


def test_single_process_build_writes_table_and_summary(tmp_path, capsys):
    code, out, err = cli([*BUILD_ARGS, "--out", str(tmp_path / "t.safetensors")], capsys)
    assert code == 0, err
    table = RatioTable.load(tmp_path / "t.safetensors")
    assert table.ratios.shape == (4, 3, 1, 3, 2) and table.ratios.dtype == torch.float64
    assert table.metadata["model_fingerprint"] == "analytic-gaussian-v1"
    assert "3 classes + mean row x 3 timesteps" in out and "img/s" in out
    assert "near-zero denominators" in out and "1 rank," in out


def test_torchrun_two_cpu_ranks_equal_single_process(single, tmp_path):
    d = single
    r = run_cli([*BUILD_ARGS, "--out", str(tmp_path / "t.safetensors"), "--save-sums", str(tmp_path / "s.safetensors")],
                torchrun_ranks=2)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "2 ranks" in r.stdout
    one, two = RatioSums.load(d / "s.safetensors"), RatioSums.load(tmp_path / "s.safetensors")
    for name, t in one.tensors().items():
        assert (two.tensors()[name] - t).abs().max().item() <= 1e-6 * max(1.0, t.abs().max().item()), name
    assert torch.equal(one.count, two.count) and int(two.count.sum()) == 3 * 10 * 3
    t1, t2 = RatioTable.load(d / "t.safetensors"), RatioTable.load(tmp_path / "t.safetensors")
    assert (t1.ratios - t2.ratios).abs().max().item() <= 1e-6
    assert t1.metadata == t2.metadata  # same build facts, incl. the data fingerprint


def test_sigkilled_build_resumes_to_the_identical_table(single, tmp_path, capsys):
    d = single
    ckpt = tmp_path / "ckpt.safetensors"
    out = tmp_path / "t.safetensors"
    args = [*BUILD_ARGS, "--out", str(out), "--checkpoint", str(ckpt), "--checkpoint-every", "2"]
    killed = run_cli(args, env_extra={KILL_ENV: str(5 * 3 + 1)})  # dies inside image batch 6 of 8
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    partial = RatioSums.load(ckpt)
    assert partial.metadata["batches_done"] == "4" and partial.metadata["batches_total"] == "8"
    code, _, err = cli(args, capsys)  # resume in this process
    assert code == 0, err
    a, b = RatioTable.load(d / "t.safetensors"), RatioTable.load(out)
    assert torch.equal(a.ratios, b.ratios) and a.metadata == b.metadata
    done = RatioSums.load(ckpt)  # a finished checkpoint is the full sums
    for name, t in RatioSums.load(d / "s.safetensors").tensors().items():
        assert torch.equal(done.tensors()[name], t), name


def test_finalize_saved_sums_with_other_estimator_and_table_info(single, tmp_path, capsys):
    d = single
    out = tmp_path / "paper.safetensors"
    code, _, err = cli(["build-table", "--sums", str(d / "s.safetensors"), "--out", str(out), "--estimator", "paper",
                        "--clamp", "-10", "10", "--dtype", "bfloat16", "--metadata", "purpose=test"], capsys)
    assert code == 0, err
    table = RatioTable.load(out)
    want = RatioSums.load(d / "s.safetensors").finalize("paper", clamp=(-10, 10), dtype=torch.bfloat16)
    assert torch.equal(table.ratios, want.ratios) and table.metadata["purpose"] == "test"
    code, text, err = cli(["table-info", str(out), "--json"], capsys)
    assert code == 0, err
    data = json.loads(text)
    assert data["shape"] == [4, 3, 1, 3, 2] and data["dtype"] == "bfloat16" and data["nbytes"] == 4 * 3 * 6 * 2
    assert data["metadata"]["estimator"] == "paper" and len(data["timestep_stats"]) == 3
    stats = data["timestep_stats"][1]
    class_rows = table.ratios[:3, 1].double().numpy()
    assert stats["t"] == 400 and abs(stats["mean"] - class_rows.mean()) < 1e-12
    assert abs(stats["q50"] - np.quantile(class_rows, 0.5)) < 1e-12
    code, text, _ = cli(["table-info", str(out)], capsys)
    assert code == 0 and "estimator: paper" in text and "memory 144 B" in text and "q99" in text


@pytest.mark.parametrize("args, message", [
    (["build-table", "--out", "x.safetensors"], "give exactly one"),
    (["build-table", "--model", "nope", "--out", "x.safetensors"], "--model: expected 'digits' or module:function"),
    (["build-table", "--model", "no_such_module:f", "--out", "x.safetensors"], "cannot load no_such_module:f"),
    (["build-table", "--model", SOURCE, "--timesteps", "0,a", "--out", "x.safetensors"], "--timesteps"),
    (["table-info", "missing.safetensors"], "path: ratio table file missing.safetensors not found"),
])
def test_cli_user_errors_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.delenv("FASTGUIDE_DEBUG", raising=False)
    code, _, err = cli(args, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
