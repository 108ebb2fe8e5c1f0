"""The digits commands end to end: `fastguide demo`, `sample`, `train`, and their one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

from fastguide import cli
from fastguide.demo import digits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_end_to_end_reduced(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", str(out), "--steps", "4", "--per-class", "3",
                                "--scales", "1,3", "--quiet")
    assert code == 0, err
    for name in ("samples_cfg.png", "samples_recfg-paper.png", "samples_recfg-ls.png", "comparison.png",
                 "metrics.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    report = json.loads((out / "metrics.json").read_text())
    assert report["config"]["steps"] == 4 and report["config"]["scales"] == [1.0, 3.0]
    assert set(report["results"]) == {"cfg", "recfg-paper", "recfg-ls"}
    for by_scale in report["results"].values():
        assert set(by_scale) == {"1.0", "3.0"}
        for m in by_scale.values():
            assert set(m) == {"accuracy", "expectation_shift", "frechet_distance", "variance_ratio"}
    # guidance at g = 3 changes the samples, so the metrics of g = 1 and g = 3 differ
    assert report["results"]["cfg"]["1.0"] != report["results"]["cfg"]["3.0"]
    assert "recfg-ls" in stdout and "accuracy" in stdout


def test_sample_writes_a_grid_of_the_requested_shape(tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "sample", "--labels", "0,1,2", "--rule", "recfg-ls", "--scale", "3",
                                "--steps", "4", "--seed", "5", "--per-label", "2", "--out", str(out))
    assert code == 0, err
    img = imread(out)
    assert img.shape[:2] == ((3 * 9 + 1) * 8, (2 * 9 + 1) * 8)  # 8x8 digits, 1 px padding, 8x upscale
    # the same request gives the same picture; another seed does not
    out2, out3 = tmp_path / "again.png", tmp_path / "other.png"
    run_cli(capsys, "sample", "--labels", "0,1,2", "--rule", "recfg-ls", "--scale", "3", "--steps", "4",
            "--seed", "5", "--per-label", "2", "--out", str(out2))
    run_cli(capsys, "sample", "--labels", "0,1,2", "--rule", "recfg-ls", "--scale", "3", "--steps", "4",
            "--seed", "6", "--per-label", "2", "--out", str(out3))
    assert (imread(out2) == img).all() and not (imread(out3) == img).all()


def test_sample_with_a_guidance_interval_guides_only_those_steps(tmp_path, capsys):
    from matplotlib.image import imread

    args = ["sample", "--labels", "4,9", "--steps", "4", "--per-label", "3"]
    code, stdout, err = run_cli(capsys, *args, "--interval", "500,999", "--out", str(tmp_path / "interval.png"))
    assert code == 0, err
    assert "guided at t in [500, 999]" in stdout
    run_cli(capsys, *args, "--out", str(tmp_path / "every.png"))
    run_cli(capsys, *args, "--scale", "1", "--out", str(tmp_path / "none.png"))
    picture = imread(tmp_path / "interval.png")
    assert not (picture == imread(tmp_path / "every.png")).all() and not (picture == imread(tmp_path / "none.png")).all()
    # what the command runs: CFG (2N rows) at the steps with t in [500, 999] only (trailing DDIM: 999, 749),
    # the N conditional rows alone at t = 499, 249
    rows_seen = []
    model = digits.load_digits_model()

    def counting(x, t, c):
        rows_seen.append(x.shape[0])
        return model(x, t, c)

    digits.sample_digits(counting, torch.tensor([4, 4, 4, 9, 9, 9]), [0, 1, 2] * 2, scale=3.0, steps=4,
                         interval=(500.0, 999.0))
    assert rows_seen == [12, 12, 6, 6]


def test_sample_and_demo_take_the_new_rules_and_their_parameters(tmp_path, capsys):
    """--rule cfg-zero-star / apg with their flags: the grid is written, the line says what ran, and each rule and
    parameter changes the picture against plain CFG from the same noise; the demo compares the listed rules."""
    from matplotlib.image import imread

    base = ["sample", "--labels", "3,8", "--steps", "4", "--per-label", "2", "--scale", "5"]
    pictures = {}
    for name, extra in {"cfg": [], "rescale": ["--rescale", "0.7"], "zero-star": ["--rule", "cfg-zero-star"],
                        "apg": ["--rule", "apg", "--eta", "0", "--momentum", "-0.5", "--norm-threshold", "2"],
                        "cosine": ["--schedule", "cosine"]}.items():
        out = tmp_path / f"{name}.png"
        code, stdout, err = run_cli(capsys, *base, *extra, "--out", str(out))
        assert code == 0, err
        pictures[name] = imread(out)
        if name == "apg":
            assert "apg g=5, eta=0, norm_threshold=2, momentum=-0.5" in stdout
    for name, picture in pictures.items():
        if name != "cfg":
            assert not (picture == pictures["cfg"]).all(), name
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--out", str(out), "--steps", "4", "--per-class", "2",
                                "--scales", "1,3", "--rules", "cfg,apg,cfg-zero-star", "--eta", "0", "--quiet")
    assert code == 0, err
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["results"]) == ["cfg", "apg", "cfg-zero-star"]
    assert report["config"]["rules"] == ["cfg", "apg", "cfg-zero-star"] and report["config"]["rule_options"]["eta"] == 0
    assert report["results"]["apg"]["1.0"] == report["results"]["cfg"]["1.0"]  # g = 1: the conditional model
    assert report["results"]["apg"]["3.0"] != report["results"]["cfg"]["3.0"]
    assert (out / "samples_apg.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--interval", "5"], "--interval"),
    (["sample", "--interval", "900,100"], "--interval"),
    (["sample", "--labels", "1,11"], "--labels"),
    (["sample", "--labels", "a"], "--labels"),
    (["sample", "--scale", "-1"], "--scale"),
    (["sample", "--steps", "0"], "--steps"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--scales", "1,-2"], "--scales"),
    (["sample", "--assets", "/nonexistent-fastguide-assets"], "--assets"),
    (["train", "--steps", "0"], "steps"),
    (["train", "--channels", "0"], "--channels"),
    (["sample", "--rule", "cfg", "--eta", "0.5"], "--eta: applies to rule apg only"),
    (["sample", "--rule", "apg", "--momentum", "1"], "--momentum"),
    (["sample", "--rule", "apg", "--eta", "-1"], "--eta"),
    (["sample", "--rescale", "1.5"], "--rescale"),
    (["sample", "--rule", "cfg-zero-star", "--zero-init-steps", "-1"], "--zero-init-steps"),
    (["sample", "--rule", "cfg-zero-star", "--zero-init-steps", "2"], "zero_init_steps"),
    (["sample", "--schedule", "wavy"], "--schedule"),
    (["demo", "--rules", "cfg,nope"], "--rules"),
    (["demo", "--rules", "cfg,cfg"], "--rules"),
    (["demo", "--rules", "cfg", "--momentum", "0.5"], "--momentum: applies to rule apg only"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, needle):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / ("x.png" if argv[0] == "sample" else "d")))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err


def test_unwritable_out_is_an_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "sample", "--steps", "1", "--out", str(blocker / "grid.png"))
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "demo", "--steps", "1", "--out", str(blocker / "demo"))
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "sample", "--out", str(tmp_path / "grid.jpg"))
    assert code == 2 and ".png" in err


def test_missing_checkpoint_in_assets_dir(tmp_path, capsys):
    (tmp_path / "assets").mkdir()
    code, _, err = run_cli(capsys, "demo", "--assets", str(tmp_path / "assets"), "--out", str(tmp_path / "d"))
    assert code == 2 and digits.UNET_FILE in err and "not found" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_requested_without_cuda(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--device", "cuda", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "cuda" in err


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastguide", "sample", "--labels", "12", "--out",
                           str(tmp_path / "g.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "--labels" in proc.stderr


@pytest.mark.parametrize("command", ["demo", "sample", "train"])
def test_help(capsys, command):
    assert cli.main([command, "--help"]) == 0 and command in capsys.readouterr().out


def test_train_cli_smoke_with_resume(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--out", str(out), "--steps", "4", "--batch-size", "4", "--classifier-epochs", "1",
              "--skip-tables", "--quiet"]
    code, stdout, err = run_cli(capsys, *common, "--stop-after", "2")
    assert code == 0, err
    assert "--resume" in stdout and not (out / digits.UNET_FILE).exists()
    code, stdout, err = run_cli(capsys, *common, "--resume")
    assert code == 0, err
    for name in (digits.UNET_FILE, digits.CLASSIFIER_FILE, digits.TRAINING_FACTS_FILE):
        assert (out / name).is_file(), name
    facts = json.loads((out / digits.TRAINING_FACTS_FILE).read_text())
    assert facts["unet"]["step"] == 4 and 0 <= facts["classifier"]["heldout_accuracy"] <= 1
    model = digits.load_digits_model(out / digits.UNET_FILE)
    assert model.config["channels"] == 32
