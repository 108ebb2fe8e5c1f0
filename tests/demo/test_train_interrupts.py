"""Fault injection for `fastguide train`: an interrupt at any point of a step (SIGINT, an undeferred
KeyboardInterrupt, SIGKILL) never leaves an inconsistent checkpoint, and resuming reproduces the uninterrupted
run bit for bit. Also: a fresh run never replaces an existing checkpoint unless asked to."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastguide.demo import train as train_module
from fastguide.demo.train import CHECKPOINT_FILE, DiffusionConfig, train_diffusion
from fastguide.demo.unet import DigitsUNet
from fastguide.interrupts import Interrupted

CONFIG = DiffusionConfig(steps=8, batch_size=8, channels=8, warmup_steps=2, checkpoint_every=3)
INTERRUPTED_STEP = 4  # 0-based: the fifth step, between the checkpoints after steps 3 and 6


def checkpoint_state(out: Path) -> dict:
    return load_file(str(out / CHECKPOINT_FILE))


def checkpoint_step(out: Path) -> int | None:
    from safetensors import safe_open

    if not (out / CHECKPOINT_FILE).exists():
        return None
    with safe_open(str(out / CHECKPOINT_FILE), framework="pt") as f:
        return int(f.metadata()["step"])


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    train_diffusion(CONFIG, out, progress=False)
    return checkpoint_state(out)


# Where in a step the interrupt lands: a call inside train_step that is wrapped to interrupt around it.
POINTS = {
    "batch": (train_module, "diffusion_batch"),
    "forward": (DigitsUNet, "forward"),
    "backward": (torch.Tensor, "backward"),
    "clip": (torch.nn.utils, "clip_grad_norm_"),
    "optimizer": (torch.optim.AdamW, "step"),
    "ema": (train_module, "ema_update"),
}


def interrupt_at(monkeypatch, point: str, when: str, interrupt) -> None:
    """Make the ``INTERRUPTED_STEP``-th call of the point's function ``interrupt()`` before or after it runs."""
    owner, name = POINTS[point]
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kw):
        hit = calls["n"] == INTERRUPTED_STEP
        calls["n"] += 1
        if hit and when == "before":
            interrupt()
        out = original(*args, **kw)
        if hit and when == "after":
            interrupt()
        return out

    monkeypatch.setattr(owner, name, wrapped)


def interrupted_run(out, monkeypatch, point: str, when: str, interrupt) -> KeyboardInterrupt:
    """Train CONFIG into ``out`` with ``interrupt`` injected at ``point``; the KeyboardInterrupt it ends with."""
    with monkeypatch.context() as m:
        interrupt_at(m, point, when, interrupt)
        with pytest.raises(KeyboardInterrupt) as stop:
            train_diffusion(CONFIG, out, progress=False)
    return stop.value


def sigint():
    os.kill(os.getpid(), signal.SIGINT)


def undeferred():
    raise KeyboardInterrupt  # as if no handler could defer it (another thread, a second Ctrl-C)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("point", list(POINTS))
def test_sigint_anywhere_in_a_step_saves_the_completed_step_and_resume_is_exact(tmp_path, monkeypatch, uninterrupted,
                                                                               point, when):
    stop = interrupted_run(tmp_path, monkeypatch, point, when, sigint)
    assert isinstance(stop, Interrupted) and stop.done == INTERRUPTED_STEP + 1  # the step finished, then saved
    assert checkpoint_step(tmp_path) == INTERRUPTED_STEP + 1
    train_diffusion(CONFIG, tmp_path, resume=True, progress=False)
    assert_same_state(checkpoint_state(tmp_path), uninterrupted)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("point", list(POINTS))
def test_an_undeferred_interrupt_keeps_the_last_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, uninterrupted,
                                                                              point, when):
    stop = interrupted_run(tmp_path, monkeypatch, point, when, undeferred)
    assert not isinstance(stop, Interrupted)
    last = INTERRUPTED_STEP // CONFIG.checkpoint_every * CONFIG.checkpoint_every
    assert checkpoint_step(tmp_path) == last  # written by the last periodic save, not by the interrupted step
    train_diffusion(CONFIG, tmp_path, resume=True, progress=False)
    assert_same_state(checkpoint_state(tmp_path), uninterrupted)


def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch):
    stop = interrupted_run(tmp_path, monkeypatch, "forward", "before", lambda: (sigint(), sigint()))
    assert not isinstance(stop, Interrupted)
    assert checkpoint_step(tmp_path) == 3


CHILD = """
import sys
from fastguide.demo import train
from fastguide.demo.train import DiffusionConfig, train_diffusion
step = train.train_step
def loud(state, *a, **k):
    loss = step(state, *a, **k)
    print(state.step, flush=True)
    return loss
train.train_step = loud
cfg = DiffusionConfig(steps=8, batch_size=8, channels=8, warmup_steps=2, checkpoint_every=1)
train_diffusion(cfg, sys.argv[1], resume=sys.argv[2] == "resume", progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 4, 7])
def test_sigkill_mid_run_then_resume_is_exact(tmp_path, kill_after):
    """A killed process (no handler runs) leaves the last atomic checkpoint; resuming completes the run exactly."""
    cfg = DiffusionConfig(steps=8, batch_size=8, channels=8, warmup_steps=2, checkpoint_every=1)
    want_dir = tmp_path / "whole"
    train_diffusion(cfg, want_dir, progress=False)
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), "fresh"], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if int(line) >= kill_after:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    done = checkpoint_step(out)  # None: killed before the first checkpoint landed
    assert done is None or done >= kill_after - 1
    train_diffusion(cfg, out, resume=done is not None, progress=False)
    assert_same_state(checkpoint_state(out), checkpoint_state(want_dir))


def test_a_fresh_run_never_replaces_an_existing_checkpoint(tmp_path):
    cfg = DiffusionConfig(steps=4, batch_size=8, channels=8, warmup_steps=2, checkpoint_every=2)
    train_diffusion(cfg, tmp_path, progress=False, stop_after=3)
    before = checkpoint_state(tmp_path)
    with pytest.raises(FileExistsError, match=r"^out: .*--resume.*--overwrite"):
        train_diffusion(cfg, tmp_path, progress=False)
    assert_same_state(checkpoint_state(tmp_path), before)
    train_diffusion(cfg, tmp_path, progress=False, overwrite=True, stop_after=1)
    assert checkpoint_step(tmp_path) == 1


def test_cli_refuses_to_overwrite_a_training_run(tmp_path, capsys):
    from fastguide.cli import main

    cfg = DiffusionConfig(steps=4, batch_size=8, channels=8, warmup_steps=2, checkpoint_every=2)
    train_diffusion(cfg, tmp_path, progress=False, stop_after=3)
    before = checkpoint_state(tmp_path)
    assert main(["train", "--out", str(tmp_path), "--steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(tmp_path), "--resume", "--overwrite"]) == 2
    assert "--overwrite: contradicts --resume" in capsys.readouterr().err
    assert_same_state(checkpoint_state(tmp_path), before)
