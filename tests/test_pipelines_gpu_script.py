"""benchmarks/pipelines_gpu.py (the real-size SDXL / SD3 denoising-loop benchmark of gpu_session.sh's pipelines part)
smoked on the CPU with its tiny configs: every mode a CPU runs is timed, and fastguide's latents equal the
diffusers-style loop's (float32, the same noise) for SDXL with Euler and DPM-Solver++ 2M and SD3 with FlowMatch
Euler.

The compiled modes compile with dynamo's aot_eager backend here (torch.compile patched for the test): the same
traced graphs as inductor's, without its C++ code generation, which takes minutes on a cold 2-core machine (six
compiles: the denoiser and fastguide's step at each of the three points). FASTGUIDE_TEST_INDUCTOR=1 keeps
inductor."""
import functools
import json
import math
import os

import pytest
import torch

pytest.importorskip("diffusers")
from benchmark_scripts import load_benchmark  # noqa: E402


@pytest.fixture(scope="module")
def script():
    return load_benchmark("pipelines_gpu")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny models run far slower with 2 intra-op threads on a shared 2-core machine (spin waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def aot_eager(monkeypatch):
    if not os.environ.get("FASTGUIDE_TEST_INDUCTOR"):
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def test_tiny_cpu_run_times_every_mode_and_matches_the_diffusers_loop(script, tmp_path, aot_eager):
    out = tmp_path / "pipelines-tiny.json"
    script.main(["--tiny", "--device", "cpu", "--reps", "1", "--json", str(out)])
    doc = json.loads(out.read_text())
    modes = [m for m in script.MODES if m != "fastguide_graph"]  # no CUDA graph on a CPU
    assert doc["meta"]["modes"] == modes and doc["meta"]["tiny"] and doc["meta"]["dtype"] == "float32"
    assert doc["skipped"] == []
    assert [(r["model"], r["scheduler"], r["steps"], r["batch"]) for r in doc["rows"]] == [
        ("sdxl", "euler", 2, 2), ("sd3", "flow-euler", 2, 2), ("sdxl", "dpm++2m", 2, 2)]  # the run order
    for row in doc["rows"]:
        assert row["errors"] == {}
        for key in ("median_s", "first_call_s", "images_per_s", "max_abs_diff_vs_diffusers_eager", "finite"):
            assert sorted(row[key]) == sorted(modes), key
        assert all(math.isfinite(v) and v > 0 for v in row["median_s"].values())
        assert all(row["finite"].values())
        assert row["peak_bytes"] is None  # CUDA only
        diffs = row["max_abs_diff_vs_diffusers_eager"]
        assert diffs["diffusers_eager"] == 0.0
        assert all(d <= 1e-4 for d in diffs.values()), diffs
        assert set(row["speedup"]) == {"fastguide_compiled_vs_diffusers_compiled", "fastguide_eager_vs_diffusers_eager",
                                       "fastguide_compiled_vs_diffusers_eager"}


def test_an_unwritable_json_path_fails_before_any_model_is_built(script, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(script, "build_model", never)
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--device", "cpu", "--json", str(tmp_path / "missing" / "x.json")])


def test_points_past_the_budget_are_skipped_and_listed(script, tmp_path):
    out = tmp_path / "budget.json"
    doc = script.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--json", str(out)])
    assert doc["rows"] == [] and json.loads(out.read_text()) == doc
    assert [(s["model"], s["scheduler"], s["batch"]) for s in doc["skipped"]] == [
        ("sdxl", "euler", 2), ("sd3", "flow-euler", 2), ("sdxl", "dpm++2m", 2)]
