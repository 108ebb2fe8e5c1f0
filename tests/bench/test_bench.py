"""`fastguide bench` runs end to end at tiny sizes and writes what it prints (CI keeps it working)."""
import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from fastguide import cli


def test_bench_quick_writes_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--batch", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    modes = {r["mode"] for r in rows}
    assert modes == {"diffusers_eager", "diffusers_compiled", "fastguide_eager", "fastguide_compiled_unfused",
                     "fastguide_compiled", "fastguide_recfg", "fastguide_interval", "floor"}  # no graph on a CPU
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in rows)
    floor = next(r for r in rows if r["mode"] == "floor")
    assert floor["vs_floor"] == 1.0
    assert all((r["warmup_s"] is not None) == r["mode"].startswith("fastguide") for r in rows)
    printed = capsys.readouterr().out
    assert "fastguide_compiled_unfused" in printed
    report_sampler = load_benchmark("report_sampler")
    (goal,) = report_sampler.goals(rows, "cpu")  # on a CPU: compiled >= 1.5x the diffusers eager loop, per point
    want = next(r for r in rows if r["mode"] == "fastguide_compiled")["images_per_s"] / next(
        r for r in rows if r["mode"] == "diffusers_eager")["images_per_s"]
    assert float(goal["measured"]) == pytest.approx(want, abs=1e-3) and goal["met"] == (want >= 1.5)

    # benchmarks/report_sampler.py renders the same file into its own RESULTS section, replacing it on rewrite
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nkept\n")
    for _ in range(2):
        assert report_sampler.main([str(out), "--write", "--results", str(results)]) == 0
    doc = results.read_text()
    assert doc.count("<!-- bench-cpu:begin -->") == 1 and "kept" in doc
    ips = next(r for r in rows if r["mode"] == "fastguide_compiled")["images_per_s"]
    assert f"| fastguide_compiled | {ips:.1f} (" in doc
    assert report_sampler.main([str(tmp_path / "missing.json")]) == 2


def test_bench_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "--overhead", "--quick", "--batch", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"diffusers_eager", "fastguide_eager", "fastguide_fused"}
    assert all(r["us_per_step"] > 0 and r["network_us_per_step"] > 0 for r in rows)
    for r in rows:
        assert r["overhead_us_per_step"] == pytest.approx(r["us_per_step"] - r["network_us_per_step"])
    base = next(r for r in rows if r["mode"] == "diffusers_eager")
    assert base["vs_diffusers"] == 1.0


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err


def test_gpu_goals_are_checked_from_the_rows():
    goals = load_benchmark("report_sampler").goals

    def row(mode, batch, ips):
        return {"model": "dit", "mode": mode, "batch": batch, "nfe": 8, "images_per_s": ips}

    rows = [row("floor", 8, 100.0), row("fastguide_graph", 8, 97.5), row("diffusers_compiled", 8, 90.0),
            row("fastguide_recfg", 8, 95.0), row("floor", 64, 100.0), row("fastguide_graph", 64, 96.0),
            row("fastguide_recfg", 64, 96.0), row("fastguide_interval", 64, 131.0)]
    got = {g["goal"].split(" (")[0] + f" B={g['goal'].split('B=')[1].split()[0]}": (g["measured"], g["met"])
           for g in goals(rows, "cuda")}
    assert got["fastguide_graph / floor >= 0.97 B=8"] == ("0.975", True)
    assert got["fastguide_graph / diffusers_compiled >= 1.1 B=8"] == ("1.083", False)
    assert got["fastguide_recfg / fastguide_graph >= 0.98 B=8"] == ("0.974", False)
    assert got["fastguide_graph / floor >= 0.97 B=64"] == ("0.960", False)
    assert got["fastguide_recfg / fastguide_graph >= 0.98 B=64"] == ("1.000", True)
    assert got["fastguide_interval / floor >= 1.3 B=64"] == ("1.310", True)
    assert len(got) == 6
    missing = goals([row("floor", 1, 10.0)], "cuda")
    assert [(g["measured"], g["met"]) for g in missing] == [("not measured", None), ("not measured", None)]


def test_bench_runs_only_the_modes_asked_for(tmp_path, capsys):
    out = tmp_path / "two.json"
    assert cli.main(["bench", "--quick", "--batch", "1", "--mode", "floor", "--mode", "fastguide_compiled",
                     "--json", str(out)]) == 0
    assert {r["mode"] for r in json.loads(out.read_text())["rows"]} == {"floor", "fastguide_compiled"}
    assert cli.main(["bench", "--mode", "fastest"]) == 2
    assert "--mode: unknown ['fastest']" in capsys.readouterr().err
    assert cli.main(["bench", "--overhead", "--mode", "floor"]) == 2
    assert "--mode: picks end-to-end modes" in capsys.readouterr().err


def test_report_sampler_reads_pytest_benchmark_json(tmp_path, capsys):
    report_sampler = load_benchmark("report_sampler")
    medians = {("e2e", "diffusers_eager"): 0.090, ("e2e", "fastguide_compiled"): 0.060,
               ("overhead", "diffusers_eager"): 1.0e-3, ("overhead", "network_eager"): 0.1e-3,
               ("overhead", "fastguide_eager"): 0.28e-3, ("overhead", "network_compiled"): 0.4e-3,
               ("overhead", "fastguide_fused"): 0.49e-3}
    bench = {"datetime": "2026-11-22T00:00:00", "benchmarks": [
        {"group": f"{group}-B16", "params": {"mode": mode, "batch": 16}, "stats": {"median": med}}
        for (group, mode), med in medians.items()]}
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(bench))
    assert report_sampler.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "| fastguide_compiled | 60.0 (1.50x) |" in text
    assert "| fastguide_eager | 18.0 (0.20) |" in text  # (0.28 - 0.1) ms / 10 steps; diffusers (1.0 - 0.1) / 10
    assert "| fastguide_fused | 9.0 (0.10) |" in text  # net of the compiled stub's calls


def test_bench_kernel_quick_times_the_reference_on_the_cpu(tmp_path):
    from fastguide.bench.kernel import floor_bytes

    out = tmp_path / "kernel.json"
    assert cli.main(["bench", "--kernel", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["rule"]) for r in rows] == [([2, 4, 8, 8], rule) for rule in
                                                        ("cfg", "recfg", "cfg-dpm2m", "cfg-unipc3", "cfg-rescale",
                                                         "cfg-zero-star", "apg")]
    assert all(r["eager_us"] > 0 and r["compiled_us"] > 0 and "triton_us" not in r for r in rows)
    # bytes a step must move: x, m_cond, m_uncond read, both halves written (+ 1 or 2 table rows)
    assert floor_bytes((2, 4, 8, 8), torch.float32, "cfg") == 5 * 512 * 4
    assert floor_bytes((2, 4, 8, 8), torch.float16, "recfg", lerp=True) == 7 * 512 * 2
    assert floor_bytes((2, 4, 8, 8), torch.float32, "cfg-unipc3") == (5 + 4 + 2) * 512 * 4  # + K reads, W writes
    assert floor_bytes((2, 4, 8, 8), torch.float32, "cfg-rescale") == 5 * 512 * 4  # the moments are not in the floor
    assert floor_bytes((2, 4, 8, 8), torch.float32, "apg") == (5 + 2) * 512 * 4  # + the state's read and write


@pytest.mark.parametrize("solver", ["ddim", "dpm++2m", "unipc"])
def test_both_sides_of_a_solver_benchmark_take_the_same_steps(solver):
    """The timed diffusers loop and the timed Sampler produce the same samples (so they do the same work)."""
    import fastguide as fg
    from fastguide.bench.end_to_end import bench_solver, diffusers_scheduler_for, diffusers_style_loop
    from fastguide.demo.digits import digits_schedule, load_digits_model

    net, schedule = load_digits_model(), digits_schedule()
    noise, labels = fg.seeded_noise(range(4), (1, 8, 8)), torch.tensor([0, 3, 5, 9])
    sch = diffusers_scheduler_for(schedule, 6, solver)
    with torch.no_grad():
        want = [diffusers_style_loop(net, sch, noise, labels, 10, 3.0) for _ in range(2)]  # resets its state
        got = fg.Sampler(net, bench_solver(schedule, 6, solver), fg.CFG(3.0), null_cond=10,
                         progress=False).sample(noise, labels)
    assert torch.equal(want[0], want[1])
    torch.testing.assert_close(got, want[0], rtol=1e-4, atol=1e-4)


def test_bench_solver_option_runs_and_labels_rows(tmp_path):
    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "--overhead", "--quick", "--batch", "2", "--solver", "unipc", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["solver"] for r in rows} == {"unipc"} and len(rows) == 3


def test_bench_rule_option_runs_each_rule_against_its_guider(tmp_path):
    """--rule: fastguide's rule and diffusers' guider for it in the same overhead run, labelled per row; the two
    loops compute the same samples (checked on the stub network's output, float32)."""
    from diffusers import DDIMScheduler

    import fastguide as fg
    from fastguide.bench.end_to_end import diffusers_style_loop
    from fastguide.bench.overhead import BENCH_RULES, StubNet, bench_rule

    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "--overhead", "--quick", "--batch", "2", "--rule", "apg", "--rule", "cfg-rescale",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["rule"] for r in rows] == ["apg"] * 3 + ["cfg-rescale"] * 3
    stub = StubNet(torch.randn(4, 1, 8, 8))
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    for name in BENCH_RULES:
        rule, make_guider = bench_rule(name, 3.0)
        sch = DDIMScheduler(timestep_spacing="trailing")
        sch.set_timesteps(4)
        # the stub's [null | cond] halves are what the diffusers loop reads (it batches null first)
        guider = None if make_guider is None else make_guider()
        want = diffusers_style_loop(stub, sch, noise, labels, 10, 3.0, guider)
        # one guider serves every call (APG's momentum restarts at step 0)
        assert torch.equal(diffusers_style_loop(stub, sch, noise, labels, 10, 3.0, guider), want)
        flipped = StubNet(torch.cat(stub.out2.chunk(2)[::-1]))
        got = fg.Sampler(flipped, fg.solver_from_diffusers(sch, 4), rule, null_cond=10, progress=False).sample(
            noise, labels)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
