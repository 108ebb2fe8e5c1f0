"""Fault injection for ratio-table builds: Ctrl-C anywhere in an image batch finishes the batch, writes the
checkpoint and stops; an undeferred interrupt keeps the last checkpoint; either way the resumed build's sums equal
an uninterrupted build's bit for bit (the SIGKILL case is in test_table_build_distributed.py)."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide import table_build
from fastguide.interrupts import Interrupted
from fastguide.table_build import RatioSums, accumulate_ratio_sums

SCHED = fg.NoiseSchedule.linear()
GRID = np.array([20, 400, 900])
SHAPE = (2, 3, 3)
BATCHES, EVERY, HIT = 6, 2, 3  # image batches, checkpoint every 2, the interrupt lands in batch 3 (0-based)


def model(x, t, c):
    return torch.tanh(x * 0.7 + 0.3 * c.to(x.dtype).view(-1, 1, 1, 1) + (t / 1000).view(-1, 1, 1, 1))


def build(checkpoint, net=model):
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(2 * 3 * BATCHES, *SHAPE, generator=gen, dtype=torch.float64)
    labels = torch.arange(2 * 3 * BATCHES) % 3
    return accumulate_ratio_sums(net, SCHED, images, labels, timesteps=GRID, num_classes=3, samples_per_class=2 * BATCHES,
                                 null_cond=3, batch_size=6, checkpoint=checkpoint, checkpoint_every=EVERY,
                                 progress=False)


def batches_done(path) -> int:
    return int(RatioSums.load(path).metadata["batches_done"])


def assert_same_sums(a: RatioSums, b: RatioSums) -> None:
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


@pytest.fixture(scope="module")
def uninterrupted():
    return build(None)


def interrupting_model(interrupt, at_call: int, when: str):
    calls = {"n": 0}

    def net(x, t, c):
        hit = calls["n"] == at_call
        calls["n"] += 1
        if hit and when == "before":
            interrupt()
        out = model(x, t, c)
        if hit and when == "after":
            interrupt()
        return out

    return net


def sigint():
    os.kill(os.getpid(), signal.SIGINT)


def undeferred():
    raise KeyboardInterrupt


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("grid_point", range(len(GRID)))  # which of the batch's forwards (one per timestep)
def test_sigint_in_a_batch_checkpoints_it_and_resume_is_exact(tmp_path, uninterrupted, grid_point, when):
    ckpt = tmp_path / "sums.safetensors"
    net = interrupting_model(sigint, HIT * len(GRID) + grid_point, when)
    with pytest.raises(Interrupted) as stop:
        build(ckpt, net)
    assert stop.value.done == HIT + 1 and batches_done(ckpt) == HIT + 1
    assert_same_sums(build(ckpt), uninterrupted)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("grid_point", range(len(GRID)))
def test_an_undeferred_interrupt_keeps_the_last_checkpoint(tmp_path, uninterrupted, grid_point, when):
    ckpt = tmp_path / "sums.safetensors"
    with pytest.raises(KeyboardInterrupt) as stop:
        build(ckpt, interrupting_model(undeferred, HIT * len(GRID) + grid_point, when))
    assert not isinstance(stop.value, Interrupted)
    assert batches_done(ckpt) == HIT // EVERY * EVERY
    assert_same_sums(build(ckpt), uninterrupted)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupt_while_a_checkpoint_is_written(tmp_path, monkeypatch, uninterrupted, when):
    """The atomic write either lands whole or not at all: a resumed build is exact either way."""
    ckpt = tmp_path / "sums.safetensors"
    original, calls = table_build.atomic_save, {"n": 0}

    def saving(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2 and when == "before":
            raise KeyboardInterrupt
        original(*args, **kw)
        if calls["n"] == 2 and when == "after":
            raise KeyboardInterrupt

    monkeypatch.setattr(table_build, "atomic_save", saving)
    with pytest.raises(KeyboardInterrupt):
        build(ckpt)
    assert batches_done(ckpt) == (2 * EVERY if when == "after" else EVERY)
    monkeypatch.undo()
    assert_same_sums(build(ckpt), uninterrupted)


def test_sigint_without_a_checkpoint_stops_and_says_so(capsys):
    with pytest.raises(Interrupted) as stop:
        build(None, interrupting_model(sigint, 1, "before"))
    assert stop.value.done == 1 and stop.value.checkpoint is None
