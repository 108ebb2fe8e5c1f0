"""RatioTable (fastguide.table): lookup (rows per label and step, linear interpolation between grid steps, the
out-of-range and unknown-label rules), storage (a bit-exact save / load round trip with its metadata, and clear
errors for files built for another schedule or latents, or of another kind), and ReCFG through the Sampler with
a loaded table against manual interpolation.

Built tables come from the analytic Gaussian problem of test_table_build.py (imported from there: a subprocess of
test_table_build_distributed.py imports it too, so it cannot be a conftest fixture); the others are random.
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastguide as fg
from fastguide.table import RatioTable
from test_table_build import GRID, SCHED, build, dataset, make_problem


# ---------------------------------------------------------------------- lookup
def random_table(k=3, grid=(0, 100, 400, 999), shape=(2, 3, 5), dtype=torch.float32):
    ratios = (torch.rand((k + 1, len(grid), *shape), dtype=torch.float64) * 2 + 0.1).to(dtype)
    return RatioTable(ratios, list(grid), metadata={"estimator": "paper",
                                                     "schedule_fingerprint": SCHED.fingerprint()})


def test_interpolation_exact_on_grid_and_linear_between():
    table = random_table()
    labels = torch.tensor([2, 0, 1, 0])
    on_grid = table.lookup(labels, [999, 400, 100, 0])
    for s, k in enumerate([3, 2, 1, 0]):
        assert torch.equal(on_grid[s], table.ratios[labels, k].double())
    steps, w = table.step_rows([400, 100])
    assert steps.tolist() == [[2, 2], [1, 1]] and w.tolist() == [0.0, 0.0]
    mid = table.lookup(labels, [250.0, 700.0])
    r = table.ratios.double()
    torch.testing.assert_close(mid[0], 0.5 * (r[labels, 1] + r[labels, 2]), rtol=1e-14, atol=0)
    w2 = (700 - 400) / (999 - 400)
    torch.testing.assert_close(mid[1], (1 - w2) * r[labels, 2] + w2 * r[labels, 3], rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="outside the table's range"):
        random_table(grid=(10, 500)).step_rows([5])
    clamped = random_table(grid=(10, 500))
    assert torch.equal(clamped.lookup(labels, [5], out_of_range="clamp")[0], clamped.ratios[labels, 0].double())
    assert table.rows_for(torch.tensor([5, 1]), unknown_label="mean").tolist() == [3, 1]
    with pytest.raises(ValueError, match="outside the ratio table's classes"):
        table.rows_for(torch.tensor([5]))


def test_step_rows_of_a_timesteps_tensor_are_kept_per_tensor_and_follow_in_place_changes():
    table = random_table()
    times = torch.tensor([999.0, 700.0, 250.0, 0.0], dtype=torch.float64)
    first = table.step_rows(times)
    assert table.step_rows(times) is first  # the same plan's timesteps: kept
    fresh = table.step_rows(times.tolist())  # a list: computed afresh, the same rows
    assert torch.equal(first[0], fresh[0]) and torch.equal(first[1], fresh[1])
    times[1] = 400.0  # changed in place: the kept rows no longer apply
    steps, w = table.step_rows(times)
    assert steps[1].tolist() == [2, 2] and float(w[1]) == 0.0
    assert table.step_rows(times, out_of_range="clamp") is not table.step_rows(times)
    table.timesteps = torch.tensor([0.0, 100.0, 700.0, 999.0], dtype=torch.float64)  # another grid: new rows
    assert table.step_rows(times)[0][1].tolist() == [1, 2]
    table.timesteps[2] = 400.0  # the grid changed in place
    assert table.step_rows(times)[0][1].tolist() == [2, 2]


# ---------------------------------------------------------------------- storage
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    mu, model = make_problem(num_classes=2, shape=(3, 2, 5))
    images, labels = dataset(mu, 6)
    sums = build(model, images, labels, 6, model_fingerprint="abc123")
    table = sums.finalize("least_squares", clamp=(-5, 5), dtype=dtype)
    path = tmp_path / "t.safetensors"
    table.save(path, metadata={"note": "hello", "epoch": 3})
    back = RatioTable.load(path, schedule=SCHED, latent_shape=(3, 2, 5))
    assert back.ratios.dtype == dtype and torch.equal(back.ratios, table.ratios)
    assert torch.equal(back.timesteps, table.timesteps) and back.has_mean_row
    m = back.metadata
    assert m["format"] == "fastguide.ratio_table" and m["format_version"] == "1"
    assert m["schedule_fingerprint"] == SCHED.fingerprint() and m["num_train_timesteps"] == "1000"
    assert json.loads(m["timesteps"]) == GRID.tolist() and m["estimator"] == "least_squares"
    assert m["num_classes"] == "2" and m["samples_per_class"] == "6" and json.loads(m["latent_shape"]) == [3, 2, 5]
    assert m["dtype"] == str(dtype).removeprefix("torch.") and m["model_fingerprint"] == "abc123"
    assert m["note"] == "hello" and m["epoch"] == "3" and m["seed"] == "3" and "data_fingerprint" in m
    assert back.nbytes == table.ratios.numel() * table.ratios.element_size()
    back.save(tmp_path / "again.safetensors")  # a loaded table saves again, unchanged
    again = RatioTable.load(tmp_path / "again.safetensors")
    assert torch.equal(again.ratios, table.ratios) and again.metadata == back.metadata


def test_loading_for_another_schedule_or_shape_or_file_kind_fails_clearly(tmp_path):
    table = random_table(shape=(1, 2, 3))
    path = tmp_path / "t.safetensors"
    table.save(path)
    with pytest.raises(ValueError, match="built for schedule .* rebuild the table"):
        RatioTable.load(path, schedule=fg.NoiseSchedule.cosine())
    with pytest.raises(ValueError, match=r"latents of shape \(1, 2, 3\), expected \(4, 8, 8\)"):
        RatioTable.load(path, latent_shape=(4, 8, 8))
    with pytest.raises(FileNotFoundError):
        RatioTable.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="path: .*junk.safetensors is not a readable safetensors file"):
        RatioTable.load(tmp_path / "junk.safetensors")
    save_file({"ratios": torch.ones(2, 1, 1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a fastguide ratio table"):
        RatioTable.load(tmp_path / "other.safetensors")
    no_fp = RatioTable(torch.ones(2, 1, 1, 1, 1), [0])
    no_fp.save(tmp_path / "nofp.safetensors")
    with pytest.raises(ValueError, match="no schedule fingerprint"):
        RatioTable.load(tmp_path / "nofp.safetensors", schedule=SCHED)
    with pytest.raises(ValueError, match="metadata: key 'estimator'"):
        table.save(tmp_path / "x.safetensors", metadata={"estimator": "least_squares"})
    with pytest.raises(TypeError, match="metadata"):
        table.save(tmp_path / "x.safetensors", metadata={"a": [1, 2]})


# ---------------------------------------------------------------------- sampling with a loaded table
def test_recfg_with_loaded_table_through_sampler_matches_manual_interpolation(tmp_path):
    mu, model = make_problem(num_classes=2, shape=(1, 2, 3))
    grid = np.array([0, 250, 500, 750, 999])
    sums = build(model, *dataset(mu, 8), 8, timesteps=grid)
    sums.finalize("least_squares", dtype=torch.float64).save(tmp_path / "t.safetensors")
    table = RatioTable.load(tmp_path / "t.safetensors", schedule=SCHED, latent_shape=(1, 2, 3))
    solver = fg.DDIM(SCHED, steps=7, spacing="trailing")
    ts = solver.plan.timesteps.numpy()
    pos = np.interp(ts, grid, np.arange(len(grid)))  # independent lerp: fractional grid position
    i0 = np.minimum(np.floor(pos).astype(int), len(grid) - 2)
    w = torch.from_numpy(pos - i0).view(1, -1, 1, 1, 1)
    r = table.ratios
    per_step = r[:, i0] + w * (r[:, i0 + 1] - r[:, i0])  # [K+1, S, ...]
    noise = fg.seeded_noise(range(4), (1, 2, 3), dtype=torch.float64)
    cond = torch.tensor([0, 1, 1, 0])
    got = fg.Sampler(model, solver, fg.ReCFG(3.0, table=table), null_cond=2, progress=False).sample(noise, cond)
    want = fg.Sampler(model, solver, fg.ReCFG(3.0, table=per_step), null_cond=2, progress=False).sample(noise, cond)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cfg = fg.Sampler(model, solver, fg.CFG(3.0), null_cond=2, progress=False).sample(noise, cond)
    assert (got - cfg).abs().max() > 1e-3  # the table really changed the guidance
