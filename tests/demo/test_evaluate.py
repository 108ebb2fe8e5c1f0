"""The digits metrics (fastguide.demo.evaluate): the Frechet distance against closed forms and scipy, the
expectation shift and variance ratio of known transforms, and the evaluator on real held-out digits."""
import numpy as np
import pytest
import torch

from fastguide.demo.evaluate import (DigitsEvaluator, expectation_shift, frechet_distance, gaussian_stats,
                                     variance_ratio)


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


def test_metrics_from_sums_over_parts_equal_the_whole_set(split):
    """MetricSums of a set cut into uneven parts (one of a single sample), added, give the metrics of the whole set
    scored at once: exactly for the pixel statistics and accuracy, to float32 feature rounding for the Frechet
    distance (the classifier sees other batches)."""
    ev = DigitsEvaluator()
    gen = torch.Generator().manual_seed(0)
    images = (split.heldout_images[:90] + 0.3 * torch.randn(90, 1, 8, 8, generator=gen)).clamp(-1, 1)
    labels = split.heldout_labels[:90]
    want = ev(images, labels)
    sums = ev.empty_sums()
    for lo, hi in ((0, 1), (1, 37), (37, 90)):
        sums = sums + ev.sums(images[lo:hi], labels[lo:hi])
    got = ev.from_sums(sums)
    for key in ("expectation_shift", "variance_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-7)  # the evaluator's mean is float32
    assert got["frechet_distance"] == pytest.approx(want["frechet_distance"], rel=1e-6)
    assert 0 < want["accuracy"] < 1 and want["frechet_distance"] > 0  # the noise made the metrics non-trivial
    with pytest.raises(ValueError, match="sums: need at least 2 samples"):
        ev.from_sums(ev.sums(images[:1], labels[:1]))
