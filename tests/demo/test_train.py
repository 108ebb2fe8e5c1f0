"""Training the digits model (fastguide.demo.train): a resumed run reproduces an uninterrupted one bit for bit,
and resuming with another config or without a checkpoint is refused."""
import pytest
import torch
from safetensors.torch import load_file

from fastguide.demo import digits
from fastguide.demo.train import CHECKPOINT_FILE, DiffusionConfig, train_diffusion


def _tiny(**kw):
    return DiffusionConfig(**{"steps": 6, "batch_size": 8, "channels": 8, "checkpoint_every": 2, "warmup_steps": 2,
                              **kw})


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    full.mkdir(), parts.mkdir()
    r = train_diffusion(_tiny(), full, progress=False)
    assert r["finished"] and r["step"] == 6
    first = train_diffusion(_tiny(), parts, stop_after=4, progress=False)
    assert not first["finished"] and first["step"] == 4
    assert not (parts / digits.UNET_FILE).exists()
    second = train_diffusion(_tiny(), parts, resume=True, progress=False)
    assert second["finished"] and second["step"] == 6
    a, b = load_file(str(full / CHECKPOINT_FILE)), load_file(str(parts / CHECKPOINT_FILE))
    assert a.keys() == b.keys() and any(k.startswith("opt.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the weights did move away from their initialisation
    init = train_diffusion(_tiny(steps=1), tmp_path, progress=False)
    assert init["step"] == 1
    c = load_file(str(tmp_path / CHECKPOINT_FILE))
    assert not torch.equal(c["model.conv_in.weight"], a["model.conv_in.weight"])
    # the finished model loads through the public loader and runs
    m = digits.load_digits_model(full / digits.UNET_FILE)
    out = m(torch.randn(3, 1, 8, 8), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_resume_rejects_a_different_config_or_missing_checkpoint(tmp_path):
    train_diffusion(_tiny(), tmp_path, stop_after=2, progress=False)
    with pytest.raises(ValueError, match="different config"):
        train_diffusion(_tiny(seed=1), tmp_path, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match=r"^resume: training checkpoint file .*empty.* not found"):
        train_diffusion(_tiny(), tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(ValueError, match="p_uncond"):
        _tiny(p_uncond=1.5).check()
