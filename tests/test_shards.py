"""fastguide.shards and `fastguide sample --num N --out DIR`: sample i depends only on its seed and shard; world
sizes 1, 2 and 3 under torchrun (gloo, CPU) write identical files; a run killed mid-way (SIGKILL) and rerun gives
the same files as an uninterrupted one, with no index missing or duplicated; another request into the same
directory is refused."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastguide as fg
from fastguide.shards import MANIFEST, ShardLayout, load_shards, sample_shards

from gaussian_models import NULL, SHAPE, gaussian_eps

ROOT = Path(__file__).resolve().parent.parent
SCHEDULE = fg.NoiseSchedule.linear()


def counting_sampler(calls, fail_after=None):
    model = gaussian_eps(SCHEDULE.alphas_cumprod)

    def counted(x, t, c):
        return model(x, t, c)
    sampler = fg.Sampler(counted, fg.DDPM(SCHEDULE, 4), fg.CFG(3.0), null_cond=NULL, progress=False)
    plain = sampler.sample

    def sample(noise, labels, **kw):
        if fail_after is not None and len(calls) >= fail_after:
            raise RuntimeError("simulated crash")
        calls.append(noise.shape[0])
        return plain(noise, labels, **kw)
    sampler.sample = sample
    return sampler


def labels_of(idx):
    return idx % 5


def run(out, num=22, shard_size=8, seed=3, calls=None, fail_after=None, request=None):
    calls = [] if calls is None else calls
    return sample_shards(counting_sampler(calls, fail_after), labels_of, out, num=num, latent_shape=SHAPE,
                         request=request or {"model": "gaussian", "steps": 4}, shard_size=shard_size, seed=seed,
                         dtype=torch.float64, progress=False), calls


def test_layout_files_and_load(tmp_path):
    manifest, calls = run(tmp_path / "a")
    assert calls == [8, 8, 6] and manifest["complete"] and manifest["shards"] == [
        "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    samples, labels, indices = load_shards(tmp_path / "a")
    assert samples.shape == (22, *SHAPE) and torch.equal(indices, torch.arange(22))
    assert torch.equal(labels, torch.arange(22) % 5) and torch.isfinite(samples).all()
    assert ShardLayout(22, 8).indices(2) == range(16, 22)


def test_a_sample_depends_on_its_seed_and_shard_only(tmp_path):
    """Two requests whose first shards coincide (same seeds, same shard batches) give those shards bit for bit;
    a sample in another seed differs."""
    run(tmp_path / "a", num=22)
    run(tmp_path / "b", num=16)
    a, _, _ = load_shards(tmp_path / "a")
    b, _, _ = load_shards(tmp_path / "b")
    assert torch.equal(a[:16], b)
    run(tmp_path / "c", num=16, seed=4)
    c, _, _ = load_shards(tmp_path / "c")
    assert not torch.equal(c[0], a[0])


def test_a_crashed_run_resumes_with_only_the_missing_shards(tmp_path):
    want, _ = run(tmp_path / "ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crash", fail_after=2)
    assert not json.loads((tmp_path / "crash" / MANIFEST).read_text())["complete"]
    _, calls = run(tmp_path / "crash")
    assert calls == [6]  # only the last shard ran again
    for name in want["shards"]:
        assert (tmp_path / "crash" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "half", fail_after=1)
    with pytest.raises(ValueError, match="out: .* is not complete yet"):
        load_shards(tmp_path / "half")


def test_a_corrupt_shard_is_sampled_again(tmp_path):
    run(tmp_path / "a")
    ref = (tmp_path / "a" / "shard-00001.safetensors").read_bytes()
    (tmp_path / "a" / "shard-00001.safetensors").write_bytes(b"junk")
    _, calls = run(tmp_path / "a")
    assert calls == [8] and (tmp_path / "a" / "shard-00001.safetensors").read_bytes() == ref


def test_another_request_into_the_same_directory_is_refused(tmp_path):
    run(tmp_path / "a")
    for kw, what in ((dict(num=30), "num"), (dict(shard_size=4), "shard_size"), (dict(seed=9), "seed"),
                     (dict(request={"model": "gaussian", "steps": 8}), "request")):
        with pytest.raises(ValueError, match=rf"out: .* holds samples of another request \(different {what}\)"):
            run(tmp_path / "a", **kw)


def test_bad_arguments_are_refused_by_name(tmp_path):
    for kw, match in ((dict(num=0), "num: expected an int >= 1"), (dict(shard_size=0), "shard_size: expected"),
                      (dict(seed=-1), "seed: expected"), (dict(request={"f": object()}), "request: expected a JSON")):
        with pytest.raises((ValueError, TypeError), match=match):
            run(tmp_path / "x", **kw)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="out: .* is not a readable sample manifest"):
        run(tmp_path / "bad")


# ---------------------------------------------------------------------------------------- the CLI under torchrun
CLI = ["sample", "--num-samples", "36", "--shard-size", "4", "--steps", "3", "--solver", "euler-a", "--seed", "5"]


def cli(args, ranks=None, wait=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
               "-m", "fastguide", *args]
    else:
        cmd = [sys.executable, "-m", "fastguide", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def shard_bytes(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.safetensors"))}


def test_world_sizes_one_two_three_write_identical_files(tmp_path):
    """Euler-ancestral (per-step noise from each sample's seed) so the stochastic path is covered too."""
    outs, metrics = {}, {}
    for ranks in (None, 2, 3):
        out = tmp_path / f"w{ranks or 1}"
        proc = cli([*CLI, "--out", str(out), "--metrics"], ranks)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[ranks or 1] = shard_bytes(out)
        metrics[ranks or 1] = json.loads((out / "metrics.json").read_text())
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["complete"] and len(manifest["shards"]) == 9
    assert len(outs[1]) == 9 and outs[1] == outs[2] == outs[3]
    samples, labels, indices = load_shards(tmp_path / "w3")
    assert torch.equal(indices, torch.arange(36)) and torch.equal(labels, torch.arange(36) % 10)
    assert "wrote 36 samples in 9 shards of 4" in proc.stdout and "3 ranks" in proc.stdout
    # the demo's metrics from statistics reduced over the ranks: the same bits for every world size, and those of
    # the whole set scored at once (the classifier's batches differ: float32 feature rounding)
    from fastguide.demo.evaluate import evaluate_samples

    whole = evaluate_samples(samples, labels)
    for key, value in metrics[1].items():
        assert metrics[2][key] == value and metrics[3][key] == value, key
        assert value == pytest.approx(whole[key], rel=1e-6)


def test_a_killed_torchrun_resumes_to_the_identical_result(tmp_path):
    args = ["sample", "--num-samples", "400", "--shard-size", "2", "--steps", "10", "--seed", "1"]
    ref = cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = cli([*args, "--out", str(out)], ranks=2, wait=False)
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.safetensors"))) < 6 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # every rank at once, mid-run
    proc.wait()
    written = len(list(out.glob("shard-*.safetensors")))
    assert 6 <= written < 200, f"the kill came too late to test a resume ({written} of 200 shards)"
    assert not json.loads((out / MANIFEST).read_text())["complete"]
    again = cli([*args, "--out", str(out)], ranks=2)
    assert again.returncode == 0, again.stderr[-2000:]
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref")
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_cli_bad_shard_arguments_are_one_line(tmp_path, capsys):
    from fastguide.cli import main

    for argv, needle in ((["--num", "0"], "--num"), (["--num", "5", "--shard-size", "0"], "--shard-size"),
                         (["--num", "5"], "--out: --num writes a directory")):
        assert main(["sample", *argv] + (["--out", str(tmp_path / "d")] if "--out:" not in needle else [])) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
