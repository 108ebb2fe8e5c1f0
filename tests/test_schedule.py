"""NoiseSchedule: beta schedules, zero-terminal-SNR rescale, diffusers-config import and timestep spacings, and
the errors unsupported configs and bad betas raise.

Expected values come from closed forms (numpy / math) or from diffusers itself, never from fastguide.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

import fastguide as fg

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE_CONFIGS = [
    pytest.param({}, id="linear"),
    pytest.param(SD_BETAS, id="scaled_linear"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2"), id="cosine"),
    pytest.param(dict(rescale_betas_zero_snr=True), id="linear-zero_snr"),
    pytest.param(dict(SD_BETAS, rescale_betas_zero_snr=True), id="scaled_linear-zero_snr"),
    pytest.param(dict(num_train_timesteps=200, beta_start=0.001, beta_end=0.03), id="linear-200"),
]


def _cosine_f(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


# ------------------------------------------------------------------ constructors against closed forms
def test_alphas_cumprod_is_float64_on_cpu():
    for sched in (fg.NoiseSchedule.linear(), fg.NoiseSchedule.from_diffusers({}),
                  fg.NoiseSchedule.from_diffusers({}, float32_arithmetic=True)):
        assert sched.alphas_cumprod.dtype == torch.float64
        assert sched.alphas_cumprod.device.type == "cpu"
        assert sched.num_train_timesteps == 1000


def test_linear_matches_numpy_cumprod():
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = np.cumprod(1.0 - betas)
    got = fg.NoiseSchedule.linear().alphas_cumprod.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_scaled_linear_matches_numpy_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    got = fg.NoiseSchedule.scaled_linear().alphas_cumprod.numpy()
    np.testing.assert_allclose(got, np.cumprod(1.0 - betas), rtol=1e-13, atol=0)


def test_cosine_matches_closed_form_until_the_beta_cap():
    n = 1000
    abar = fg.NoiseSchedule.cosine(n).alphas_cumprod.numpy()
    # abar_t = f((t + 1) / n) / f(0) wherever beta is below its 0.999 cap (everywhere but the last step).
    expected = np.array([_cosine_f((t + 1) / n) / _cosine_f(0.0) for t in range(n - 1)])
    np.testing.assert_allclose(abar[:-1], expected, rtol=1e-10, atol=1e-18)
    assert abar[-1] == pytest.approx(abar[-2] * (1 - 0.999), rel=1e-12)


def test_from_betas_keeps_explicit_betas():
    betas = np.linspace(0.001, 0.05, 50)
    sched = fg.NoiseSchedule.from_betas(betas)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-14)


def test_zero_snr_rescale_is_affine_in_sqrt_abar_and_ends_at_zero():
    base = fg.NoiseSchedule.scaled_linear()
    resc = base.rescaled_zero_snr()
    old, new = base.alphas_cumprod.sqrt().numpy(), resc.alphas_cumprod.sqrt().numpy()
    assert resc.alphas_cumprod[-1].item() == 0.0
    assert new[0] == pytest.approx(old[0], rel=1e-12)
    expected = (old - old[-1]) * old[0] / (old[0] - old[-1])  # Lin et al. 2023, Algorithm 1
    np.testing.assert_allclose(new, expected, rtol=1e-9, atol=1e-12)


def test_zero_snr_rescale_matches_diffusers_function_in_float64():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ours = fg.NoiseSchedule.from_betas(betas.numpy()).rescaled_zero_snr().betas
    theirs = diffusers_rescale(betas.clone())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ diffusers import
@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS)
def test_from_diffusers_alphas_cumprod_close_to_diffusers(cfg):
    ours = fg.NoiseSchedule.from_diffusers(cfg).alphas_cumprod
    theirs = DDIMScheduler(**cfg).alphas_cumprod.double()
    diff = (ours - theirs).abs().max().item()
    # diffusers rounds to float32: the float64 schedule differs by about 1e-7 (<= 1e-5), but it does differ,
    # which is what makes a 1e-4 bound on whole samples a meaningful test (a wrong timestep moves ~1e-1).
    assert diff <= 1e-5
    assert diff > 1e-10


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS)
def test_float32_arithmetic_reproduces_diffusers_bit_for_bit(cfg):
    ours = fg.NoiseSchedule.from_diffusers(cfg, float32_arithmetic=True).alphas_cumprod
    theirs = DDIMScheduler(**cfg).alphas_cumprod
    assert ours.dtype == torch.float64
    assert torch.equal(ours.float(), theirs)
    assert torch.equal(ours, theirs.double())  # float32 values held exactly in float64


def test_trained_betas_from_config():
    betas = np.linspace(2e-4, 0.03, 300)
    cfg = dict(num_train_timesteps=300, trained_betas=betas.tolist())
    ours = fg.NoiseSchedule.from_diffusers(cfg).alphas_cumprod.numpy()
    np.testing.assert_allclose(ours, np.cumprod(1 - betas), rtol=1e-13)
    np.testing.assert_allclose(ours, DDIMScheduler(**cfg).alphas_cumprod.double().numpy(), atol=1e-6)


def test_from_diffusers_takes_a_scheduler_config_as_it_is():
    """scheduler.config (a FrozenDict with _class_name / _diffusers_version) is accepted unchanged."""
    ddim = DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                         prediction_type="v_prediction", timestep_spacing="trailing")
    sched = fg.NoiseSchedule.from_diffusers(ddim.config)
    assert (sched.timestep_spacing, sched.steps_offset, sched.set_alpha_to_one, sched.clip_sample,
            sched.prediction_type) == ("trailing", 1, False, False, "v_prediction")
    assert sched.final_alpha_cumprod == pytest.approx(float(ddim.final_alpha_cumprod), rel=1e-6)
    config_with_metadata = dict(ddim.config, _class_name="DDIMScheduler", _diffusers_version="0.42.1")
    assert fg.NoiseSchedule.from_diffusers(config_with_metadata).timestep_spacing == "trailing"

    ddpm = DDPMScheduler(variance_type="fixed_large", clip_sample_range=2.0)
    sched = fg.NoiseSchedule.from_diffusers(ddpm.config)
    assert (sched.variance_type, sched.clip_sample, sched.clip_sample_range) == ("fixed_large", True, 2.0)


def test_from_diffusers_defaults_are_diffusers_defaults():
    sched = fg.NoiseSchedule.from_diffusers({})
    d = DDIMScheduler().config
    assert sched.clip_sample is d.clip_sample is True
    assert sched.set_alpha_to_one is d.set_alpha_to_one is True
    assert (sched.timestep_spacing, sched.steps_offset, sched.prediction_type, sched.clip_sample_range) == (
        d.timestep_spacing, d.steps_offset, d.prediction_type, d.clip_sample_range)
    assert sched.final_alpha_cumprod == 1.0
    no_one = fg.NoiseSchedule.from_diffusers(dict(set_alpha_to_one=False))
    assert no_one.final_alpha_cumprod == no_one.alphas_cumprod[0].item()


# ------------------------------------------------------------------ timesteps
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 10, 25, 50, 999, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers_set_timesteps(spacing, steps, offset):
    cfg = dict(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset == 1 and steps == 1000:
        with pytest.raises(ValueError, match="steps_offset"):
            fg.NoiseSchedule.from_diffusers(cfg).timesteps(steps)
        return
    ours = fg.NoiseSchedule.from_diffusers(cfg).timesteps(steps)
    for scheduler in (DDIMScheduler(**cfg), DDPMScheduler(**cfg)):
        scheduler.set_timesteps(steps)
        assert np.array_equal(ours, scheduler.timesteps.numpy()), (ours[:6], scheduler.timesteps[:6])
    assert ours.dtype == np.int64 and len(ours) == steps
    assert (np.diff(ours) < 0).all()


def test_timesteps_for_a_200_step_schedule():
    cfg = dict(num_train_timesteps=200, timestep_spacing="trailing")
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(7)
    assert np.array_equal(fg.NoiseSchedule.from_diffusers(cfg).timesteps(7), ref.timesteps.numpy())


def test_fingerprint_identifies_the_schedule():
    a, b = fg.NoiseSchedule.linear(), fg.NoiseSchedule.linear()
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != fg.NoiseSchedule.scaled_linear().fingerprint()
    assert a.fingerprint() != fg.NoiseSchedule.linear(beta_end=0.0201).fingerprint()


# ------------------------------------------------------------------ bad input: diffusers configs and betas
def test_unsupported_diffusers_settings():
    with pytest.raises(ValueError, match="config: thresholding=True"):
        fg.NoiseSchedule.from_diffusers(dict(thresholding=True))
    with pytest.raises(ValueError, match=r"config: unsupported scheduler keys \['karras_sigmas'\]"):
        fg.NoiseSchedule.from_diffusers(dict(karras_sigmas=True))
    with pytest.raises(ValueError, match="config: beta_schedule 'sigmoid' is not supported"):
        fg.NoiseSchedule.from_diffusers(dict(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="config: variance_type 'learned_range' is not supported"):
        fg.NoiseSchedule.from_diffusers(dict(variance_type="learned_range"))
    with pytest.raises(ValueError, match=r"config: trained_betas has shape \(5,\), expected \(1000,\)"):
        fg.NoiseSchedule.from_diffusers(dict(trained_betas=[0.1] * 5))


def test_bad_betas():
    with pytest.raises(ValueError, match="betas: expected finite values in"):
        fg.NoiseSchedule.from_betas([0.1, 1.5, 0.2])
    with pytest.raises(ValueError, match="betas: expected a 1-D sequence"):
        fg.NoiseSchedule.from_betas([[0.1, 0.2]])
    with pytest.raises(ValueError, match="num_train_timesteps: expected an int >= 2"):
        fg.NoiseSchedule.linear(num_train_timesteps=1)
