"""`fastguide bench` runs end to end at tiny sizes and writes what it prints (CI keeps it working)."""
import json

from fastguide import cli


def test_bench_quick_writes_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--batch", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    modes = {r["mode"] for r in rows}
    assert {"diffusers_eager", "fastguide_eager", "fastguide_compiled", "fastguide_compiled_fused", "floor"} <= modes
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in rows)
    floor = next(r for r in rows if r["mode"] == "floor")
    assert floor["vs_floor"] == 1.0
    assert "fastguide_compiled_fused" in capsys.readouterr().out


def test_bench_overhead_quick(tmp_path):
    out = tmp_path / "overhead.json"
    assert cli.main(["bench", "--overhead", "--quick", "--batch", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"diffusers_eager", "fastguide_eager", "fastguide_fused"}
    assert all(r["us_per_step"] > 0 for r in rows)


def test_bench_rejects_bad_arguments(capsys):
    assert cli.main(["bench", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "tpu"]) == 2
    assert "--device" in capsys.readouterr().err
