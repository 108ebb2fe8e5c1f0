"""The embedded digits default: data split, shipped model / classifier / tables, metrics, training + resume."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastguide import NoiseSchedule
from fastguide.demo.data import load_digits_split, stratified_heldout_mask
from fastguide.demo.evaluate import (DigitsEvaluator, evaluate_samples, expectation_shift, frechet_distance,
                                gaussian_stats, variance_ratio)
from fastguide.demo import digits
from fastguide.demo.train import CHECKPOINT_FILE, DiffusionConfig, train_diffusion


@pytest.fixture(scope="module")
def model():
    return digits.load_digits_model()


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


# ---------------------------------------------------------------------- data
def test_split_is_fixed_stratified_and_disjoint(split):
    again = load_digits_split()
    assert torch.equal(split.heldout_images, again.heldout_images)
    assert split.train_images.shape == (1438, 1, 8, 8) and split.heldout_images.shape == (359, 1, 8, 8)
    assert float(split.train_images.min()) == -1.0 and float(split.train_images.max()) == 1.0
    from sklearn.datasets import load_digits
    y = load_digits().target
    held_counts = np.bincount(split.heldout_labels.numpy(), minlength=10)
    assert held_counts.tolist() == [int(round(0.2 * n)) for n in np.bincount(y)]
    mask = stratified_heldout_mask(y, 0.2, 0)
    assert not np.array_equal(mask, stratified_heldout_mask(y, 0.2, 1))  # the seed matters
    # no image appears in both halves (digits has a few exact duplicates, so compare by index via the mask)
    assert mask.sum() == 359 and (~mask).sum() == 1438


# ---------------------------------------------------------------------- shipped assets
def test_shipped_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in digits.ASSETS_DIR.iterdir() if p.is_file())
    assert total <= 5 * 2**20


def test_shipped_model_samples_deterministically(model):
    labels = torch.tensor([0, 3, 7, 7])
    a = digits.sample_digits(model, labels, [1, 2, 3, 4], rule="cfg", scale=3.0, steps=4)
    b = digits.sample_digits(model, labels, [1, 2, 3, 4], rule="cfg", scale=3.0, steps=4)
    c = digits.sample_digits(model, labels, [1, 2, 3, 5], rule="cfg", scale=3.0, steps=4)
    assert a.shape == (4, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert torch.equal(a[:3], c[:3]) and not torch.equal(a[3], c[3])  # a sample depends only on its own seed


def test_guided_samples_are_classified_as_requested(model):
    # Measured with the shipped model (DDIM 10 steps, g = 3, 20 per digit): CFG 0.99-1.0 accuracy, the
    # least-squares ReCFG table the same; the classifier itself is 0.989 on held-out real digits.
    # 0.9 leaves room for seed noise (200 samples: one standard error is ~0.7 points at 0.99) and is
    # 9x chance (0.1): a broken model, label mix-up or null-label swap lands far below it.
    labels = torch.arange(10).repeat_interleave(20)
    seeds = list(range(200))
    tables = digits.load_digits_tables()
    for rule in ("cfg", "recfg-ls"):
        x = digits.sample_digits(model, labels, seeds, rule=rule, scale=3.0, steps=10, tables=tables)
        acc = evaluate_samples(x, labels)["accuracy"]
        assert acc >= 0.9, (rule, acc)


def test_every_rule_is_the_conditional_model_at_scale_one(model):
    # (1 - g) R = 0 at g = 1, which the demo relies on to share its g = 1 samples between rules
    labels, seeds = torch.arange(10), list(range(10))
    tables = digits.load_digits_tables()
    cfg = digits.sample_digits(model, labels, seeds, rule="cfg", scale=1.0, steps=5)
    for rule in ("recfg-paper", "recfg-ls"):
        x = digits.sample_digits(model, labels, seeds, rule=rule, scale=1.0, steps=5, tables=tables)
        torch.testing.assert_close(x, cfg, rtol=0, atol=1e-6)
        assert not torch.allclose(digits.sample_digits(model, labels, seeds, rule=rule, scale=3.0, steps=5,
                                                       tables=tables), cfg, atol=1e-3)


def test_unconditional_label_is_not_a_digit(model):
    # The null label must not behave like any class: the conditional samples of digit 1 and the
    # unconditional samples from the same seeds differ.
    seeds = list(range(20))
    cond = digits.sample_digits(model, torch.ones(20, dtype=torch.long), seeds, scale=1.0, steps=10)
    from fastguide import CFG, DDIM, Sampler, seeded_noise
    uncond = Sampler(model, DDIM(digits.digits_schedule(), steps=10), CFG(1.0), null_cond=10).sample(
        seeded_noise(seeds, (1, 8, 8)), torch.full((20,), 10))
    assert (cond - uncond).abs().mean() > 0.1


def test_tables_load_with_the_shipped_schedule():
    tables = digits.load_digits_tables()
    assert set(tables) == {"paper", "least_squares"}
    for est, table in tables.items():
        assert table.ratios.shape == (11, len(digits.TABLE_TIMESTEPS), 1, 8, 8)
        assert table.metadata["estimator"] == est
        assert torch.isfinite(table.ratios).all()
        # every trailing-spaced timestep of a 10-step DDIM run lies inside the table's grid
        steps, w = table.step_rows(digits.digits_schedule().timesteps(10))
        assert torch.all(w == 0)
    with pytest.raises(ValueError, match="schedule"):
        from fastguide.table import RatioTable
        RatioTable.load(digits.asset_path(digits.TABLE_FILES["paper"]), schedule=NoiseSchedule.cosine())


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    missing = r"model: digits model file .*nope.safetensors not found \(run `fastguide train --out DIR`"
    with pytest.raises(FileNotFoundError, match=missing):
        digits.load_digits_model(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="classifier: .*bad.safetensors is not a readable safetensors file"):
        digits.load_digits_classifier(bad)
    with pytest.raises(ValueError, match="format"):  # a table file is not a model
        digits.load_digits_model(digits.asset_path(digits.TABLE_FILES["paper"]))


def test_shipped_classifier_heldout_accuracy(split):
    clf = digits.load_digits_classifier()
    with torch.no_grad():
        acc = (clf(split.heldout_images).argmax(1) == split.heldout_labels).float().mean()
    assert acc >= 0.97  # measured 0.989 (355 / 359)


# ---------------------------------------------------------------------- metrics
def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 6, generator=g, dtype=torch.float64)
    mu, cov = gaussian_stats(feats)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    # diagonal (commuting) covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, -1.0, 2.5])
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general (non-commuting) covariances against scipy's matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    m1, m2 = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    c1, c2 = m1 @ m1.T + 0.1 * torch.eye(4, dtype=torch.float64), m2 @ m2.T + 0.1 * torch.eye(4, dtype=torch.float64)
    root = scipy_linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(np.trace(c1.numpy() + c2.numpy() - 2 * root))
    assert frechet_distance(torch.zeros(4), c1, torch.zeros(4), c2) == pytest.approx(expected, rel=1e-8)


def test_expectation_shift_and_variance_ratio_of_known_transforms(split):
    real, labels = split.heldout_images.double(), split.heldout_labels
    offset = torch.linspace(-0.5, 0.5, 64, dtype=torch.float64).view(1, 1, 8, 8)
    assert expectation_shift(real + offset, labels, real, labels) == pytest.approx(float(offset.norm()), rel=1e-9)
    assert expectation_shift(real, labels, real, labels) == pytest.approx(0.0, abs=1e-12)
    # scaling each class around its own mean by 2 multiplies its variance by 4 and keeps its mean
    means = torch.stack([real[labels == c].mean(0) for c in range(10)])[labels]
    spread = means + 2 * (real - means)
    assert variance_ratio(spread, labels, real, labels) == pytest.approx(4.0, rel=1e-9)
    assert expectation_shift(spread, labels, real, labels) == pytest.approx(0.0, abs=1e-9)


def test_evaluator_on_real_heldout_digits(split):
    ev = DigitsEvaluator()
    m = ev(split.heldout_images, split.heldout_labels)
    assert m["accuracy"] >= 0.97
    assert m["expectation_shift"] == pytest.approx(0.0, abs=1e-6)
    assert m["variance_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert m["frechet_distance"] == pytest.approx(0.0, abs=1e-3)
    # the train split is a different sample of the same distribution: small but non-zero distance
    m_train = ev(split.train_images, split.train_labels)
    assert 0 < m_train["frechet_distance"] < 5 and m_train["expectation_shift"] < 1
    # a blank image set is far from the digits
    blank = -torch.ones(100, 1, 8, 8) + 0.01 * torch.randn(100, 1, 8, 8)
    assert ev(blank, torch.arange(10).repeat(10))["frechet_distance"] > 10 * m_train["frechet_distance"]
    with pytest.raises(ValueError, match="labels"):
        ev(split.heldout_images[:4], torch.tensor([0, 1, 2, 11]))
    with pytest.raises(ValueError, match="labels"):
        ev(split.heldout_images[:4], torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------- training
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
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_diffusion(_tiny(), tmp_path / "empty", resume=True, progress=False)
    with pytest.raises(ValueError, match="p_uncond"):
        _tiny(p_uncond=1.5).check()


def test_training_facts_are_recorded():
    facts = digits.load_training_facts()
    assert facts["classifier"]["heldout_accuracy"] >= 0.97
    assert facts["unet"]["finished"] and json.dumps(facts)
