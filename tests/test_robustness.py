"""A systematic guard against bad input: generated bad values (hypothesis) thrown at every public constructor,
``sample()`` argument, loader and CLI option. The API must answer with a TypeError / ValueError whose message
starts with the argument's name; the CLI with exit status 2 and one line on stderr naming the option; never a
traceback, a hang, or silent success."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastguide as fg
from fastguide import cli
from fastguide.demo.digits import load_digits_classifier, load_digits_model
from fastguide.table_build import RatioSums

SHAPE = (2, 3, 3)
NULL = 3
SCHEDULE = fg.NoiseSchedule.linear()
FAST = settings(max_examples=int(os.environ.get("FASTGUIDE_FUZZ_EXAMPLES", 30)), deadline=None, database=None,
                derandomize=not os.environ.get("FASTGUIDE_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture])  # fixed examples on CI

# Values of every kind that a careless caller may pass.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.binary(max_size=4),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def toy_model(x, t, cond):
    return torch.tanh(x + 0.1 * cond.to(x.dtype).view(-1, 1, 1, 1))


def sampler(**kw):
    return fg.Sampler(toy_model, fg.DDIM(SCHEDULE, steps=3), fg.CFG(2.0), null_cond=NULL, progress=False, **kw)


def raises_naming(name: str, fn, *args, **kw) -> None:
    """fn(*args, **kw) raises TypeError or ValueError whose message starts with ``name``."""
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args, **kw)
    assert str(info.value).startswith(f"{name}:"), f"{name}: message does not name it: {info.value}"


def is_int(v, low=None, high=None) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and (low is None or v >= low) and (
        high is None or v <= high)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------- constructors
@FAST
@given(anything)
def test_solver_steps(v):
    assume(not is_int(v, 1, 1000))
    raises_naming("steps", fg.DDIM, SCHEDULE, steps=v)
    if v is not None:  # DDPM's default: every training step
        raises_naming("steps", fg.DDPM, SCHEDULE, steps=v)
    if not is_int(v, 1):
        raises_naming("steps", fg.FlowEuler, v)


@FAST
@given(anything)
def test_solver_options(v):
    if not (is_number(v) and math.isfinite(v) and v >= 0):
        raises_naming("eta", fg.DDIM, SCHEDULE, steps=4, eta=v)
    if not (is_number(v) and math.isfinite(v) and v > 0):
        raises_naming("shift", fg.FlowEuler, 4, shift=v)
    if v not in ("leading", "trailing", "linspace", None):
        raises_naming("spacing", fg.DDIM, SCHEDULE, steps=4, spacing=v)
    if v not in ("epsilon", "v_prediction", "sample", None):
        raises_naming("prediction_type", fg.DDIM, SCHEDULE, steps=4, prediction_type=v)
        raises_naming("prediction_type", fg.DDPM, SCHEDULE, steps=4, prediction_type=v)
    if v is not None and not isinstance(v, bool):
        raises_naming("clip_sample", fg.DDIM, SCHEDULE, steps=4, clip_sample=v)
    if v is not None and not (is_number(v) and math.isfinite(v) and v > 0):
        raises_naming("clip_sample_range", fg.DDIM, SCHEDULE, steps=4, clip_sample_range=v)
    if v is not None and not is_int(v, 0, 249):  # 4 leading steps of 1000 (0..750) admit offsets 0..249
        raises_naming("steps_offset", fg.DDIM, SCHEDULE, steps=4, steps_offset=v)


@FAST
@given(anything)
def test_schedule_constructors(v):
    if not is_int(v, 2):
        raises_naming("num_train_timesteps", fg.NoiseSchedule.linear, v)
    if not hasattr(v, "items"):
        raises_naming("config", fg.NoiseSchedule.from_diffusers, v)
        raises_naming("config", fg.FlowEuler.from_diffusers, v, 4)


@FAST
@given(st.sampled_from(["num_train_timesteps", "beta_start", "steps_offset", "clip_sample", "beta_schedule",
                        "prediction_type", "timestep_spacing"]),
       st.one_of(st.text(min_size=1, max_size=4), st.floats(allow_nan=True), st.lists(st.integers(), max_size=2)))
def test_diffusers_config_values(key, v):
    """A value of the wrong kind names its key (never Python's 'invalid literal for int()')."""
    valid = {"beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
             "prediction_type": ("epsilon", "v_prediction", "sample"),
             "timestep_spacing": ("leading", "trailing", "linspace")}
    assume(v not in valid.get(key, ()))
    assume(not (key == "beta_start" and is_number(v) and math.isfinite(v) and 0 <= v <= 1))
    with pytest.raises((TypeError, ValueError)) as info:
        fg.NoiseSchedule.from_diffusers({key: v})
    assert key in str(info.value) and not str(info.value).startswith("invalid literal")


@FAST
@given(anything)
def test_guidance_scales_and_intervals(v):
    scale_ok = is_number(v) and math.isfinite(v) and v >= 0
    if not scale_ok:
        if v is not None:  # CFG-family rules: None is their default scale (4.0)
            for rule in (fg.CFG, fg.CFGZeroStar, fg.APG):
                raises_naming("scale", rule, v)
        raises_naming("scale", fg.ClassifierGuidance, lambda x, t: x.flatten(1), v)
    for name, make in (("rescale", lambda: fg.CFG(2.0, rescale=v)), ("eta", lambda: fg.APG(2.0, eta=v)),
                       ("momentum", lambda: fg.APG(2.0, momentum=v)), ("schedule", lambda: fg.CFG(2.0, schedule=v)),
                       ("zero_init_steps", lambda: fg.CFGZeroStar(2.0, zero_init_steps=v))):
        valid = {"rescale": scale_ok and v <= 1, "eta": scale_ok, "momentum": is_number(v) and -1 < v < 1,
                 "schedule": v is None or callable(v) or v in fg.guidance.SCHEDULES,
                 "zero_init_steps": v is None or is_int(v, 0)}[name]
        if name == "schedule" and isinstance(v, torch.Tensor):
            continue  # a tensor schedule is checked against the plan's steps at sampling (test_guidance_rules.py)
        if not valid:
            raises_naming(name, make)
    if v is not None and not (isinstance(v, list) and len(v) == 2 and v[0] <= v[1]):
        raises_naming("interval", fg.CFG, 2.0, interval=v)
        if not (is_number(v) and v <= 1.0):  # (v, 1) with a number v <= 1 is a valid interval
            raises_naming("interval", fg.CFG, 2.0, interval=(v, 1.0))
    if not isinstance(v, torch.Tensor):
        raises_naming("table", fg.ReCFG, 2.0, table=v)


@FAST
@given(anything)
def test_sampler_constructor(v):
    raises_naming("solver", fg.Sampler, toy_model, v)
    if v is not None:  # None: the conditional model alone
        raises_naming("guidance", fg.Sampler, toy_model, fg.DDIM(SCHEDULE, steps=3), v, null_cond=NULL)
    if v not in ("auto", "torch", "triton"):
        raises_naming("backend", fg.Sampler, toy_model, fg.DDIM(SCHEDULE, steps=3), backend=v)
    if v is not None and not is_int(v, 1):
        raises_naming("num_classes", fg.Sampler, toy_model, fg.DDIM(SCHEDULE, steps=3), num_classes=v)
    if not callable(v):
        raises_naming("model", fg.Sampler, v, fg.DDIM(SCHEDULE, steps=3))


# ---------------------------------------------------------------------- sample() arguments
NOISE = fg.seeded_noise([0, 1], SHAPE, torch.float64)
LABELS = torch.tensor([0, 1])


@FAST
@given(st.one_of(anything, st.sampled_from([torch.zeros(2, 3), torch.zeros(2, 2, 3, 3, dtype=torch.int64),
                                            torch.zeros(0, 2, 3, 3), torch.full((2, 2, 3, 3), math.nan)])))
def test_sample_noise(v):
    raises_naming("noise", sampler().sample, v, LABELS)


@FAST
@given(st.one_of(anything, st.sampled_from([torch.tensor([True, False]), torch.tensor([0, 1, 2]),
                                            torch.zeros(2, 2, dtype=torch.int64), torch.tensor(1)])))
def test_sample_cond(v):
    assume(not (isinstance(v, list) and len(v) == 2))  # two labels are a valid condition list
    raises_naming("cond", sampler().sample, NOISE, v)


@FAST
@given(st.one_of(anything, st.lists(st.one_of(st.floats(), st.text(max_size=2), st.integers(max_value=-1),
                                              st.integers(min_value=2**63)), min_size=2, max_size=2)))
def test_sample_seeds(v):
    assume(v is not None)
    valid = isinstance(v, list) and all(is_int(s, 0, 2**63 - 1) for s in v)
    assume(not (valid and len(v) == 2))
    raises_naming("seeds", sampler().sample, NOISE, LABELS, seeds=v)
    if not (valid and v):  # any non-empty list of valid seeds makes noise
        raises_naming("seeds", fg.seeded_noise, v, SHAPE)


@FAST
@given(anything)
def test_sample_scale_and_guidance(v):
    assume(v is not None)
    if not (is_number(v) and math.isfinite(v) and v >= 0):
        raises_naming("scale", sampler().sample, NOISE, LABELS, scale=v)
    raises_naming("guidance", sampler().sample, NOISE, LABELS, guidance=v)


def test_sample_labels_outside_the_models_classes():
    s = sampler(num_classes=3)
    for bad in ([0, 5], [-1, 0]):
        raises_naming("cond", s.sample, NOISE, torch.tensor(bad))
    assert s.sample(NOISE, torch.tensor([2, NULL])).shape == NOISE.shape  # the null label is allowed


@FAST
@given(st.one_of(anything, st.tuples(st.integers(-2, 3), st.integers(-2, 3))))
def test_noise_shapes(v):
    assume(not (isinstance(v, (tuple, list)) and all(is_int(d, 1) for d in v)))
    raises_naming("shape", fg.seeded_noise, [0], v)


@FAST
@given(anything)
def test_warmup_shape(v):
    raises_naming("noise_shape", sampler().warmup, v)


def test_an_interval_without_a_step_of_the_plan():
    s = fg.Sampler(toy_model, fg.DDIM(SCHEDULE, steps=3, spacing="trailing"), fg.CFG(2.0, interval=(0.1, 0.9)),
                   null_cond=NULL, progress=False)
    with pytest.raises(ValueError, match=r"^interval: \[0.1, 0.9\] contains no step of the plan, whose model "
                                         r"times run from 332 to 999"):
        s.sample(NOISE, LABELS)


# ---------------------------------------------------------------------- loaders
@pytest.mark.parametrize("content", [b"", b"not safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage",
                                     b"\xff" * 64])
def test_loaders_refuse_junk_files(tmp_path, content):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    raises_naming("path", fg.RatioTable.load, path)
    raises_naming("path", RatioSums.load, path)
    raises_naming("model", load_digits_model, path)
    raises_naming("classifier", load_digits_classifier, path)


@pytest.mark.parametrize("content", [b"", b"not onnx", b"\x08\x01" * 8])
def test_onnx_loaders_refuse_junk_files(tmp_path, content):
    from fastguide.onnx import OnnxSampler, read_metadata

    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    raises_naming("path", OnnxSampler, path)
    raises_naming("path", read_metadata, path)
    with pytest.raises(FileNotFoundError, match="^path:"):
        read_metadata(tmp_path / "missing.onnx")


@FAST
@given(anything)
def test_ratio_table_and_build_arguments(v):
    raises_naming("ratios", fg.RatioTable, v)
    images, labels = torch.randn(4, *SHAPE, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    kw = dict(timesteps=[10, 500], num_classes=2, samples_per_class=2, null_cond=2, progress=False)
    for name in ("num_classes", "samples_per_class", "batch_size", "checkpoint_every", "seed"):
        if not is_int(v, 0 if name == "seed" else 1) or (name in ("num_classes", "samples_per_class") and v > 2):
            with pytest.raises((TypeError, ValueError), match=rf"^({name}|labels|samples_per_class):"):
                fg.accumulate_ratio_sums(toy_model, SCHEDULE, images, labels, **{**kw, name: v})
    if not (isinstance(v, list) and v and all(is_int(t, 0, 999) for t in v) and len(set(v)) == len(v)):
        raises_naming("timesteps", fg.accumulate_ratio_sums, toy_model, SCHEDULE, images, labels, **{**kw, "timesteps": v})


@pytest.mark.parametrize("bad_output", [lambda x: (x, x), lambda x: x[:, :1], lambda x: x.sum()],
                         ids=["tuple", "shape", "scalar"])
def test_a_compiled_sampler_checks_the_model_output_before_compiling(bad_output):
    s = fg.Sampler(lambda x, t, c: bad_output(x), fg.DDIM(SCHEDULE, steps=3), fg.CFG(2.0), null_cond=NULL,
                   progress=False).compile()
    with pytest.raises((TypeError, ValueError), match=r"^model: (expected a tensor output|output shape)"):
        s.sample(NOISE, LABELS)


def test_build_table_never_imports_from_the_working_directory_for_the_shipped_model(tmp_path):
    """A module planted in the current directory (here a fake sklearn, which the digits data loader imports) is
    not imported by `build-table --model digits`."""
    import subprocess
    import sys

    marker = tmp_path / "planted-ran"
    (tmp_path / "sklearn.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit(3)\n")
    res = subprocess.run([sys.executable, "-m", "fastguide.cli", "build-table", "--model", "digits", "--timesteps",
                          "2", "--samples-per-class", "1", "--out", str(tmp_path / "t.safetensors"), "--no-progress"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not marker.exists() and (tmp_path / "t.safetensors").exists()


def test_loaders_refuse_directories_and_missing_files(tmp_path):
    for bad in (tmp_path, tmp_path / "missing.safetensors"):
        for load, name in ((fg.RatioTable.load, "path"), (RatioSums.load, "path"), (load_digits_model, "model")):
            with pytest.raises(FileNotFoundError, match=rf"^{name}:"):
                load(bad)


# ---------------------------------------------------------------------- the command line
def run_cli(capsys, argv) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


CLI_CASES = {
    "sample": (["sample", "--out", "{tmp}/g.png"],
               {"--steps": ["0", "1001", "abc"], "--scale": ["-1", "nan", "inf", "x"], "--labels": ["", "1,x", "12"],
                "--per-label": ["0", "65"], "--seed": ["-1", "1.5"], "--interval": ["5", "a,b", "9,1", "2000,3000", "0,50"],
                "--out": ["{tmp}/g.txt", "{tmp}", "/nonexistent/g.png"], "--device": ["tpu", "cuda:9"],
                "--rule": ["foo"], "--backend": ["gpu"]}),
    "demo": (["demo", "--out", "{tmp}/d", "--quiet"],
             {"--steps": ["0"], "--scales": ["", "1,x", "-2"], "--per-class": ["1", "1000"], "--out": ["/proc/x"],
              "--device": ["tpu"]}),
    "train": (["train", "--out", "{tmp}/t", "--quiet"],
              {"--steps": ["0"], "--batch-size": ["0"], "--seed": ["-1"], "--threads": ["0"], "--stop-after": ["0"],
               "--classifier-epochs": ["0"], "--table-samples-per-class": ["0"], "--out": ["/proc/x"]}),
    "build-table": (["build-table", "--model", "digits", "--out", "{tmp}/t.safetensors"],
                    {"--timesteps": ["0", "x", "1,y"], "--samples-per-class": ["0"], "--num-classes": ["0"],
                     "--batch-size": ["0"], "--seed": ["-1"], "--checkpoint-every": ["0"], "--device": ["tpu"],
                     "--out": ["{tmp}", "/nonexistent/t.safetensors"], "--save-sums": ["{tmp}/t.safetensors"],
                     "--metadata": ["novalue"], "--dtype": ["int8"], "--estimator": ["mean"]}),
    "table-info": (["table-info", "{tmp}/missing.safetensors"], {}),
    "toy": (["toy", "--samples", "0"],
            {"--gamma": ["-1", "nan"], "--T": ["0", "-1", "inf"], "--c": ["0", "nan"], "--steps": ["1"],
             "--samples": ["1"], "--seed": ["-1"], "--plot": ["{tmp}", "/nonexistent/p.png"], "--device": ["tpu"]}),
    "export-onnx": (["export-onnx", "--out", "{tmp}/m.onnx", "--no-verify"],
                    {"--steps": ["0"], "--scale": ["-1"], "--opset": ["10"], "--out": ["{tmp}/m.txt", "{tmp}"],
                     "--mode": ["both"]}),
    "bench": (["bench", "--quick"],
              {"--batch": ["0"], "--nfe": ["0"], "--reps": ["0"], "--device": ["tpu"], "--mode": ["fastest"],
               "--json": ["{tmp}", "/nonexistent/b.json"]}),
}


@pytest.mark.parametrize("command,option,value", [(c, o, v) for c, (_, opts) in CLI_CASES.items()
                                                   for o, vals in opts.items() for v in vals])
def test_cli_bad_option_is_one_line_naming_it(tmp_path, capsys, command, option, value):
    base, _ = CLI_CASES[command]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in base] + [option, value.replace("{tmp}", str(tmp_path))]
    code, err = run_cli(capsys, argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert option in lines[0] or option.lstrip("-").replace("-", "_") in lines[0], lines[0]


def test_cli_missing_or_junk_files_are_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    for argv in (["table-info", str(tmp_path / "missing.safetensors")], ["table-info", str(junk)],
                 ["table-info", str(tmp_path)],
                 ["build-table", "--sums", str(junk), "--out", str(tmp_path / "t.safetensors")],
                 ["sample", "--assets", str(tmp_path / "none"), "--out", str(tmp_path / "g.png")],
                 ["sample", "--assets", str(junk), "--out", str(tmp_path / "g.png")]):
        code, err = run_cli(capsys, argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)


@FAST
@given(st.lists(st.sampled_from(["--steps", "--scale", "--seed", "--per-label", "--labels", "--interval", "--x",
                                 "-q", "3", "-1", "nan", "", "a,b"]), max_size=6))
def test_cli_random_arguments_never_trace_back(tmp_path_factory, capsys, argv):
    """Random argument soup: a non-zero exit with one line (or a successful run), never a traceback."""
    tmp = tmp_path_factory.mktemp("soup")
    code, err = run_cli(capsys, ["sample", "--out", str(tmp / "g.png"), "--per-label", "1", *argv])
    assert "Traceback" not in err
    if code != 0:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    else:
        assert (tmp / "g.png").exists()


def test_closed_stdout_is_one_line(tmp_path):
    """`fastguide table-info T | head -1`: the closed pipe ends in one line on stderr, not a traceback."""
    import subprocess
    import sys

    from fastguide.demo.digits import TABLE_FILES, asset_path

    table = asset_path(TABLE_FILES["least_squares"])
    proc = subprocess.Popen([sys.executable, "-m", "fastguide.cli", "table-info", str(table)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command prints anything
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "output closed" in err, err


def test_labels_outside_the_digits_models_classes_are_refused_up_front():
    """The digits model says how many classes it has, so a Sampler checks labels before the network would fail
    with an IndexError."""
    model = load_digits_model()
    s = fg.Sampler(model, fg.DDIM(fg.NoiseSchedule.linear(), steps=2), fg.CFG(2.0), null_cond=10, progress=False)
    assert s.num_classes == 10
    noise = fg.seeded_noise([0, 1], (1, 8, 8))
    with pytest.raises(ValueError, match=r"^cond: labels \[11\] are outside the model's classes \[0, 10\)"):
        s.sample(noise, torch.tensor([3, 11]))
    with pytest.raises(TypeError, match=r"^cond: expected integer labels or float embeddings, got torch.bool"):
        s.sample(noise, torch.tensor([True, False]))
    assert s.sample(noise, torch.tensor([9, 10])).shape == noise.shape  # 10 is the null label
